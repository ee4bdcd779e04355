/* session.h -- the session layer: the block requests (models, regions,
 * Put, Lookup, Get, Release, Pin, Unpin, Evict, FindModel) in models.c,
 * jobs.c, pins.c and session.c, called by server.c through request.c's
 * table, replying through conn.h.
 * Private to the daemon; nothing outside daemon/ includes it.
 *
 * Lifetimes. A client lives as conn.h says. Regions are referenced the same way: by the client's
 * region list (until the connection closes) and by each job that reads or writes them, and are
 * unmapped with the last reference. Models live as long as the server: they are shared by every
 * client of a tenant and a job may hold one past its client.
 *
 * Everything here runs on the loop's thread except the bodies of jobs
 * (session.c), which touch only their job, the codec (immutable) and
 * memory the loop keeps alive for them.
 */
#ifndef VQKVD_SESSION_H
#define VQKVD_SESSION_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "backend.h"
#include "conn.h"
#include "disk.h"
#include "frame.h"
#include "remote.h"
#include "state.h"
#include "vqkv_proto.h"

/* A block this connection pinned with ttl_ms 0: unpinned when it closes.
 * An entry of an open-addressing table; model 0 (never an id) is empty. */
typedef struct vqkvd_pin {
    uint32_t model;
    uint8_t key[VQKVD_KEY_BYTES];
} vqkvd_pin_t;

typedef struct vqkvd_calib vqkvd_calib_t;

/* What a block was encoded with, recorded with the block (store.h) so that
 * it is never decoded with anything else: the codec's canonical spec and
 * the SHA-256 of its codebook file (vqkv_codebook_save_buffer's bytes; all
 * zero for a codec without codebooks). A model holds two, its codec's and
 * its fp16 fallback's; a disk or remote tier writes both into a block's
 * record. */
struct vqkvd_codec_ident {
    const char *spec; /* the codec's own string */
    uint8_t codebooks_sha256[32];
};
typedef struct vqkvd_codec_ident vqkvd_codec_ident_t;

/* A registered model, shared by (tenant, model_id, head range).
 *
 * A VQ codec registered without codebooks is not ready: its Puts are stored
 * with the fp16 fallback (a pool class of its own) while calib.c collects
 * them as calibration samples and trains; once the codebooks are in, ready
 * turns 1 and later Puts use codec. Blocks already stored are fp16 until
 * transcode.c re-encodes them in the background: a block's codec identity
 * says which codec decodes it.
 *
 * Two numbers name a model: id, its place in the server's table (the wire
 * handle, the log lines), and store_id, a stable hash of what it is
 * (ident: model_id, heads, layout and codec spec), the same in every run
 * and on every node, which is what the store and every tier keep. */
struct vqkvd_model {
    uint32_t id;       /* the wire handle: index + 1 in the server's models; never 0 */
    uint32_t store_id; /* the store's model number: the first 4 bytes of ident; never 0 */
    uint8_t ident[32]; /* SHA-256 of model_id, heads, layout and codec spec */
    uint32_t tenant;
    char *model_id;
    uint32_t kv_head_first, kv_head_count;
    vqkv_layout_t layout;   /* this rank's slice: num_kv_heads = kv_head_count */
    vqkv_codec_t *codec;    /* as registered; trained in place by calib.c */
    uint32_t cls;           /* pool slot class of codec's blocks */
    uint32_t block_bytes;   /* compressed by codec */
    uint32_t logical_bytes; /* uncompressed, in the workers' dtype */
    int ready;              /* codec has its codebooks: Puts use it */
    vqkv_codec_t *fallback; /* fp16, while not ready; NULL when never needed */
    uint32_t fallback_cls, fallback_bytes;
    vqkvd_codec_ident_t codec_ident;    /* set when ready */
    vqkvd_codec_ident_t fallback_ident; /* set with the fallback */
    vqkvd_calib_t *calib;               /* collecting or training; NULL otherwise */
    /* The RoPE the first registration naming one gave (RegisterModel
     * rope_theta, rope_style), for calibration that samples positions;
     * theta 0 until then. */
    vqkv_rope_t rope;
    struct vqkvd_transcode *transcode; /* a batch of fallback blocks in flight, or NULL */
    uint64_t transcoded;               /* fallback blocks re-encoded so far */
    int transcode_done;                /* no fallback block left: no more walks */
    /* The remote tier's codebook exchange (remote.h): the set published
     * (or adopted, which needs no publishing), a request under way, and
     * when to ask again. */
    bool remote_shared;
    bool remote_busy;
    uint64_t remote_next_ms;
};

/* A mapped MEMFD region of one client. */
typedef struct vqkvd_region {
    struct vqkvd_region *next; /* the client's list */
    uint64_t handle;
    uint32_t refs;
    vqkvd_model_t *model;
    vqkvd_backend_t *backend; /* closes mem with the last reference */
    vqkvd_region_mem_t mem;
    vqkv_kv_view_t view;     /* its layer_offsets point into layer_offsets */
    uint64_t *layer_offsets; /* per-layer starts, or NULL for a strided view */
} vqkvd_region_t;

