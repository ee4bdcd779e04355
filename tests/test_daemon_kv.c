/* test_daemon_kv.c -- vqkvd's block requests as a process: models, memfd
 * regions, Put, Lookup, Get and Release between two connections of one
 * tenant, on the CPU backend. The daemon binary runs on a socket in a fresh
 * temporary directory (tests/daemon_harness.h) and is stopped with
 * SIGTERM; exit status 0 is required, so under ASan a leak in the daemon
 * fails the test that caused it.
 *
 * Regions hold a vLLM-layout cache [layers][2][slots][tokens][heads][dim] of
 * random fp16 values in [-2, 2] (finite, so the fp16 codec's bit-exactness
 * is checked byte for byte).
 */
#include <math.h>
#include <stdbool.h>
#include <sys/mman.h>

#include "daemon_harness.h"
#include "vqkv_codec.h"

/* ---- requests ------------------------------------------------------------- */

#define LAYERS 2
#define HEADS 2
#define DIM 64
#define TOKENS 16
#define SLOTS 8
#define MODEL "test/model@main"

static const vqkv_layout_t layout = {LAYERS, HEADS, DIM, TOKENS, VQKV_DTYPE_F16};

/* The reply must be an Error of code whose message contains text. */
static void expect_refused(Vqkv__Envelope *reply, int code, const char *text)
{
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_ERROR);
    if (text != NULL && strstr(reply->error->message, text) == NULL)
        fail_msg("\"%s\" does not say \"%s\"", reply->error->message, text);
    expect_error(reply, reply->request_id, code);
}

