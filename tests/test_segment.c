/* test_segment.c -- the disk tier's segment files (daemon/segment.h):
 * CRC-32C against the known vectors (table and SSE4.2 alike), record
 * headers encoded and parsed field by field, every field's refusal (with
 * the checksum made right again, so the field check is what refuses),
 * specs that do not fit, the writer's file (name, mode, file header),
 * many records over several segments found by scans that read headers
 * only (counted through /proc/self/io), the directory listing among other
 * files, a segment cut at every byte offset, every single bit flipped,
 * hostile lengths, wrong magic and version, a read-only or missing
 * directory, EFBIG through RLIMIT_FSIZE and ENOSPC through /dev/full.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "segment.h"
#include "test_util.h"
#include "vqkv_codec.h"

#define HDR VQKVD_SEGMENT_FILE_HEADER_BYTES
#define REC VQKVD_SEGMENT_RECORD_BYTES

/* ---- fixtures and helpers ---------------------------------------------------- */

typedef struct {
    char dir[512];
} scratch_t;

static int make_scratch(void **state)
{
    scratch_t *s = calloc(1, sizeof *s);
    if (s == NULL || test_make_dir(s->dir, sizeof s->dir, "vqkv-segment") != 0) {
        free(s);
        return -1;
    }
    *state = s;
    return 0;
}

/* The scratch directory and what the tests left in it. */
static int drop_scratch(void **state)
{
    scratch_t *s = *state;
    test_remove_tree(s->dir);
    free(s);
    return 0;
}

/* n bytes from seed, none of them 'V', so that no payload holds a record's
 * magic and the search behind damage finds only real records. */
static void fill_payload(uint8_t *p, size_t n, uint64_t seed)
{
    test_rng_t rng = {seed};
    for (size_t i = 0; i < n; i++) {
        p[i] = (uint8_t)test_rng_next(&rng);
        if (p[i] == 'V')
            p[i] = 'v';
    }
}

/* Block record number i: every field set to something of its own. */
static vqkvd_segment_record_t make_rec(uint64_t seq, uint32_t payload_bytes)
{
    vqkvd_segment_record_t r;
    memset(&r, 0, sizeof r);
    r.tenant = 1000 + (uint32_t)seq;
    r.seq = seq;
    r.model = 0x5eed0000u | (uint32_t)seq;
    r.logical_bytes = payload_bytes * 3 + 1;
    r.payload_bytes = payload_bytes;
    for (int i = 0; i < 32; i++) {
        r.key[i] = (uint8_t)(seq * 31 + (uint64_t)i + 1);
        r.parent[i] = seq > 1 ? (uint8_t)((seq - 1) * 31 + (uint64_t)i + 1) : 0;
        r.codebooks_sha256[i] = (uint8_t)(0xc0 + i);
    }
    snprintf(r.spec, sizeof r.spec, "rvq:d=8,b=8,r=%u", (unsigned)(seq % 4 + 1));
    return r;
}

static void assert_rec_equal(const vqkvd_segment_record_t *a, const vqkvd_segment_record_t *b)
{
    assert_int_equal(a->flags, b->flags);
    assert_int_equal(a->tenant, b->tenant);
    assert_int_equal(a->seq, b->seq);
    assert_int_equal(a->model, b->model);
    assert_int_equal(a->logical_bytes, b->logical_bytes);
    assert_int_equal(a->payload_bytes, b->payload_bytes);
    assert_int_equal(a->payload_crc, b->payload_crc);
    assert_memory_equal(a->key, b->key, 32);
    assert_memory_equal(a->parent, b->parent, 32);
    assert_memory_equal(a->codebooks_sha256, b->codebooks_sha256, 32);
    assert_string_equal(a->spec, b->spec);
}

/* Makes a record header's checksum right again after a change. */
static void reseal(uint8_t *h)
{
    test_put_u32(h + 204, vqkvd_segment_crc32c(0, h, 204));
}

/* What scans saw: up to 256 records and their payload offsets. */
typedef struct {
    size_t n;
    vqkvd_segment_record_t rec[256];
    uint64_t at[256];
} seen_t;

static int collect(void *arg, const vqkvd_segment_record_t *rec, uint64_t payload_offset)
{
    seen_t *s = arg;
    assert_true(s->n < 256);
    s->rec[s->n] = *rec;
    s->at[s->n++] = payload_offset;
    return VQKV_OK;
}

