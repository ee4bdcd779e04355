/* remote.h -- the remote tier: blocks and codebooks shared by the nodes of
 * a deployment through one Redis or Redis Cluster (remote.c, over
 * redis.h). Everything here runs on the loop and never waits for Redis.
 *
 * Write-behind: a block whose compressed bytes are final in memory (a
 * put's encode done, a re-encode after calibration) is also SET in Redis,
 * a segment record header (segment.h: tenant, model, key, parent, codec
 * spec and codebooks' SHA-256, payload CRC-32C) before its bytes, with
 * remote_ttl_s. Past remote_queue_bytes unacknowledged, or with Redis
 * down, a block is not sent and is counted: a put never waits for Redis.
 *
 * Read-through: a lookup that ends in the local tiers fetches the chain's
 * next blocks (one GET each, pipelined, routed each on its own in a
 * cluster) with a deadline of remote_lookup_ms; values that pass every
 * check (vqkvd_remote_fetch_t) go through the Promote job (jobs.c) into
 * pool slots, their payload CRC checked there, and are leased like local
 * blocks.
 *
 * Codebooks: a model whose codebooks turn final publishes them under
 * their SHA-256 and names that set for its (tenant, model identity); a
 * model that starts calibrating adopts the named set instead, checked by
 * its SHA-256 before it is loaded (calib.h).
 *
 * Redis keys: vqkv:b:<tenant>:<model ident hex>:<block key hex> (a block),
 * vqkv:cb:<codebooks SHA-256 hex> (a codebook file),
 * vqkv:cbm:<tenant>:<model ident hex> (the set a model adopts). The model
 * identity is the SHA-256 of model_id, heads, layout and codec spec
 * (session.h), the same on every node; block keys are too when the nodes
 * share salt_secret_file.
 */
#ifndef VQKVD_REMOTE_H
#define VQKVD_REMOTE_H

#include <stdbool.h>
#include <stdint.h>

#include "segment.h"
#include "state.h"
#include "store.h"

struct vqkvd_codec_ident;

/* The most blocks one lookup fetches past the local tiers. */
#define VQKVD_REMOTE_MAX_FETCH 4096u

typedef struct vqkvd_remote vqkvd_remote_t;

/* Counters since start (docs/METRICS.md). */
typedef struct vqkvd_remote_stats {
    bool up;               /* every node it needs is connected */
    uint64_t puts_sent;    /* blocks SET */
    uint64_t puts_stored;  /* of which Redis acknowledged */
    uint64_t puts_failed;  /* an error reply, a broken connection or no answer */
    uint64_t puts_skipped; /* not sent: Redis down or remote_queue_bytes reached */
    uint64_t fetches;      /* blocks asked for by lookups */
    uint64_t fetch_hits;   /* blocks fetched and brought into memory */
    uint64_t fetch_misses; /* asked for, not in Redis */
    uint64_t fetch_late;   /* asked for, not answered by the lookup's deadline */
    uint64_t rejected;     /* values refused: header, length, identity, chain or CRC */
    uint64_t codebooks_published, codebooks_adopted;
    uint64_t bytes_sent, bytes_fetched;
    uint64_t reconnects; /* connections made after the first */
} vqkvd_remote_stats_t;

/* Connects to cfg.remote when set (in the background: a Redis that is down
 * at start is retried, never waited for). VQKV_OK, also when no remote is
 * configured; VQKV_EINVAL (a bad URL or password file, logged) stops the
 * start; VQKV_ENOMEM. */
int vqkvd_remote_start(vqkvd_server_t *s);
/* The daemon is stopping: blocks on their way get up to a second to be
 * acknowledged, then every connection closes; the loop can run dry. */
void vqkvd_remote_stop(vqkvd_server_t *s);
/* After the loop has run dry. */
void vqkvd_remote_destroy(vqkvd_server_t *s);
/* Every tick: a model whose codebooks are final publishes them, one still
 * calibrating asks for a published set to adopt (each at most once a
 * second until it succeeds). O(models). */
void vqkvd_remote_tick(vqkvd_server_t *s, uint64_t now_ms);
void vqkvd_remote_stats(const vqkvd_server_t *s, vqkvd_remote_stats_t *st);

/* Write-behind of block b of model m, whose slot holds its final codes. A
 * copy of them (block_read) is formatted on the loop; no-op without a
 * remote tier, for a staged block, or for one of an identity m lacks. */
void vqkvd_remote_put(vqkvd_server_t *s, const vqkvd_model_t *m, const vqkvd_block_t *b);

/* A lookup's fetch of keys[first..first+n): for each block, its value
 * when it passed every check but the payload's CRC (left to the thread
 * pool), else NULL. */
typedef struct vqkvd_remote_fetch vqkvd_remote_fetch_t;
struct vqkvd_remote_fetch {
    uint32_t first, n;
    uint8_t **values; /* record header, then payload */
    vqkvd_segment_record_t *recs;
    const struct vqkvd_codec_ident **idents; /* which of the model's identities */
    /* private to remote.c */
    vqkvd_server_t *s;
    const vqkvd_model_t *m;
    uint32_t tenant, left;
    const uint8_t *keys; /* the lookup's, all of them; borrowed until done */
    uint32_t *lens;      /* of values */
    struct vqkvd_remote_get *gets;
    void (*done)(void *arg, vqkvd_remote_fetch_t *f);
    void *arg;
};

/* Starts fetching keys[first..first+n) of (tenant, m); done(arg, f) runs
 * once on the loop when every answer is in or remote_lookup_ms has
 * passed, never from inside this call. keys must stay valid until then.
 * VQKV_OK; VQKV_EAGAIN when Redis is down (done never runs); VQKV_ENOMEM. */
int vqkvd_remote_fetch(vqkvd_server_t *s, const vqkvd_model_t *m, uint32_t tenant,
                       const uint8_t *keys, uint32_t first, uint32_t n,
                       void (*done)(void *arg, vqkvd_remote_fetch_t *f), void *arg);
/* Counts the fetched blocks that reached memory, and one whose payload
 * failed its CRC (the Promote job's findings). */
void vqkvd_remote_fetch_result(vqkvd_server_t *s, uint32_t hits, uint32_t damaged);
void vqkvd_remote_fetch_free(vqkvd_remote_fetch_t *f);

#endif
