/* test_region_pieces.c -- how vqkvd holds the pieces of a CUDA VMM region
 * (models.c: RegionPieces, then a RegisterRegion that brings the last of
 * them), on a machine without a GPU or CUDA: a real server in-process
 * (vqkvd_server_start on a socket in a temporary directory, its loop turned
 * by this file until each reply is in), whose CPU backend is wrapped by a
 * backend of this file's that imports pieces. A piece is a memfd this file
 * made holding the piece's number; the test backend's piece_import reads
 * that number, its region_open records the pieces a VMM region is given
 * (and refuses one when told to), and its piece_release counts; MEMFD
 * regions go to the CPU backend.
 *
 * Held to: the pieces of RegionPieces frames and the RegisterRegion's own
 * fds reach region_open all together and in the order sent, each Ack
 * counting the pieces held; every imported piece is released exactly once,
 * after a registered region, after a refused one (region_open failing, the
 * payload check, an unknown model, a MEMFD region after pieces, a
 * RegionPieces whose fd count is wrong), after an import failing midway
 * (the pieces before it, of the frame and held, let go; the frame's fds
 * after it never imported), when the client disconnects, and past
 * VQKV_REGION_MAX_PIECES, which is refused with a message naming the
 * limit while a region of exactly that many registers. After each of
 * these the daemon holds no fd it was sent and serves the next request,
 * and the next region's pieces count from zero.
 */
#include <fcntl.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "frame.h"
#include "log.h"
#include "server.h"
#include "test_util.h"

/* Every piece's size: region_bytes is a multiple of it. */
#define PIECE_BYTES 4096u
/* Pieces the test backend imports in one test, at most. */
#define IMPORTS_MAX (4 * VQKV_REGION_MAX_PIECES)
/* Piece handles count from here: a handle is never a piece's number. */
#define HANDLE_BASE 0x100000000ull
/* Turns of the server's loop before a missing reply fails the test: the
 * tick timer (100 ms) wakes it when nothing else does. */
#define TURNS_MAX 100

static const vqkv_layout_t layout = {2, 2, 8, 4, VQKV_DTYPE_F16};
static const uint8_t gpu_uuid[16] = {0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};

/* The CPU backend with pieces: what the session asked of it. */
typedef struct {
    vqkvd_backend_t be;      /* first: the server's backend points here */
    vqkvd_backend_ops_t ops; /* the CPU backend's, pieces and VMM regions added */
    vqkvd_backend_t *cpu;
    uint32_t ids[IMPORTS_MAX];      /* the piece number of each import, by handle */
    uint32_t released[IMPORTS_MAX]; /* how often each handle was let go */
    size_t n_imports;
    uint32_t bad;                            /* releases or opens of a handle not held */
    uint32_t opened[VQKV_REGION_MAX_PIECES]; /* the last VMM region_open's piece numbers */
    size_t n_opened;
    uint32_t open_calls; /* region_open of VMM regions */
    bool open_fails;     /* refuse the next VMM region */
    uint32_t vmm_open;   /* VMM regions opened and not closed */
} pieces_backend_t;

typedef struct {
    uv_loop_t loop;
    vqkvd_server_t server;
    pieces_backend_t backend;
    char dir[64];
    char path[96];
    int sock; /* the client's end */
    vqkv_frame_reader_t reader;
    uint64_t next_id;
    uint64_t model;      /* the model's handle on this connection */
    uint32_t next_piece; /* the number the next piece memfd holds */
    int fds;             /* open fds with the server up and the client connected */
    uint64_t piece_bytes[VQKV_REGION_MAX_PIECES + 2]; /* a RegisterRegion's, up to 2 too many */
} pieces_t;

/* ---- the test backend -------------------------------------------------------- */

/* How often handle was released (its counter), or NULL for a handle
 * piece_import never gave. */
static uint32_t *pieces_released(pieces_backend_t *t, uint64_t handle)
{
    if (handle <= HANDLE_BASE || handle > HANDLE_BASE + t->n_imports)
        return NULL;
    return &t->released[handle - HANDLE_BASE - 1];
}