static int scan_fd(int fd, seen_t *seen, vqkvd_segment_scan_t *out)
{
    memset(seen, 0, sizeof *seen);
    return vqkvd_segment_scan(fd, collect, seen, out);
}

static int open_segment(const char *dir, uint64_t number, int flags)
{
    char name[VQKVD_SEGMENT_NAME_BYTES], path[1024];
    assert_ok(vqkvd_segment_name(number, name, sizeof name));
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, flags | O_CLOEXEC);
    assert_true(fd >= 0);
    return fd;
}

/* A segment of n records (sizes[i] bytes of payload; 0 is a tombstone)
 * with seq 1..n: their record offsets in at[], the file's length back. */
static uint64_t write_segment(const char *dir, uint64_t number, const uint32_t *sizes, size_t n,
                              uint64_t *at)
{
    vqkvd_segment_writer_t w;
    assert_ok(vqkvd_segment_create(&w, dir, number));
    for (size_t i = 0; i < n; i++) {
        vqkvd_segment_record_t r = make_rec(i + 1, sizes[i]);
        uint8_t *p = malloc(sizes[i] ? sizes[i] : 1);
        assert_non_null(p);
        fill_payload(p, sizes[i], number * 1000 + i);
        if (sizes[i] == 0)
            r.flags = VQKVD_SEGMENT_TOMBSTONE;
        assert_ok(vqkvd_segment_append(&w, &r, p, &at[i]));
        free(p);
    }
    assert_ok(vqkvd_segment_sync(&w));
    uint64_t end = w.end;
    assert_ok(vqkvd_segment_close(&w));
    return end;
}

/* ---- CRC-32C --------------------------------------------------------------------- */

static void test_crc32c_vectors(void **state)
{
    (void)state;
    uint8_t zeros[32] = {0}, ones[32], up[32], down[32];
    memset(ones, 0xff, sizeof ones);
    for (int i = 0; i < 32; i++) {
        up[i] = (uint8_t)i;
        down[i] = (uint8_t)(31 - i);
    }
    /* RFC 3720 B.4 and the common check value. */
    const struct {
        const void *p;
        size_t n;
        uint32_t crc;
    } v[] = {{"123456789", 9, 0xe3069283u}, {"", 0, 0},
             {zeros, 32, 0x8a9136aau},      {ones, 32, 0x62a8ab43u},
             {up, 32, 0x46dd794eu},         {down, 32, 0x113fdb5cu}};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        assert_int_equal(vqkvd__segment_crc32c_scalar(0, v[i].p, v[i].n), v[i].crc);
        assert_int_equal(vqkvd_segment_crc32c(0, v[i].p, v[i].n), v[i].crc);
    }
    /* Both agree at every length and alignment, and continue a CRC. */
    uint8_t buf[1100];
    fill_payload(buf, sizeof buf, 7);
    for (size_t off = 0; off < 8; off++)
        for (size_t n = 0; n + off <= sizeof buf; n += 1 + n / 8) {
            uint32_t want = vqkvd__segment_crc32c_scalar(0, buf + off, n);
            assert_int_equal(vqkvd_segment_crc32c(0, buf + off, n), want);
            uint32_t half = vqkvd_segment_crc32c(0, buf + off, n / 2);
            assert_int_equal(vqkvd__segment_crc32c_scalar(half, buf + off + n / 2, n - n / 2),
                             want);
        }
}

/* ---- headers --------------------------------------------------------------------- */

