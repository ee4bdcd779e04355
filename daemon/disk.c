/* disk.c -- the disk tier (disk.h): an index of the blocks in the segment
 * files of disk_dir, rebuilt from their headers at start, kept up to date
 * by one write job at a time, trimmed by dropping the oldest segment.
 *
 * The index is a chained hash table keyed like the store's (SipHash with
 * the store's secret key, so a tenant cannot slow another's lookups by
 * choosing colliding keys), doubling at load 1. Dropping a segment walks
 * the whole index for its entries: O(blocks on disk) once per segment,
 * where a segment holds thousands of blocks; a per-segment list would cost
 * two pointers a block to save that; not needed so far.
 *
 * A segment is at most VQKVD_DISK_SEGMENT_BYTES, and at most a quarter of
 * disk_bytes, so that dropping the oldest frees a bounded share. The
 * writer (segment.h) belongs to the write job in flight; the loop touches
 * it only when no job runs: at close, and to give up the only segment on
 * a full disk (vqkvd__disk_write_after). A segment is never appended to
 * after a restart (a new one is made), so torn tails are left as they are.
 */
#include "disk.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "vqkv_proto.h"

#define VQKVD_DISK_SEGMENT_BYTES (256ull << 20)
/* Segments one write job may start: a batch is at most one segment's bytes. */
#define VQKVD_DISK_CREATED_MAX 2

struct vqkvd_disk_seg {
    vqkvd_disk_seg_t *next, *prev; /* the next newer and older */
    uint64_t number;
    int fd;         /* read-only, for payload reads; -1 once closed */
    uint64_t bytes; /* the file's length, counted against the limit */
    /* Bytes of the records still needed: blocks the index points at
     * (live), tombstones a compaction carried here (carried). The rest is
     * what compaction reclaims. */
    uint64_t live, carried;
    bool gone;     /* dropped from the list; its file deleted by the next job */
    uint32_t refs; /* the tier's own (until dropped) and each read in flight */
};

typedef struct vqkvd__disk_write {
    struct vqkvd__disk_write *next;
    vqkvd_segment_record_t rec;
    uint8_t *payload;        /* NULL for a tombstone, and for a move until read */
    uint64_t number, offset; /* where it went */
    int rc;
    int sys_errno;
    /* A compaction's: a move reads its payload from src at src_offset (the
     * record of sequence number src_seq); a carried tombstone has src
     * NULL. */
    bool compaction;
    bool unread;        /* a move whose payload could not be read (rc says why) */
    bool retried;       /* met a full disk once, written again in the room a drop made */
    uint64_t first_seq; /* its sequence number when first queued (a retry takes a new one) */
    vqkvd_disk_seg_t *src;
    uint64_t src_offset, src_seq;
} vqkvd__disk_write_t;

/* One record of the segment being compacted, as its scan found it. */
typedef struct {
    uint64_t seq;
    uint32_t tenant, model;
    bool tombstone;
    uint8_t key[VQKVD_KEY_BYTES];
} vqkvd__disk_compact_rec_t;

struct vqkvd_disk {
    char *dir;
    uint64_t segment_bytes; /* the limit is stats.limit_bytes */
    uv_loop_t *loop;
    const vqkvd_store_t *store; /* its hash key */
    vqkvd_disk_entry_t **buckets;
    uint64_t mask;
    vqkvd_disk_seg_t *oldest, *newest;
    uint64_t next_seq, next_number;
    vqkvd_segment_writer_t writer;
    /* evicted blocks waiting, oldest first; the batch the job writes */
    vqkvd__disk_write_t *queue, *queue_tail, *batch;
    uint64_t queue_bytes;
    uv_work_t work;
    bool writing;
    bool off;          /* a segment could not be made: nothing more is written */
    uint64_t *unlinks; /* dropped segments the next job deletes */
    size_t n_unlinks;
    uint64_t *unlinking; /* the job's share of them */
    size_t n_unlinking;
    struct {
        uint64_t number;
        int fd;
    } created[VQKVD_DISK_CREATED_MAX];
    uint32_t n_created;
    void (*written)(void *arg);
    void *written_arg;
    uint64_t retrying; /* items queued again after ENOSPC, not yet settled */
    bool stopping;     /* no compaction starts */
    /* The compaction running (victim not NULL): a scan job lists the
     * victim's records, then its live blocks and needed tombstones go
     * through the write queue, and once all have settled the victim goes. */
    struct {
        vqkvd_disk_seg_t *victim; /* held by a ref while it runs */
        uv_work_t work;
        vqkvd__disk_compact_rec_t *recs;
        size_t n, cap;
        int rc;           /* of the scan */
        bool carry;       /* the victim is not the oldest: tombstones move on */
        uint64_t pending; /* its writes not yet settled */
        bool failed;      /* a tombstone not carried: the victim stays */
        bool blocked;     /* one failed: none starts before a write succeeds */
        uint64_t moved;   /* blocks moved */
    } compact;
    vqkvd_disk_stats_t stats;
};

/* ---- the index ---------------------------------------------------------------- */

static vqkvd_disk_entry_t **vqkvd__disk_bucket(const vqkvd_disk_t *d, uint32_t tenant,
                                               uint32_t model, const uint8_t *key)
{
    return &d->buckets[vqkvd_store_hash(d->store, tenant, model, key) & d->mask];
}

/* The link to (tenant, model, key) in the chain at p, or to its end. */
static vqkvd_disk_entry_t **vqkvd__disk_chain_find(vqkvd_disk_entry_t **p, uint32_t tenant,
                                                   uint32_t model, const uint8_t *key)
{
    for (; *p != NULL; p = &(*p)->hnext)
        if ((*p)->tenant == tenant && (*p)->model == model &&
            memcmp((*p)->key, key, VQKVD_KEY_BYTES) == 0)
            break;
    return p;
}

static vqkvd_disk_entry_t **vqkvd__disk_link(const vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                             const uint8_t *key)
{
    return vqkvd__disk_chain_find(vqkvd__disk_bucket(d, tenant, model, key), tenant, model, key);
}