static uint64_t model_ok(client_t *c, const char *model_id, const char *codec)
{
    Vqkv__Envelope *r = register_model(c, &layout, model_id, codec);
    if (r->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("RegisterModel: %s", r->error->message);
    assert_int_equal(r->body_case, VQKV__ENVELOPE__BODY_MODEL_REGISTERED);
    uint64_t h = r->model_registered->model_handle;
    assert_true(h != 0);
    assert_true(r->model_registered->block_bytes > 0);
    assert_true(strncmp(r->model_registered->codec, codec, strlen(codec)) == 0);
    vqkv_frame_envelope_free(r);
    return h;
}

/* A memfd region of worker memory, mapped here too. */
typedef struct {
    int fd;
    uint8_t *base;
    vqkv_kv_view_t view;
} region_t;

static uint16_t f16(float x)
{
    uint16_t h;
    vqkv_dtype_from_f32(VQKV_DTYPE_F16, &x, 1, &h);
    return h;
}

static void region_new(region_t *r, uint32_t slots, unsigned seed)
{
    vqkv_kv_view_vllm(&r->view, &layout, slots);
    r->fd = memfd_create("test_daemon_kv", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    assert_true(r->fd >= 0);
    assert_int_equal(ftruncate(r->fd, (off_t)r->view.region_bytes), 0);
    r->base = mmap(NULL, r->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    assert_true(r->base != MAP_FAILED);
    srand(seed);
    uint16_t *v = (uint16_t *)r->base;
    for (size_t i = 0; i < r->view.region_bytes / 2; i++)
        v[i] = f16((float)rand() / (float)RAND_MAX * 4.0f - 2.0f);
}

static void region_free(region_t *r)
{
    munmap(r->base, r->view.region_bytes);
    close(r->fd);
}

/* A RegisterRegion of model for r's whole view, as a memfd with its fd. */
static void region_request(Vqkv__RegisterRegion *rr, uint64_t model, const region_t *r)
{
    *rr = (Vqkv__RegisterRegion)VQKV__REGISTER_REGION__INIT;
    rr->model_handle = model;
    rr->kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    rr->region_bytes = r->view.region_bytes;
    rr->layer_stride = r->view.layer_stride;
    rr->kv_stride = r->view.kv_stride;
    rr->slot_stride = r->view.slot_stride;
    rr->token_stride = r->view.token_stride;
    rr->head_stride = r->view.head_stride;
    rr->num_slots = r->view.num_slots;
    rr->num_fds = 1;
}

/* RegisterRegion with explicit sizes and fds; the reply. */
static Vqkv__Envelope *register_region(client_t *c, uint64_t model, const region_t *r,
                                       uint64_t bytes, uint64_t offset, uint32_t slots,
                                       size_t n_fds)
{
    Vqkv__RegisterRegion rr;
    region_request(&rr, model, r);
    rr.region_bytes = bytes;
    rr.offset = offset;
    rr.num_slots = slots;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    return call(c, &env, &r->fd, n_fds);
}

/* What a CUDA RegisterRegion carries, for the refusal cases. */
typedef struct {
    Vqkv__RegionKind kind;
    size_t handle_bytes, uuid_bytes; /* cuda_ipc_handle, gpu_uuid */
    uint32_t device;
    size_t n_fds; /* num_fds says the same */
    int code;
    const char *says;
    /* piece_bytes: none, or n_pieces splitting region_bytes evenly, the
     * last short by trim, the first empty when zero_first */
    size_t n_pieces;
    uint64_t trim;
    bool zero_first;
} cuda_case_t;

/* RegisterRegion of r's whole view as cc describes, fd sent n_fds times. */
static Vqkv__Envelope *register_cuda_region(client_t *c, uint64_t model, const region_t *r,
                                            const cuda_case_t *cc, int fd)
{
    static const uint8_t uuid[16] = {0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    uint8_t handle[65] = {0};
    int fds[4] = {fd, fd, fd, fd};
    uint64_t pieces[4];
    assert_true(cc->n_fds <= 4 && cc->n_pieces <= 4);
    Vqkv__RegisterRegion rr;
    region_request(&rr, model, r);
    for (size_t i = 0; i < cc->n_pieces; i++)
        pieces[i] = rr.region_bytes / cc->n_pieces +
                    (i + 1 == cc->n_pieces ? rr.region_bytes % cc->n_pieces - cc->trim : 0);
    if (cc->zero_first) {
        pieces[cc->n_pieces - 1] += pieces[0];
        pieces[0] = 0;
    }
    rr.n_piece_bytes = cc->n_pieces;
    rr.piece_bytes = pieces;
    rr.kind = cc->kind;
    rr.num_fds = (uint32_t)cc->n_fds;
    rr.cuda_ipc_handle = (ProtobufCBinaryData){cc->handle_bytes, handle};
    rr.gpu_uuid = (ProtobufCBinaryData){cc->uuid_bytes, (uint8_t *)uuid};
    rr.device = cc->device;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    return call(c, &env, fds, cc->n_fds);
}

static uint64_t region_ok(client_t *c, uint64_t model, const region_t *r)
{
    Vqkv__Envelope *e = register_region(c, model, r, r->view.region_bytes, 0, r->view.num_slots, 1);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("RegisterRegion: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_REGION_REGISTERED);
    uint64_t h = e->region_registered->region_handle;
    assert_true(h != 0);
    vqkv_frame_envelope_free(e);
    return h;
}

/* Key i of chain `chain`: any 32 distinct bytes do here. */
static void make_key(uint8_t key[32], unsigned chain, unsigned i)
{
    for (unsigned b = 0; b < 32; b++)
        key[b] = (uint8_t)(chain * 31 + i * 7 + b * 13 + (b == 0 ? chain : 0) + (b == 1 ? i : 0));
}

/* Put blocks i0..i0+n-1 of chain from slots; chained says whether block i
 * names block i-1 as its parent (block 0 never has one). */
/* A Put of n blocks of chain from i0 on, into slots, with a worker's CUDA
 * event when event is not NULL; the reply. */
static Vqkv__Envelope *put_event(client_t *c, uint64_t model, uint64_t region, unsigned chain,
                                 unsigned i0, size_t n, const uint32_t *slots, int chained,
                                 const ProtobufCBinaryData *event)
{
    uint8_t keys[64][32], parents[64][32];
    ProtobufCBinaryData k[64], p[64];
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++) {
        make_key(keys[i], chain, i0 + (unsigned)i);
        k[i] = (ProtobufCBinaryData){32, keys[i]};
        p[i] = (ProtobufCBinaryData){0, NULL};
        if (chained && i0 + i > 0) {
            make_key(parents[i], chain, i0 + (unsigned)i - 1);
            p[i] = (ProtobufCBinaryData){32, parents[i]};
        }
    }
    Vqkv__Put pr = VQKV__PUT__INIT;
    pr.model_handle = model;
    pr.region_handle = region;
    pr.n_keys = pr.n_parent_keys = pr.n_slots = n;
    pr.keys = k;
    pr.parent_keys = p;
    pr.slots = (uint32_t *)slots;
    if (event != NULL)
        pr.cuda_event = *event;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_PUT;
    env.put = &pr;
    return call(c, &env, NULL, 0);
}

static Vqkv__Envelope *put(client_t *c, uint64_t model, uint64_t region, unsigned chain,
                           unsigned i0, size_t n, const uint32_t *slots, int chained)
{
    return put_event(c, model, region, chain, i0, n, slots, chained, NULL);
}

/* A Put that must succeed; returns PutDone.stored. */
static uint32_t put_ok(client_t *c, uint64_t model, uint64_t region, unsigned chain, unsigned i0,
                       size_t n, const uint32_t *slots, int chained)
{
    Vqkv__Envelope *e = put(c, model, region, chain, i0, n, slots, chained);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Put: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_PUT_DONE);
    assert_int_equal(e->put_done->n_status, n);
    uint32_t stored = e->put_done->stored;
    vqkv_frame_envelope_free(e);
    return stored;
}

/* Lookup of chain keys 0..n-1, plus one unknown key when extra; returns
 * present and the lease. */
static uint32_t lookup(client_t *c, uint64_t model, unsigned chain, size_t n, int extra,
                       uint64_t *lease)
{
    uint8_t keys[65][32];
    ProtobufCBinaryData k[65];
    for (size_t i = 0; i < n; i++)
        make_key(keys[i], chain, (unsigned)i);
    if (extra)
        make_key(keys[n], 9999, 0);
    for (size_t i = 0; i < n + (extra ? 1 : 0); i++)
        k[i] = (ProtobufCBinaryData){32, keys[i]};
    Vqkv__Lookup lk = VQKV__LOOKUP__INIT;
    lk.model_handle = model;
    lk.n_keys = n + (extra ? 1 : 0);
    lk.keys = k;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
    env.lookup = &lk;
    Vqkv__Envelope *e = call(c, &env, NULL, 0);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_LOOKUP_RESULT);
    uint32_t present = e->lookup_result->present;
    *lease = e->lookup_result->lease_id;
    assert_true((present == 0) == (*lease == 0));
    vqkv_frame_envelope_free(e);
    return present;
}

/* env, a Get of lease into slots[0..n) of region, its body in g. */
static void get_request(Vqkv__Get *g, Vqkv__Envelope *env, uint64_t lease, uint64_t region,
                        const uint32_t *slots, size_t n)
{
    *g = (Vqkv__Get)VQKV__GET__INIT;
    g->lease_id = lease;
    g->region_handle = region;
    g->n_slots = n;
    g->slots = (uint32_t *)slots;
    *env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    env->body_case = VQKV__ENVELOPE__BODY_GET;
    env->get = g;
}

static Vqkv__Envelope *get(client_t *c, uint64_t lease, uint64_t region, const uint32_t *slots,
                           size_t n)
{
    Vqkv__Get g;
    Vqkv__Envelope env;
    get_request(&g, &env, lease, region, slots, n);
    return call(c, &env, NULL, 0);
}

static void get_ok(client_t *c, uint64_t lease, uint64_t region, const uint32_t *slots, size_t n)
{
    Vqkv__Envelope *e = get(c, lease, region, slots, n);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Get: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_GET_DONE);
    assert_int_equal(e->get_done->written, n);
    vqkv_frame_envelope_free(e);
}

static Vqkv__Envelope *release(client_t *c, uint64_t lease)
{
    Vqkv__Release rl = VQKV__RELEASE__INIT;
    rl.lease_id = lease;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_RELEASE;
    env.release = &rl;
    return call(c, &env, NULL, 0);
}

/* StatsReply; the caller frees the envelope. */
static Vqkv__Envelope *stats(client_t *c)
{
    Vqkv__Stats st = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &st;
    Vqkv__Envelope *e = call(c, &env, NULL, 0);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
    return e;
}

/* Copies block `from` of region a into block `to` of the buffer shaped like
 * region b (both vLLM views of the same layout), row by row. */
static void copy_block(uint8_t *dst, const vqkv_kv_view_t *dv, uint32_t to, const uint8_t *src,
                       const vqkv_kv_view_t *sv, uint32_t from)
{
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < TOKENS; t++)
                for (uint32_t h = 0; h < HEADS; h++) {
                    size_t so = sv->offset + l * sv->layer_stride + kv * sv->kv_stride +
                                from * sv->slot_stride + t * sv->token_stride + h * sv->head_stride;
                    size_t d = dv->offset + l * dv->layer_stride + kv * dv->kv_stride +
                               to * dv->slot_stride + t * dv->token_stride + h * dv->head_stride;
                    memcpy(dst + d, src + so, DIM * 2);
                }
}