static void test_record_round_trip(void **state)
{
    (void)state;
    vqkvd_segment_record_t r = make_rec(0x0102030405060708ull, 4096), back;
    r.payload_crc = 0xdeadbeefu;
    uint8_t h[REC + 8];
    assert_ok(vqkvd_segment_encode(&r, h));
    assert_ok(vqkvd_segment_parse(h, REC, &back));
    assert_rec_equal(&r, &back);
    /* The documented layout, spot-checked byte for byte. */
    assert_memory_equal(h, "VQKR", 4);
    assert_int_equal(h[4] | h[5] << 8, VQKVD_SEGMENT_VERSION);
    assert_int_equal(h[6] | h[7] << 8, REC);
    assert_int_equal(h[16], 0x08);
    assert_int_equal(h[23], 0x01);
    assert_int_equal(test_get_u32(h + 32), 4096);
    assert_int_equal(test_get_u32(h + 36), 0xdeadbeefu);
    assert_memory_equal(h + 40, r.key, 32);
    assert_memory_equal(h + 72, r.parent, 32);
    assert_memory_equal(h + 104, r.codebooks_sha256, 32);
    assert_string_equal((const char *)h + 136, r.spec);
    assert_int_equal(test_get_u32(h + 204), vqkvd_segment_crc32c(0, h, 204));
    /* Bytes past the header are ignored; too few are refused. */
    memset(h + REC, 0x77, 8);
    assert_ok(vqkvd_segment_parse(h, sizeof h, &back));
    assert_rc(vqkvd_segment_parse(h, REC - 1, &back), VQKV_EFORMAT);
    assert_rc(vqkvd_segment_parse(NULL, REC, &back), VQKV_EINVAL);
    assert_rc(vqkvd_segment_encode(NULL, h), VQKV_EINVAL);

    /* A tombstone: no payload, no spec needed; a root with a zero parent. */
    vqkvd_segment_record_t t = make_rec(1, 0);
    t.flags = VQKVD_SEGMENT_TOMBSTONE;
    t.spec[0] = '\0';
    assert_ok(vqkvd_segment_encode(&t, h));
    assert_ok(vqkvd_segment_parse(h, REC, &back));
    assert_rec_equal(&t, &back);
    assert_true(back.flags & VQKVD_SEGMENT_TOMBSTONE);
}

/* Changes one field of a valid header (at off, n bytes of value, little
 * endian), reseals it and expects parse to refuse it. */
static void refuse_field(const uint8_t *good, size_t off, size_t n, uint64_t value)
{
    uint8_t h[REC];
    vqkvd_segment_record_t r;
    memcpy(h, good, REC);
    for (size_t i = 0; i < n; i++)
        h[off + i] = (uint8_t)(value >> (8 * i));
    reseal(h);
    memset(&r, 0x55, sizeof r);
    assert_rc(vqkvd_segment_parse(h, REC, &r), VQKV_EFORMAT);
    assert_int_equal(r.seq, 0x5555555555555555ull); /* *rec untouched */
}

static void test_parse_refuses_fields(void **state)
{
    (void)state;
    uint8_t good[REC], h[REC];
    vqkvd_segment_record_t r = make_rec(9, 100), back;
    assert_ok(vqkvd_segment_encode(&r, good));
    refuse_field(good, 0, 1, 'X');     /* magic */
    refuse_field(good, 4, 2, 2);       /* version */
    refuse_field(good, 6, 2, REC + 8); /* header length */
    refuse_field(good, 6, 2, 0xffff);
    refuse_field(good, 8, 4, 2);                                 /* an unknown flag */
    refuse_field(good, 8, 4, VQKVD_SEGMENT_TOMBSTONE);           /* a tombstone with a payload */
    refuse_field(good, 16, 8, 0);                                /* seq 0 */
    refuse_field(good, 24, 4, 0);                                /* model 0 */
    refuse_field(good, 32, 4, 0);                                /* a block without payload */
    refuse_field(good, 32, 4, VQKVD_SEGMENT_MAX_PAYLOAD + 1ull); /* hostile lengths */
    refuse_field(good, 32, 4, 0xffffffffu);
    refuse_field(good, 136, 1, 0);        /* an empty spec in a block */
    refuse_field(good, 136 + 2, 1, 0);    /* a NUL inside the spec */
    refuse_field(good, 136 + 63, 1, 'x'); /* a character after the padding */
    refuse_field(good, 136 + 1, 1, '\t'); /* not printable */
    refuse_field(good, 136 + 1, 1, 0x80);
    refuse_field(good, 200, 4, 1); /* reserved */
    /* The key all zero; a spec filling the field, with no NUL. */
    memcpy(h, good, REC);
    memset(h + 40, 0, 32);
    reseal(h);
    assert_rc(vqkvd_segment_parse(h, REC, &back), VQKV_EFORMAT);
    memcpy(h, good, REC);
    memset(h + 136, 'a', VQKVD_SEGMENT_SPEC_BYTES);
    reseal(h);
    assert_rc(vqkvd_segment_parse(h, REC, &back), VQKV_EFORMAT);
    /* A header whose checksum fails, and the checksum itself damaged. */
    memcpy(h, good, REC);
    h[100] ^= 1;
    assert_rc(vqkvd_segment_parse(h, REC, &back), VQKV_EFORMAT);
    memcpy(h, good, REC);
    h[205] ^= 0x10;
    assert_rc(vqkvd_segment_parse(h, REC, &back), VQKV_EFORMAT);
    /* The largest payload is fine. */
    memcpy(h, good, REC);
    test_put_u32(h + 32, VQKVD_SEGMENT_MAX_PAYLOAD);
    reseal(h);
    assert_ok(vqkvd_segment_parse(h, REC, &back));
    assert_int_equal(back.payload_bytes, VQKVD_SEGMENT_MAX_PAYLOAD);
}

