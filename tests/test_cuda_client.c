/* test_cuda_client.c -- what libvqkv sends for a CUDA VMM region spanning
 * many physical allocations, checked on a machine without a GPU: the fake
 * driver (fake_libcuda.c, named by VQKV_LIBCUDA) pretends to have the
 * memory, and a daemon of this file's own, on a thread, reads the frames
 * libvqkv sends and answers as vqkvd's CUDA backend would.
 *
 * For 1 to 9 pieces: the pieces before the last 1 to 4 come in RegionPieces
 * of 4 fds each, every frame's num_fds is the fds it carries, the
 * RegisterRegion brings the rest with the pieces' sizes (adding up to
 * region_bytes), the offset into the first piece and the GPU's UUID, and
 * every fd is the memfd the fake driver exported. libvqkv keeps nothing
 * open once the client is closed.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "fake_libcuda.h"
#include "frame.h"
#include "test_util.h"
#include "vqkv.h"
#include "vqkv_proto.h"

#define PIECE (2ull << 20)
#define BASE 0x7f0000200000ull
#define SALT_BYTES 32

static const vqkv_layout_t layout = {2, 2, 64, 16, VQKV_DTYPE_F16};

/* What the daemon saw of one registration. */
typedef struct {
    size_t pieces_frames;        /* RegionPieces */
    size_t fds_in_pieces_frames; /* their fds */
    size_t fds_in_register;      /* the RegisterRegion's */
    size_t n_piece_bytes;
    uint64_t piece_sum, region_bytes, offset, first_piece;
    int kind, uuid_ok, bad_fd, bad_count;
} seen_t;

typedef struct {
    int listen_fd;
    seen_t seen;
    const char *failed; /* what went wrong on the thread (cmocka asserts on the main one) */
} daemon_t;