/* ---- tests ------------------------------------------------------------------ */

static void test_share_fp16(void **state)
{
    client_t a, b;
    region_t ra, rb;
    client_open(&a, *state);
    client_open(&b, *state);
    hello(&a, "test_daemon_kv");
    hello(&b, "test_daemon_kv");
    uint64_t ma = model_ok(&a, MODEL, "fp16");
    region_new(&ra, SLOTS, 1);
    uint64_t ha = region_ok(&a, ma, &ra);
    static const uint32_t from[4] = {1, 3, 5, 7};
    assert_int_equal(put_ok(&a, ma, ha, 1, 0, 4, from, 1), 4);
    /* Idempotent: the same blocks again are all present. */
    Vqkv__Envelope *e = put(&a, ma, ha, 1, 0, 4, from, 1);
    assert_int_equal(e->put_done->stored, 0);
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(e->put_done->status[i], VQKV__PUT_STATUS__PUT_PRESENT);
    vqkv_frame_envelope_free(e);

    /* B shares the model; another codec under the same id is refused. */
    uint64_t mb = model_ok(&b, MODEL, "fp16");
    assert_int_equal(mb, ma);
    expect_refused(register_model(&b, &layout, MODEL, "kivi4"), VQKV_EMISMATCH,
                   "this registration says codec kivi4:g=32, registered fp16");
    region_new(&rb, SLOTS, 2);
    uint64_t hb = region_ok(&b, mb, &rb);
    uint8_t *want = malloc(rb.view.region_bytes);
    assert_non_null(want);
    memcpy(want, rb.base, rb.view.region_bytes);

    uint64_t lease;
    assert_int_equal(lookup(&b, mb, 1, 4, 1, &lease), 4);
    /* A may not use B's lease. */
    static const uint32_t one[1] = {0};
    expect_refused(get(&a, lease, ha, one, 1), VQKV_ELEASE, "lease");
    static const uint32_t to[4] = {0, 2, 4, 6};
    get_ok(&b, lease, hb, to, 4);
    for (size_t i = 0; i < 4; i++)
        copy_block(want, &rb.view, to[i], ra.base, &ra.view, from[i]);
    assert_memory_equal(rb.base, want, rb.view.region_bytes);
    free(want);

    e = stats(&b);
    const Vqkv__StatsReply *st = e->stats_reply;
    assert_int_equal(st->blocks, 4);
    assert_int_equal(st->hits, 4);
    assert_int_equal(st->misses, 1);
    assert_int_equal(st->clients, 2);
    assert_int_equal(st->leases, 1);
    assert_int_equal(st->bytes_logical, 4ull * LAYERS * 2 * TOKENS * HEADS * DIM * 2);
    assert_true(st->pool_bytes > 0);
    assert_int_equal(st->n_tenants, 1);
    assert_int_equal(st->tenants[0]->blocks, 4);
    vqkv_frame_envelope_free(e);

    e = release(&b, lease);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
    vqkv_frame_envelope_free(e);
    expect_refused(release(&b, lease), VQKV_ELEASE, NULL);
    expect_refused(get(&b, lease, hb, to, 4), VQKV_ELEASE, NULL);
    client_close(&a);
    client_close(&b);
    region_free(&ra);
    region_free(&rb);
}

static void test_kivi4_roundtrip(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, "test/kivi", "kivi4");
    region_new(&r, 4, 3);
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t from[1] = {0}, to[1] = {2};
    assert_int_equal(put_ok(&c, m, h, 2, 0, 1, from, 1), 1);
    uint8_t *before = malloc(r.view.region_bytes);
    assert_non_null(before);
    memcpy(before, r.base, r.view.region_bytes);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 2, 1, 0, &lease), 1);
    get_ok(&c, lease, h, to, 1);

    /* 4 bits over a range of at most 4: half a step is 4/15/2 = 0.133. */
    float max_err = 0;
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < TOKENS; t++)
                for (uint32_t hd = 0; hd < HEADS; hd++) {
                    size_t o = l * r.view.layer_stride + kv * r.view.kv_stride +
                               t * r.view.token_stride + hd * r.view.head_stride;
                    float x[DIM], y[DIM];
                    vqkv_dtype_to_f32(VQKV_DTYPE_F16, r.base + o, DIM, x);
                    vqkv_dtype_to_f32(VQKV_DTYPE_F16, r.base + o + 2 * r.view.slot_stride, DIM, y);
                    for (int i = 0; i < DIM; i++) {
                        float d = x[i] > y[i] ? x[i] - y[i] : y[i] - x[i];
                        max_err = d > max_err ? d : max_err;
                    }
                }
    assert_true(max_err > 0.0f);
    if (max_err > 0.15f)
        fail_msg("kivi4 max error %g over 0.15", (double)max_err);
    /* Nothing but slot 2 changed. */
    copy_block(before, &r.view, 2, r.base, &r.view, 2);
    assert_memory_equal(r.base, before, r.view.region_bytes);
    free(before);
    client_close(&c);
    region_free(&r);
}