static int pieces_import(vqkvd_backend_t *be, int fd, uint64_t *piece, char *why, size_t why_size)
{
    pieces_backend_t *t = (pieces_backend_t *)be;
    struct stat st;
    uint32_t id;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || pread(fd, &id, sizeof id, 0) != sizeof id) {
        snprintf(why, why_size, "the fd is not a piece of this test");
        return VQKV_EMAP;
    }
    if (t->n_imports == IMPORTS_MAX) {
        snprintf(why, why_size, "the test backend is out of room");
        return VQKV_ENOMEM;
    }
    t->ids[t->n_imports++] = id;
    *piece = HANDLE_BASE + t->n_imports;
    return VQKV_OK;
}

static void pieces_release(vqkvd_backend_t *be, uint64_t piece)
{
    pieces_backend_t *t = (pieces_backend_t *)be;
    uint32_t *released = pieces_released(t, piece);
    if (released == NULL || *released > 0)
        t->bad++;
    else
        (*released)++;
}

/* VMM regions: the pieces recorded, then host memory for the view (or a
 * refusal); other kinds are the CPU backend's. */
static int pieces_region_open(vqkvd_backend_t *be, const Vqkv__RegisterRegion *rr, const int *fds,
                              size_t n_fds, const uint64_t *pieces, size_t n_pieces,
                              vqkvd_region_mem_t *mem, char *why, size_t why_size)
{
    pieces_backend_t *t = (pieces_backend_t *)be;
    if (rr->kind != VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD)
        return t->cpu->ops->region_open(t->cpu, rr, fds, n_fds, pieces, n_pieces, mem, why,
                                        why_size);
    t->open_calls++;
    /* More than the limit (which the session refuses) is recorded as none. */
    t->n_opened = n_pieces <= VQKV_REGION_MAX_PIECES ? n_pieces : 0;
    for (size_t i = 0; i < t->n_opened; i++) {
        uint32_t *released = pieces_released(t, pieces[i]);
        if (released == NULL || *released > 0)
            t->bad++;
        else
            t->opened[i] = t->ids[pieces[i] - HANDLE_BASE - 1];
    }
    if (t->open_fails) {
        snprintf(why, why_size, "the test backend refuses this region");
        return VQKV_EDEVICE;
    }
    mem->base = calloc(1, rr->region_bytes);
    if (mem->base == NULL) {
        snprintf(why, why_size, "out of memory");
        return VQKV_ENOMEM;
    }
    mem->bytes = rr->region_bytes;
    mem->vmm = true;
    mem->device = 0;
    t->vmm_open++;
    return VQKV_OK;
}

static void pieces_region_close(vqkvd_backend_t *be, vqkvd_region_mem_t *mem)
{
    pieces_backend_t *t = (pieces_backend_t *)be;
    if (!mem->vmm) {
        t->cpu->ops->region_close(t->cpu, mem);
        return;
    }
    free(mem->base);
    mem->base = NULL;
    t->vmm_open--;
}

static void pieces_destroy(vqkvd_backend_t *be)
{
    pieces_backend_t *t = (pieces_backend_t *)be;
    t->cpu->ops->destroy(t->cpu);
    t->cpu = NULL;
}

/* Puts the test backend in front of the CPU backend s was started with. */
static void pieces_backend_install(pieces_backend_t *t, vqkvd_server_t *s)
{
    t->cpu = s->backend;
    t->ops = *t->cpu->ops;
    t->ops.piece_import = pieces_import;
    t->ops.piece_release = pieces_release;
    t->ops.region_open = pieces_region_open;
    t->ops.region_close = pieces_region_close;
    t->ops.destroy = pieces_destroy;
    t->be = *t->cpu;
    t->be.ops = &t->ops;
    s->backend = &t->be;
}

/* ---- the client -------------------------------------------------------------- */

static uint64_t pieces_send(pieces_t *f, Vqkv__Envelope *env, const int *fds, size_t n_fds)
{
    env->request_id = f->next_id++;
    assert_pok(vqkv_frame_send(f->sock, env, fds, n_fds, VQKV_FRAME_DEFAULT_MAX));
    return env->request_id;
}

