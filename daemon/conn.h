/* conn.h -- one client connection: its socket, the frames read from it
 * and the replies queued for it (conn.c), and the state the session layer
 * keeps per connection (session.h owns those fields' meaning).
 * Private to the daemon.
 *
 * The layers, top to bottom, each calling only downwards:
 *   server.c (accept, Hello, Stats, dispatch through request.c's table)
 *   -> the session layer (models.c, jobs.c, pins.c, session.c)
 *   -> conn.c (replies, settling, closing) -> counters.c.
 * conn.c reaches up only through the two ops the server gives each client:
 * what to do with a frame, and what a closed connection leaves to undo.
 *
 * Lifetime: a client is referenced by its connection (dropped once libuv
 * has closed the poll handle) and by every job on the thread pool; it is
 * freed when the last reference goes, so a job that finishes after its
 * client disconnected still finds c->closed and drops its reply.
 * Everything here runs on the loop's thread.
 */
#ifndef VQKVD_CONN_H
#define VQKVD_CONN_H

#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "frame.h"
#include "state.h"
#include "vqkv_proto.h"

/* Welcome.tenant_salt: a SHA-256. */
#define VQKVD_SALT_BYTES 32
/* Hello.client_name may be this long. */
#define VQKVD_NAME_MAX 64
/* Models one connection may register. */
#define VQKVD_CLIENT_MAX_MODELS 64
/* Blocks one connection may hold pinned with ttl_ms 0 (until Unpin or close). */
#define VQKVD_CLIENT_MAX_PINS 65536

/* What the server does with a connection's events (conn.c calls them;
 * they must not free c). */
typedef struct {
    /* A whole frame was read; takes it (vqkv_frame_clear). */
    void (*frame)(vqkvd_client_t *c, vqkv_frame_t *frame);
    /* c is closing: unlink it from the server and undo its session state
     * (leases, pins, regions). Called once, before its socket closes. */
    void (*gone)(vqkvd_client_t *c);
} vqkvd_conn_ops_t;

/* One reply waiting for the socket: a whole encoded frame. */
typedef struct vqkvd_out {
    struct vqkvd_out *next;
    uint8_t *buf;
    size_t len, off; /* off bytes already written */
    int counted;     /* the reply of a request counted in inflight */
} vqkvd_out_t;

struct vqkvd_client {
    vqkvd_server_t *server;
    const vqkvd_conn_ops_t *ops;
    vqkvd_client_t *prev, *next;
    uint64_t id; /* also the owner of its leases */
    uint32_t refs;
    int fd;
    uv_poll_t poll;
    int events; /* the events poll is started with; 0 when stopped */
    vqkv_frame_reader_t reader;

    pid_t pid; /* SO_PEERCRED, at connect time */
    uid_t uid;
    gid_t gid;
    char tenant[16]; /* the uid in decimal */
    uint8_t salt[VQKVD_SALT_BYTES];
    char name[VQKVD_NAME_MAX + 1]; /* Hello.client_name */
    int hello_done;

    vqkvd_out_t *out_head, *out_tail;
    uint32_t out_count;
    uint32_t inflight; /* requests whose reply is queued, not yet written */
    uint32_t pending;  /* requests on the thread pool, not yet replied */

    uint32_t models[VQKVD_CLIENT_MAX_MODELS]; /* ids this connection registered */
    uint32_t n_models;
    struct vqkvd_region *regions; /* session.h */
    uint32_t n_regions;
    uint64_t next_region;
    uint64_t *pieces; /* imported from RegionPieces, for the next RegisterRegion */
    uint32_t n_pieces, cap_pieces;
    struct vqkvd_pin *pins; /* ttl_ms 0 pins: a table of cap_pins (a power of 2) */
    uint32_t n_pins, cap_pins;

    int closing; /* write what is queued, then close; read nothing more */
    int dead;    /* close now: the socket failed */
    int closed;  /* uv_close called; freed when refs reach 0 */
};

/* Queues env as the reply to a request counted in inflight (every
 * admitted request gets exactly one, this or vqkvd_client_error). Nothing
 * is sent to a closed client. */
void vqkvd_client_reply(vqkvd_client_t *c, Vqkv__Envelope *env);
/* Queues an Error reply (counted, like vqkvd_client_reply); logged at debug
 * and counted by code for the metrics. */
void vqkvd_client_error(vqkvd_client_t *c, uint64_t request_id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Queues an Error that answers no admitted request: one refused before
 * it was let in (VQKV_ELIMIT), or a connection refused or revoked
 * (request_id 0). Not counted in inflight. */
void vqkvd_client_refuse(vqkvd_client_t *c, uint64_t request_id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* After any work on c: writes what the socket takes, then closes c or
 * watches for what it needs next. Call it once c's poll handle is
 * initialised (poll.data = c). */
void vqkvd_client_settle(vqkvd_client_t *c);
/* Closes c now (ops->gone, then the socket once libuv lets go). Safe twice. */
void vqkvd_client_close(vqkvd_client_t *c);
/* Drops a reference; the last one frees c. */
void vqkvd_client_unref(vqkvd_client_t *c);

#endif