static void test_refusals(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    expect_refused(register_model(&c, &layout, MODEL, "nonsense"), VQKV_ESPEC, "nonsense");
    expect_refused(register_model(&c, &layout, "", "fp16"), VQKV_EINVAL, "model_id");
    /* A RoPE is a base, finite and above 1, and a known style, or neither. */
    static const struct {
        double theta;
        int style;
    } ropes[] = {{1e4, 0}, {0.0, 1}, {1.0, 1}, {-1e4, 2}, {NAN, 1}, {INFINITY, 2}};
    for (size_t i = 0; i < sizeof ropes / sizeof ropes[0]; i++)
        expect_refused(
            register_model_rope(&c, &layout, MODEL, "fp16", ropes[i].theta, ropes[i].style),
            VQKV_EINVAL, "RoPE");
    /* A style this daemon does not know is an unknown enum value. */
    expect_refused(register_model_rope(&c, &layout, MODEL, "fp16", 1e4, 3), VQKV_EUNKNOWN,
                   "enum value");
    uint64_t m = model_ok(&c, MODEL, "fp16");
    region_new(&r, SLOTS, 4);
    uint64_t bytes = r.view.region_bytes;

    /* Regions: no fd, a size past the memfd, an offset past the region, a
     * view past the region, an unknown model. */
    expect_refused(register_region(&c, m, &r, bytes, 0, SLOTS, 0), VQKV_EFDS,
                   "num_fds says 1, 0 came with the frame");
    expect_refused(register_region(&c, m, &r, bytes + 4096, 0, SLOTS, 1), VQKV_ERANGE, "memfd");
    expect_refused(register_region(&c, m, &r, bytes, bytes, SLOTS, 1), VQKV_ERANGE, "offset");
    expect_refused(register_region(&c, m, &r, bytes, 0, SLOTS + 1, 1), VQKV_ERANGE, "slots");
    expect_refused(register_region(&c, m, &r, bytes, 64, SLOTS, 1), VQKV_ERANGE, "slots");
    expect_refused(register_region(&c, 77, &r, bytes, 0, SLOTS, 1), VQKV_EHANDLE, "model");
    region_t overlapping = r; /* heads half a head apart */
    overlapping.view.head_stride /= 2;
    expect_refused(register_region(&c, m, &overlapping, bytes, 0, SLOTS, 1), VQKV_EINVAL,
                   "overlaps itself: its head_stride");
    uint64_t h = region_ok(&c, m, &r);

    /* A slot past the region refuses the whole Put; the daemon goes on. */
    static const uint32_t bad[2] = {0, SLOTS};
    expect_refused(put(&c, m, h, 3, 0, 2, bad, 1), VQKV_ERANGE, "slot 8 outside region");
    expect_refused(put(&c, m, h + 1, 3, 0, 2, bad, 1), VQKV_EHANDLE, "region");
    static const uint32_t good[2] = {0, 1};
    assert_int_equal(put_ok(&c, m, h, 3, 0, 2, good, 1), 2);
    /* A chain whose parent is unknown. */
    Vqkv__Envelope *e = put(&c, m, h, 4, 5, 1, good, 1);
    assert_int_equal(e->put_done->status[0], VQKV__PUT_STATUS__PUT_NO_PARENT);
    vqkv_frame_envelope_free(e);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 3, 2, 0, &lease), 2);
    expect_refused(get(&c, lease, h, bad, 2), VQKV_ERANGE, "slot 8");
    expect_refused(get(&c, lease + 1, h, good, 2), VQKV_ELEASE, NULL);
    static const uint32_t three[3] = {2, 3, 4};
    expect_refused(get(&c, lease, h, three, 3), VQKV_EINVAL, "lease of 2");
    e = stats(&c);
    assert_int_equal(e->stats_reply->blocks, 2);
    vqkv_frame_envelope_free(e);
    client_close(&c);
    region_free(&r);
}

/* CUDA regions sent to a daemon without a GPU: a malformed payload is
 * refused for its shape (the same answer a CUDA daemon gives), a well-formed
 * one with VQKV_EDEVICE naming the GPU; the fds sent are closed, and the
 * connection and the daemon go on serving. */
