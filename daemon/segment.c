/* segment.c -- segment files of the disk tier (segment.h): CRC-32C, the
 * record and file headers, the writer, the scanner, payload reads and the
 * directory listing.
 *
 * Every read goes through pread with a length fixed before it (a header's
 * size, or a payload length the caller's buffer bounds), so a hostile file
 * can make a scan stop early but never read out of bounds or allocate: the
 * scan allocates nothing at all, the listing one array that grows with the
 * directory. Headers are decoded field by field from bytes, never cast, so
 * alignment and host byte order do not matter.
 *
 * CRC-32C uses the SSE4.2 instruction, 8 bytes a step, where the CPU has
 * it; the table version (slicing by 8, about 1 byte per cycle) is the
 * reference and what other CPUs run. Headers are 208 bytes, so either is
 * noise beside the pread; payload checks on reads are what the speed is for.
 *
 * A failed append cuts the file back to its last whole record, so a writer
 * that met ENOSPC can go on once there is room; when even the cut fails
 * (or fdatasync did: the kernel may have dropped the dirty pages), the tail
 * is unknown and the writer refuses everything but close.
 */
#include "segment.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "vqkv_codec.h"

static const uint8_t vqkvd__segment_file_magic[8] = {'V', 'Q', 'K', 'V', 'S', 'E', 'G', '\0'};
static const uint8_t vqkvd__segment_record_magic[4] = {'V', 'Q', 'K', 'R'};

/* Offsets of the record header's fields (segment.h's table). */
enum {
    VQKVD__REC_VERSION = 4,
    VQKVD__REC_HLEN = 6,
    VQKVD__REC_FLAGS = 8,
    VQKVD__REC_TENANT = 12,
    VQKVD__REC_SEQ = 16,
    VQKVD__REC_MODEL = 24,
    VQKVD__REC_LOGICAL = 28,
    VQKVD__REC_PAYLOAD = 32,
    VQKVD__REC_PAYLOAD_CRC = 36,
    VQKVD__REC_KEY = 40,
    VQKVD__REC_PARENT = 72,
    VQKVD__REC_BOOKS = 104,
    VQKVD__REC_SPEC = 136,
    VQKVD__REC_RESERVED = 200,
    VQKVD__REC_CRC = 204,
};

/* ---- CRC-32C ---------------------------------------------------------------- */

static uint32_t vqkvd__segment_crc_table[8][256];
static uint32_t (*vqkvd__segment_crc_fn)(uint32_t, const void *, size_t);
static pthread_once_t vqkvd__segment_crc_once = PTHREAD_ONCE_INIT;
static void vqkvd__segment_crc_init(void);

uint32_t vqkvd__segment_crc32c_scalar(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&vqkvd__segment_crc_once, vqkvd__segment_crc_init);
    const uint8_t *p = data;
    uint32_t c = ~crc;
    uint32_t(*t)[256] = vqkvd__segment_crc_table;
    for (; len >= 8; len -= 8, p += 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24);
        c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
            t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
    }
    for (; len > 0; len--, p++)
        c = t[0][(c ^ *p) & 0xff] ^ (c >> 8);
    return ~c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
vqkvd__segment_crc32c_sse42(uint32_t crc, const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t c = ~crc;
    for (; len >= 8; len -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, sizeof w);
        c = _mm_crc32_u64(c, w);
    }
    for (; len > 0; len--, p++)
        c = _mm_crc32_u8((uint32_t)c, *p);
    return ~(uint32_t)c;
}
#endif

/* The tables of the reflected polynomial 0x82f63b78 (slicing by 8: table k
 * is a byte followed by k zero bytes), and the best function for this CPU. */
static void vqkvd__segment_crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int b = 0; b < 8; b++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1u)));
        vqkvd__segment_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++) {
            uint32_t prev = vqkvd__segment_crc_table[k - 1][i];
            vqkvd__segment_crc_table[k][i] = (prev >> 8) ^ vqkvd__segment_crc_table[0][prev & 0xff];
        }
    vqkvd__segment_crc_fn = vqkvd__segment_crc32c_scalar;
#if defined(__x86_64__)
    const char *env = getenv("VQKV_CPU_SIMD");
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && (env == NULL || strcmp(env, "0") != 0))
        vqkvd__segment_crc_fn = vqkvd__segment_crc32c_sse42;
#endif
}

