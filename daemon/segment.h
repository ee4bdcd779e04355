/* segment.h -- the on-disk record format of vqkvd's disk tier: append-only
 * segment files of compressed blocks, and the synchronous calls that write,
 * scan and read them.
 *
 * Blocks evicted from the memory pool go to segment files in disk_dir as
 * they are (compressed bytes, never re-encoded), and at start vqkvd rebuilds
 * its index from the record headers alone, seeking past every payload. This
 * layer knows files and bytes only: no loop, no daemon state, no locks. Each
 * call blocks on the file system, so the daemon runs them on the thread
 * pool; one writer or scanner per fd at a time.
 *
 * A segment is `seg-<16 lowercase hex digits>.vqs` (its number), mode 0600:
 * a file header, then records, each a fixed-size header and its payload.
 * Integers are little-endian; every checksum is CRC-32C (Castagnoli).
 *
 * File header, 32 bytes:
 *
 *   offset  bytes  field
 *        0      8  magic "VQKVSEG\0"
 *        8      2  format version, 1
 *       10      2  header length, 32
 *       12      4  flags, 0 (no flag defined yet)
 *       16      8  segment number (the one in the file's name)
 *       24      4  reserved, 0
 *       28      4  CRC-32C of bytes 0..27
 *
 * Record header, 208 bytes, then payload length bytes of payload:
 *
 *   offset  bytes  field
 *        0      4  magic "VQKR"
 *        4      2  format version, 1
 *        6      2  header length, 208
 *        8      4  flags: bit 0 tombstone (the key was dropped), others 0
 *       12      4  tenant (uid)
 *       16      8  sequence number, never 0; increases through a segment
 *                  and across the directory: a later record of a key wins
 *       24      4  model (its store_id, session.h), never 0
 *       28      4  logical bytes (the block uncompressed)
 *       32      4  payload length: 1..64 MiB for a block, 0 for a tombstone
 *       36      4  CRC-32C of the payload (0 for a tombstone)
 *       40     32  key, not all zero
 *       72     32  parent key, all zero for a chain's root
 *      104     32  SHA-256 of the codec's codebooks (all zero without any)
 *      136     64  codec spec: printable ASCII, NUL-padded, at most 63
 *                  bytes so a NUL always ends it; empty only in a tombstone
 *      200      4  reserved, 0
 *      204      4  CRC-32C of bytes 0..203
 *
 * Trade-offs. Fixed-size headers with a fixed-size spec field: a scan reads
 * 208 bytes per record and needs no length to trust before the checksum
 * holds, at the price of 64 bytes for specs that are mostly 10. Version and
 * header length are checked for equality, not ranges: a later format takes
 * a new version, and this reader refuses its files (whole file header) or
 * stops at its records rather than guess. The payload has its own checksum
 * that only a read verifies, so a scan costs one pread per record whatever
 * the payloads weigh; a damaged payload shows when its block is read.
 * Records are written with one pwritev each and never rewritten; a crash
 * leaves a torn tail, which a scan reports (where it starts, how many bytes,
 * how many records it cuts off); the caller decides what to do with it. Nothing here
 * decides what a tombstone or a later sequence number means for the index:
 * that is the caller's, this layer only keeps both on disk intact.
 *
 * Errors are VQKV_E* codes: VQKV_EINVAL for arguments (a spec that does not
 * fit, a payload over the limit, a sequence number not above the last),
 * VQKV_EFORMAT for bytes that are not a valid header or a payload whose
 * checksum fails, VQKV_EIO where a system call failed, with its errno kept
 * beside the code (ENOSPC and EFBIG among them), VQKV_ENOMEM.
 */
#ifndef VQKVD_SEGMENT_H
#define VQKVD_SEGMENT_H

#include <stddef.h>
#include <stdint.h>

