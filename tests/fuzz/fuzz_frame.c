/* fuzz_frame.c -- the frame reader and Envelope unpacking (proto/frame.h)
 * on arbitrary byte streams.
 *
 * Input: a mode byte, a seed byte, then the stream. The stream is fed to a
 * vqkv_frame_reader_t in chunks whose sizes a generator seeded by the seed
 * byte draws (mode bits 0-1: at most 1, 8, 256 bytes or the whole rest),
 * under a max_frame of 16, 300, 4096 bytes or the default (bits 2-3); with
 * bit 4 set, some chunks carry 1 to 5 fds (dups of /dev/null), which the
 * reader must attribute or refuse and never leak.
 *
 * Invariants: the frames the reader yields are exactly those a plain
 * parse of the stream finds, in order, and it fails with VQKV_ETOOBIG
 * exactly where that parse meets a length over max_frame (fd errors aside
 * when fds are sent); end of stream is VQKV_ECLOSED on a frame boundary and
 * VQKV_ETRUNC inside one; no fd stays open. Every payload that unpacks
 * passes vqkv_frame_check or gets VQKV_EUNKNOWN and re-encodes through
 * vqkv_frame_encode with a correct length prefix; one that passes the
 * check re-encodes to bytes that unpack to an Envelope that passes it too
 * and re-encodes to the same bytes (packing is a fixed point after one
 * round).
 */
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "frame.h"
#include "fuzz.h"