static void test_cuda_regions_refused(void **state)
{
    const Vqkv__RegionKind IPC = VQKV__REGION_KIND__REGION_KIND_CUDA_IPC;
    const Vqkv__RegionKind VMM = VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD;
    const Vqkv__RegionKind MEMFD = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    const cuda_case_t cases[] = {
        {IPC, 64, 16, 0, 0, VQKV_EDEVICE,
         "GPU-deadbeef-0102-0304-0506-0708090a0b0c: this vqkvd "
         "runs the cpu backend",
         0, 0, false},
        {VMM, 0, 16, 0, 1, VQKV_EDEVICE, "owns no GPU", 0, 0, false},
        {IPC, 63, 16, 0, 0, VQKV_EINVAL, "64 bytes of a cudaIpcMemHandle_t", 0, 0, false},
        {IPC, 65, 16, 0, 0, VQKV_EINVAL, "64 bytes of a cudaIpcMemHandle_t", 0, 0, false},
        {IPC, 0, 16, 0, 0, VQKV_EINVAL, "64 bytes of a cudaIpcMemHandle_t", 0, 0, false},
        {IPC, 64, 15, 0, 0, VQKV_EINVAL, "16 bytes of a CUDA device UUID", 0, 0, false},
        {IPC, 64, 0, 0, 0, VQKV_EINVAL, "16 bytes of a CUDA device UUID", 0, 0, false},
        {IPC, 64, 16, 0, 1, VQKV_EFDS, "CUDA_IPC region comes with exactly 0 fd", 0, 0, false},
        {IPC, 64, 16, 2, 0, VQKV_EINVAL, "named by gpu_uuid", 0, 0, false},
        {VMM, 0, 16, 0, 0, VQKV_EFDS, "it has 1, 0 were held from RegionPieces and 0 came", 0, 0,
         false},
        {VMM, 0, 16, 0, 2, VQKV_EFDS, "it has 1, 0 were held from RegionPieces and 2 came", 0, 0,
         false},
        {VMM, 0, 16, 0, 1, VQKV_EFDS, "it has 2, 0 were held from RegionPieces and 1 came", 2, 0,
         false},
        {VMM, 0, 16, 0, 3, VQKV_EDEVICE, "owns no GPU", 3, 0, false},
        {VMM, 0, 16, 0, 2, VQKV_EINVAL, "the pieces add up to", 2, 1, false},
        {VMM, 0, 16, 0, 2, VQKV_EINVAL, "pieces are not empty", 2, 0, true},
        {MEMFD, 0, 0, 0, 1, VQKV_EINVAL, "piece_bytes belongs to CUDA_VMM_FD regions only", 2, 0,
         false},
        {VMM, 64, 16, 0, 1, VQKV_EINVAL, "CUDA_IPC regions only", 0, 0, false},
        {MEMFD, 0, 16, 0, 1, VQKV_EINVAL, "CUDA regions only", 0, 0, false},
        {VQKV__REGION_KIND__REGION_KIND_UNSPECIFIED, 0, 0, 0, 1, VQKV_EINVAL, "kind must be", 0, 0,
         false},
    };
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, MODEL, "fp16");
    region_new(&r, SLOTS, 5);
    /* The fd of the wrong kind for a VMM region: a pipe. */
    int pipe_fds[2];
    assert_int_equal(pipe2(pipe_fds, O_CLOEXEC), 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int fd = cases[i].kind == VMM ? pipe_fds[0] : r.fd;
        expect_refused(register_cuda_region(&c, m, &r, &cases[i], fd), cases[i].code,
                       cases[i].says);
    }
    /* Pieces sent ahead of a VMM region: a daemon without a GPU imports
     * none. */
    Vqkv__RegionPieces rp = VQKV__REGION_PIECES__INIT;
    rp.num_fds = 2;
    Vqkv__Envelope pieces_env = VQKV__ENVELOPE__INIT;
    pieces_env.body_case = VQKV__ENVELOPE__BODY_REGION_PIECES;
    pieces_env.region_pieces = &rp;
    const int two[2] = {pipe_fds[0], pipe_fds[0]};
    expect_refused(call(&c, &pieces_env, two, 2), VQKV_EDEVICE,
                   "the cpu backend and owns no GPU; RegionPieces carry CUDA VMM memory");
    /* The daemon kept none of the fds: once ours is closed, the pipe has
     * no reader left (its replies came after it closed what it got). */
    signal(SIGPIPE, SIG_IGN);
    close(pipe_fds[0]);
    assert_int_equal(write(pipe_fds[1], "x", 1), -1);
    assert_int_equal(errno, EPIPE);
    close(pipe_fds[1]);
    /* A CUDA region whose view runs past its allocation: the view check. */
    region_t past = r;
    past.view.num_slots = SLOTS + 1;
    cuda_case_t ipc = {IPC, 64, 16, 0, 0, VQKV_ERANGE, NULL, 0, 0, false};
    expect_refused(register_cuda_region(&c, m, &past, &ipc, -1), VQKV_ERANGE, "slots");

    /* A worker's CUDA event with a Put or a Get: the cpu backend has none
     * to wait on or record; a handle of the wrong size is refused first.
     * Nothing was stored or written. */
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t slot0[1] = {0};
    uint8_t event[65] = {0};
    const ProtobufCBinaryData long_event = {65, event}, good_event = {64, event};
    expect_refused(put_event(&c, m, h, 77, 0, 1, slot0, 0, &long_event), VQKV_EINVAL,
                   "a cudaIpcEventHandle_t is 64");
    expect_refused(put_event(&c, m, h, 77, 0, 1, slot0, 0, &good_event), VQKV_EDEVICE,
                   "the cpu backend has no GPU events");
    assert_int_equal(put_ok(&c, m, h, 77, 0, 1, slot0, 0), 1);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 77, 1, 0, &lease), 1);
    Vqkv__Get g;
    Vqkv__Envelope env;
    get_request(&g, &env, lease, h, slot0, 1);
    g.cuda_event = good_event;
    expect_refused(call(&c, &env, NULL, 0), VQKV_EDEVICE, "no GPU events");
    get_ok(&c, lease, h, slot0, 1);
    client_close(&c);
    region_free(&r);
}

/* A daemon started with one more flag. */
static int setup_with(void **state, const char *flag, const char *value)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    const char *const extra[] = {flag, value, NULL};
    daemon_start(d, extra);
    return 0;
}

static int setup_tiny_pool(void **state)
{
    /* 256 KiB: 4 chunks of 64 KiB, 16 blocks of 16 KiB. */
    return setup_with(state, "--pool-bytes", "256K");
}

static void test_eviction_keeps_leased(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, MODEL, "fp16");
    region_new(&r, SLOTS, 5);
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t first[4] = {0, 1, 2, 3};
    assert_int_equal(put_ok(&c, m, h, 1, 0, 4, first, 1), 4);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 1, 4, 0, &lease), 4);
    /* 40 more roots, 4 per Put: far past the pool's 16 blocks. */
    static const uint32_t more[4] = {4, 5, 6, 7};
    for (unsigned i = 0; i < 40; i += 4)
        assert_int_equal(put_ok(&c, m, h, 100 + i, 0, 1, more, 0) +
                             put_ok(&c, m, h, 101 + i, 0, 1, more + 1, 0) +
                             put_ok(&c, m, h, 102 + i, 0, 1, more + 2, 0) +
                             put_ok(&c, m, h, 103 + i, 0, 1, more + 3, 0),
                         4);
    Vqkv__Envelope *e = stats(&c);
    assert_true(e->stats_reply->evictions > 0);
    assert_true(e->stats_reply->blocks <= 16);
    vqkv_frame_envelope_free(e);

    /* The leased chain survived, byte for byte. */
    uint8_t *want = malloc(r.view.region_bytes);
    assert_non_null(want);
    memcpy(want, r.base, r.view.region_bytes);
    for (uint32_t i = 0; i < 4; i++)
        copy_block(want, &r.view, more[i], r.base, &r.view, first[i]);
    get_ok(&c, lease, h, more, 4);
    assert_memory_equal(r.base, want, r.view.region_bytes);
    free(want);
    uint64_t again;
    assert_int_equal(lookup(&c, m, 1, 4, 0, &again), 4);
    client_close(&c);
    region_free(&r);
}

/* Pin (unpin 0: ttl_ms) or Unpin (unpin 1) of chain keys 0..n-1; key_len
 * other than 32 makes every key that long. */
static Vqkv__Envelope *pin_req(client_t *c, uint64_t model, unsigned chain, size_t n,
                               uint32_t ttl_ms, int unpin, size_t key_len)
{
    uint8_t keys[8][32];
    ProtobufCBinaryData k[8];
    assert_true(n <= 8 && key_len <= 32);
    for (size_t i = 0; i < n; i++) {
        make_key(keys[i], chain, (unsigned)i);
        k[i] = (ProtobufCBinaryData){key_len, keys[i]};
    }
    Vqkv__Pin p = VQKV__PIN__INIT;
    Vqkv__Unpin u = VQKV__UNPIN__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    if (unpin) {
        u.model_handle = model;
        u.n_keys = n;
        u.keys = k;
        env.body_case = VQKV__ENVELOPE__BODY_UNPIN;
        env.unpin = &u;
    } else {
        p.model_handle = model;
        p.n_keys = n;
        p.keys = k;
        p.ttl_ms = ttl_ms;
        env.body_case = VQKV__ENVELOPE__BODY_PIN;
        env.pin = &p;
    }
    return call(c, &env, NULL, 0);
}