static void test_encode_refuses_specs(void **state)
{
    (void)state;
    uint8_t h[REC], before[REC];
    vqkvd_segment_record_t r = make_rec(3, 10), back;
    memset(h, 0xaa, sizeof h);
    memcpy(before, h, sizeof h);
    /* 63 characters fit; 64 (no room for the NUL) do not. */
    memset(r.spec, 'a', 63);
    r.spec[63] = '\0';
    assert_ok(vqkvd_segment_encode(&r, h));
    assert_ok(vqkvd_segment_parse(h, REC, &back));
    assert_int_equal(strlen(back.spec), 63);
    memcpy(h, before, sizeof h);
    memset(r.spec, 'a', sizeof r.spec);
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    assert_memory_equal(h, before, sizeof h); /* nothing written */
    snprintf(r.spec, sizeof r.spec, "fp8\n");
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    r.spec[0] = '\0';
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    /* Other fields out of their domain. */
    r = make_rec(3, VQKVD_SEGMENT_MAX_PAYLOAD + 1u);
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    r = make_rec(0, 10);
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    r = make_rec(3, 10);
    r.flags = 4;
    assert_rc(vqkvd_segment_encode(&r, h), VQKV_EINVAL);
    assert_memory_equal(h, before, sizeof h);
}

/* ---- writing, scanning, reading -------------------------------------------------- */

static void test_write_scan_read(void **state)
{
    scratch_t *s = *state;
    const uint32_t sizes[] = {1, 5000, 0, 333, 4096, 17, 0, 65536, 2, 900};
    const size_t n = sizeof sizes / sizeof sizes[0];
    uint64_t at[16];
    uint64_t end = write_segment(s->dir, 7, sizes, n, at);

    char path[1024];
    struct stat st;
    snprintf(path, sizeof path, "%s/seg-0000000000000007.vqs", s->dir);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal((uint64_t)st.st_size, end);
    assert_int_equal(at[0], HDR);

    int fd = open_segment(s->dir, 7, O_RDONLY);
    seen_t seen;
    vqkvd_segment_scan_t sc;
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.number, 7);
    assert_int_equal(sc.records, n);
    assert_int_equal(sc.last_seq, n);
    assert_int_equal(sc.good_bytes, end);
    assert_int_equal(sc.bad_bytes, 0);
    assert_int_equal(sc.bad_records, 0);
    assert_int_equal(seen.n, n);
    for (size_t i = 0; i < n; i++) {
        vqkvd_segment_record_t want = make_rec(i + 1, sizes[i]);
        uint8_t *p = malloc(sizes[i] + 1), *got = malloc(sizes[i] + 1);
        assert_true(p != NULL && got != NULL);
        fill_payload(p, sizes[i], 7 * 1000 + i);
        want.payload_crc = sizes[i] ? vqkvd_segment_crc32c(0, p, sizes[i]) : 0;
        if (sizes[i] == 0)
            want.flags = VQKVD_SEGMENT_TOMBSTONE;
        assert_rec_equal(&seen.rec[i], &want);
        assert_int_equal(seen.at[i], at[i] + REC);
        int err = -1;
        assert_ok(
            vqkvd_segment_read_payload(fd, &seen.rec[i], seen.at[i], got, sizes[i] + 1, &err));
        assert_int_equal(err, 0);
        assert_memory_equal(got, p, sizes[i]);
        free(p);
        free(got);
    }
    close(fd);

    /* The same number again is refused, and the file stays. */
    vqkvd_segment_writer_t w;
    assert_rc(vqkvd_segment_create(&w, s->dir, 7), VQKV_EIO);
    assert_int_equal(w.sys_errno, EEXIST);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal((uint64_t)st.st_size, end);
}

/* Bytes this process has read through read(2) and friends. -1 where
 * /proc/self/io cannot be read. */