static uint32_t fuzz__rng_next(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static uint32_t fuzz__le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The round trip of one payload that unpacked. */
static void fuzz__check_envelope(const Vqkv__Envelope *env)
{
    int strict = vqkv_frame_check(env);
    FUZZ_CHECK(strict == VQKV_OK || strict == VQKV_EUNKNOWN, "vqkv_frame_check gave %d", strict);
    uint8_t *once = NULL, *twice = NULL;
    size_t once_len = 0, twice_len = 0;
    int rc = vqkv_frame_encode(env, VQKV_FRAME_LIMIT, &once, &once_len);
    FUZZ_CHECK(rc == VQKV_OK, "an unpacked Envelope does not encode: %d", rc);
    FUZZ_CHECK(once_len >= VQKV_FRAME_HEADER_BYTES &&
                   fuzz__le32(once) == once_len - VQKV_FRAME_HEADER_BYTES,
               "length prefix %u for %zu bytes", (unsigned)fuzz__le32(once), once_len);
    if (strict != VQKV_OK) {
        /* Every peer refuses it, so its round trip does not matter; and
         * protobuf-c keeps even an unknown field numbered 0 (spelled as a
         * two-byte tag), whose re-encoding then no longer unpacks. */
        free(once);
        return;
    }
    Vqkv__Envelope *again = NULL;
    rc = vqkv_frame_unpack(once + VQKV_FRAME_HEADER_BYTES, once_len - VQKV_FRAME_HEADER_BYTES,
                           &again);
    FUZZ_CHECK(rc == VQKV_OK, "a re-encoded Envelope does not unpack: %d", rc);
    FUZZ_CHECK(again->request_id == env->request_id && again->body_case == env->body_case,
               "request_id or body changed in a round trip");
    FUZZ_CHECK(vqkv_frame_check(again) == VQKV_OK, "strictness changed in a round trip");
    rc = vqkv_frame_encode(again, VQKV_FRAME_LIMIT, &twice, &twice_len);
    FUZZ_CHECK(rc == VQKV_OK && twice_len == once_len && memcmp(once, twice, once_len) == 0,
               "re-encoding is not stable (%zu then %zu bytes)", once_len, twice_len);
    vqkv_frame_envelope_free(again);
    free(once);
    free(twice);
}

/* One frame the reader yielded, against the next one the plain parse
 * finds at *ref in stream[0, n). */
static void fuzz__check_frame(const vqkv_frame_t *f, const uint8_t *stream, size_t n, size_t *ref)
{
    FUZZ_CHECK(*ref + VQKV_FRAME_HEADER_BYTES <= n, "a frame past the end of the stream");
    uint32_t len = fuzz__le32(stream + *ref);
    FUZZ_CHECK(f->len == len && *ref + VQKV_FRAME_HEADER_BYTES + len <= n &&
                   (len == 0 || memcmp(f->data, stream + *ref + VQKV_FRAME_HEADER_BYTES, len) == 0),
               "frame at %zu: %zu bytes yielded, %u in the stream", *ref, f->len, (unsigned)len);
    FUZZ_CHECK(f->n_fds <= VQKV_FRAME_MAX_FDS, "%zu fds on one frame", f->n_fds);
    *ref += VQKV_FRAME_HEADER_BYTES + len;

    Vqkv__Envelope *env = NULL;
    int rc = vqkv_frame_unpack(f->data, f->len, &env);
    FUZZ_CHECK(rc == VQKV_OK || rc == VQKV_EMALFORMED || rc == VQKV_ETOOBIG,
               "vqkv_frame_unpack gave %d", rc);
    if (rc == VQKV_OK)
        fuzz__check_envelope(env);
    vqkv_frame_envelope_free(env);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t max_frames[4] = {16, 300, 4096, VQKV_FRAME_DEFAULT_MAX};
    static const size_t max_chunks[4] = {1, 8, 256, SIZE_MAX};
    static int devnull = -1;
    if (devnull < 0)
        devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    FUZZ_CHECK(devnull >= 0, "cannot open /dev/null");
    if (size < 2)
        return 0;
    uint8_t mode = data[0];
    uint32_t seed = 0x9e3779b9u ^ data[1];
    const uint8_t *stream = data + 2;
    size_t n = size - 2;
    uint32_t max_frame = max_frames[(mode >> 2) & 3];
    size_t max_chunk = max_chunks[mode & 3];
    int send_fds = (mode & 0x10) != 0;
    int fds_before = fuzz_fd_count();

    vqkv_frame_reader_t r;
    FUZZ_CHECK(vqkv_frame_reader_init(&r, max_frame) == VQKV_OK, "reader init");
    size_t off = 0, ref = 0;
    int err = VQKV_OK, fds_sent = 0;
    while (off < n && err == VQKV_OK) {
        size_t chunk = max_chunk == SIZE_MAX ? n - off : 1 + fuzz__rng_next(&seed) % max_chunk;
        if (chunk > n - off)
            chunk = n - off;
        int fds[5];
        size_t n_fds = 0;
        if (send_fds && fuzz__rng_next(&seed) % 4 == 0) {
            n_fds = 1 + fuzz__rng_next(&seed) % 5;
            for (size_t i = 0; i < n_fds; i++)
                fds[i] = fcntl(devnull, F_DUPFD_CLOEXEC, 0);
            fds_sent = 1;
        }
        err = vqkv_frame_reader_feed(&r, stream + off, chunk, fds, n_fds);
        if (err != VQKV_OK)
            break;
        off += chunk;
        for (;;) {
            vqkv_frame_t f;
            int rc = vqkv_frame_reader_next(&r, &f);
            if (rc == 0)
                break;
            if (rc < 0) {
                err = rc;
                break;
            }
            fuzz__check_frame(&f, stream, n, &ref);
            vqkv_frame_clear(&f);
        }
    }

    /* What the plain parse says comes after the last frame yielded. */
    int too_big = ref + VQKV_FRAME_HEADER_BYTES <= n && fuzz__le32(stream + ref) > max_frame;
    if (err == VQKV_OK) {
        int rc = vqkv_frame_reader_eof(&r);
        FUZZ_CHECK(!too_big, "a length over max_frame was not refused");
        int boundary = ref == n;
        FUZZ_CHECK(rc == (boundary ? VQKV_ECLOSED : VQKV_ETRUNC) || (fds_sent && rc == VQKV_ETRUNC),
                   "end of stream at %zu (last frame ends at %zu) gave %d", n, ref, rc);
    } else if (fds_sent) {
        FUZZ_CHECK(err == VQKV_EFDS || (err == VQKV_ETOOBIG && too_big), "reader error %d", err);
    } else {
        FUZZ_CHECK(err == VQKV_ETOOBIG && too_big, "reader error %d at %zu", err, ref);
    }
    FUZZ_CHECK(vqkv_frame_reader_error(&r) != VQKV_OK, "a finished reader has no sticky error");
    vqkv_frame_reader_free(&r);
    int fds_after = fuzz_fd_count();
    FUZZ_CHECK(fds_after == fds_before, "%d fds open before, %d after", fds_before, fds_after);
    return 0;
}
