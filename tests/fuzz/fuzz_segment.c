/* fuzz_segment.c -- the disk tier's segment files (daemon/segment.h) as a
 * hostile file: vqkvd_segment_scan over a memfd, vqkvd_segment_read_payload
 * of every record it finds, and vqkvd_segment_parse of the raw bytes.
 *
 * Input: a mode byte, then the file. Mode bit 0 seals the file before it is
 * written: the file header's checksum, then walking from the first record,
 * each record header's checksum (and with bit 1 its payload's checksum
 * first), stepping past the payload length it claims; without it a mutation
 * almost never gets past a checksum, with it mutations reach every field
 * check. Bit 2 makes the callback stop the scan after (mode >> 4) records.
 *
 * Invariants: the scan answers VQKV_OK, VQKV_EFORMAT (a whole file header
 * that does not check, with no records) or the callback's code; records
 * come in file order, each right behind the one before, inside the file,
 * with increasing sequence numbers, and each re-encodes to the bytes it
 * was parsed from; good_bytes + bad_bytes is the file's length, good_bytes
 * the end of the last record, bad_records 0 exactly when bad_bytes is;
 * every payload read gives the file's bytes, VQKV_OK exactly when their
 * CRC-32C (the table version) is the header's, VQKV_EFORMAT otherwise;
 * a header parsed from the raw input re-encodes to it; no fd leaks.
 */
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "segment.h"
#include "vqkv_codec.h"

#define FUZZ_SEG_SEAL 0x01
#define FUZZ_SEG_SEAL_PAYLOADS 0x02
#define FUZZ_SEG_STOP 0x04

typedef struct {
    int fd;
    const uint8_t *file;
    size_t len;
    uint64_t records, stop_after, next_offset, last_seq;
} fuzz__seg_t;

static uint32_t fuzz__get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void fuzz__put32(uint8_t *p, uint32_t x)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(x >> (8 * i));
}

/* Mode bit 0: checksums made right, as described above. */
static void fuzz__seal(uint8_t *f, size_t len, int payloads)
{
    if (len < VQKVD_SEGMENT_FILE_HEADER_BYTES)
        return;
    fuzz__put32(f + 28, vqkvd_segment_crc32c(0, f, 28));
    size_t off = VQKVD_SEGMENT_FILE_HEADER_BYTES;
    while (len - off >= VQKVD_SEGMENT_RECORD_BYTES) {
        uint8_t *h = f + off;
        uint32_t n = fuzz__get32(h + 32);
        size_t room = len - off - VQKVD_SEGMENT_RECORD_BYTES;
        if (payloads && n <= room)
            fuzz__put32(h + 36, vqkvd_segment_crc32c(0, h + VQKVD_SEGMENT_RECORD_BYTES, n));
        fuzz__put32(h + 204, vqkvd_segment_crc32c(0, h, 204));
        if (n > room)
            return;
        off += VQKVD_SEGMENT_RECORD_BYTES + n;
    }
}

static int fuzz__on_record(void *arg, const vqkvd_segment_record_t *rec, uint64_t payload_offset)
{
    fuzz__seg_t *s = arg;
    FUZZ_CHECK(payload_offset == s->next_offset + VQKVD_SEGMENT_RECORD_BYTES,
               "record %llu at payload offset %llu, expected %llu", (unsigned long long)s->records,
               (unsigned long long)payload_offset,
               (unsigned long long)(s->next_offset + VQKVD_SEGMENT_RECORD_BYTES));
    FUZZ_CHECK(payload_offset + rec->payload_bytes <= s->len, "a payload past the end");
    FUZZ_CHECK(rec->seq > s->last_seq, "sequence numbers do not increase");
    uint8_t again[VQKVD_SEGMENT_RECORD_BYTES];
    FUZZ_CHECK(vqkvd_segment_encode(rec, again) == VQKV_OK, "a parsed record does not encode");
    FUZZ_CHECK(memcmp(again, s->file + s->next_offset, sizeof again) == 0,
               "a parsed record encodes to other bytes");

    const uint8_t *want = s->file + payload_offset;
    uint8_t *buf = malloc(rec->payload_bytes + 1u);
    FUZZ_CHECK(buf != NULL, "out of memory");
    int err = -1;
    int rc =
        vqkvd_segment_read_payload(s->fd, rec, payload_offset, buf, rec->payload_bytes + 1u, &err);
    int crc_ok = vqkvd__segment_crc32c_scalar(0, want, rec->payload_bytes) == rec->payload_crc;
    FUZZ_CHECK(rc == (crc_ok ? VQKV_OK : VQKV_EFORMAT) && err == 0, "payload read gave %d (%d)", rc,
               err);
    FUZZ_CHECK(memcmp(buf, want, rec->payload_bytes) == 0, "payload read gave other bytes");
    free(buf);

    if (s->records == s->stop_after)
        return VQKV_ENOMEM;
    s->next_offset = payload_offset + rec->payload_bytes;
    s->last_seq = rec->seq;
    s->records++;
    return VQKV_OK;
}