const vqkvd_disk_entry_t *vqkvd_disk_find(const vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                          const uint8_t *key)
{
    return d != NULL ? *vqkvd__disk_link(d, tenant, model, key) : NULL;
}

/* Doubles the table when entries outnumber buckets; a failed grow only
 * leaves chains longer. O(1) amortized. */
static void vqkvd__disk_maybe_grow(vqkvd_disk_t *d)
{
    uint64_t n = d->mask + 1;
    if (d->stats.blocks < n)
        return;
    vqkvd_disk_entry_t **nb = calloc(2 * n, sizeof *nb), **old = d->buckets;
    if (nb == NULL)
        return;
    d->buckets = nb;
    d->mask = 2 * n - 1;
    for (uint64_t i = 0; i < n; i++) {
        for (vqkvd_disk_entry_t *e = old[i], *next; e != NULL; e = next) {
            next = e->hnext;
            vqkvd_disk_entry_t **head = vqkvd__disk_bucket(d, e->tenant, e->model, e->key);
            e->hnext = *head;
            *head = e;
        }
    }
    free(old);
}

/* Bytes a block's record takes in its segment. */
static uint64_t vqkvd__disk_record_bytes(uint32_t payload_bytes)
{
    return VQKVD_SEGMENT_RECORD_BYTES + (uint64_t)payload_bytes;
}

static void vqkvd__disk_unlink_entry(vqkvd_disk_t *d, vqkvd_disk_entry_t **link)
{
    vqkvd_disk_entry_t *e = *link;
    *link = e->hnext;
    if (e->seg != NULL)
        e->seg->live -= vqkvd__disk_record_bytes(e->payload_bytes);
    d->stats.blocks--;
    free(e);
}

/* What record rec (payload at payload_offset of seg) says: a tombstone
 * removes the key's entry, a block replaces an older one. Returns the
 * block's new entry, or NULL. O(1) average: one hash, since unlinking
 * leaves the table's size alone. */
static vqkvd_disk_entry_t *vqkvd__disk_apply(vqkvd_disk_t *d, vqkvd_disk_seg_t *seg,
                                             const vqkvd_segment_record_t *rec,
                                             uint64_t payload_offset)
{
    vqkvd_disk_entry_t **head = vqkvd__disk_bucket(d, rec->tenant, rec->model, rec->key);
    vqkvd_disk_entry_t **link = vqkvd__disk_chain_find(head, rec->tenant, rec->model, rec->key);
    if (*link != NULL && (*link)->seq > rec->seq)
        return NULL;
    if (*link != NULL)
        vqkvd__disk_unlink_entry(d, link);
    if (rec->flags & VQKVD_SEGMENT_TOMBSTONE)
        return NULL;
    vqkvd_disk_entry_t *e = calloc(1, sizeof *e);
    if (e == NULL)
        return NULL; /* a miss later, nothing wrong */
    e->seg = seg;
    e->seq = rec->seq;
    e->payload_offset = payload_offset;
    e->tenant = rec->tenant;
    e->model = rec->model;
    e->logical_bytes = rec->logical_bytes;
    e->payload_bytes = rec->payload_bytes;
    e->payload_crc = rec->payload_crc;
    memcpy(e->key, rec->key, VQKVD_KEY_BYTES);
    memcpy(e->parent, rec->parent, VQKVD_KEY_BYTES);
    memcpy(e->spec, rec->spec, sizeof e->spec);
    memcpy(e->codebooks_sha256, rec->codebooks_sha256, 32);
    e->hnext = *head;
    *head = e;
    if (seg != NULL)
        seg->live += vqkvd__disk_record_bytes(e->payload_bytes);
    d->stats.blocks++;
    vqkvd__disk_maybe_grow(d);
    return e;
}

/* ---- segments ------------------------------------------------------------------ */

/* The path of segment number in d's directory. */
static void vqkvd__disk_path(const vqkvd_disk_t *d, uint64_t number, char path[PATH_MAX])
{
    char name[VQKVD_SEGMENT_NAME_BYTES];
    vqkvd_segment_name(number, name, sizeof name);
    snprintf(path, PATH_MAX, "%s/%s", d->dir, name);
}

static vqkvd_disk_seg_t *vqkvd__disk_seg_add(vqkvd_disk_t *d, uint64_t number, int fd,
                                             uint64_t bytes)
{
    vqkvd_disk_seg_t *seg = calloc(1, sizeof *seg);
    if (seg == NULL) {
        close(fd);
        return NULL;
    }
    seg->number = number;
    seg->fd = fd;
    seg->bytes = bytes;
    seg->refs = 1;
    seg->prev = d->newest;
    if (d->newest != NULL)
        d->newest->next = seg;
    else
        d->oldest = seg;
    d->newest = seg;
    d->stats.segments++;
    d->stats.bytes += bytes;
    return seg;
}

/* The segment of that number, searched from the newest: a write lands in
 * the newest or the one before, so O(1) in practice. */
static vqkvd_disk_seg_t *vqkvd__disk_seg_find(const vqkvd_disk_t *d, uint64_t number)
{
    vqkvd_disk_seg_t *seg = d->newest;
    while (seg != NULL && seg->number > number)
        seg = seg->prev;
    return seg != NULL && seg->number == number ? seg : NULL;
}

static void vqkvd__disk_seg_unref(vqkvd_disk_seg_t *seg)
{
    if (--seg->refs > 0)
        return;
    if (seg->fd >= 0)
        close(seg->fd);
    free(seg);
}

/* Takes seg out of the list and the counts, its file left where it is. */
static void vqkvd__disk_seg_detach(vqkvd_disk_t *d, vqkvd_disk_seg_t *seg)
{
    if (seg->prev != NULL)
        seg->prev->next = seg->next;
    else
        d->oldest = seg->next;
    if (seg->next != NULL)
        seg->next->prev = seg->prev;
    else
        d->newest = seg->prev;
    seg->gone = true;
    d->stats.segments--;
    d->stats.bytes -= seg->bytes;
    vqkvd__disk_seg_unref(seg);
}

/* Takes seg out of the list, for the next write job to delete its file.
 * false (nothing done) when there is no memory to note it. */
