/* server.h -- vqkvd's server: the listening Unix socket, the connected
 * clients and the requests they send, all driven by one libuv loop.
 *
 * Everything the server holds lives in one vqkvd_server_t (Redis-style: one
 * explicit struct, no hidden globals), so a test or a later in-process
 * harness can run one next to anything else on a loop of its own. Nothing
 * in here blocks: the listening socket and every client socket are
 * non-blocking, read through uv_poll_t, and replies wait in a per-client
 * queue until the socket takes them.
 *
 * The server is single-threaded and not thread-safe: every call below must
 * come from the loop's thread.
 */
#ifndef VQKVD_SERVER_H
#define VQKVD_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "frame.h"
#include "state.h"
#include "vqkv_proto.h"

/* Fills cfg with the defaults (socket_path NULL, listen_fd -1): config.c,
 * from its table of keys. */
void vqkvd_config_defaults(vqkvd_config_t *cfg);

/* Creates the backend, the pool (cfg->pool_bytes) and the store with the
 * quotas, binds and listens on cfg->socket_path (mode 0660), or takes
 * cfg->listen_fd, and starts accepting on loop. A socket file left by a
 * dead daemon is replaced; one a live daemon listens on is not
 * (s->sys_errno EADDRINUSE), nor a path that is not a socket (EEXIST).
 * Returns VQKV_OK or a VQKV_E* code as every daemon function does:
 * VQKV_EINVAL (a config it cannot run), VQKV_ENOMEM, VQKV_EIO (a system
 * call failed: s->sys_errno says which error). What failed is logged. On
 * failure nothing is left open, though the loop may need one more run to
 * finish closing handles (only when libuv refuses to poll the socket). */
int vqkvd_server_start(vqkvd_server_t *s, uv_loop_t *loop, const vqkvd_config_t *cfg);

/* Applies what a running server can take from next (a reloaded config;
 * vqkvd_config_take_live in config.h lists the settings): the allow lists
 * and admin uids, the quotas (of tenants already known too: a lowered quota
 * evicts on the tenant's next Put), calibration_tokens, max_clients and
 * lease_ms. Connected peers that the new allow lists no longer admit get an
 * Error VQKV_EPERM and are closed, as if they had just connected: leaving
 * them would keep a revoked uid reading and writing its tenant's blocks
 * until it chose to leave. Returns how many were closed. */
uint32_t vqkvd_server_reconfigure(vqkvd_server_t *s, const vqkvd_config_t *next);

/* What vqkvd_notify (notify.h) shows as the service's status, from the
 * same counters as a StatsReply. */
typedef struct {
    uint64_t hits, misses; /* blocks lookups found, and asked for past the prefix */
    uint64_t bytes_stored; /* compressed bytes held */
    uint64_t pool_bytes;   /* what blocks may use */
    uint32_t clients;      /* connected */
} vqkvd_server_status_t;

void vqkvd_server_status(const vqkvd_server_t *s, vqkvd_server_status_t *st);

/* Stops accepting, removes the socket file it bound (never the file of an
 * inherited listen_fd) and closes every client, without waiting for their
 * queued replies (work already on the thread pool finishes; its replies
 * are dropped). The handles finish closing on the next loop iteration;
 * uv_run then returns once nothing else is active. Safe to call twice. */
void vqkvd_server_stop(vqkvd_server_t *s);

/* Frees the pool, the store and the models. Call after vqkvd_server_stop,
 * once uv_run has returned (no job is left on the thread pool); also after
 * a failed start. Safe twice. */
void vqkvd_server_destroy(vqkvd_server_t *s);

/* The handlers of request.c's table for the requests of the connection
 * itself: Hello and Stats. */
void vqkvd_client_hello(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_client_stats(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);

#endif