/* The scan's answer against what the callback saw. */
static void fuzz__check_scan(const fuzz__seg_t *s, int rc, const vqkvd_segment_scan_t *sc)
{
    int stopped = s->stop_after != UINT64_MAX && s->records == s->stop_after && rc == VQKV_ENOMEM;
    FUZZ_CHECK(rc == VQKV_OK || stopped || (rc == VQKV_EFORMAT && s->len >= 32 && sc->records == 0),
               "scan gave %d", rc);
    FUZZ_CHECK(sc->records == s->records && sc->last_seq == s->last_seq,
               "scan counted %llu records, the callback %llu", (unsigned long long)sc->records,
               (unsigned long long)s->records);
    FUZZ_CHECK(sc->good_bytes + sc->bad_bytes == s->len, "good + bad is not the file's length");
    FUZZ_CHECK((sc->bad_records == 0) == (sc->bad_bytes == 0) || rc != VQKV_OK,
               "bad_records %llu with bad_bytes %llu", (unsigned long long)sc->bad_records,
               (unsigned long long)sc->bad_bytes);
    if (rc == VQKV_OK && s->records > 0)
        FUZZ_CHECK(sc->good_bytes == s->next_offset, "good_bytes is not the last record's end");
    if (rc == VQKV_OK && s->len >= VQKVD_SEGMENT_FILE_HEADER_BYTES)
        FUZZ_CHECK(fuzz__get32(s->file + 28) == vqkvd__segment_crc32c_scalar(0, s->file, 28),
                   "a file header with a bad checksum was accepted");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    int mode = data[0], fds = fuzz_fd_count();
    size_t len = size - 1;
    uint8_t *file = malloc(len + 1);
    FUZZ_CHECK(file != NULL, "out of memory");
    memcpy(file, data + 1, len);
    if (mode & FUZZ_SEG_SEAL)
        fuzz__seal(file, len, mode & FUZZ_SEG_SEAL_PAYLOADS);

    fuzz__seg_t s = {.file = file,
                     .len = len,
                     .stop_after = (mode & FUZZ_SEG_STOP) ? (uint64_t)(mode >> 4) : UINT64_MAX,
                     .next_offset = VQKVD_SEGMENT_FILE_HEADER_BYTES};
    s.fd = fuzz_memfd("segment", file, len);
    vqkvd_segment_scan_t sc;
    int rc = vqkvd_segment_scan(s.fd, fuzz__on_record, &s, &sc);
    fuzz__check_scan(&s, rc, &sc);
    close(s.fd);

    /* The raw input as one header, wherever it came from. */
    vqkvd_segment_record_t rec;
    uint8_t again[VQKVD_SEGMENT_RECORD_BYTES];
    if (vqkvd_segment_parse(file, len, &rec) == VQKV_OK) {
        FUZZ_CHECK(vqkvd_segment_encode(&rec, again) == VQKV_OK &&
                       memcmp(again, file, sizeof again) == 0,
                   "a parsed header encodes to other bytes");
    }
    free(file);
    FUZZ_CHECK(fuzz_fd_count() == fds, "fds leaked");
    return 0;
}
