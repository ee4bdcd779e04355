/* state.h -- what vqkvd holds: its settings (vqkvd_config_t) and the one
 * vqkvd_server_t every layer reads and changes on the loop's thread. Types
 * only: server.h has the server's functions, and the layers below it
 * (session.h, conn.h) include this instead, so nothing below the server
 * includes its header.
 */
#ifndef VQKVD_STATE_H
#define VQKVD_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "backend.h"
#include "counters.h"
#include "pool.h"
#include "staging.h"
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
    uint64_t staging_bytes;  /* puts staged before their encode (staging.h); 0: off */
    const char *disk_dir;    /* the disk tier's segments (borrowed); NULL: no disk tier */
    uint64_t disk_bytes;     /* the most its segment files hold */
    uint32_t disk_flush_ms;  /* memory written down this often; 0: only on eviction and stop */
    /* The remote tier (remote.h), all borrowed: a Redis URL or cluster
     * seeds, NULL: none; its password's file; the secret the tenant salts
     * derive from, NULL: the state directory's. */
    const char *remote;
    const char *remote_password_file;
    const char *salt_secret_file;
    uint32_t remote_ttl_s;       /* EXPIRE of a block written there; 0: none */
    uint64_t remote_queue_bytes; /* the most sent there and not yet acknowledged */
    uint32_t remote_lookup_ms;   /* a lookup's wait for its answers */
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
    /* "cpu", "auto" or "cuda:N" (borrowed): backend.c's factory picks the
     * backend from it ("auto": cuda:0 when built with CUDA and a GPU is
     * seen, else the CPU). */
    const char *device;
    /* A VQ model without codebooks stores blocks in the fp16 fallback until
     * this many tokens of them are collected, then trains in the background. */
    uint32_t calib_tokens;
    /* Calibration keys of a model that named its RoPE are turned through
     * offsets below this (vqkv_train_opts_t rope_positions; 0: not turned). */
    uint32_t calib_positions;
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
     * process of a tenant, unguessable by another tenant. Kept in the
     * state directory (salt-secret, 0600), so salts and keys survive a
     * restart; drawn at every start without one. */
    uint8_t salt_secret[32];
    int stopping;

    /* The blocks (session.c): the pool holds their bytes, the store indexes
     * them; the timer sweeps expired leases and evicts every 100 ms. */
    vqkvd_backend_t *backend; /* regions, codec runs and the arena (backend.h) */
    vqkvd_pool_t pool;
    vqkvd_store_t store;
    vqkvd_staging_t staging;              /* puts whose encode runs after their reply */
    struct vqkvd_disk *disk;              /* the disk tier (tiers.h), NULL when off */
    struct vqkvd_remote *remote;          /* the remote tier (remote.h), NULL when off */
    bool flushing;                        /* memory is being written to disk (tiers.h) */
    uint64_t flush_queued;                /* blocks flushes queued, since start */
    uint64_t flush_last_ms;               /* when disk_flush_ms last started one */
    struct vqkvd_flush_wait *flush_waits; /* Flush requests not answered yet */
    uv_timer_t tick;
    vqkvd_model_t **models; /* by id - 1; shared by the clients of a tenant */
    uint32_t n_models, cap_models;
    vqkvd_counters_t counters;
} vqkvd_server_t;

#endif