static long long read_bytes(void)
{
    FILE *f = fopen("/proc/self/io", "r");
    long long rchar = -1;
    char line[128];
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "rchar: %lld", &rchar) == 1)
            break;
    if (f != NULL)
        fclose(f);
    return rchar;
}

static void test_many_segments_and_list(void **state)
{
    scratch_t *s = *state;
    const uint64_t numbers[] = {3, 1, 0x10, 0xfedcba9876543210ull};
    uint32_t sizes[60];
    uint64_t at[4][60];
    for (size_t i = 0; i < 60; i++)
        sizes[i] = i % 10 == 9 ? 0 : 65536 + (uint32_t)i;
    for (size_t k = 0; k < 4; k++)
        write_segment(s->dir, numbers[k], sizes, 60, at[k]);
    /* Files and a directory the listing must pass over. */
    const char *others[] = {"seg-0000000000000002.vqs.tmp", "seg-000000000000000g.vqs",
                            "seg-00000000000000AB.vqs",     "seg-1.vqs",
                            "seg-00000000000000001.vqs",    "README"};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", s->dir, others[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        close(fd);
    }
    char sub[1024];
    snprintf(sub, sizeof sub, "%s/seg-0000000000000005.vqs", s->dir);
    assert_int_equal(mkdir(sub, 0700), 0);

    uint64_t *list = NULL;
    size_t count = 0;
    int err = -1;
    assert_ok(vqkvd_segment_list(s->dir, &list, &count, &err));
    assert_int_equal(count, 4);
    const uint64_t sorted[] = {1, 3, 0x10, 0xfedcba9876543210ull};
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(list[i], sorted[i]);
    free(list);

    /* Every record found where it was written, reading 32 bytes of file
     * header and 208 per record: no payload (each over 64 KiB) is read. */
    for (size_t k = 0; k < 4; k++) {
        int fd = open_segment(s->dir, numbers[k], O_RDONLY);
        seen_t seen;
        vqkvd_segment_scan_t sc;
        long long before = read_bytes();
        assert_ok(scan_fd(fd, &seen, &sc));
        long long after = read_bytes();
        if (before >= 0 && after >= 0)
            assert_true(after - before <= HDR + 60 * REC + 4096); /* the /proc read itself */
        else
            print_message("no /proc/self/io: bytes read by the scan not counted\n");
        assert_int_equal(sc.number, numbers[k]);
        assert_int_equal(sc.records, 60);
        assert_int_equal(sc.bad_bytes, 0);
        for (size_t i = 0; i < 60; i++)
            assert_int_equal(seen.at[i], at[k][i] + REC);
        close(fd);
    }

    /* An empty directory lists nothing; a missing one is an error. */
    assert_int_equal(rmdir(sub), 0);
    for (size_t i = 0; i < 4; i++) {
        char name[VQKVD_SEGMENT_NAME_BYTES], path[1024];
        assert_ok(vqkvd_segment_name(numbers[i], name, sizeof name));
        snprintf(path, sizeof path, "%s/%s", s->dir, name);
        assert_int_equal(unlink(path), 0);
    }
    assert_ok(vqkvd_segment_list(s->dir, &list, &count, &err));
    assert_int_equal(count, 0);
    assert_null(list);
    char missing[1024];
    snprintf(missing, sizeof missing, "%s/missing", s->dir);
    assert_rc(vqkvd_segment_list(missing, &list, &count, &err), VQKV_EIO);
    assert_int_equal(err, ENOENT);
}

/* ---- damage ---------------------------------------------------------------------- */

/* Cuts the segment at every length from whole to empty: the records that
 * end by the cut are found, the rest is the tail. */
static void test_truncated_everywhere(void **state)
{
    scratch_t *s = *state;
    const uint32_t sizes[] = {100, 0, 50, 300};
    const size_t n = sizeof sizes / sizeof sizes[0];
    uint64_t at[4];
    uint64_t end = write_segment(s->dir, 2, sizes, n, at);
    int fd = open_segment(s->dir, 2, O_RDWR);
    for (uint64_t cut = end + 1; cut-- > 0;) {
        assert_int_equal(ftruncate(fd, (off_t)cut), 0);
        size_t whole = 0;
        uint64_t good = cut < HDR ? 0 : HDR;
        for (size_t i = 0; i < n; i++)
            if (at[i] + REC + sizes[i] <= cut) {
                whole = i + 1;
                good = at[i] + REC + sizes[i];
            }
        seen_t seen;
        vqkvd_segment_scan_t sc;
        assert_ok(scan_fd(fd, &seen, &sc));
        assert_int_equal(sc.records, whole);
        assert_int_equal(seen.n, whole);
        assert_int_equal(sc.good_bytes, good);
        assert_int_equal(sc.bad_bytes, cut - good);
        assert_int_equal(sc.bad_records, cut > good ? 1 : 0);
        assert_int_equal(sc.last_seq, whole);
    }
    close(fd);
}