/* An fd the fake driver exported: a memfd (a regular file). */
static int is_memfd(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

static bool daemon_reply(int fd, uint64_t id, Vqkv__Envelope *env)
{
    env->request_id = id;
    return vqkv_frame_send(fd, env, NULL, 0, 1u << 20) == VQKV_OK;
}

/* Answers one request as vqkvd would; false when it cannot. */
static bool daemon_answer(int fd, const Vqkv__Envelope *req, const vqkv_frame_t *frame, seen_t *s)
{
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    static uint8_t salt[SALT_BYTES];
    switch (req->body_case) {
    case VQKV__ENVELOPE__BODY_HELLO: {
        Vqkv__Welcome w = VQKV__WELCOME__INIT;
        w.protocol_version = VQKV_PROTO_VERSION;
        w.max_frame_bytes = 1u << 20;
        w.max_inflight = 16;
        w.max_regions = 4;
        w.backend = "cuda";
        w.tenant = "0";
        w.server_version = "test";
        w.tenant_salt = (ProtobufCBinaryData){SALT_BYTES, salt};
        env.body_case = VQKV__ENVELOPE__BODY_WELCOME;
        env.welcome = &w;
        return daemon_reply(fd, req->request_id, &env);
    }
    case VQKV__ENVELOPE__BODY_REGISTER_MODEL: {
        Vqkv__ModelRegistered mr = VQKV__MODEL_REGISTERED__INIT;
        mr.model_handle = 1;
        mr.codec = "fp16";
        mr.block_bytes = 2 * 16 * 2 * 64 * 2;
        mr.layout = req->register_model->layout;
        mr.kv_head_count = layout.num_kv_heads;
        env.body_case = VQKV__ENVELOPE__BODY_MODEL_REGISTERED;
        env.model_registered = &mr;
        return daemon_reply(fd, req->request_id, &env);
    }
    case VQKV__ENVELOPE__BODY_REGION_PIECES: {
        s->pieces_frames++;
        s->fds_in_pieces_frames += frame->n_fds;
        s->bad_count |= req->region_pieces->num_fds != frame->n_fds || frame->n_fds != 4;
        for (size_t i = 0; i < frame->n_fds; i++)
            s->bad_fd |= !is_memfd(frame->fds[i]);
        Vqkv__Ack ack = VQKV__ACK__INIT;
        ack.count = (uint32_t)s->fds_in_pieces_frames;
        env.body_case = VQKV__ENVELOPE__BODY_ACK;
        env.ack = &ack;
        return daemon_reply(fd, req->request_id, &env);
    }
    case VQKV__ENVELOPE__BODY_REGISTER_REGION: {
        const Vqkv__RegisterRegion *rr = req->register_region;
        s->fds_in_register = frame->n_fds;
        s->bad_count |= rr->num_fds != frame->n_fds || frame->n_fds < 1 || frame->n_fds > 4;
        for (size_t i = 0; i < frame->n_fds; i++)
            s->bad_fd |= !is_memfd(frame->fds[i]);
        s->n_piece_bytes = rr->n_piece_bytes;
        for (size_t i = 0; i < rr->n_piece_bytes; i++)
            s->piece_sum += rr->piece_bytes[i];
        s->first_piece = rr->n_piece_bytes > 0 ? rr->piece_bytes[0] : 0;
        s->region_bytes = rr->region_bytes;
        s->offset = rr->offset;
        s->kind = rr->kind;
        s->uuid_ok = rr->gpu_uuid.len == 16 && memcmp(rr->gpu_uuid.data, FAKE_CUDA_UUID, 16) == 0;
        Vqkv__RegionRegistered rg = VQKV__REGION_REGISTERED__INIT;
        rg.region_handle = 1;
        env.body_case = VQKV__ENVELOPE__BODY_REGION_REGISTERED;
        env.region_registered = &rg;
        return daemon_reply(fd, req->request_id, &env);
    }
    default: return false;
    }
}

/* One connection, served until the client closes it. */
static void *daemon_main(void *arg)
{
    daemon_t *d = arg;
    int fd = accept(d->listen_fd, NULL, NULL);
    vqkv_frame_reader_t reader;
    if (fd < 0 || vqkv_frame_reader_init(&reader, 1u << 20) != VQKV_OK) {
        d->failed = "accept";
        return NULL;
    }
    for (;;) {
        vqkv_frame_t frame;
        int rc = vqkv_frame_recv(fd, &reader, &frame);
        if (rc == VQKV_ECLOSED)
            break;
        Vqkv__Envelope *req = NULL;
        if (rc != VQKV_OK || vqkv_frame_unpack(frame.data, frame.len, &req) != VQKV_OK) {
            d->failed = "a frame that does not read";
            break;
        }
        bool answered = daemon_answer(fd, req, &frame, &d->seen);
        vqkv_frame_envelope_free(req);
        vqkv_frame_clear(&frame);
        if (!answered) {
            d->failed = "a request the test daemon does not answer";
            break;
        }
    }
    vqkv_frame_reader_free(&reader);
    close(fd);
    return NULL;
}

/* Registers n pieces of VMM memory with the view 4 KiB into the first and
 * ending 4 KiB into the last; what the daemon saw. */
static seen_t register_pieces(size_t n)
{
    fake_cuda_setup_fn setup;
    fake_cuda_counts_fn counts;
    if (!fake_cuda_open(&setup, &counts))
        fail_msg("the fake driver: %s", dlerror());
    fake_cuda_memory_t mem = fake_cuda_vmm(BASE, PIECE, n, -1);
    setup(&mem);

    char dir[] = "/tmp/vqkv-cuda-client-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/sock", dir);
    daemon_t d = {.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    assert_true(d.listen_fd >= 0);
    assert_int_equal(bind(d.listen_fd, (struct sockaddr *)&addr, sizeof addr), 0);
    assert_int_equal(listen(d.listen_fd, 1), 0);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, daemon_main, &d), 0);

    int before = count_open_fds();
    vqkv_client_t *c = NULL;
    assert_int_equal(vqkv_connect(addr.sun_path, "test_cuda_client", 5000, &c), VQKV_OK);
    vqkv_model_t *m = NULL;
    assert_int_equal(vqkv_register_model(c, "test/cuda-client", &layout, "fp16", &m), VQKV_OK);
    /* A slot is 16 KiB over its two layers and sides: slots enough to
     * reach from 4 KiB into the first piece into the last. */
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, (uint32_t)((n - 1) * PIECE / (16 << 10) + 1));
    vqkv_region_t r;
    int rc = vqkv_register_cuda_region(c, m, BASE + 4096, view.region_bytes, &view, &r);
    if (rc != VQKV_OK)
        fail_msg("%zu pieces: %s", n, vqkv_last_error(c));
    int exports, retained;
    counts(&exports, &retained);
    assert_int_equal(retained, 0);
    vqkv_close(c);
    assert_int_equal(pthread_join(thread, NULL), 0);
    if (d.failed != NULL)
        fail_msg("%zu pieces: the test daemon saw %s", n, d.failed);
    assert_int_equal(count_open_fds(), before); /* the region's fds went with the client */
    close(d.listen_fd);
    unlink(addr.sun_path);
    rmdir(dir);
    assert_int_equal((size_t)exports, d.seen.n_piece_bytes);
    return d.seen;
}

static void test_pieces_in_batches(void **state)
{
    (void)state;
    for (size_t n = 1; n <= 9; n++) {
        seen_t s = register_pieces(n);
        size_t last = (n - 1) % 4 + 1; /* the RegisterRegion's: 1 to 4 */
        assert_int_equal(s.kind, VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD);
        assert_int_equal(s.n_piece_bytes, n);
        assert_int_equal(s.pieces_frames, (n - last) / 4);
        assert_int_equal(s.fds_in_pieces_frames, n - last);
        assert_int_equal(s.fds_in_register, last);
        assert_int_equal(s.piece_sum, s.region_bytes);
        assert_int_equal(s.region_bytes, n * PIECE);
        assert_int_equal(s.first_piece, PIECE);
        assert_int_equal(s.offset, 4096);
        assert_true(s.uuid_ok);
        assert_false(s.bad_fd);
        assert_false(s.bad_count);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pieces_in_batches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