static bool vqkvd__disk_seg_remove(vqkvd_disk_t *d, vqkvd_disk_seg_t *seg)
{
    uint64_t *un = realloc(d->unlinks, (d->n_unlinks + 1) * sizeof *un);
    if (un == NULL)
        return false;
    d->unlinks = un;
    d->unlinks[d->n_unlinks++] = seg->number;
    vqkvd__disk_seg_detach(d, seg);
    return true;
}

/* Drops the oldest segment with every block the index has in it; the next
 * write job deletes its file. O(blocks on disk). */
static bool vqkvd__disk_drop_oldest(vqkvd_disk_t *d)
{
    vqkvd_disk_seg_t *seg = d->oldest;
    seg->refs++; /* the walk below still reads it */
    if (!vqkvd__disk_seg_remove(d, seg)) {
        seg->refs--;
        return false; /* over the limit a little longer */
    }
    for (uint64_t i = 0; i <= d->mask; i++) {
        vqkvd_disk_entry_t **link = &d->buckets[i];
        while (*link != NULL) {
            if ((*link)->seg == seg) {
                vqkvd__disk_unlink_entry(d, link);
                d->stats.dropped++;
            } else {
                link = &(*link)->hnext;
            }
        }
    }
    vqkvd__disk_seg_unref(seg);
    return true;
}

/* The oldest segments go while the files are over the limit; the one
 * being written stays. */
static void vqkvd__disk_trim(vqkvd_disk_t *d)
{
    while (d->stats.bytes > d->stats.limit_bytes && d->oldest != NULL && d->oldest != d->newest &&
           vqkvd__disk_drop_oldest(d))
        ;
}

static int vqkvd__disk_scan_record(void *arg, const vqkvd_segment_record_t *rec,
                                   uint64_t payload_offset)
{
    vqkvd_disk_t *d = arg;
    vqkvd__disk_apply(d, d->newest, rec, payload_offset);
    if (rec->seq >= d->next_seq)
        d->next_seq = rec->seq + 1;
    return VQKV_OK;
}

/* Adds segment number of the directory to the index: its headers read,
 * a damaged tail counted and left out. A file whose file header is not
 * one of this version is left alone (not counted, never deleted) and said
 * so. */
static void vqkvd__disk_load(vqkvd_disk_t *d, uint64_t number)
{
    char path[PATH_MAX];
    vqkvd__disk_path(d, number, path);
    /* Taken even when unreadable: a new segment must not collide with it. */
    if (number >= d->next_number)
        d->next_number = number + 1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        vqkvd_log(VQKVD_LOG_WARN, "disk: cannot read %s: %s; its blocks are lost", path,
                  strerror(errno));
        if (fd >= 0)
            close(fd);
        return;
    }
    if (vqkvd__disk_seg_add(d, number, fd, (uint64_t)st.st_size) == NULL)
        return;
    vqkvd_segment_scan_t scan;
    int rc = vqkvd_segment_scan(fd, vqkvd__disk_scan_record, d, &scan);
    if (rc == VQKV_EFORMAT) {
        /* Before any record was read: nothing of it is in the index. */
        vqkvd_log(VQKVD_LOG_WARN, "disk: %s is not a segment this vqkvd reads; left alone", path);
        vqkvd__disk_seg_detach(d, d->newest);
        return;
    }
    uint64_t bad = rc != VQKV_OK ? 1 : scan.bad_records;
    if (bad > 0) {
        d->stats.bad_records += bad;
        vqkvd_log(VQKVD_LOG_WARN,
                  "disk: %s: %s; %llu records before byte %llu kept, %llu bad ones dropped", path,
                  rc != VQKV_OK ? vqkv_proto_strerror(rc) : "damaged or cut short",
                  (unsigned long long)scan.records, (unsigned long long)scan.good_bytes,
                  (unsigned long long)bad);
    }
}

/* ---- writing ----------------------------------------------------------------- */

static void vqkvd__disk_compact_settled(vqkvd_disk_t *d);
static void vqkvd__disk_maybe_compact(vqkvd_disk_t *d);

/* Memory an item holds while queued: its payload; a move reads its own
 * when written. */
static uint64_t vqkvd__disk_held_bytes(const vqkvd__disk_write_t *it)
{
    return it->src != NULL ? 0 : it->rec.payload_bytes;
}

/* A compaction's move done: the block's entry, if still the record
 * moved, points at the copy in seg; a copy that could not be read (its
 * payload damaged) leaves the index; one not written stays where it was. */
static void vqkvd__disk_settle_move(vqkvd_disk_t *d, const vqkvd__disk_write_t *it,
                                    vqkvd_disk_seg_t *seg)
{
    vqkvd_disk_entry_t **link = vqkvd__disk_link(d, it->rec.tenant, it->rec.model, it->rec.key);
    vqkvd_disk_entry_t *e = *link;
    if (e == NULL || e->seq != it->src_seq || e->seg != it->src)
        return; /* dropped or replaced meanwhile: the copy is dead */
    if (it->unread) {
        /* Damaged (counted) or unreadable: not served, like a failed read. */
        d->stats.bad_records += it->rc == VQKV_EFORMAT;
        if (it->rc == VQKV_EFORMAT || it->rc == VQKV_EIO)
            vqkvd__disk_unlink_entry(d, link);
        return;
    }
    if (seg == NULL)
        return;
    uint64_t bytes = vqkvd__disk_record_bytes(e->payload_bytes);
    e->seg->live -= bytes;
    seg->live += bytes;
    e->seg = seg;
    e->seq = it->rec.seq;
    e->payload_offset = it->offset + VQKVD_SEGMENT_RECORD_BYTES;
    d->compact.moved++;
}

/* Its write done: the entry of a queued block (still this record's: a
 * later put or a drop may have replaced it) points into seg, or goes
 * when the write failed (seg NULL). */