/* Flips every bit of a small segment in turn: a file header bit makes the
 * file refused, a record header bit makes that record the first bad one
 * (the whole records behind it counted), a payload bit passes the scan and
 * fails that payload's checksum on read. */
static void test_every_bit_flipped(void **state)
{
    scratch_t *s = *state;
    const uint32_t sizes[] = {24, 40, 0, 8};
    const size_t n = sizeof sizes / sizeof sizes[0];
    uint64_t at[4];
    uint64_t end = write_segment(s->dir, 9, sizes, n, at);
    int fd = open_segment(s->dir, 9, O_RDWR);
    uint8_t buf[64];
    for (uint64_t byte = 0; byte < end; byte++) {
        uint8_t orig;
        assert_int_equal(pread(fd, &orig, 1, (off_t)byte), 1);
        size_t rec = 0; /* the record holding the byte */
        while (rec + 1 < n && byte >= at[rec + 1])
            rec++;
        for (int bit = 0; bit < 8; bit++) {
            uint8_t flipped = orig ^ (uint8_t)(1u << bit);
            assert_int_equal(pwrite(fd, &flipped, 1, (off_t)byte), 1);
            seen_t seen;
            vqkvd_segment_scan_t sc;
            int rc = scan_fd(fd, &seen, &sc);
            if (byte < HDR) {
                assert_rc(rc, VQKV_EFORMAT);
                assert_int_equal(sc.records, 0);
            } else if (byte < at[rec] + REC) {
                assert_ok(rc);
                assert_int_equal(sc.records, rec);
                assert_int_equal(sc.good_bytes, at[rec]);
                assert_int_equal(sc.bad_bytes, end - at[rec]);
                assert_int_equal(sc.bad_records, n - rec);
            } else {
                assert_ok(rc);
                assert_int_equal(sc.records, n);
                assert_int_equal(sc.bad_bytes, 0);
                for (size_t i = 0; i < n; i++) {
                    int err = -1;
                    assert_rc(vqkvd_segment_read_payload(fd, &seen.rec[i], seen.at[i], buf,
                                                         sizeof buf, &err),
                              i == rec ? VQKV_EFORMAT : VQKV_OK);
                }
            }
            assert_int_equal(pwrite(fd, &orig, 1, (off_t)byte), 1);
        }
    }
    close(fd);
}

/* Writes bytes as the whole of a file named seg-...1.vqs; its fd back. */
static int file_of(const char *dir, const void *bytes, size_t len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/seg-0000000000000001.vqs", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, bytes, len, 0), (ssize_t)len);
    return fd;
}

static void test_wrong_magic_and_version(void **state)
{
    scratch_t *s = *state;
    const uint32_t sizes[] = {10, 20};
    uint64_t at[2];
    uint64_t end = write_segment(s->dir, 1, sizes, 2, at);
    uint8_t good[512], f[512];
    int fd = open_segment(s->dir, 1, O_RDONLY);
    assert_int_equal(pread(fd, good, end, 0), (ssize_t)end);
    close(fd);
    /* The file header: magic, version, length, flags, reserved; each with
     * its checksum made right, and the checksum itself wrong. */
    const size_t offs[] = {0, 7, 8, 10, 12, 24, 28};
    for (size_t i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        memcpy(f, good, end);
        f[offs[i]] ^= 0x02;
        if (offs[i] != 28)
            test_put_u32(f + 28, vqkvd_segment_crc32c(0, f, 28));
        fd = file_of(s->dir, f, end);
        seen_t seen;
        vqkvd_segment_scan_t sc;
        assert_rc(scan_fd(fd, &seen, &sc), VQKV_EFORMAT);
        assert_int_equal(seen.n, 0);
        close(fd);
    }
    /* A record of another version is where the segment stops. */
    memcpy(f, good, end);
    f[at[1] + 4] = 2;
    reseal(f + at[1]);
    fd = file_of(s->dir, f, end);
    seen_t seen;
    vqkvd_segment_scan_t sc;
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.records, 1);
    assert_int_equal(sc.good_bytes, at[1]);
    assert_int_equal(sc.bad_records, 1);
    close(fd);
}