/* Turns the server's loop until the reply to request id is in; the caller
 * frees it. The handler that replied has returned by then. */
static Vqkv__Envelope *pieces_reply(pieces_t *f, uint64_t id)
{
    for (int turns = 0;;) {
        vqkv_frame_t frame;
        int rc = vqkv_frame_reader_next(&f->reader, &frame);
        if (rc == 1) {
            Vqkv__Envelope *env = NULL;
            assert_pok(vqkv_frame_unpack(frame.data, frame.len, &env));
            vqkv_frame_clear(&frame);
            assert_int_equal(env->request_id, id);
            return env;
        }
        assert_int_equal(rc, 0);
        rc = vqkv_frame_reader_recv(&f->reader, f->sock, MSG_DONTWAIT);
        if (rc == VQKV_EAGAIN) {
            assert_true(++turns < TURNS_MAX);
            uv_run(&f->loop, UV_RUN_ONCE);
        } else {
            assert_true(rc > 0);
        }
    }
}

static Vqkv__Envelope *pieces_call(pieces_t *f, Vqkv__Envelope *env, const int *fds, size_t n_fds)
{
    return pieces_reply(f, pieces_send(f, env, fds, n_fds));
}

static void pieces_expect_error(Vqkv__Envelope *reply, int code, const char *says)
{
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_ERROR);
    assert_prc(reply->error->code, code);
    if (strstr(reply->error->message, says) == NULL)
        fail_msg("the error says \"%s\", not \"%s\"", reply->error->message, says);
    vqkv_frame_envelope_free(reply);
}

/* Connects, says Hello and registers the model. */
static void pieces_connect(pieces_t *f)
{
    f->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", f->path);
    assert_true(f->sock >= 0);
    assert_int_equal(connect(f->sock, (struct sockaddr *)&addr, sizeof addr), 0);
    assert_pok(vqkv_frame_reader_init(&f->reader, VQKV_FRAME_DEFAULT_MAX));
    f->next_id = 1;

    Vqkv__Hello h = VQKV__HELLO__INIT;
    h.protocol_version = VQKV_PROTO_VERSION;
    h.client_name = "test_region_pieces";
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    Vqkv__Envelope *reply = pieces_call(f, &env, NULL, 0);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_WELCOME);
    vqkv_frame_envelope_free(reply);

    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = layout.num_layers;
    wl.num_kv_heads = layout.num_kv_heads;
    wl.head_dim = layout.head_dim;
    wl.block_tokens = layout.block_tokens;
    wl.dtype = (Vqkv__DType)layout.dtype;
    Vqkv__RegisterModel rm = VQKV__REGISTER_MODEL__INIT;
    rm.model_id = "pieces";
    rm.layout = &wl;
    rm.kv_head_count = layout.num_kv_heads;
    rm.codec = "fp16";
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_MODEL;
    env.register_model = &rm;
    reply = pieces_call(f, &env, NULL, 0);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_MODEL_REGISTERED);
    f->model = reply->model_registered->model_handle;
    vqkv_frame_envelope_free(reply);
}

static void pieces_disconnect(pieces_t *f)
{
    close(f->sock);
    f->sock = -1;
    vqkv_frame_reader_free(&f->reader);
}

/* Disconnects and turns the server's loop until it has let the client go
 * and closed its end: the fds left are those before the connection. */
static void pieces_gone(pieces_t *f)
{
    pieces_disconnect(f);
    for (int turns = 0; f->server.n_clients > 0 || count_open_fds() != f->fds - 2; turns++) {
        assert_true(turns < TURNS_MAX);
        uv_run(&f->loop, UV_RUN_ONCE);
    }
}

/* n memfd pieces into fds, numbered on from f->next_piece. */
static void pieces_make(pieces_t *f, int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        fds[i] = memfd_create("piece", MFD_CLOEXEC);
        assert_true(fds[i] >= 0);
        uint32_t id = f->next_piece++;
        assert_int_equal(pwrite(fds[i], &id, sizeof id, 0), sizeof id);
    }
}

static void pieces_close(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        close(fds[i]);
}