uint32_t vqkvd_segment_crc32c(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&vqkvd__segment_crc_once, vqkvd__segment_crc_init);
    return vqkvd__segment_crc_fn(crc, data, len);
}

/* ---- bytes ------------------------------------------------------------------ */

static void vqkvd__segment_put16(uint8_t *p, uint16_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
}

static void vqkvd__segment_put32(uint8_t *p, uint32_t x)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

static void vqkvd__segment_put64(uint8_t *p, uint64_t x)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

static uint16_t vqkvd__segment_get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t vqkvd__segment_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t vqkvd__segment_get64(const uint8_t *p)
{
    return (uint64_t)vqkvd__segment_get32(p) | (uint64_t)vqkvd__segment_get32(p + 4) << 32;
}

static int vqkvd__segment_all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != 0)
            return 0;
    return 1;
}

/* ---- record headers ----------------------------------------------------------- */

/* Whether the 64-byte spec field holds printable ASCII, then NULs only,
 * with at least one NUL (and, for a block, at least one character). */
static int vqkvd__segment_spec_ok(const char *field, uint32_t flags)
{
    size_t n = 0;
    while (n < VQKVD_SEGMENT_SPEC_BYTES && field[n] != '\0') {
        if (field[n] < 0x20 || field[n] > 0x7e)
            return 0;
        n++;
    }
    if (n == VQKVD_SEGMENT_SPEC_BYTES || (n == 0 && !(flags & VQKVD_SEGMENT_TOMBSTONE)))
        return 0;
    return vqkvd__segment_all_zero((const uint8_t *)field + n, VQKVD_SEGMENT_SPEC_BYTES - n);
}

/* Whether rec's fields are in their domains (segment.h's table), the spec
 * field read as it is stored. */
static int vqkvd__segment_record_ok(const vqkvd_segment_record_t *rec)
{
    int tomb = (rec->flags & VQKVD_SEGMENT_TOMBSTONE) != 0;
    if ((rec->flags & ~VQKVD_SEGMENT_TOMBSTONE) != 0 || rec->seq == 0 || rec->model == 0)
        return 0;
    if (vqkvd__segment_all_zero(rec->key, sizeof rec->key))
        return 0;
    if (tomb ? rec->payload_bytes != 0 || rec->payload_crc != 0
             : rec->payload_bytes == 0 || rec->payload_bytes > VQKVD_SEGMENT_MAX_PAYLOAD)
        return 0;
    return vqkvd__segment_spec_ok(rec->spec, rec->flags);
}

int vqkvd_segment_encode(const vqkvd_segment_record_t *rec, uint8_t out[VQKVD_SEGMENT_RECORD_BYTES])
{
    if (rec == NULL || out == NULL)
        return VQKV_EINVAL;
    /* The spec as a C string: it must end inside the field, and is checked
     * as it will be stored, NUL-padded. */
    size_t spec_len = strnlen(rec->spec, sizeof rec->spec);
    if (spec_len == sizeof rec->spec)
        return VQKV_EINVAL;
    vqkvd_segment_record_t stored = *rec;
    memset(stored.spec + spec_len, 0, sizeof stored.spec - spec_len);
    if (!vqkvd__segment_record_ok(&stored))
        return VQKV_EINVAL;
    uint8_t *p = out;
    memset(p, 0, VQKVD_SEGMENT_RECORD_BYTES);
    memcpy(p + VQKVD__REC_SPEC, stored.spec, VQKVD_SEGMENT_SPEC_BYTES);
    memcpy(p, vqkvd__segment_record_magic, sizeof vqkvd__segment_record_magic);
    vqkvd__segment_put16(p + VQKVD__REC_VERSION, VQKVD_SEGMENT_VERSION);
    vqkvd__segment_put16(p + VQKVD__REC_HLEN, VQKVD_SEGMENT_RECORD_BYTES);
    vqkvd__segment_put32(p + VQKVD__REC_FLAGS, rec->flags);
    vqkvd__segment_put32(p + VQKVD__REC_TENANT, rec->tenant);
    vqkvd__segment_put64(p + VQKVD__REC_SEQ, rec->seq);
    vqkvd__segment_put32(p + VQKVD__REC_MODEL, rec->model);
    vqkvd__segment_put32(p + VQKVD__REC_LOGICAL, rec->logical_bytes);
    vqkvd__segment_put32(p + VQKVD__REC_PAYLOAD, rec->payload_bytes);
    vqkvd__segment_put32(p + VQKVD__REC_PAYLOAD_CRC, rec->payload_crc);
    memcpy(p + VQKVD__REC_KEY, rec->key, 32);
    memcpy(p + VQKVD__REC_PARENT, rec->parent, 32);
    memcpy(p + VQKVD__REC_BOOKS, rec->codebooks_sha256, 32);
    vqkvd__segment_put32(p + VQKVD__REC_CRC, vqkvd_segment_crc32c(0, p, VQKVD__REC_CRC));
    return VQKV_OK;
}