/* A Pin or Unpin that must succeed; returns Ack.count. */
static uint32_t pin_ok(client_t *c, uint64_t model, unsigned chain, size_t n, uint32_t ttl_ms,
                       int unpin)
{
    Vqkv__Envelope *e = pin_req(c, model, chain, n, ttl_ms, unpin, 32);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("%s: %s", unpin ? "Unpin" : "Pin", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
    uint32_t count = e->ack->count;
    vqkv_frame_envelope_free(e);
    return count;
}

/* How many leading blocks of chain the daemon holds (the lease released). */
static uint32_t held(client_t *c, uint64_t model, unsigned chain, size_t n)
{
    uint64_t lease;
    uint32_t present = lookup(c, model, chain, n, 0, &lease);
    if (lease != 0) {
        Vqkv__Envelope *e = release(c, lease);
        assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
        vqkv_frame_envelope_free(e);
    }
    return present;
}

/* 40 roots, far past the tiny pool's 16 blocks: chains 16 + 40 * (round %
 * 6) on, so consecutive rounds put new keys (make_key's bytes repeat with
 * the chain modulo 256). */
static void flood(client_t *c, uint64_t model, uint64_t region, unsigned round)
{
    static const uint32_t more[4] = {4, 5, 6, 7};
    unsigned base = 16 + 40 * (round % 6);
    uint32_t stored = 0;
    for (unsigned i = 0; i < 40; i++)
        stored += put_ok(c, model, region, base + i, 0, 1, more + i % 4, 0);
    assert_true(stored >= 16);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void test_pins(void **state)
{
    client_t a, b;
    region_t r;
    client_open(&a, *state);
    hello(&a, "test_daemon_kv");
    uint64_t m = model_ok(&a, MODEL, "fp16");
    region_new(&r, SLOTS, 6);
    uint64_t h = region_ok(&a, m, &r);
    static const uint32_t first[4] = {0, 1, 2, 3};

    /* Refused: bad key size, unknown model. */
    expect_refused(pin_req(&a, m, 1, 2, 0, 0, 31), VQKV_EINVAL, "not 32 bytes");
    expect_refused(pin_req(&a, m, 1, 2, 0, 1, 16), VQKV_EINVAL, "not 32 bytes");
    expect_refused(pin_req(&a, m + 1000, 1, 2, 0, 0, 32), VQKV_EHANDLE, "no model");
    expect_refused(pin_req(&a, m + 1000, 1, 2, 0, 1, 32), VQKV_EHANDLE, "no model");

    /* Pinned with ttl 0, the chain survives eviction; keys not held are
     * skipped. */
    assert_int_equal(put_ok(&a, m, h, 1, 0, 4, first, 1), 4);
    assert_int_equal(pin_ok(&a, m, 1, 6, 0, 0), 4);
    flood(&a, m, h, 0);
    Vqkv__Envelope *e = stats(&a);
    assert_true(e->stats_reply->evictions > 0);
    assert_true(e->stats_reply->blocks <= 16);
    vqkv_frame_envelope_free(e);
    assert_int_equal(held(&a, m, 1, 4), 4);

    /* Unpin counts the blocks it unpinned; then they can go. */
    assert_int_equal(pin_ok(&a, m, 1, 4, 0, 1), 4);
    assert_int_equal(pin_ok(&a, m, 1, 4, 0, 1), 0);
    flood(&a, m, h, 1);
    assert_int_equal(held(&a, m, 1, 4), 0);

    /* The pins of a connection that closed are released. */
    assert_int_equal(put_ok(&a, m, h, 2, 0, 4, first, 1), 4);
    client_open(&b, *state);
    hello(&b, "test_daemon_kv");
    uint64_t mb = model_ok(&b, MODEL, "fp16");
    assert_int_equal(pin_ok(&b, mb, 2, 4, 0, 0), 4);
    flood(&a, m, h, 2);
    assert_int_equal(held(&a, m, 2, 4), 4);
    client_close(&b);
    uint64_t deadline = mono_ms() + 10000;
    for (;;) {
        e = stats(&a);
        uint32_t clients = e->stats_reply->clients;
        vqkv_frame_envelope_free(e);
        if (clients == 1)
            break;
        if (mono_ms() > deadline)
            fail_msg("the daemon still counts %u clients", clients);
        usleep(10000);
    }
    flood(&a, m, h, 3);
    assert_int_equal(held(&a, m, 2, 4), 0);

    /* A pin with a TTL holds through eviction while it lasts: an hour, which
     * no run of this test outlasts, so the check holds however slowly a
     * loaded machine or a wrapped daemon gets through the flood. */
    assert_int_equal(put_ok(&a, m, h, 3, 0, 4, first, 1), 4);
    assert_int_equal(pin_ok(&a, m, 3, 4, 3600 * 1000, 0), 4);
    flood(&a, m, h, 4);
    assert_int_equal(held(&a, m, 3, 4), 4);
    /* Then lapses: a later Pin replaces the expiry (vqkv.proto), here with
     * a short one, after which a flood evicts the chain. */
    uint64_t pinned_at = mono_ms();
    assert_int_equal(pin_ok(&a, m, 3, 4, 300, 0), 4);
    deadline = mono_ms() + 10000;
    for (unsigned round = 0;; round++) {
        if (mono_ms() - pinned_at > 300) {
            flood(&a, m, h, 5 + round);
            if (held(&a, m, 3, 4) == 0)
                break;
        }
        if (mono_ms() > deadline)
            fail_msg("the pin with a TTL never lapsed");
        usleep(20000);
    }
    client_close(&a);
    region_free(&r);
}

/* A client that sends work and leaves at once: the daemon finishes it,
 * drops the replies, frees everything (ASan) and serves the next client. */
static void test_client_dies_midrequest(void **state)
{
    region_t r;
    region_new(&r, SLOTS, 6);
    for (int round = 0; round < 4; round++) {
        client_t c;
        client_open(&c, *state);
        hello(&c, "test_daemon_kv");
        uint64_t m = model_ok(&c, MODEL, "kivi2");
        uint64_t h = region_ok(&c, m, &r);
        static const uint32_t slots[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        assert_int_equal(put_ok(&c, m, h, 7, 0, 8, slots, 1), round == 0 ? 8 : 0);
        uint64_t lease;
        assert_int_equal(lookup(&c, m, 7, 8, 0, &lease), 8);
        /* Requests sent, replies never read. */
        Vqkv__Get g;
        Vqkv__Envelope env;
        get_request(&g, &env, lease, h, slots, 8);
        send_env(&c, &env);
        send_env(&c, &env);
        client_close(&c);
    }
    client_t b;
    client_open(&b, *state);
    hello(&b, "test_daemon_kv");
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    for (;;) {
        Vqkv__Envelope *e = stats(&b);
        int done = e->stats_reply->clients == 1 && e->stats_reply->leases == 0;
        vqkv_frame_envelope_free(e);
        if (done)
            break;
        assert_true(now_ms() < deadline);
        sleep_ms(5);
    }
    client_close(&b);
    region_free(&r);
}

/* SIGTERM, repeated, with Gets still on the thread pool: the daemon exits
 * 0 (under ASan: leaking nothing), and the client reads whole replies,
 * then the end of the stream, never a torn frame. */
static void test_sigterm_inflight(void **state)
{
    daemon_t *d = *state;
    region_t r;
    region_new(&r, SLOTS, 8);
    client_t c;
    client_open(&c, d);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, MODEL, "kivi2");
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t slots[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    assert_int_equal(put_ok(&c, m, h, 1, 0, 8, slots, 1), 8);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 1, 8, 0, &lease), 8);
    Vqkv__Get g;
    Vqkv__Envelope get;
    get_request(&g, &get, lease, h, slots, 8);
    for (int i = 0; i < 16; i++)
        send_env(&c, &get);
    /* The stop signal comes again and again while vqkvd finishes the Gets
     * (a supervisor, an impatient operator): the clean stop must not be
     * cut short by the second one. */
    daemon_stop_repeating(d, 1);
    for (;;) {
        vqkv_frame_t frame;
        int rc = vqkv_frame_recv(c.fd, &c.reader, &frame);
        if (rc == VQKV_ECLOSED)
            break;
        assert_prc(rc, VQKV_OK);
        Vqkv__Envelope *e = NULL;
        assert_prc(vqkv_frame_unpack(frame.data, frame.len, &e), VQKV_OK);
        vqkv_frame_clear(&frame);
        assert_true(e->body_case == VQKV__ENVELOPE__BODY_GET_DONE ||
                    e->body_case == VQKV__ENVELOPE__BODY_ERROR);
        vqkv_frame_envelope_free(e);
    }
    client_close(&c);
    region_free(&r);
}

/* A lease neither got nor released expires: Get on it is refused with
 * VQKV_ELEASE and the daemon no longer counts it. */
static void test_lease_expires(void **state)
{
    daemon_t *d = *state;
    region_t r;
    region_new(&r, SLOTS, 9);
    client_t c;
    client_open(&c, d);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, MODEL, "fp16");
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t slots[2] = {0, 1};
    assert_int_equal(put_ok(&c, m, h, 3, 0, 2, slots, 1), 2);
    uint64_t lease;
    assert_int_equal(lookup(&c, m, 3, 2, 0, &lease), 2);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    for (;;) {
        Vqkv__Envelope *e = stats(&c);
        uint64_t leases = e->stats_reply->leases;
        vqkv_frame_envelope_free(e);
        if (leases == 0)
            break;
        assert_true(now_ms() < deadline);
        sleep_ms(20);
    }
    expect_refused(get(&c, lease, h, slots, 2), VQKV_ELEASE, "lease");
    client_close(&c);
    region_free(&r);
}