/* RegionPieces saying num_fds, with fds[n]; the reply. */
static Vqkv__Envelope *pieces_region_pieces(pieces_t *f, const int *fds, size_t n, uint32_t num_fds)
{
    Vqkv__RegionPieces rp = VQKV__REGION_PIECES__INIT;
    rp.num_fds = num_fds;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGION_PIECES;
    env.region_pieces = &rp;
    return pieces_call(f, &env, fds, n);
}

/* RegionPieces of n new pieces, acknowledged with held pieces in all. */
static void pieces_send_ok(pieces_t *f, size_t n, uint32_t held)
{
    int fds[VQKV_FRAME_MAX_FDS];
    pieces_make(f, fds, n);
    Vqkv__Envelope *reply = pieces_region_pieces(f, fds, n, (uint32_t)n);
    pieces_close(fds, n);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_ACK);
    assert_int_equal(reply->ack->count, held);
    vqkv_frame_envelope_free(reply);
}

/* With none held, RegionPieces until n pieces are (4 a frame, as libvqkv
 * sends them). */
static void pieces_hold(pieces_t *f, size_t n)
{
    for (size_t held = 0; held < n;) {
        size_t k = n - held < VQKV_FRAME_MAX_FDS ? n - held : VQKV_FRAME_MAX_FDS;
        held += k;
        pieces_send_ok(f, k, (uint32_t)held);
    }
}

/* A RegisterRegion of a CUDA_VMM_FD region of n_pieces pieces for f's
 * model, n_fds of them with its frame, into rr (its piece_bytes f's). */
static void pieces_vmm_region(pieces_t *f, Vqkv__RegisterRegion *rr, size_t n_fds, size_t n_pieces)
{
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, 1);
    for (size_t i = 0; i < n_pieces; i++)
        f->piece_bytes[i] = PIECE_BYTES;
    *rr = (Vqkv__RegisterRegion)VQKV__REGISTER_REGION__INIT;
    rr->model_handle = f->model;
    rr->kind = VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD;
    rr->region_bytes = n_pieces * PIECE_BYTES;
    rr->layer_stride = view.layer_stride;
    rr->kv_stride = view.kv_stride;
    rr->slot_stride = view.slot_stride;
    rr->token_stride = view.token_stride;
    rr->head_stride = view.head_stride;
    rr->num_slots = view.num_slots;
    rr->num_fds = (uint32_t)n_fds;
    rr->gpu_uuid = (ProtobufCBinaryData){sizeof gpu_uuid, (uint8_t *)gpu_uuid};
    rr->piece_bytes = f->piece_bytes;
    rr->n_piece_bytes = n_pieces;
}

/* RegisterRegion rr with fds[n_fds]; the reply. */
static Vqkv__Envelope *pieces_register(pieces_t *f, Vqkv__RegisterRegion *rr, const int *fds,
                                       size_t n_fds)
{
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = rr;
    return pieces_call(f, &env, fds, n_fds);
}

/* The VMM region of n_fds new pieces and n_pieces in all; the reply. */
static Vqkv__Envelope *pieces_register_vmm(pieces_t *f, size_t n_fds, size_t n_pieces)
{
    int fds[VQKV_FRAME_MAX_FDS];
    pieces_make(f, fds, n_fds);
    Vqkv__RegisterRegion rr;
    pieces_vmm_region(f, &rr, n_fds, n_pieces);
    Vqkv__Envelope *reply = pieces_register(f, &rr, fds, n_fds);
    pieces_close(fds, n_fds);
    return reply;
}

/* The held pieces and n_fds new ones of the frame register as one region;
 * region_open had them all, in the order sent. */
static void pieces_register_ok(pieces_t *f, size_t held, size_t n_fds)
{
    uint32_t calls = f->backend.open_calls, first = f->next_piece - (uint32_t)held;
    Vqkv__Envelope *reply = pieces_register_vmm(f, n_fds, held + n_fds);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_REGION_REGISTERED);
    assert_true(reply->region_registered->region_handle != 0);
    vqkv_frame_envelope_free(reply);
    assert_int_equal(f->backend.open_calls, calls + 1);
    assert_int_equal(f->backend.n_opened, held + n_fds);
    for (size_t i = 0; i < held + n_fds; i++)
        assert_int_equal(f->backend.opened[i], first + i);
}