int vqkvd_segment_parse(const uint8_t *buf, size_t len, vqkvd_segment_record_t *rec)
{
    if (buf == NULL || rec == NULL)
        return VQKV_EINVAL;
    if (len < VQKVD_SEGMENT_RECORD_BYTES ||
        memcmp(buf, vqkvd__segment_record_magic, sizeof vqkvd__segment_record_magic) != 0 ||
        vqkvd__segment_get16(buf + VQKVD__REC_VERSION) != VQKVD_SEGMENT_VERSION ||
        vqkvd__segment_get16(buf + VQKVD__REC_HLEN) != VQKVD_SEGMENT_RECORD_BYTES ||
        vqkvd__segment_get32(buf + VQKVD__REC_CRC) !=
            vqkvd_segment_crc32c(0, buf, VQKVD__REC_CRC) ||
        vqkvd__segment_get32(buf + VQKVD__REC_RESERVED) != 0)
        return VQKV_EFORMAT;
    vqkvd_segment_record_t r;
    r.flags = vqkvd__segment_get32(buf + VQKVD__REC_FLAGS);
    r.tenant = vqkvd__segment_get32(buf + VQKVD__REC_TENANT);
    r.seq = vqkvd__segment_get64(buf + VQKVD__REC_SEQ);
    r.model = vqkvd__segment_get32(buf + VQKVD__REC_MODEL);
    r.logical_bytes = vqkvd__segment_get32(buf + VQKVD__REC_LOGICAL);
    r.payload_bytes = vqkvd__segment_get32(buf + VQKVD__REC_PAYLOAD);
    r.payload_crc = vqkvd__segment_get32(buf + VQKVD__REC_PAYLOAD_CRC);
    memcpy(r.key, buf + VQKVD__REC_KEY, 32);
    memcpy(r.parent, buf + VQKVD__REC_PARENT, 32);
    memcpy(r.codebooks_sha256, buf + VQKVD__REC_BOOKS, 32);
    memcpy(r.spec, buf + VQKVD__REC_SPEC, VQKVD_SEGMENT_SPEC_BYTES);
    if (!vqkvd__segment_record_ok(&r))
        return VQKV_EFORMAT;
    *rec = r;
    return VQKV_OK;
}

/* ---- file headers -------------------------------------------------------------- */

static void vqkvd__segment_file_header(uint64_t number,
                                       uint8_t out[VQKVD_SEGMENT_FILE_HEADER_BYTES])
{
    memset(out, 0, VQKVD_SEGMENT_FILE_HEADER_BYTES);
    memcpy(out, vqkvd__segment_file_magic, sizeof vqkvd__segment_file_magic);
    vqkvd__segment_put16(out + 8, VQKVD_SEGMENT_VERSION);
    vqkvd__segment_put16(out + 10, VQKVD_SEGMENT_FILE_HEADER_BYTES);
    vqkvd__segment_put64(out + 16, number);
    vqkvd__segment_put32(out + 28, vqkvd_segment_crc32c(0, out, 28));
}

/* VQKV_OK with *number, or VQKV_EFORMAT. */
static int vqkvd__segment_file_header_parse(const uint8_t in[VQKVD_SEGMENT_FILE_HEADER_BYTES],
                                            uint64_t *number)
{
    if (memcmp(in, vqkvd__segment_file_magic, sizeof vqkvd__segment_file_magic) != 0 ||
        vqkvd__segment_get16(in + 8) != VQKVD_SEGMENT_VERSION ||
        vqkvd__segment_get16(in + 10) != VQKVD_SEGMENT_FILE_HEADER_BYTES ||
        vqkvd__segment_get32(in + 12) != 0 || vqkvd__segment_get32(in + 24) != 0 ||
        vqkvd__segment_get32(in + 28) != vqkvd_segment_crc32c(0, in, 28))
        return VQKV_EFORMAT;
    *number = vqkvd__segment_get64(in + 16);
    return VQKV_OK;
}