static void test_hostile_lengths(void **state)
{
    scratch_t *s = *state;
    const uint32_t sizes[] = {10};
    uint64_t at[1];
    uint64_t end = write_segment(s->dir, 1, sizes, 1, at);
    uint8_t f[1 << 16];
    int fd = open_segment(s->dir, 1, O_RDONLY);
    assert_int_equal(pread(fd, f, end, 0), (ssize_t)end);
    close(fd);
    seen_t seen;
    vqkvd_segment_scan_t sc;

    /* A header claiming the largest payload, in a file that ends at once:
     * torn, nothing allocated or read for it. */
    test_put_u32(f + at[0] + 32, VQKVD_SEGMENT_MAX_PAYLOAD);
    reseal(f + at[0]);
    fd = file_of(s->dir, f, end);
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.records, 0);
    assert_int_equal(sc.good_bytes, HDR);
    assert_int_equal(sc.bad_records, 1);
    /* Read anyway: the file ends first. */
    vqkvd_segment_record_t r;
    assert_ok(vqkvd_segment_parse(f + at[0], REC, &r));
    static uint8_t big[VQKVD_SEGMENT_MAX_PAYLOAD];
    int err = -1;
    assert_rc(vqkvd_segment_read_payload(fd, &r, at[0] + REC, big, sizeof big, &err), VQKV_EIO);
    assert_int_equal(err, ENODATA);
    assert_rc(vqkvd_segment_read_payload(fd, &r, at[0] + REC, big, sizeof big - 1, &err),
              VQKV_EINVAL);
    r.payload_bytes = VQKVD_SEGMENT_MAX_PAYLOAD + 1u;
    assert_rc(vqkvd_segment_read_payload(fd, &r, at[0] + REC, big, sizeof big, &err), VQKV_EINVAL);
    close(fd);

    /* A file header then 64 KiB of zeros: one bad record, nothing behind it. */
    memset(f + HDR, 0, sizeof f - HDR);
    fd = file_of(s->dir, f, sizeof f);
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.records, 0);
    assert_int_equal(sc.bad_bytes, sizeof f - HDR);
    assert_int_equal(sc.bad_records, 1);
    close(fd);

    /* Sequence numbers that do not increase: the scan stops at the second;
     * the writer refuses to write one. */
    vqkvd_segment_record_t a = make_rec(5, 10);
    uint8_t pay[10] = {0};
    a.payload_crc = vqkvd_segment_crc32c(0, pay, 10);
    assert_ok(vqkvd_segment_encode(&a, f + HDR));
    memcpy(f + HDR + REC, pay, 10);
    memcpy(f + HDR + REC + 10, f + HDR, REC + 10);
    fd = file_of(s->dir, f, HDR + 2 * (REC + 10));
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.records, 1);
    assert_int_equal(sc.bad_records, 1);
    close(fd);
    vqkvd_segment_writer_t w;
    uint64_t off;
    assert_ok(vqkvd_segment_create(&w, s->dir, 2));
    assert_ok(vqkvd_segment_append(&w, &a, pay, &off));
    assert_rc(vqkvd_segment_append(&w, &a, pay, &off), VQKV_EINVAL);
    assert_int_equal(w.end, HDR + REC + 10);
    a = make_rec(6, 10);
    memset(a.spec, 'x', sizeof a.spec); /* a spec that does not fit */
    assert_rc(vqkvd_segment_append(&w, &a, pay, &off), VQKV_EINVAL);
    assert_int_equal(w.end, HDR + REC + 10);
    assert_ok(vqkvd_segment_close(&w));
}

/* ---- system errors ------------------------------------------------------------------ */

/* As an unprivileged user (root drops to nobody in a child: root writes
 * anywhere), creating in a read-only directory is VQKV_EIO with EACCES. */