/* session.c: the server's backend, pool, store and tick timer: VQKV_OK, or
 * VQKV_EINVAL / VQKV_ENOMEM with what failed logged. */
int vqkvd_session_start(vqkvd_server_t *s);
void vqkvd_session_stop(vqkvd_server_t *s);    /* closes the timer */
void vqkvd_session_destroy(vqkvd_server_t *s); /* after the loop has run dry */

/* The handlers of request.c's table, one per request the session layer
 * owns: models.c, jobs.c, pins.c, session.c. frame is the request's frame;
 * a handler that keeps an fd sets its slot to -1. Each answers exactly
 * once, now or when its job is done. */
void vqkvd_session_register_model(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                  vqkv_frame_t *frame);
void vqkvd_session_register_region(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                   vqkv_frame_t *frame);
void vqkvd_session_region_pieces(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_find_model(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_put(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_lookup(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_get(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_release(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_pin(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_unpin(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_evict(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);
void vqkvd_session_flush(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame);

/* models.c: the model of tenant with that store number, or NULL. */
vqkvd_model_t *vqkvd_model_by_store_id(const vqkvd_server_t *s, uint32_t tenant, uint32_t store_id);

/* models.c: fills id for codec (its spec; its codebooks' SHA-256, or zero
 * for a codec without codebooks). VQKV_OK, or VQKV_ENOMEM. */
int vqkvd_codec_ident_set(vqkvd_codec_ident_t *id, const vqkv_codec_t *codec);

/* models.c: codebooks final, the backend told, Puts use the codec (the
 * only place a model turns ready). ident: the codec's identity when the
 * caller hashed it already (training does, on the thread pool), else NULL
 * to hash it here. VQKV_OK or the error. */
int vqkvd_model_set_ready(vqkvd_server_t *s, vqkvd_model_t *m, const vqkvd_codec_ident_t *ident);

/* ---- internal to the session layer's files -------------------------------
 * Each replies with an Error itself where it returns NULL or false. */

/* c's model or region of that handle, or NULL (no reply). */
vqkvd_model_t *vqkvd__client_model(const vqkvd_client_t *c, uint64_t handle);
vqkvd_region_t *vqkvd__client_region(const vqkvd_client_t *c, uint64_t handle);
/* Drops a reference; the last one closes the region's memory. */
void vqkvd__region_unref(vqkvd_region_t *r);
/* Whether region r can hold model m's blocks (VQKV_EMISMATCH otherwise). */
bool vqkvd__region_fits(vqkvd_client_t *c, uint64_t id, const vqkvd_region_t *r,
                        const vqkvd_model_t *m);
/* 0 when two layouts (and specs, when not NULL) agree, else 1 with the
 * first field that differs written into why. */
int vqkvd__model_diff(const vqkv_layout_t *was, const char *was_spec, const vqkv_layout_t *now,
                      const char *now_spec, char *why, size_t why_size);
/* The model of a request naming n_keys keys of 32 bytes. */
vqkvd_model_t *vqkvd__keys_check(vqkvd_client_t *c, uint64_t id, const char *what,
                                 uint64_t model_handle, size_t n_keys,
                                 const ProtobufCBinaryData *keys);
/* The keys, one after the other, in one allocation (NULL after ENOMEM). */
uint8_t *vqkvd__keys_flat(vqkvd_client_t *c, uint64_t id, const ProtobufCBinaryData *keys,
                          size_t n);
/* Answers with an Ack of count. */
void vqkvd__ack(vqkvd_client_t *c, uint64_t id, uint32_t count);
/* models.c: lets go of the pieces c holds from RegionPieces. */
void vqkvd__pieces_release(vqkvd_client_t *c);
/* Whether c's peer is in cfg.admin_uids. */
int vqkvd__is_admin(const vqkvd_client_t *c);

/* session.c: the connection is gone: leases released, ttl_ms 0 pins
 * undone, regions dropped. */
void vqkvd_session_client_gone(vqkvd_client_t *c);

/* The daemon-wide figures of the moment, as Stats answers them and the
 * metrics endpoint (metrics.h) exports them. */
typedef struct {
    vqkvd_store_stats_t store;
    vqkvd_pool_stats_t pool;
    uint32_t clients; /* connections open */
    uint32_t models;  /* registered since start (they live as long as the server) */
    uint64_t regions; /* registered by the open connections */
    uint64_t pins;    /* ttl_ms 0 pins the open connections hold */
    vqkvd_staging_t staging;
    vqkvd_disk_stats_t disk;     /* all zero without a disk tier */
    vqkvd_remote_stats_t remote; /* likewise without a remote tier */
} vqkvd_totals_t;

/* session.c: fills t. O(clients): regions and pins are summed over them. */
void vqkvd_session_totals(const vqkvd_server_t *s, vqkvd_totals_t *t);

/* session.c: fills a StatsReply from vqkvd_session_totals, with its
 * tenants: the client's own first, then, for a peer in cfg.admin_uids,
 * every other tenant the store knows. st->tenants is one allocation,
 * entries included: free(st->tenants) once the reply is packed. VQKV_OK or
 * VQKV_ENOMEM. */
int vqkvd_session_stats(vqkvd_client_t *c, Vqkv__StatsReply *st);

#endif