static int setup_short_leases(void **state)
{
    return setup_with(state, "--lease-ms", "200");
}

/* ---- staged puts ------------------------------------------------------------ */

/* want gets region r's slots [0, n) as codec spec stores them: encoded and
 * decoded here by the library, into the same slots of a copy of r. */
static void local_roundtrip(const region_t *r, uint32_t n, const char *spec, uint8_t *want)
{
    vqkv_codec_t *codec = NULL;
    assert_int_equal(vqkv_codec_create(spec, &layout, &codec), VQKV_OK);
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    assert_non_null(block);
    memcpy(want, r->base, r->view.region_bytes);
    for (uint32_t i = 0; i < n; i++) {
        assert_int_equal(vqkv_codec_encode(codec, r->base, &r->view, i, block), VQKV_OK);
        assert_int_equal(vqkv_codec_decode(codec, block, want, &r->view, i), VQKV_OK);
    }
    free(block);
    vqkv_codec_free(codec);
}

/* Slots [at, at + n) of r must hold slots [0, n) of want. */
static void expect_blocks(const region_t *r, uint32_t at, uint32_t n, const uint8_t *want)
{
    uint8_t *got = calloc(1, r->view.region_bytes), *exp = calloc(1, r->view.region_bytes);
    assert_true(got != NULL && exp != NULL);
    for (uint32_t i = 0; i < n; i++) {
        copy_block(got, &r->view, i, r->base, &r->view, at + i);
        copy_block(exp, &r->view, i, want, &r->view, i);
    }
    assert_memory_equal(got, exp, r->view.region_bytes);
    free(got);
    free(exp);
}

/* A reply that must be an Ack. */
static void expect_ok(Vqkv__Envelope *e)
{
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
    vqkv_frame_envelope_free(e);
}

/* The daemon's staging figures: puts staged, puts that found it full, and
 * the blocks not yet encoded. */
static void staging_figures(client_t *c, uint64_t *staged, uint64_t *full, uint64_t *backlog)
{
    Vqkv__Envelope *e = stats(c);
    *staged = e->stats_reply->puts_staged;
    *full = e->stats_reply->puts_staging_full;
    *backlog = e->stats_reply->encode_backlog;
    vqkv_frame_envelope_free(e);
}

/* Waits until every staged block is encoded and its stage freed (a
 * liveness bound of a minute, not a speed limit). */