static void test_readonly_dir(void **state)
{
    scratch_t *s = *state;
    vqkvd_segment_writer_t w;
    char path[1024];
    snprintf(path, sizeof path, "%s/missing", s->dir);
    assert_rc(vqkvd_segment_create(&w, path, 1), VQKV_EIO);
    assert_int_equal(w.sys_errno, ENOENT);
    assert_int_equal(w.fd, -1);
    snprintf(path, sizeof path, "%s/plain", s->dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    close(fd);
    assert_rc(vqkvd_segment_create(&w, path, 1), VQKV_EIO);
    assert_int_equal(w.sys_errno, ENOTDIR);

    assert_int_equal(chmod(s->dir, 0555), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(10);
        int rc = vqkvd_segment_create(&w, s->dir, 2);
        _exit(rc != VQKV_EIO ? 11 : w.sys_errno != EACCES ? 12 : 0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(chmod(s->dir, 0700), 0);
    uint64_t *list;
    size_t count;
    int err;
    assert_ok(vqkvd_segment_list(s->dir, &list, &count, &err));
    assert_int_equal(count, 0); /* nothing left by the refusals */
    assert_null(list);
}

/* RLIMIT_FSIZE with SIGXFSZ ignored: an append crossing the limit is
 * written in part, then EFBIG; the part is cut off and, with the limit
 * lifted, the writer goes on. */
static void test_efbig(void **state)
{
    scratch_t *s = *state;
    vqkvd_segment_writer_t w;
    uint8_t pay[1000];
    uint64_t off;
    fill_payload(pay, sizeof pay, 1);
    assert_ok(vqkvd_segment_create(&w, s->dir, 4));
    vqkvd_segment_record_t r = make_rec(1, sizeof pay);
    assert_ok(vqkvd_segment_append(&w, &r, pay, &off));
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = w.end + 100;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    r = make_rec(2, sizeof pay);
    int rc = vqkvd_segment_append(&w, &r, pay, &off);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, old_handler);
    assert_rc(rc, VQKV_EIO);
    assert_int_equal(w.sys_errno, EFBIG);
    assert_false(w.broken);
    struct stat st;
    assert_int_equal(fstat(w.fd, &st), 0);
    assert_int_equal((uint64_t)st.st_size, w.end);
    assert_ok(vqkvd_segment_append(&w, &r, pay, &off));
    assert_ok(vqkvd_segment_close(&w));
    int fd = open_segment(s->dir, 4, O_RDONLY);
    seen_t seen;
    vqkvd_segment_scan_t sc;
    assert_ok(scan_fd(fd, &seen, &sc));
    assert_int_equal(sc.records, 2);
    assert_int_equal(sc.bad_bytes, 0);
    close(fd);
}

/* ENOSPC without a full file system: the writer's fd replaced by
 * /dev/full. Its tail cannot be cut either, so the writer is broken. */
static void test_enospc(void **state)
{
    scratch_t *s = *state;
    vqkvd_segment_writer_t w;
    uint8_t pay[100] = {0};
    uint64_t off = 12345;
    assert_ok(vqkvd_segment_create(&w, s->dir, 5));
    int full = open("/dev/full", O_WRONLY | O_CLOEXEC);
    if (full < 0) {
        print_message("no /dev/full: ENOSPC not tested\n");
        assert_ok(vqkvd_segment_close(&w));
        return;
    }
    assert_int_equal(dup2(full, w.fd), w.fd);
    close(full);
    vqkvd_segment_record_t r = make_rec(1, sizeof pay);
    assert_rc(vqkvd_segment_append(&w, &r, pay, &off), VQKV_EIO);
    assert_int_equal(w.sys_errno, ENOSPC);
    assert_true(w.broken);
    assert_int_equal(off, 12345);
    assert_int_equal(w.end, HDR);
    r = make_rec(2, sizeof pay);
    assert_rc(vqkvd_segment_append(&w, &r, pay, &off), VQKV_EIO);
    assert_rc(vqkvd_segment_sync(&w), VQKV_EIO);
    assert_ok(vqkvd_segment_close(&w));
    assert_rc(vqkvd_segment_close(&w), VQKV_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c_vectors),
        cmocka_unit_test(test_record_round_trip),
        cmocka_unit_test(test_parse_refuses_fields),
        cmocka_unit_test(test_encode_refuses_specs),
        cmocka_unit_test_setup_teardown(test_write_scan_read, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_many_segments_and_list, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_truncated_everywhere, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_every_bit_flipped, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_wrong_magic_and_version, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_hostile_lengths, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_readonly_dir, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_efbig, make_scratch, drop_scratch),
        cmocka_unit_test_setup_teardown(test_enospc, make_scratch, drop_scratch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