static void vqkvd__disk_settle(vqkvd_disk_t *d, const vqkvd__disk_write_t *it,
                               vqkvd_disk_seg_t *seg)
{
    if (it->src != NULL) {
        vqkvd__disk_settle_move(d, it, seg);
        return;
    }
    if (it->rec.flags & VQKVD_SEGMENT_TOMBSTONE) {
        if (it->compaction && seg != NULL)
            seg->carried += VQKVD_SEGMENT_RECORD_BYTES;
        else if (it->compaction)
            d->compact.failed = true;
        return;
    }
    vqkvd_disk_entry_t **link = vqkvd__disk_link(d, it->rec.tenant, it->rec.model, it->rec.key);
    vqkvd_disk_entry_t *e = *link;
    if (e == NULL || e->seq != it->rec.seq)
        return;
    if (seg == NULL) {
        vqkvd__disk_unlink_entry(d, link);
        return;
    }
    e->seg = seg;
    e->queued = NULL;
    e->payload_crc = it->rec.payload_crc; /* set by the append */
    e->payload_offset = it->offset + VQKVD_SEGMENT_RECORD_BYTES;
    seg->live += vqkvd__disk_record_bytes(e->payload_bytes);
}

/* On the job's thread: syncs the segment being written; when that fails,
 * the batch's records before end that went into it are not known to be
 * on disk. */
static void vqkvd__disk_sync(vqkvd_disk_t *d, const vqkvd__disk_write_t *end)
{
    vqkvd_segment_writer_t *w = &d->writer;
    if (w->fd < 0 || vqkvd_segment_sync(w) == VQKV_OK)
        return;
    for (vqkvd__disk_write_t *it = d->batch; it != end; it = it->next)
        if (it->rc == VQKV_OK && it->number == w->number) {
            it->rc = VQKV_EIO;
            it->sys_errno = w->sys_errno;
        }
}

/* On the job's thread: makes the next segment and a read fd for it, the
 * one before synced first (records up to end went there). */
static int vqkvd__disk_new_segment(vqkvd_disk_t *d, const vqkvd__disk_write_t *end, int *sys_errno)
{
    vqkvd_segment_writer_t *w = &d->writer;
    if (w->fd >= 0) {
        vqkvd__disk_sync(d, end); /* a broken writer's sync fails: its records too */
        vqkvd_segment_close(w);
    }
    if (d->n_created == VQKVD_DISK_CREATED_MAX)
        return VQKV_ELIMIT;
    uint64_t number = d->next_number++;
    int rc = vqkvd_segment_create(w, d->dir, number);
    if (rc != VQKV_OK) {
        *sys_errno = w->sys_errno;
        return rc;
    }
    char path[PATH_MAX];
    vqkvd__disk_path(d, number, path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *sys_errno = errno;
        vqkvd_segment_close(w);
        return VQKV_EIO;
    }
    d->created[d->n_created].number = number;
    d->created[d->n_created++].fd = fd;
    return VQKV_OK;
}

/* On a pool thread: deletes the dropped segments, appends the batch
 * (a new segment where the current one is full or broken), syncs. */
static void vqkvd__disk_write_work(uv_work_t *work)
{
    vqkvd_disk_t *d = work->data;
    vqkvd_segment_writer_t *w = &d->writer;
    char path[PATH_MAX];
    for (size_t i = 0; i < d->n_unlinking; i++) {
        vqkvd__disk_path(d, d->unlinking[i], path);
        unlink(path);
    }
    int rc = VQKV_OK, err = 0;
    for (vqkvd__disk_write_t *it = d->batch; it != NULL; it = it->next) {
        uint64_t need = vqkvd__disk_record_bytes(it->rec.payload_bytes);
        if (rc == VQKV_OK &&
            (w->fd < 0 || w->broken ||
             (w->end > VQKVD_SEGMENT_FILE_HEADER_BYTES && w->end + need > d->segment_bytes)))
            rc = vqkvd__disk_new_segment(d, it, &err);
        if (rc == VQKV_OK && it->src != NULL && it->payload == NULL) {
            /* A move: its bytes come from the segment compacted. */
            it->payload = malloc(it->rec.payload_bytes);
            it->rc =
                it->payload == NULL
                    ? VQKV_ENOMEM
                    : vqkvd_segment_read_payload(it->src->fd, &it->rec, it->src_offset, it->payload,
                                                 it->rec.payload_bytes, &it->sys_errno);
            if (it->rc != VQKV_OK) {
                it->unread = true;
                continue;
            }
        }
        if (rc == VQKV_OK) {
            it->rc = vqkvd_segment_append(w, &it->rec, it->payload, &it->offset);
            it->number = w->number;
            it->sys_errno = w->sys_errno;
        } else {
            it->rc = rc;
            it->sys_errno = err;
        }
    }
    vqkvd__disk_sync(d, NULL);
}

static void vqkvd__disk_kick(vqkvd_disk_t *d);
static void vqkvd__disk_enqueue(vqkvd_disk_t *d, vqkvd__disk_write_t *it);

/* A write that met a full disk, queued again with a new sequence number
 * (records of a segment go in increasing order) when it is still wanted:
 * a block whose entry is still this record (the entry follows it), a
 * tombstone whose key has no record since. */
static void vqkvd__disk_requeue(vqkvd_disk_t *d, vqkvd__disk_write_t *it)
{
    vqkvd_disk_entry_t *e = *vqkvd__disk_link(d, it->rec.tenant, it->rec.model, it->rec.key);
    bool tombstone = (it->rec.flags & VQKVD_SEGMENT_TOMBSTONE) != 0;
    if (tombstone ? e != NULL : e == NULL || e->seq != it->rec.seq) {
        free(it->payload);
        free(it);
        return;
    }
    it->rec.seq = d->next_seq++;
    if (!tombstone)
        e->seq = it->rec.seq;
    it->retried = true;
    d->retrying++;
    it->rc = VQKV_OK;
    it->sys_errno = 0;
    it->next = NULL;
    vqkvd__disk_enqueue(d, it);
}

/* Back on the loop: the new segments join the list, the written blocks the
 * index; failures are counted and said once a batch. */