static void await_encoded(client_t *c)
{
    for (int i = 0; i < 60000; i++) {
        Vqkv__Envelope *e = stats(c);
        int done = e->stats_reply->encode_backlog == 0 && e->stats_reply->staging_bytes == 0;
        vqkv_frame_envelope_free(e);
        if (done)
            return;
        usleep(1000);
    }
    fail_msg("staged blocks still not encoded after a minute");
}

/* A Put replies before its encode (staging is on by default); a Get
 * returns the codec's bytes whether it comes while the blocks are staged
 * or after their encode, the same bytes the library's own round trip
 * gives. */
static void test_staged_puts(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, "test/staged", "kivi4");
    region_new(&r, 8, 5);
    uint64_t h = region_ok(&c, m, &r);
    uint8_t *want = malloc(r.view.region_bytes);
    assert_non_null(want);
    local_roundtrip(&r, 4, "kivi4", want);
    static const uint32_t from[4] = {0, 1, 2, 3}, to[4] = {4, 5, 6, 7};

    assert_int_equal(put_ok(&c, m, h, 3, 0, 4, from, 1), 4);
    uint64_t staged, full, backlog, lease;
    staging_figures(&c, &staged, &full, &backlog);
    assert_int_equal(staged, 1);
    assert_int_equal(full, 0);
    assert_true(backlog <= 4);
    assert_int_equal(lookup(&c, m, 3, 4, 0, &lease), 4);
    get_ok(&c, lease, h, to, 4);
    expect_blocks(&r, 4, 4, want);
    expect_ok(release(&c, lease));

    await_encoded(&c);
    for (uint32_t l = 0; l < LAYERS; l++) /* slots 4..7 cleared, every layer's K and V */
        for (uint32_t kv = 0; kv < 2; kv++)
            memset(r.base + l * r.view.layer_stride + kv * r.view.kv_stride +
                       4 * r.view.slot_stride,
                   0, 4 * r.view.slot_stride);
    assert_int_equal(lookup(&c, m, 3, 4, 0, &lease), 4);
    get_ok(&c, lease, h, to, 4);
    expect_blocks(&r, 4, 4, want);
    expect_ok(release(&c, lease));
    /* Present blocks are not staged again. */
    assert_int_equal(put_ok(&c, m, h, 3, 0, 4, from, 1), 0);
    staging_figures(&c, &staged, &full, &backlog);
    assert_int_equal(staged, 1);
    free(want);
    client_close(&c);
    region_free(&r);
}

static int setup_small_staging(void **state)
{
    /* One fp16 block of the test layout: 2 layers x K, V x 16 tokens x 2
     * heads x 64 x 2 bytes. */
    return setup_with(state, "--staging-bytes", "16K");
}

/* A Put that does not fit in staging waits for its encode; one that fits
 * is staged; both store the same bytes. */
static void test_staging_full(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, "test/staging-full", "fp16");
    region_new(&r, 8, 6);
    uint64_t h = region_ok(&c, m, &r);
    uint8_t *want = malloc(r.view.region_bytes);
    assert_non_null(want);
    memcpy(want, r.base, r.view.region_bytes);
    static const uint32_t from[2] = {0, 1}, to[2] = {4, 5}, to_staged[1] = {6};
    uint64_t staged, full, backlog, lease;

    assert_int_equal(put_ok(&c, m, h, 4, 0, 2, from, 1), 2);
    staging_figures(&c, &staged, &full, &backlog);
    assert_int_equal(staged, 0);
    assert_int_equal(full, 1);
    assert_int_equal(backlog, 0);
    assert_int_equal(put_ok(&c, m, h, 5, 0, 1, from, 1), 1);
    staging_figures(&c, &staged, &full, &backlog);
    assert_int_equal(staged, 1);
    assert_int_equal(full, 1);

    assert_int_equal(lookup(&c, m, 4, 2, 0, &lease), 2);
    get_ok(&c, lease, h, to, 2);
    expect_blocks(&r, 4, 2, want);
    expect_ok(release(&c, lease));
    assert_int_equal(lookup(&c, m, 5, 1, 0, &lease), 1);
    get_ok(&c, lease, h, to_staged, 1); /* a slot no Get wrote before */
    expect_blocks(&r, 6, 1, want);
    expect_ok(release(&c, lease));
    await_encoded(&c);
    free(want);
    client_close(&c);
    region_free(&r);
}

static int setup_no_staging(void **state)
{
    return setup_with(state, "--staging-bytes", "0");
}

/* staging_bytes 0: every Put waits for its encode. */
static void test_staging_off(void **state)
{
    client_t c;
    region_t r;
    client_open(&c, *state);
    hello(&c, "test_daemon_kv");
    uint64_t m = model_ok(&c, "test/staging-off", "fp16");
    region_new(&r, 4, 7);
    uint64_t h = region_ok(&c, m, &r);
    static const uint32_t from[2] = {0, 1};
    uint64_t staged, full, backlog;
    assert_int_equal(put_ok(&c, m, h, 6, 0, 2, from, 1), 2);
    staging_figures(&c, &staged, &full, &backlog);
    assert_int_equal(staged + full + backlog, 0);
    client_close(&c);
    region_free(&r);
}

static void test_bad_pool_bytes(void **state)
{
    (void)state;
    static const char *const bad[] = {"12X", "0", "-5M", "", "1MM", "99999999999G"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *const extra[] = {"--pool-bytes", bad[i], NULL};
        pid_t pid = spawn_daemon("/nonexistent/vqkv.sock", extra);
        int status = wait_exit(pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 2)
            fail_msg("--pool-bytes \"%s\": wait status %#x, not exit 2", bad[i], status);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_share_fp16, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kivi4_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cuda_regions_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eviction_keeps_leased, setup_tiny_pool, teardown),
        cmocka_unit_test_setup_teardown(test_pins, setup_tiny_pool, teardown),
        cmocka_unit_test_setup_teardown(test_client_dies_midrequest, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sigterm_inflight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lease_expires, setup_short_leases, teardown),
        cmocka_unit_test_setup_teardown(test_staged_puts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_staging_full, setup_small_staging, teardown),
        cmocka_unit_test_setup_teardown(test_staging_off, setup_no_staging, teardown),
        cmocka_unit_test(test_bad_pool_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
