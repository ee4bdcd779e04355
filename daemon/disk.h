/* disk.h -- the disk tier: blocks evicted from the memory pool kept in
 * append-only segment files (segment.h) under disk_dir, found again by
 * lookups after eviction and after a restart.
 *
 * What it holds. A block the store evicts for room (store.h's on_evict)
 * is copied, compressed as it is, into a write queue, and the index
 * (tenant, model, key) -> where the record is has it from then on: a
 * lookup that finds it queued copies it from the queue. One write job at
 * a time appends the queue to the newest segment on libuv's thread pool
 * and syncs it; the index then points into the file (or, if the write
 * failed, forgets the block). A later record of a key replaces the
 * earlier one (sequence numbers grow across the directory); a tombstone
 * record (an Evict) removes it, on disk too, so a restart does not bring
 * it back.
 *
 * Bounds. disk_bytes bounds the segment files: past it, the oldest segment
 * goes whole, with its blocks: a FIFO of segments, written in the memory
 * tier's LRU order. A block read back into memory keeps its place on disk
 * and is not written again when it is evicted again, so a block hot
 * enough to stay in memory costs no writes. The write queue holds at
 * most VQKVD_DISK_QUEUE_BYTES; evictions past it are not written (counted).
 * The index costs about 200 bytes of memory a block on disk. Space of
 * dropped blocks is reclaimed by compaction (disk.c): a segment at least
 * half dead has its live records appended anew, then goes.
 *
 * I/O runs only on the thread pool: appends, syncs, payload reads (pread,
 * CRC-32C checked), unlinks. Opening the directory at start scans every
 * segment's headers (not payloads) before the daemon serves. libuv's
 * thread pool rather than io_uring: the daemon's jobs already run there,
 * it needs no new dependency, and io_uring is refused by the seccomp
 * profiles many containers run under.
 *
 * Durability: a block is on disk once it has been evicted from memory and
 * its write job has synced; a put alone is in memory
 * only. docs/RELIABILITY.md states it for users.
 *
 * Single-threaded like the store, except vqkvd_disk_read, which any
 * thread may call for a read it was handed.
 */
#ifndef VQKVD_DISK_H
#define VQKVD_DISK_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "segment.h"
#include "store.h"

/* Bytes of evicted blocks waiting to be written, at most. */
#define VQKVD_DISK_QUEUE_BYTES (64ull << 20)

typedef struct vqkvd_disk vqkvd_disk_t;
typedef struct vqkvd_disk_seg vqkvd_disk_seg_t;

/* A block on disk as the index knows it. Read its fields, never write them. */
typedef struct vqkvd_disk_entry {
    struct vqkvd_disk_entry *hnext;
    vqkvd_disk_seg_t *seg; /* NULL while queued */
    const uint8_t *queued; /* its payload in the write queue while queued */
    uint64_t seq;
    uint64_t payload_offset;
    uint32_t tenant, model, logical_bytes, payload_bytes, payload_crc;
    uint8_t key[VQKVD_KEY_BYTES];
    uint8_t parent[VQKVD_KEY_BYTES]; /* all zero for a chain's first block */
    char spec[VQKVD_SEGMENT_SPEC_BYTES];
    uint8_t codebooks_sha256[32];
} vqkvd_disk_entry_t;

/* One payload a job reads: where it is, its segment held open until
 * vqkvd_disk_read_done. */
typedef struct {
    bool started;
    vqkvd_disk_seg_t *seg; /* NULL: the payload was still queued, copied into copy */
    uint8_t *copy;
    uint64_t seq;
    vqkvd_segment_record_t rec; /* payload_bytes and payload_crc */
    uint64_t payload_offset;
    uint32_t tenant, model;
    uint8_t key[VQKVD_KEY_BYTES];
} vqkvd_disk_read_t;

typedef struct {
    uint64_t blocks, bytes; /* on disk and in the index now; bytes of segment files */
    uint64_t limit_bytes;
    uint64_t segments;
    uint64_t writes, write_bytes; /* blocks written since start */
    uint64_t write_errors;        /* blocks whose write failed (ENOSPC, ...) */
    uint64_t queue_full;          /* evictions not written: the queue was full */
    uint64_t reads, read_bytes;   /* blocks read back (promoted into memory) */
    uint64_t bad_records;         /* damaged records found by scans and reads, dropped */
    uint64_t dropped;             /* blocks dropped with the oldest segments */
    uint64_t compactions;         /* segments whose live records moved on, and the file went */
} vqkvd_disk_stats_t;