/* rr made a MEMFD region of one slot. */
static void pieces_memfd_region(Vqkv__RegisterRegion *rr)
{
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, 1);
    rr->kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    rr->region_bytes = view.region_bytes;
    rr->num_fds = 1;
    rr->gpu_uuid = (ProtobufCBinaryData){0, NULL};
    rr->n_piece_bytes = 0;
}

/* The daemon serves: a MEMFD region registers (the CPU backend's). */
static void pieces_serves(pieces_t *f)
{
    Vqkv__RegisterRegion rr;
    pieces_vmm_region(f, &rr, 1, 1);
    pieces_memfd_region(&rr);
    int fd = memfd_create("region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, (off_t)rr.region_bytes), 0);
    Vqkv__Envelope *reply = pieces_register(f, &rr, &fd, 1);
    close(fd);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_REGION_REGISTERED);
    vqkv_frame_envelope_free(reply);
}

/* Every piece imported so far was released exactly once, and no handle
 * the backend did not hold was released or opened. */
static void pieces_all_released(const pieces_backend_t *t)
{
    assert_int_equal(t->bad, 0);
    for (size_t i = 0; i < t->n_imports; i++)
        if (t->released[i] != 1)
            fail_msg("piece %u (import %zu) was released %u times", (unsigned)t->ids[i], i,
                     (unsigned)t->released[i]);
}

/* After a request: every piece let go, and the daemon holds no fd it was
 * sent. */
static void pieces_settled(const pieces_t *f)
{
    pieces_all_released(&f->backend);
    assert_int_equal(count_open_fds(), f->fds);
}

/* Whether piece number id was ever imported. */
static bool pieces_imported(const pieces_t *f, uint32_t id)
{
    for (size_t i = 0; i < f->backend.n_imports; i++)
        if (f->backend.ids[i] == id)
            return true;
    return false;
}

/* ---- setup ----------------------------------------------------------------------- */

static int pieces_setup(void **state)
{
    pieces_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    *state = f;
    assert_int_equal(test_make_dir(f->dir, sizeof f->dir, "vqkv-pieces"), 0);
    snprintf(f->path, sizeof f->path, "%s/vqkvd.sock", f->dir);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    vqkvd_config_t cfg;
    vqkvd_config_defaults(&cfg);
    cfg.socket_path = f->path;
    cfg.device = "cpu"; /* "auto" would take a GPU where there is one */
    cfg.pool_bytes = 1u << 20;
    cfg.max_regions = 256;
    int rc = vqkvd_server_start(&f->server, &f->loop, &cfg);
    if (rc != VQKV_OK)
        fail_msg("vqkvd_server_start: %s (%s)", vqkv_strerror(rc), strerror(f->server.sys_errno));
    pieces_backend_install(&f->backend, &f->server);
    pieces_connect(f);
    f->fds = count_open_fds();
    return 0;
}

static int pieces_teardown(void **state)
{
    pieces_t *f = *state;
    if (f->sock >= 0)
        pieces_disconnect(f);
    vqkvd_server_stop(&f->server);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    vqkvd_server_destroy(&f->server);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    assert_int_equal(f->backend.vmm_open, 0);
    pieces_all_released(&f->backend);
    assert_int_equal(rmdir(f->dir), 0);
    free(f);
    return 0;
}

/* ---- the tests ------------------------------------------------------------------ */

/* Pieces from three RegionPieces and the RegisterRegion's own fds make one
 * region; the next region's pieces count from zero. */
static void test_registered(void **state)
{
    pieces_t *f = *state;
    pieces_send_ok(f, 4, 4);
    pieces_send_ok(f, 4, 8);
    pieces_send_ok(f, 2, 10);
    pieces_register_ok(f, 10, 3);
    assert_int_equal(f->backend.n_imports, 13);
    pieces_settled(f);
    /* A region of the frame's pieces alone, then one after a single piece. */
    pieces_register_ok(f, 0, 4);
    pieces_settled(f);
    pieces_send_ok(f, 1, 1);
    pieces_register_ok(f, 1, 1);
    assert_int_equal(f->backend.n_imports, 19);
    pieces_settled(f);
    assert_int_equal(f->backend.vmm_open, 3);
    pieces_serves(f);
}

