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

#include "backend.h"
#include "counters.h"
#include "pool.h"
#include "store.h"

/* The smallest pool vqkvd accepts: less holds no block of a real model
 * (SmolLM2-135M's kivi4 block is 57 KiB). */
#define VQKVD_POOL_MIN_BYTES (64ull << 10)

/* Uids (and gids) --allow-uid (--allow-gid) may name. */
#define VQKVD_MAX_ALLOWED 32

/* The daemon's settings. vqkvd_config_defaults fills every field. */
typedef struct {
    const char *socket_path; /* borrowed; must outlive the server */
    uint32_t max_frame;      /* Welcome.max_frame_bytes */
    uint32_t max_inflight;   /* Welcome.max_inflight */
    uint32_t max_regions;    /* Welcome.max_regions */
    uint32_t max_clients;    /* connections past this are refused (VQKV_ELIMIT) */
    uint64_t pool_bytes;     /* the CPU pool's arena (--pool-bytes) */
    /* A listening Unix stream socket handed over by the service manager
     * (socket activation) to serve on instead of binding socket_path, or
     * -1. The server owns it from vqkvd_server_start on and never unlinks
     * its file: it belongs to whoever bound it. */
    int listen_fd;
    /* A peer may connect when its uid is in allow_uids or its gid in
     * allow_gids (SO_PEERCRED). Defaults: the daemon's own uid and root. */
    uid_t allow_uids[VQKVD_MAX_ALLOWED];
    size_t n_allow_uids;
    gid_t allow_gids[VQKVD_MAX_ALLOWED];
    size_t n_allow_gids;
    /* Peers whose Stats reply lists every tenant (vqkvctl run by an
     * operator); others see the totals and their own tenant. */
    uid_t admin_uids[VQKVD_MAX_ALLOWED];
    size_t n_admin_uids;

    /* Where trained codebooks are saved and looked for (borrowed; NULL:
     * codebooks live only as long as the process). */
    const char *state_dir;
    /* "cpu", "auto" or "cuda:N" (borrowed); only the CPU backend exists
     * so far, which "auto" picks on a machine without one. */
    const char *device;
    /* A VQ model without codebooks stores blocks in the fp16 fallback until
     * this many tokens of them are collected, then trains in the background. */
    uint32_t calib_tokens;
    /* A Lookup's lease lasts this long unless released (--lease-ms). */
    uint32_t lease_ms;
    /* HOST:PORT of the HTTP metrics endpoint (metrics.h; borrowed), a
     * loopback address (config.h); NULL: no endpoint. */
    const char *metrics_address;

    /* Byte quotas on compressed bytes held, per tenant (uid): quota_bytes
     * for a uid named in quota_uids, default_quota_bytes for the others;
     * 0 is unlimited. */
    uint64_t default_quota_bytes;
    uid_t quota_uids[VQKVD_MAX_ALLOWED];
    uint64_t quota_bytes[VQKVD_MAX_ALLOWED];
    size_t n_quotas;
} vqkvd_config_t;

typedef struct vqkvd_client vqkvd_client_t;
typedef struct vqkvd_model vqkvd_model_t;

typedef struct {
    uv_loop_t *loop;
    vqkvd_config_t cfg;

    int listen_fd;             /* -1 once closed */
    uv_poll_t listen_poll;     /* readable: connections to accept */
    uv_timer_t accept_backoff; /* restarts accepting after EMFILE */
    int socket_created;        /* the socket file is ours to unlink */
    int sys_errno;             /* errno of the system call that failed vqkvd_server_start */

    vqkvd_client_t *clients; /* doubly linked, newest first */
    uint32_t n_clients;      /* StatsReply.clients */
    uint64_t next_client_id; /* for logs */

    /* Tenant salts are SHA-256(salt_secret || tenant): the same for every
     * process of a tenant, unguessable by another tenant. Drawn at start,
     * so salts (and with them keys) change when the daemon restarts, which
     * is harmless while the store does not outlive the process. */
    uint8_t salt_secret[32];
    int stopping;

    /* The blocks (session.c): the pool holds their bytes, the store indexes
     * them; the timer sweeps expired leases and evicts every 100 ms. */
    vqkvd_backend_t *backend; /* regions, codec runs and the arena (backend.h) */
    vqkvd_pool_t pool;
    vqkvd_store_t store;
    uv_timer_t tick;
    vqkvd_model_t **models; /* by id - 1; shared by the clients of a tenant */
    uint32_t n_models, cap_models;
    vqkvd_counters_t counters;
} vqkvd_server_t;

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

#endif