static void vqkvd__disk_write_after(uv_work_t *work, int status)
{
    vqkvd_disk_t *d = work->data;
    for (uint32_t i = 0; i < d->n_created; i++)
        vqkvd__disk_seg_add(d, d->created[i].number, d->created[i].fd,
                            VQKVD_SEGMENT_FILE_HEADER_BYTES);
    d->n_created = 0;
    /* A full disk may have room once the oldest segment goes: the writes
     * that met it are queued once more, to land in that room. */
    /* A tombstone that does not fit would let a restart bring back what an
     * Evict removed, so for one the tier drops even the segment it writes
     * (every block on disk, when it is the only one), rather than that. */
    bool full = false, tombstone = false;
    for (const vqkvd__disk_write_t *it = d->batch; it != NULL; it = it->next)
        if (it->rc != VQKV_OK && it->sys_errno == ENOSPC && !it->retried) {
            full = true;
            tombstone = tombstone || (it->rec.flags & VQKVD_SEGMENT_TOMBSTONE);
        }
    bool room = full && d->oldest != NULL && (d->oldest != d->newest || tombstone);
    if (room) {
        bool only = d->oldest == d->newest;
        vqkvd_log(VQKVD_LOG_WARN,
                  "disk: %s: %s; the %s segment goes, with its blocks, to make room for the "
                  "records that met it%s",
                  d->dir, strerror(ENOSPC), only ? "only" : "oldest",
                  only ? " (an Evict's tombstones)" : "");
        if (only && d->writer.fd >= 0)
            vqkvd_segment_close(&d->writer); /* no job runs: the next makes a new one */
        vqkvd__disk_drop_oldest(d);
    }
    vqkvd__disk_write_t *again = NULL, **again_tail = &again;
    int failed = 0, err = 0;
    for (vqkvd__disk_write_t *it = d->batch, *next; it != NULL; it = next) {
        next = it->next;
        d->retrying -= it->retried;
        if (status < 0 && it->rc == VQKV_OK)
            it->rc = VQKV_EIO;
        vqkvd_disk_seg_t *seg = it->rc == VQKV_OK ? vqkvd__disk_seg_find(d, it->number) : NULL;
        if (room && seg == NULL && !it->unread && !it->retried && !it->compaction &&
            it->sys_errno == ENOSPC) {
            it->next = NULL;
            *again_tail = it;
            again_tail = &it->next;
            continue;
        }
        if (it->unread) {
            /* not a write that failed: vqkvd__disk_settle_move says */
        } else if (seg != NULL) {
            uint64_t end = it->offset + vqkvd__disk_record_bytes(it->rec.payload_bytes);
            d->stats.bytes += end > seg->bytes ? end - seg->bytes : 0;
            seg->bytes = end > seg->bytes ? end : seg->bytes;
            d->stats.writes += !(it->rec.flags & VQKVD_SEGMENT_TOMBSTONE);
            d->stats.write_bytes += it->rec.payload_bytes;
            d->compact.blocked = d->compact.blocked && it->compaction;
        } else {
            d->stats.write_errors++;
            failed++;
            err = it->sys_errno;
        }
        vqkvd__disk_settle(d, it, seg);
        if (it->compaction)
            vqkvd__disk_compact_settled(d);
        if (it->src != NULL)
            vqkvd__disk_seg_unref(it->src);
        free(it->payload);
        free(it);
    }
    /* A directory that refuses new files stays so: the tier stops
     * writing. */
    d->off = d->off || err == EACCES || err == EROFS || err == ENOENT || err == EPERM;
    if (failed > 0)
        vqkvd_log(VQKVD_LOG_WARN, "disk: %d blocks not written to %s: %s%s", failed, d->dir,
                  err != 0 ? strerror(err) : "write failed",
                  d->off ? "; the disk tier writes nothing more until a restart" : "");
    d->batch = NULL;
    free(d->unlinking);
    d->unlinking = NULL;
    d->n_unlinking = 0;
    d->writing = false;
    for (vqkvd__disk_write_t *it = again, *next; it != NULL; it = next) {
        next = it->next;
        vqkvd__disk_requeue(d, it);
    }
    vqkvd__disk_trim(d);
    vqkvd__disk_kick(d);
    if (d->written != NULL)
        d->written(d->written_arg);
    vqkvd__disk_maybe_compact(d);
}

void vqkvd_disk_on_written(vqkvd_disk_t *d, void (*fn)(void *arg), void *arg)
{
    d->written = fn;
    d->written_arg = arg;
}

uint64_t vqkvd_disk_last_queued(const vqkvd_disk_t *d)
{
    return d->next_seq - 1;
}

bool vqkvd_disk_settled(const vqkvd_disk_t *d, uint64_t seq)
{
    /* The queue and the batch in flight hold the records not settled, in
     * order; the batch is older. A retry is out of that order (a new
     * number at the tail): while one waits, every item is looked at, by
     * the number it was first queued with. */
    const vqkvd__disk_write_t *oldest = d->batch != NULL ? d->batch : d->queue;
    if (d->retrying == 0)
        return oldest == NULL || oldest->rec.seq > seq;
    const vqkvd__disk_write_t *lists[2] = {d->batch, d->queue};
    for (int l = 0; l < 2; l++)
        for (const vqkvd__disk_write_t *it = lists[l]; it != NULL; it = it->next)
            if (it->first_seq <= seq)
                return false;
    return true;
}

bool vqkvd_disk_has_room(const vqkvd_disk_t *d, uint64_t bytes)
{
    return !d->off && d->queue_bytes + bytes <= VQKVD_DISK_QUEUE_BYTES;
}

/* Starts the write job with what is queued (up to a segment's bytes) and
 * the segments to delete, unless one runs or there is nothing to do. */
