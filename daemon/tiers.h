/* tiers.h -- the disk tier under the memory pool, for the session layer
 * (tiers.c). Everything here runs on the loop.
 */
#ifndef VQKVD_TIERS_H
#define VQKVD_TIERS_H

#include "disk.h"
#include "session.h"

/* Opens cfg.disk_dir when set and hooks eviction to it. A tier that
 * cannot open is logged and left off (VQKV_OK: memory serves alone);
 * VQKV_ENOMEM stops the start. */
int vqkvd_tiers_start(vqkvd_server_t *s);
/* The daemon is stopping: what memory holds and the disk lacks is
 * queued (vqkvd_tiers_flush), the loop runs until it is written; no
 * compaction starts. */
void vqkvd_tiers_stop(vqkvd_server_t *s);
/* Every tick (session.c): starts the flush disk_flush_ms asks for when it
 * is due, and goes on with one that waits (a Put that failed takes its
 * stage out of the way without an encode to say so). */
void vqkvd_tiers_tick(vqkvd_server_t *s, uint64_t now_ms);
/* After the loop has run dry. */
void vqkvd_tiers_destroy(vqkvd_server_t *s);

/* Writes down what memory holds and the disk lacks, in the background
 * (disk_flush_ms, a stop). No-op without a disk tier. O(blocks in memory). */
void vqkvd_tiers_flush(vqkvd_server_t *s);
/* While a flush waits or the daemon stops, a staged encode that ends
 * hands each block it made whole to vqkvd_tiers_flush_block, then calls
 * vqkvd_tiers_flush_resume (the waiting Flushes learn their blocks are
 * queued). O(blocks of the encode), not of memory. */
void vqkvd_tiers_flush_block(vqkvd_server_t *s, const vqkvd_block_t *b);
void vqkvd_tiers_flush_resume(vqkvd_server_t *s);
/* A Flush request: flushes, and answers c's request id with an Ack (the
 * blocks queued) once every block memory held when it came, staged ones
 * included, is synced, or with VQKV_EIO if writes failed meanwhile.
 * VQKV_EINVAL without a disk tier, VQKV_ENOMEM: nothing waits. */
int vqkvd_tiers_flush_wait(vqkvd_server_t *s, vqkvd_client_t *c, uint64_t id);

/* After an Evict of keys[0..n) (or all) of (tenant, model) in memory: the
 * disk forgets those no longer in memory and every chain below them (all:
 * every block not in memory). The disk copies of blocks the Evict took
 * from memory went with them (store.h's on_forget), so this returns only
 * the blocks that were on disk alone: each block forgotten counts once. */
uint64_t vqkvd_tiers_forget(vqkvd_server_t *s, uint32_t tenant, uint32_t model, const uint8_t *keys,
                            uint32_t n, bool all);

/* A staged block evicted for room before its encode was done (ev, from
 * its stage), now encoded: codes go to the disk tier as the eviction
 * would have sent them. */
void vqkvd_tiers_write_codes(vqkvd_server_t *s, const vqkvd_model_t *m,
                             const vqkvd_codec_ident_t *ident, uint32_t tenant, const uint8_t *key,
                             const struct vqkvd_stage_evicted *ev, const uint8_t *codes);

/* How many of keys[from..n) follow one another on disk, each the child of
 * the one before, with an identity model m decodes now. O(n). */
uint32_t vqkvd_tiers_disk_run(const vqkvd_server_t *s, const vqkvd_model_t *m, uint32_t tenant,
                              const uint8_t *keys, uint32_t from, uint32_t n);

/* Which of m's identities (its codec's once ready, its fp16 fallback's)
 * has this spec and codebooks' SHA-256; NULL: none, never decoded. */
const vqkvd_codec_ident_t *vqkvd_tiers_ident(const vqkvd_model_t *m, const char *spec,
                                             const uint8_t *codebooks_sha256);
/* Bytes of a block of m stored with ident, 0 for an identity m lacks. */
uint32_t vqkvd_tiers_block_bytes(const vqkvd_model_t *m, const vqkvd_codec_ident_t *ident);
/* The record header of a block (segment.h; seq and payload_crc left 0):
 * parent NULL for a chain's first block. */
void vqkvd_tiers_record(vqkvd_segment_record_t *rec, uint32_t tenant, uint32_t model,
                        uint32_t logical_bytes, const uint8_t *key, const uint8_t *parent,
                        const vqkvd_codec_ident_t *ident, uint32_t bytes);

/* Which of m's identities disk block e has (NULL: none; never read). */
const vqkvd_codec_ident_t *vqkvd_tiers_disk_ident(const vqkvd_model_t *m,
                                                  const vqkvd_disk_entry_t *e);
/* The pool class of m's blocks of identity ident. */
uint32_t vqkvd_tiers_class(const vqkvd_model_t *m, const vqkvd_codec_ident_t *ident);

#endif