/* Opens the tier in dir (made 0700 if missing) holding at most limit
 * bytes, with the index hashed like store's keys: rebuilds the index from
 * the segments there (headers only; damaged tails counted and skipped,
 * later records winning, tombstones applied) and drops the oldest segments
 * past limit. VQKV_OK; VQKV_EINVAL; VQKV_ENOMEM; VQKV_EIO (the directory
 * cannot be made or read) with why filled. */
int vqkvd_disk_open(const char *dir, uint64_t limit, uv_loop_t *loop, const vqkvd_store_t *store,
                    vqkvd_disk_t **out, char *why, size_t why_size);
/* After the loop has run dry: frees everything, closes the files. */
void vqkvd_disk_close(vqkvd_disk_t *d);

/* No compaction starts from now on (a stopping daemon); one running ends. */
void vqkvd_disk_stop(vqkvd_disk_t *d);

/* Called after each write job, its blocks settled: a flush (tiers.c)
 * queues its next share then, and learns what is synced. */
void vqkvd_disk_on_written(vqkvd_disk_t *d, void (*fn)(void *arg), void *arg);

/* The sequence number of the last record queued (0 before any): records
 * are written in the order of their numbers. */
uint64_t vqkvd_disk_last_queued(const vqkvd_disk_t *d);
/* Whether every record numbered up to seq has been written and synced,
 * or failed (counted in write_errors). O(1). */
bool vqkvd_disk_settled(const vqkvd_disk_t *d, uint64_t seq);

/* Whether the write queue takes bytes more now. */
bool vqkvd_disk_has_room(const vqkvd_disk_t *d, uint64_t bytes);

/* An evicted block the queue had no room for: counted (queue_full), and
 * said once. */
void vqkvd_disk_refused(vqkvd_disk_t *d);

/* Queues a block for writing: payload (payload_bytes, malloc'd; the tier
 * frees it) with its header fields in rec (seq and payload_crc are the
 * tier's to set). Returns false, freeing payload, when the queue is full
 * or the tier cannot write. */
bool vqkvd_disk_put(vqkvd_disk_t *d, const vqkvd_segment_record_t *rec, uint8_t *payload);

/* Forgets (tenant, model, key) and queues a tombstone for it, so neither
 * this run nor a restart finds it. false when the tier had no such block. */
bool vqkvd_disk_drop(vqkvd_disk_t *d, uint32_t tenant, uint32_t model, const uint8_t *key);

/* Forgets every block of (tenant, model) whose parent is in neither tier
 * (in_memory says for memory), and so on down their chains, each with a
 * tombstone: what an Evict of their ancestor asks. Returns how many went.
 * O(blocks on disk x chain depth). */
uint64_t vqkvd_disk_drop_orphans(vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                 bool (*in_memory)(void *arg, const uint8_t *key), void *arg);

/* Forgets every block of (tenant, model) that is not in memory, each with
 * a tombstone. Returns how many went. O(blocks on disk). */
uint64_t vqkvd_disk_drop_model(vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                               bool (*in_memory)(void *arg, const uint8_t *key), void *arg);

/* The block on disk, or NULL. O(1) average. */
const vqkvd_disk_entry_t *vqkvd_disk_find(const vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                          const uint8_t *key);

/* Starts reading e's payload: fills r and holds its segment open. */
void vqkvd_disk_read_start(const vqkvd_disk_entry_t *e, vqkvd_disk_read_t *r);
/* Any thread: the payload of r into buf (r->rec.payload_bytes). VQKV_OK,
 * VQKV_EFORMAT (checksum or length wrong), VQKV_EIO. */
int vqkvd_disk_read(const vqkvd_disk_read_t *r, void *buf);
/* On the loop, after vqkvd_disk_read (rc its result, or anything else for
 * a read not made): releases the segment; a record that failed its read
 * (VQKV_EFORMAT: damaged, counted; VQKV_EIO) leaves the index. */
void vqkvd_disk_read_done(vqkvd_disk_t *d, vqkvd_disk_read_t *r, int rc);

void vqkvd_disk_stats(const vqkvd_disk_t *d, vqkvd_disk_stats_t *st);

#endif