static void vqkvd__disk_kick(vqkvd_disk_t *d)
{
    if (d->writing || (d->queue == NULL && d->n_unlinks == 0))
        return;
    uint64_t bytes = 0;
    vqkvd__disk_write_t **tail = &d->batch;
    while (d->queue != NULL &&
           (bytes == 0 || bytes + d->queue->rec.payload_bytes <= d->segment_bytes)) {
        vqkvd__disk_write_t *it = d->queue;
        d->queue = it->next;
        it->next = NULL;
        bytes += it->rec.payload_bytes;
        d->queue_bytes -= vqkvd__disk_held_bytes(it);
        *tail = it;
        tail = &it->next;
    }
    if (d->queue == NULL)
        d->queue_tail = NULL;
    d->unlinking = d->unlinks;
    d->n_unlinking = d->n_unlinks;
    d->unlinks = NULL;
    d->n_unlinks = 0;
    d->work.data = d;
    d->writing = true;
    if (uv_queue_work(d->loop, &d->work, vqkvd__disk_write_work, vqkvd__disk_write_after) < 0) {
        d->writing = false; /* a closing loop: the batch goes unwritten */
        vqkvd__disk_write_after(&d->work, UV_ECANCELED);
    }
}

static void vqkvd__disk_enqueue(vqkvd_disk_t *d, vqkvd__disk_write_t *it)
{
    if (it->first_seq == 0)
        it->first_seq = it->rec.seq;
    if (d->queue_tail != NULL)
        d->queue_tail->next = it;
    else
        d->queue = it;
    d->queue_tail = it;
    d->queue_bytes += vqkvd__disk_held_bytes(it);
    vqkvd__disk_kick(d);
}

static bool vqkvd__disk_queue(vqkvd_disk_t *d, const vqkvd_segment_record_t *rec, uint8_t *payload)
{
    vqkvd__disk_write_t *it = calloc(1, sizeof *it);
    if (it == NULL) {
        free(payload);
        return false;
    }
    it->rec = *rec;
    it->rec.seq = d->next_seq++;
    it->payload = payload;
    if (payload !=
        NULL) { /* found from now on, read from the queue (its CRC comes with the write) */
        vqkvd_disk_entry_t *e = vqkvd__disk_apply(d, NULL, &it->rec, 0);
        if (e != NULL)
            e->queued = payload;
    }
    vqkvd__disk_enqueue(d, it);
    return true;
}

void vqkvd_disk_refused(vqkvd_disk_t *d)
{
    if (!d->off && d->stats.queue_full++ == 0)
        vqkvd_log(VQKVD_LOG_WARN, "disk: the write queue is full; evicted blocks are lost "
                                  "until it drains (vqkv_disk_queue_full_total counts them)");
}

bool vqkvd_disk_put(vqkvd_disk_t *d, const vqkvd_segment_record_t *rec, uint8_t *payload)
{
    if (!vqkvd_disk_has_room(d, rec->payload_bytes)) {
        vqkvd_disk_refused(d);
        free(payload);
        return false;
    }
    return vqkvd__disk_queue(d, rec, payload);
}

/* Forgets the entry at link and queues its tombstone. */
static void vqkvd__disk_drop_link(vqkvd_disk_t *d, vqkvd_disk_entry_t **link)
{
    const vqkvd_disk_entry_t *e = *link;
    vqkvd_segment_record_t rec = {
        .flags = VQKVD_SEGMENT_TOMBSTONE, .tenant = e->tenant, .model = e->model};
    memcpy(rec.key, e->key, VQKVD_KEY_BYTES);
    vqkvd__disk_unlink_entry(d, link);
    vqkvd__disk_queue(d, &rec, NULL);
}

bool vqkvd_disk_drop(vqkvd_disk_t *d, uint32_t tenant, uint32_t model, const uint8_t *key)
{
    vqkvd_disk_entry_t **link = vqkvd__disk_link(d, tenant, model, key);
    if (*link == NULL)
        return false;
    vqkvd__disk_drop_link(d, link);
    return true;
}

/* One pass over the index dropping the blocks of (tenant, model) that
 * are orphans (parent in neither tier), or, with every, all those not in
 * memory; returns how many it dropped. */
static uint64_t vqkvd__disk_orphan_pass(vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                        bool (*in_memory)(void *arg, const uint8_t *key), void *arg,
                                        bool every)
{
    static const uint8_t zero[VQKVD_KEY_BYTES];
    uint64_t n = 0;
    for (uint64_t i = 0; i <= d->mask; i++) {
        vqkvd_disk_entry_t **link = &d->buckets[i];
        while (*link != NULL) {
            vqkvd_disk_entry_t *e = *link;
            bool keep = e->tenant != tenant || e->model != model ||
                        (every ? in_memory(arg, e->key)
                               : memcmp(e->parent, zero, VQKVD_KEY_BYTES) == 0 ||
                                     *vqkvd__disk_link(d, tenant, model, e->parent) != NULL ||
                                     in_memory(arg, e->parent));
            if (keep) {
                link = &e->hnext;
                continue;
            }
            vqkvd__disk_drop_link(d, link); /* *link is the next entry now */
            n++;
        }
    }
    return n;
}

uint64_t vqkvd_disk_drop_orphans(vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                                 bool (*in_memory)(void *arg, const uint8_t *key), void *arg)
{
    uint64_t total = 0, n;
    while ((n = vqkvd__disk_orphan_pass(d, tenant, model, in_memory, arg, false)) > 0)
        total += n;
    return total;
}

uint64_t vqkvd_disk_drop_model(vqkvd_disk_t *d, uint32_t tenant, uint32_t model,
                               bool (*in_memory)(void *arg, const uint8_t *key), void *arg)
{
    return vqkvd__disk_orphan_pass(d, tenant, model, in_memory, arg, true);
}

/* ---- compaction ----------------------------------------------------------------- */

/* A segment other than the newest is compacted when at most half of its
 * records' bytes are still needed: its live blocks (and the tombstones
 * that must outlive it) are appended anew, like evicted blocks, and once
 * they are synced the file goes. Moving at most half to free at least
 * half bounds the bytes written per byte reclaimed by one. Only while the
 * write queue is idle, one segment at a time: evictions come first.
 *
 * Copies take new sequence numbers, so a restart prefers them to the
 * originals (a SIGKILL before the old file goes leaves both; the later
 * wins). A tombstone moves on only while its key has no record at all:
 * with a new number it would otherwise kill that later record. A victim
 * that is the oldest segment drops its tombstones: every record they
 * could hide lies before them in it, and goes with it. */