/* Held pieces are let go whichever check refuses the region. */
static void test_region_refused(void **state)
{
    pieces_t *f = *state;
    int fds[VQKV_FRAME_MAX_FDS];
    Vqkv__RegisterRegion rr;

    /* region_open refuses: it had all 7 pieces, in order. */
    pieces_hold(f, 5);
    f->backend.open_fails = true;
    pieces_expect_error(pieces_register_vmm(f, 2, 7), VQKV_EDEVICE,
                        "the test backend refuses this region");
    f->backend.open_fails = false;
    assert_int_equal(f->backend.n_opened, 7);
    for (uint32_t i = 0; i < 7; i++)
        assert_int_equal(f->backend.opened[i], f->next_piece - 7 + i);
    assert_int_equal(f->backend.n_imports, 7);
    pieces_settled(f);
    pieces_serves(f);

    /* The payload check, for the count and for the sizes: the frame's fd
     * is never imported. */
    pieces_hold(f, 4);
    pieces_expect_error(pieces_register_vmm(f, 1, 6), VQKV_EFDS,
                        "it has 6, 4 were held from RegionPieces and 1 came");
    assert_false(pieces_imported(f, f->next_piece - 1));
    pieces_settled(f);
    pieces_serves(f);
    pieces_hold(f, 4);
    pieces_make(f, fds, 1);
    pieces_vmm_region(f, &rr, 1, 5);
    rr.region_bytes--;
    pieces_expect_error(pieces_register(f, &rr, fds, 1), VQKV_EINVAL, "the pieces add up to");
    pieces_close(fds, 1);
    assert_false(pieces_imported(f, f->next_piece - 1));
    pieces_settled(f);
    pieces_serves(f);

    /* An unknown model. */
    pieces_hold(f, 2);
    pieces_make(f, fds, 1);
    pieces_vmm_region(f, &rr, 1, 3);
    rr.model_handle = 99;
    pieces_expect_error(pieces_register(f, &rr, fds, 1), VQKV_EHANDLE, "no model 99");
    pieces_close(fds, 1);
    pieces_settled(f);
    pieces_serves(f);

    /* A MEMFD region after pieces. */
    pieces_hold(f, 3);
    pieces_make(f, fds, 1);
    pieces_vmm_region(f, &rr, 1, 1);
    pieces_memfd_region(&rr);
    assert_int_equal(ftruncate(fds[0], (off_t)rr.region_bytes), 0);
    pieces_expect_error(pieces_register(f, &rr, fds, 1), VQKV_EFDS,
                        "RegionPieces were sent before it");
    pieces_close(fds, 1);
    pieces_settled(f);
    pieces_serves(f);

    /* RegionPieces whose num_fds is not what came: the 4 held go too, so
     * the RegisterRegion counting on them is refused for its count. */
    pieces_hold(f, 4);
    pieces_make(f, fds, 2);
    pieces_expect_error(pieces_region_pieces(f, fds, 2, 3), VQKV_EFDS,
                        "(num_fds 3, 2 came); the pieces held before are let go");
    pieces_close(fds, 2);
    assert_int_equal(f->backend.n_imports, 7 + 4 + 4 + 2 + 3 + 4);
    pieces_settled(f);
    pieces_expect_error(pieces_register_vmm(f, 2, 8), VQKV_EFDS, "it has 8, 0 were held");
    pieces_settled(f);
    pieces_register_ok(f, 0, 2);
    pieces_settled(f);
}

/* An import failing midway: the pieces imported before it, of the frame
 * and held, are let go, the fds after it are closed unimported. */