#define VQKVD_SEGMENT_VERSION 1
#define VQKVD_SEGMENT_FILE_HEADER_BYTES 32
#define VQKVD_SEGMENT_RECORD_BYTES 208
#define VQKVD_SEGMENT_SPEC_BYTES 64           /* the field; specs are at most 63 bytes */
#define VQKVD_SEGMENT_MAX_PAYLOAD (64u << 20) /* a record's payload, at most */
#define VQKVD_SEGMENT_NAME_BYTES 25           /* "seg-" 16 hex ".vqs" and the NUL */

/* Record flags. */
#define VQKVD_SEGMENT_TOMBSTONE 0x1u

/* One record's header, as encoded and as parsed. */
typedef struct {
    uint32_t flags; /* VQKVD_SEGMENT_TOMBSTONE or 0 */
    uint32_t tenant;
    uint64_t seq;
    uint32_t model; /* store_id */
    uint32_t logical_bytes;
    uint32_t payload_bytes;
    uint32_t payload_crc; /* set by vqkvd_segment_append and parse */
    uint8_t key[32];
    uint8_t parent[32];
    uint8_t codebooks_sha256[32];
    char spec[VQKVD_SEGMENT_SPEC_BYTES]; /* NUL-terminated */
} vqkvd_segment_record_t;

/* CRC-32C of len bytes, continuing from crc (0 to start): SSE4.2 where the
 * CPU has it, unless VQKV_CPU_SIMD is "0", else a table (slicing by 8). */
uint32_t vqkvd_segment_crc32c(uint32_t crc, const void *data, size_t len);
/* The table version alone, for the tests to hold both to the same values. */
uint32_t vqkvd__segment_crc32c_scalar(uint32_t crc, const void *data, size_t len);

/* Encodes rec, its header checksum included, into out. VQKV_EINVAL when a
 * field is out of its domain (the table above; payload_crc is written as
 * given), leaving out untouched. */
int vqkvd_segment_encode(const vqkvd_segment_record_t *rec,
                         uint8_t out[VQKVD_SEGMENT_RECORD_BYTES]);

/* Parses the len bytes at buf (a header needs VQKVD_SEGMENT_RECORD_BYTES;
 * more are ignored) into *rec, checking every field and the checksum:
 * VQKV_OK, VQKV_EINVAL for NULL arguments, or VQKV_EFORMAT. Reads nothing
 * past len. */
int vqkvd_segment_parse(const uint8_t *buf, size_t len, vqkvd_segment_record_t *rec);

/* The file name of segment number into buf (VQKVD_SEGMENT_NAME_BYTES at
 * least): VQKV_OK or VQKV_EINVAL. */
int vqkvd_segment_name(uint64_t number, char *buf, size_t size);

/* An open segment being appended to. Read its fields, never write them. */
typedef struct {
    int fd;            /* -1 once closed */
    uint64_t number;   /* the segment number */
    uint64_t end;      /* bytes of whole records: where the next one goes */
    uint64_t last_seq; /* the last record's sequence number, 0 before one */
    int broken;        /* a failure left the tail unknown: only close works */
    int sys_errno;     /* errno of the system call that failed the last call */
} vqkvd_segment_writer_t;

/* Creates seg-<number>.vqs in dir (0600, refusing one that exists: EEXIST),
 * writes its file header and makes its name durable (fsync of dir). VQKV_OK
 * with w open; VQKV_EINVAL; or VQKV_EIO with w->sys_errno (a read-only or
 * missing dir: EACCES, EROFS, ENOENT), nothing left behind. */
int vqkvd_segment_create(vqkvd_segment_writer_t *w, const char *dir, uint64_t number);

/* Appends rec and its payload (rec->payload_bytes bytes; rec->payload_crc
 * is computed here and written back into rec, for the caller's index) at w->end with one pwritev,
 * and sets *offset to where the record starts (its payload is VQKVD_SEGMENT_RECORD_BYTES later).
 * Not durable until vqkvd_segment_sync. VQKV_EINVAL (a bad field, rec->seq
 * not above w->last_seq) changes nothing. VQKV_EIO keeps errno in
 * w->sys_errno (ENOSPC, EFBIG, ...): the part written is cut off again, and
 * when even that fails the writer is broken and refuses every further call
 * but close; a scan cuts the torn tail. */