static bool vqkvd__disk_worth_compacting(const vqkvd_disk_seg_t *seg)
{
    return seg->bytes > VQKVD_SEGMENT_FILE_HEADER_BYTES &&
           2 * (seg->live + seg->carried) <= seg->bytes - VQKVD_SEGMENT_FILE_HEADER_BYTES;
}

/* On the scan job's thread: notes each record of the victim. */
static int vqkvd__disk_compact_collect(void *arg, const vqkvd_segment_record_t *rec,
                                       uint64_t payload_offset)
{
    (void)payload_offset;
    vqkvd_disk_t *d = arg;
    if (d->compact.n == d->compact.cap) {
        size_t cap = d->compact.cap != 0 ? 2 * d->compact.cap : 256;
        vqkvd__disk_compact_rec_t *recs = realloc(d->compact.recs, cap * sizeof *recs);
        if (recs == NULL)
            return VQKV_ENOMEM;
        d->compact.recs = recs;
        d->compact.cap = cap;
    }
    vqkvd__disk_compact_rec_t *r = &d->compact.recs[d->compact.n++];
    r->seq = rec->seq;
    r->tenant = rec->tenant;
    r->model = rec->model;
    r->tombstone = (rec->flags & VQKVD_SEGMENT_TOMBSTONE) != 0;
    memcpy(r->key, rec->key, VQKVD_KEY_BYTES);
    return VQKV_OK;
}

static void vqkvd__disk_compact_scan(uv_work_t *work)
{
    vqkvd_disk_t *d = work->data;
    vqkvd_segment_scan_t scan;
    d->compact.rc =
        vqkvd_segment_scan(d->compact.victim->fd, vqkvd__disk_compact_collect, d, &scan);
}

/* Every write of the compaction settled: the victim goes if no block is
 * left in it and every tombstone it had to pass on was. */
static void vqkvd__disk_compact_end(vqkvd_disk_t *d)
{
    vqkvd_disk_seg_t *victim = d->compact.victim;
    uint64_t number = victim->number, bytes = victim->bytes;
    bool done = !d->compact.failed && !victim->gone && victim->live == 0 &&
                vqkvd__disk_seg_remove(d, victim);
    if (done) {
        d->stats.compactions++;
        vqkvd_log(VQKVD_LOG_INFO,
                  "disk: segment %llu compacted: %llu blocks moved, %llu bytes freed",
                  (unsigned long long)number, (unsigned long long)d->compact.moved,
                  (unsigned long long)bytes);
    } else if (!victim->gone) {
        d->compact.blocked = true; /* its writes failed: retried after one succeeds */
    }
    vqkvd__disk_seg_unref(victim);
    free(d->compact.recs);
    d->compact.recs = NULL;
    d->compact.n = d->compact.cap = 0;
    d->compact.victim = NULL;
    vqkvd__disk_kick(d); /* deletes the file */
}

static void vqkvd__disk_compact_settled(vqkvd_disk_t *d)
{
    if (--d->compact.pending == 0)
        vqkvd__disk_compact_end(d);
}

/* Queues a compaction's write: a move of e, or (e NULL) r's tombstone. */
static bool vqkvd__disk_compact_queue(vqkvd_disk_t *d, const vqkvd__disk_compact_rec_t *r,
                                      const vqkvd_disk_entry_t *e)
{
    vqkvd__disk_write_t *it = calloc(1, sizeof *it);
    if (it == NULL)
        return false;
    it->compaction = true;
    it->rec.tenant = r->tenant;
    it->rec.model = r->model;
    memcpy(it->rec.key, r->key, VQKVD_KEY_BYTES);
    if (e == NULL) {
        it->rec.flags = VQKVD_SEGMENT_TOMBSTONE;
    } else {
        it->rec.logical_bytes = e->logical_bytes;
        it->rec.payload_bytes = e->payload_bytes;
        it->rec.payload_crc = e->payload_crc;
        memcpy(it->rec.parent, e->parent, VQKVD_KEY_BYTES);
        memcpy(it->rec.spec, e->spec, sizeof it->rec.spec);
        memcpy(it->rec.codebooks_sha256, e->codebooks_sha256, 32);
        it->src = e->seg;
        it->src->refs++;
        it->src_offset = e->payload_offset;
        it->src_seq = e->seq;
    }
    it->rec.seq = d->next_seq++;
    d->compact.pending++;
    vqkvd__disk_enqueue(d, it);
    return true;
}

/* Back on the loop with the victim's records: queues what must move.
 * O(records in the victim). */
static void vqkvd__disk_compact_scanned(uv_work_t *work, int status)
{
    vqkvd_disk_t *d = work->data;
    vqkvd_disk_seg_t *victim = d->compact.victim;
    d->compact.pending = 1; /* this pass's own, so no write ends it early */
    d->compact.failed = status < 0 || d->compact.rc != VQKV_OK || victim->gone;
    for (size_t i = 0; i < d->compact.n && !d->compact.failed; i++) {
        const vqkvd__disk_compact_rec_t *r = &d->compact.recs[i];
        const vqkvd_disk_entry_t *e = *vqkvd__disk_link(d, r->tenant, r->model, r->key);
        if (r->tombstone) {
            if (!d->compact.carry || (e != NULL && e->seg != NULL))
                continue;
            /* A later record not yet written: the tombstone stays needed
             * until it is; this victim waits. */
            d->compact.failed = e != NULL || !vqkvd__disk_compact_queue(d, r, NULL);
        } else if (e != NULL && e->seg == victim && e->seq == r->seq) {
            d->compact.failed = !vqkvd__disk_compact_queue(d, r, e);
        }
    }
    vqkvd__disk_compact_settled(d);
}

/* Starts compacting the oldest segment worth it, when the tier is idle.
 * O(segments). */