static void test_import_fails(void **state)
{
    pieces_t *f = *state;
    int fds[VQKV_FRAME_MAX_FDS], pipe_fds[2];

    /* RegionPieces: piece, piece, a pipe, piece. */
    pieces_hold(f, 4);
    pieces_make(f, fds, 3);
    fds[3] = fds[2];
    assert_int_equal(pipe2(pipe_fds, O_CLOEXEC), 0);
    fds[2] = pipe_fds[0];
    pieces_expect_error(pieces_region_pieces(f, fds, 4, 4), VQKV_EMAP,
                        "not a piece of this test; the pieces held before are let go");
    pieces_close(fds, 4);
    close(pipe_fds[1]);
    assert_int_equal(f->backend.n_imports, 6);
    assert_false(pieces_imported(f, f->next_piece - 1));
    pieces_settled(f);
    pieces_serves(f);

    /* The RegisterRegion's own: piece, a pipe, piece; region_open never
     * sees them. */
    pieces_hold(f, 4);
    pieces_make(f, fds, 2);
    fds[2] = fds[1];
    assert_int_equal(pipe2(pipe_fds, O_CLOEXEC), 0);
    fds[1] = pipe_fds[0];
    uint32_t calls = f->backend.open_calls;
    Vqkv__RegisterRegion rr;
    pieces_vmm_region(f, &rr, 3, 7);
    pieces_expect_error(pieces_register(f, &rr, fds, 3), VQKV_EMAP, "not a piece of this test");
    pieces_close(fds, 3);
    close(pipe_fds[1]);
    assert_int_equal(f->backend.open_calls, calls);
    assert_int_equal(f->backend.n_imports, 6 + 5);
    assert_false(pieces_imported(f, f->next_piece - 1));
    pieces_settled(f);
    pieces_serves(f);
    pieces_send_ok(f, 1, 1);
    pieces_register_ok(f, 1, 1);
    pieces_settled(f);
}

/* A client that disconnects with pieces held, and with a VMM region
 * registered and pieces held, lets them all go. */
static void test_client_gone(void **state)
{
    pieces_t *f = *state;
    pieces_hold(f, 6);
    pieces_gone(f);
    pieces_all_released(&f->backend);
    assert_int_equal(f->backend.n_imports, 6);

    pieces_connect(f);
    pieces_settled(f);
    pieces_register_ok(f, 0, 2);
    pieces_hold(f, 3);
    assert_int_equal(f->backend.vmm_open, 1);
    pieces_gone(f);
    pieces_all_released(&f->backend);
    assert_int_equal(f->backend.vmm_open, 0);
    pieces_connect(f);
    pieces_settled(f);
    pieces_serves(f);
}

/* VQKV_REGION_MAX_PIECES held, and registered as one region; one more is
 * refused, in RegionPieces and in a RegisterRegion. */
static void test_limit(void **state)
{
    pieces_t *f = *state;
    int fds[VQKV_FRAME_MAX_FDS];

    pieces_hold(f, VQKV_REGION_MAX_PIECES);
    pieces_make(f, fds, 1);
    pieces_expect_error(pieces_region_pieces(f, fds, 1, 1), VQKV_ELIMIT,
                        "a region spans at most 8192 pieces; the pieces held before are let go");
    pieces_close(fds, 1);
    assert_int_equal(f->backend.n_imports, VQKV_REGION_MAX_PIECES);
    pieces_settled(f);
    pieces_serves(f);

    pieces_hold(f, VQKV_REGION_MAX_PIECES - 4);
    pieces_register_ok(f, VQKV_REGION_MAX_PIECES - 4, 4);
    pieces_settled(f);

    pieces_hold(f, VQKV_REGION_MAX_PIECES - 2);
    pieces_expect_error(pieces_register_vmm(f, 4, VQKV_REGION_MAX_PIECES + 2), VQKV_EINVAL,
                        "piece_bytes has 8194 entries; a region spans at most 8192");
    pieces_settled(f);
    pieces_serves(f);
}

int main(void)
{
    vqkvd_log_level = VQKVD_LOG_WARN; /* no line for every refusal */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_registered, pieces_setup, pieces_teardown),
        cmocka_unit_test_setup_teardown(test_region_refused, pieces_setup, pieces_teardown),
        cmocka_unit_test_setup_teardown(test_import_fails, pieces_setup, pieces_teardown),
        cmocka_unit_test_setup_teardown(test_client_gone, pieces_setup, pieces_teardown),
        cmocka_unit_test_setup_teardown(test_limit, pieces_setup, pieces_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