int vqkvd_segment_append(vqkvd_segment_writer_t *w, vqkvd_segment_record_t *rec,
                         const void *payload, uint64_t *offset);

/* fdatasync: the records appended so far survive a crash. VQKV_OK, or
 * VQKV_EIO with w->sys_errno; a failed sync breaks the writer (what reached
 * the disk is unknown). */
int vqkvd_segment_sync(vqkvd_segment_writer_t *w);

/* Closes the file (no sync). VQKV_OK, or VQKV_EIO with w->sys_errno; the fd
 * is closed either way. */
int vqkvd_segment_close(vqkvd_segment_writer_t *w);

/* Called by vqkvd_segment_scan for each valid record, in file order, with
 * the offset of its payload; anything but VQKV_OK stops the scan, which
 * returns it. */
typedef int (*vqkvd_segment_scan_fn)(void *arg, const vqkvd_segment_record_t *rec,
                                     uint64_t payload_offset);

/* What a scan found. A whole file has bad_bytes 0. Otherwise the valid
 * records end at good_bytes and the rest is bad: a torn tail (bad_records
 * 1: the record cut short or damaged), or damage with bad_records - 1 whole
 * records behind it, which truncating at good_bytes would lose too. They
 * are found by searching the tail for headers that check, stepping over
 * the payload of each found: the one place a scan reads more than headers,
 * as much as the damaged stretch, only when there is damage. */
typedef struct {
    uint64_t number;      /* the file header's segment number */
    uint64_t records;     /* valid records, each passed to the callback */
    uint64_t last_seq;    /* sequence number of the last of them, 0 without one */
    uint64_t good_bytes;  /* where the valid records end */
    uint64_t bad_bytes;   /* the file's length - good_bytes */
    uint64_t bad_records; /* the first bad record and whole ones behind it */
    int sys_errno;        /* with VQKV_EIO */
} vqkvd_segment_scan_t;

/* Walks the segment open on fd from its start, reading record headers only
 * (one pread each; payloads are skipped, never read or checked), and calls
 * fn for each valid record up to the first bad one: a header that does not
 * parse, a sequence number not above the one before, or a payload reaching
 * past the end of the file. *out tells what was found. A file shorter than
 * its file header is all tail (VQKV_OK, no records); a whole file header
 * that is not one of this version is VQKV_EFORMAT (not a segment this
 * reader may cut). VQKV_EIO with out->sys_errno when a read fails;
 * VQKV_EINVAL; or fn's code. Allocates nothing. */
int vqkvd_segment_scan(int fd, vqkvd_segment_scan_fn fn, void *arg, vqkvd_segment_scan_t *out);

/* Reads rec's payload (at payload_offset, as the scan gave it) into buf of
 * size bytes and checks its length and checksum: VQKV_OK; VQKV_EINVAL (size
 * below rec->payload_bytes, or over the limit); VQKV_EFORMAT when the
 * checksum fails (the payload is damaged; buf holds the bytes read);
 * VQKV_EIO with *sys_errno (pread's errno, or ENODATA when the file ends
 * first). */
int vqkvd_segment_read_payload(int fd, const vqkvd_segment_record_t *rec, uint64_t payload_offset,
                               void *buf, size_t size, int *sys_errno);

/* The segment numbers in dir, ascending, in *numbers (malloc'd, the
 * caller frees; NULL when *count is 0): names seg-<16 lowercase hex
 * digits>.vqs only, every other entry ignored. VQKV_OK, VQKV_EINVAL,
 * VQKV_ENOMEM, or VQKV_EIO with *sys_errno. */
int vqkvd_segment_list(const char *dir, uint64_t **numbers, size_t *count, int *sys_errno);

#endif