static void vqkvd__disk_maybe_compact(vqkvd_disk_t *d)
{
    if (d->compact.victim != NULL || d->compact.blocked || d->stopping || d->off || d->writing ||
        d->queue != NULL)
        return;
    vqkvd_disk_seg_t *seg = d->oldest;
    while (seg != NULL && seg != d->newest && !vqkvd__disk_worth_compacting(seg))
        seg = seg->next;
    if (seg == NULL || seg == d->newest)
        return;
    seg->refs++;
    d->compact.victim = seg;
    d->compact.carry = seg != d->oldest;
    d->compact.n = 0;
    d->compact.moved = 0;
    d->compact.rc = VQKV_OK;
    d->compact.work.data = d;
    if (uv_queue_work(d->loop, &d->compact.work, vqkvd__disk_compact_scan,
                      vqkvd__disk_compact_scanned) < 0) {
        d->compact.victim = NULL; /* a closing loop */
        vqkvd__disk_seg_unref(seg);
    }
}

void vqkvd_disk_stop(vqkvd_disk_t *d)
{
    d->stopping = true;
}

/* ---- reading ----------------------------------------------------------------- */

void vqkvd_disk_read_start(const vqkvd_disk_entry_t *e, vqkvd_disk_read_t *r)
{
    memset(r, 0, sizeof *r);
    r->started = true;
    r->seg = e->seg;
    if (r->seg != NULL)
        r->seg->refs++;
    else if ((r->copy = malloc(e->payload_bytes)) != NULL)
        memcpy(r->copy, e->queued, e->payload_bytes); /* compressed bytes, on the loop */
    r->seq = e->seq;
    r->rec.payload_bytes = e->payload_bytes;
    r->rec.payload_crc = e->payload_crc;
    r->payload_offset = e->payload_offset;
    r->tenant = e->tenant;
    r->model = e->model;
    memcpy(r->key, e->key, VQKVD_KEY_BYTES);
}

int vqkvd_disk_read(const vqkvd_disk_read_t *r, void *buf)
{
    int err = 0;
    if (r->seg == NULL) {
        if (r->copy == NULL)
            return VQKV_ENOMEM;
        memcpy(buf, r->copy, r->rec.payload_bytes);
        return VQKV_OK;
    }
    return vqkvd_segment_read_payload(r->seg->fd, &r->rec, r->payload_offset, buf,
                                      r->rec.payload_bytes, &err);
}

void vqkvd_disk_read_done(vqkvd_disk_t *d, vqkvd_disk_read_t *r, int rc)
{
    if (rc == VQKV_OK) {
        d->stats.reads++;
        d->stats.read_bytes += r->rec.payload_bytes;
    } else if (rc == VQKV_EFORMAT || rc == VQKV_EIO) {
        vqkvd_disk_entry_t **link = vqkvd__disk_link(d, r->tenant, r->model, r->key);
        if (*link != NULL && (*link)->seq == r->seq)
            vqkvd__disk_unlink_entry(d, link);
        d->stats.bad_records += rc == VQKV_EFORMAT;
        vqkvd_log(VQKVD_LOG_WARN, "disk: segment %llu: a block at byte %llu %s; dropped",
                  (unsigned long long)(r->seg != NULL ? r->seg->number : 0),
                  (unsigned long long)r->payload_offset,
                  rc == VQKV_EFORMAT ? "fails its checksum" : "cannot be read");
    }
    if (r->seg != NULL)
        vqkvd__disk_seg_unref(r->seg);
    free(r->copy);
    memset(r, 0, sizeof *r);
}

/* ---- the tier ------------------------------------------------------------------ */

int vqkvd_disk_open(const char *dir, uint64_t limit, uv_loop_t *loop, const vqkvd_store_t *store,
                    vqkvd_disk_t **out, char *why, size_t why_size)
{
    *out = NULL;
    if (dir == NULL || limit == 0 || loop == NULL || store == NULL)
        return VQKV_EINVAL;
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        snprintf(why, why_size, "cannot make %s: %s", dir, strerror(errno));
        return VQKV_EIO;
    }
    vqkvd_disk_t *d = calloc(1, sizeof *d);
    uint64_t *numbers = NULL;
    size_t count = 0;
    int err = 0, rc = VQKV_ENOMEM;
    if (d == NULL || (d->dir = strdup(dir)) == NULL ||
        (d->buckets = calloc(64, sizeof *d->buckets)) == NULL)
        goto fail;
    d->mask = 63;
    d->stats.limit_bytes = limit;
    d->segment_bytes = limit / 4 < VQKVD_DISK_SEGMENT_BYTES ? limit / 4 : VQKVD_DISK_SEGMENT_BYTES;
    d->loop = loop;
    d->store = store;
    d->writer.fd = -1;
    d->next_seq = 1;
    rc = vqkvd_segment_list(dir, &numbers, &count, &err);
    if (rc != VQKV_OK) {
        snprintf(why, why_size, "cannot list %s: %s", dir, err ? strerror(err) : "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < count; i++)
        vqkvd__disk_load(d, numbers[i]);
    free(numbers);
    vqkvd__disk_trim(d);
    vqkvd__disk_maybe_compact(d);
    *out = d;
    return VQKV_OK;
fail:
    if (rc == VQKV_ENOMEM)
        snprintf(why, why_size, "out of memory");
    vqkvd_disk_close(d);
    return rc;
}

void vqkvd_disk_close(vqkvd_disk_t *d)
{
    if (d == NULL)
        return;
    if (d->writer.fd >= 0)
        vqkvd_segment_close(&d->writer);
    for (uint64_t i = 0; d->buckets != NULL && i <= d->mask; i++)
        while (d->buckets[i] != NULL)
            vqkvd__disk_unlink_entry(d, &d->buckets[i]);
    while (d->oldest != NULL) {
        vqkvd_disk_seg_t *seg = d->oldest;
        d->oldest = seg->next;
        vqkvd__disk_seg_unref(seg);
    }
    for (vqkvd__disk_write_t *it = d->queue, *next; it != NULL; it = next) {
        next = it->next;
        free(it->payload);
        free(it);
    }
    free(d->unlinks);
    free(d->compact.recs);
    free(d->buckets);
    free(d->dir);
    free(d);
}

void vqkvd_disk_stats(const vqkvd_disk_t *d, vqkvd_disk_stats_t *st)
{
    *st = d->stats;
}