int vqkvd_segment_name(uint64_t number, char *buf, size_t size)
{
    if (buf == NULL || size < VQKVD_SEGMENT_NAME_BYTES)
        return VQKV_EINVAL;
    snprintf(buf, size, "seg-%016" PRIx64 ".vqs", number);
    return VQKV_OK;
}

/* ---- system calls ------------------------------------------------------------------ */

/* Reads len bytes at off into buf: the count read (less only at the end of
 * the file), or -1 with errno. */
static ssize_t vqkvd__segment_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, (uint8_t *)buf + got, len - got, (off_t)(off + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* Writes every byte of iov[0..n) at off, going on after short writes: 0,
 * or the errno of the call that failed. */
static int vqkvd__segment_pwritev_full(int fd, struct iovec *iov, int n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = pwritev(fd, iov, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno;
        if (w == 0)
            return EIO; /* not a regular file's answer; never loop on it */
        off += (uint64_t)w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* ---- the writer -------------------------------------------------------------------- */

int vqkvd_segment_create(vqkvd_segment_writer_t *w, const char *dir, uint64_t number)
{
    if (w == NULL || dir == NULL)
        return VQKV_EINVAL;
    char name[VQKVD_SEGMENT_NAME_BYTES];
    uint8_t head[VQKVD_SEGMENT_FILE_HEADER_BYTES];
    struct iovec iov = {.iov_base = head, .iov_len = sizeof head};
    int err = 0, fd = -1;
    *w = (vqkvd_segment_writer_t){.fd = -1, .number = number};
    vqkvd_segment_name(number, name, sizeof name);
    vqkvd__segment_file_header(number, head);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        err = errno;
        goto done;
    }
    fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        err = errno;
        goto done;
    }
    err = vqkvd__segment_pwritev_full(fd, &iov, 1, 0);
    if (err == 0 && fsync(dfd) < 0)
        err = errno;
    if (err != 0) {
        unlinkat(dfd, name, 0);
        close(fd);
        fd = -1;
    }
done:
    if (dfd >= 0)
        close(dfd);
    w->sys_errno = err;
    if (err != 0)
        return VQKV_EIO;
    w->fd = fd;
    w->end = VQKVD_SEGMENT_FILE_HEADER_BYTES;
    return VQKV_OK;
}

int vqkvd_segment_append(vqkvd_segment_writer_t *w, vqkvd_segment_record_t *rec,
                         const void *payload, uint64_t *offset)
{
    if (w == NULL || rec == NULL || offset == NULL || w->fd < 0 ||
        (payload == NULL && rec->payload_bytes > 0) || rec->seq <= w->last_seq ||
        rec->payload_bytes > VQKVD_SEGMENT_MAX_PAYLOAD)
        return VQKV_EINVAL;
    if (w->broken) {
        w->sys_errno = EIO;
        return VQKV_EIO;
    }
    vqkvd_segment_record_t r = *rec;
    r.payload_crc = r.payload_bytes ? vqkvd_segment_crc32c(0, payload, r.payload_bytes) : 0;
    uint8_t head[VQKVD_SEGMENT_RECORD_BYTES];
    int rc = vqkvd_segment_encode(&r, head);
    if (rc != VQKV_OK)
        return rc;
    rec->payload_crc = r.payload_crc;
    struct iovec iov[2] = {{.iov_base = head, .iov_len = sizeof head},
                           {.iov_base = (void *)payload, .iov_len = r.payload_bytes}};
    int err = vqkvd__segment_pwritev_full(w->fd, iov, r.payload_bytes ? 2 : 1, w->end);
    w->sys_errno = err;
    if (err != 0) {
        /* Cut what part of the record got written; the writer goes on at
         * the same end, or is broken when the tail cannot be cut. */
        if (ftruncate(w->fd, (off_t)w->end) < 0)
            w->broken = 1;
        return VQKV_EIO;
    }
    *offset = w->end;
    w->end += VQKVD_SEGMENT_RECORD_BYTES + (uint64_t)r.payload_bytes;
    w->last_seq = r.seq;
    return VQKV_OK;
}

int vqkvd_segment_sync(vqkvd_segment_writer_t *w)
{
    if (w == NULL || w->fd < 0)
        return VQKV_EINVAL;
    if (w->broken) {
        w->sys_errno = EIO;
        return VQKV_EIO;
    }
    if (fdatasync(w->fd) < 0) {
        w->sys_errno = errno;
        w->broken = 1;
        return VQKV_EIO;
    }
    w->sys_errno = 0;
    return VQKV_OK;
}

int vqkvd_segment_close(vqkvd_segment_writer_t *w)
{
    if (w == NULL || w->fd < 0)
        return VQKV_EINVAL;
    int rc = close(w->fd);
    w->fd = -1;
    w->sys_errno = rc < 0 ? errno : 0;
    return rc < 0 ? VQKV_EIO : VQKV_OK;
}

/* ---- the scanner ------------------------------------------------------------------- */

/* The record at off, when its header parses and its payload ends by size:
 * 1 with *rec; 0 when it is bad; -1 with errno when a read failed. */
static int vqkvd__segment_record_at(int fd, uint64_t off, uint64_t size,
                                    vqkvd_segment_record_t *rec)
{
    uint8_t head[VQKVD_SEGMENT_RECORD_BYTES];
    if (off > size || size - off < VQKVD_SEGMENT_RECORD_BYTES)
        return 0;
    ssize_t n = vqkvd__segment_pread_full(fd, head, sizeof head, off);
    if (n < 0)
        return -1;
    if (vqkvd_segment_parse(head, (size_t)n, rec) != VQKV_OK)
        return 0;
    return size - off - VQKVD_SEGMENT_RECORD_BYTES >= rec->payload_bytes;
}

/* Counts the whole records in the damaged tail [from, size): each place the
 * record magic starts a header that checks, then on past its payload.
 * Reads the tail in windows; 0 or -1 with errno. */
static int vqkvd__segment_count_behind(int fd, uint64_t from, uint64_t size, uint64_t *count)
{
    uint8_t win[16384];
    const size_t mlen = sizeof vqkvd__segment_record_magic;
    uint64_t pos = from;
    while (size - pos >= VQKVD_SEGMENT_RECORD_BYTES) {
        ssize_t n = vqkvd__segment_pread_full(fd, win, sizeof win, pos);
        if (n < 0)
            return -1;
        if (n < VQKVD_SEGMENT_RECORD_BYTES)
            return 0;                                   /* shrunk since fstat */
        uint64_t next = pos + (uint64_t)n - (mlen - 1); /* a magic may straddle windows */
        for (size_t i = 0; i + mlen <= (size_t)n; i++) {
            if (memcmp(win + i, vqkvd__segment_record_magic, mlen) != 0)
                continue;
            vqkvd_segment_record_t rec;
            int ok = vqkvd__segment_record_at(fd, pos + i, size, &rec);
            if (ok < 0)
                return -1;
            if (ok) {
                (*count)++;
                next = pos + i + VQKVD_SEGMENT_RECORD_BYTES + rec.payload_bytes;
                break;
            }
        }
        pos = next;
    }
    return 0;
}

/* Reads and checks the file header: VQKV_OK (*torn set when the file is
 * shorter than one), VQKV_EFORMAT, or VQKV_EIO with out->sys_errno. */
static int vqkvd__segment_scan_header(int fd, uint64_t size, vqkvd_segment_scan_t *out, int *torn)
{
    uint8_t head[VQKVD_SEGMENT_FILE_HEADER_BYTES];
    *torn = size < sizeof head;
    if (*torn)
        return VQKV_OK;
    ssize_t n = vqkvd__segment_pread_full(fd, head, sizeof head, 0);
    if (n < 0) {
        out->sys_errno = errno;
        return VQKV_EIO;
    }
    if ((size_t)n < sizeof head) {
        *torn = 1; /* shrunk since fstat */
        return VQKV_OK;
    }
    return vqkvd__segment_file_header_parse(head, &out->number);
}

int vqkvd_segment_scan(int fd, vqkvd_segment_scan_fn fn, void *arg, vqkvd_segment_scan_t *out)
{
    if (fd < 0 || fn == NULL || out == NULL)
        return VQKV_EINVAL;
    *out = (vqkvd_segment_scan_t){0};
    struct stat st;
    int torn = 0, rc = VQKV_OK;
    if (fstat(fd, &st) < 0) {
        out->sys_errno = errno;
        return VQKV_EIO;
    }
    uint64_t size = (uint64_t)st.st_size, off = 0;
    rc = vqkvd__segment_scan_header(fd, size, out, &torn);
    if (rc != VQKV_OK || torn)
        goto tail;
    off = VQKVD_SEGMENT_FILE_HEADER_BYTES;
    while (off < size) {
        vqkvd_segment_record_t rec;
        int ok = vqkvd__segment_record_at(fd, off, size, &rec);
        if (ok < 0) {
            out->sys_errno = errno;
            rc = VQKV_EIO;
            goto tail;
        }
        if (!ok || rec.seq <= out->last_seq)
            break;
        rc = fn(arg, &rec, off + VQKVD_SEGMENT_RECORD_BYTES);
        if (rc != VQKV_OK)
            goto tail;
        out->records++;
        out->last_seq = rec.seq;
        off += VQKVD_SEGMENT_RECORD_BYTES + (uint64_t)rec.payload_bytes;
    }
    if (off < size) {
        out->bad_records = 1;
        if (vqkvd__segment_count_behind(fd, off + 1, size, &out->bad_records) < 0) {
            out->sys_errno = errno;
            rc = VQKV_EIO;
        }
    }
tail:
    out->good_bytes = off;
    out->bad_bytes = size - off;
    if (torn && size > 0)
        out->bad_records = 1;
    return rc;
}

/* ---- payloads and listing ------------------------------------------------------------ */

int vqkvd_segment_read_payload(int fd, const vqkvd_segment_record_t *rec, uint64_t payload_offset,
                               void *buf, size_t size, int *sys_errno)
{
    if (fd < 0 || rec == NULL || buf == NULL || sys_errno == NULL ||
        rec->payload_bytes > VQKVD_SEGMENT_MAX_PAYLOAD || size < rec->payload_bytes)
        return VQKV_EINVAL;
    *sys_errno = 0;
    ssize_t n = vqkvd__segment_pread_full(fd, buf, rec->payload_bytes, payload_offset);
    if (n < 0 || (size_t)n < rec->payload_bytes) {
        *sys_errno = n < 0 ? errno : ENODATA;
        return VQKV_EIO;
    }
    if (vqkvd_segment_crc32c(0, buf, rec->payload_bytes) != rec->payload_crc)
        return VQKV_EFORMAT;
    return VQKV_OK;
}

/* The number named by a segment file name, or -1 for any other name. */
static int vqkvd__segment_number_of(const char *name, uint64_t *number)
{
    if (strlen(name) != VQKVD_SEGMENT_NAME_BYTES - 1 || strncmp(name, "seg-", 4) != 0 ||
        strcmp(name + 20, ".vqs") != 0)
        return -1;
    uint64_t x = 0;
    for (int i = 4; i < 20; i++) {
        char c = name[i];
        if (c >= '0' && c <= '9')
            x = x << 4 | (uint64_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            x = x << 4 | (uint64_t)(c - 'a' + 10);
        else
            return -1;
    }
    *number = x;
    return 0;
}

static int vqkvd__segment_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int vqkvd_segment_list(const char *dir, uint64_t **numbers, size_t *count, int *sys_errno)
{
    if (dir == NULL || numbers == NULL || count == NULL || sys_errno == NULL)
        return VQKV_EINVAL;
    uint64_t *v = NULL;
    size_t n = 0, cap = 0;
    int rc = VQKV_OK;
    *sys_errno = 0;
    DIR *d = opendir(dir);
    if (d == NULL) {
        *sys_errno = errno;
        return VQKV_EIO;
    }
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (e == NULL) {
            *sys_errno = errno;
            rc = errno != 0 ? VQKV_EIO : VQKV_OK;
            break;
        }
        uint64_t x;
        if (e->d_type == DT_DIR || vqkvd__segment_number_of(e->d_name, &x) < 0)
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            uint64_t *bigger = realloc(v, cap * sizeof *v);
            if (bigger == NULL) {
                rc = VQKV_ENOMEM;
                break;
            }
            v = bigger;
        }
        v[n++] = x;
    }
    closedir(d);
    if (rc != VQKV_OK) {
        free(v);
        return rc;
    }
    if (n > 0)
        qsort(v, n, sizeof *v, vqkvd__segment_cmp);
    *numbers = v;
    *count = n;
    return VQKV_OK;
}
