/* test_proto.c -- the wire protocol (proto/): every message type survives
 * pack, frame, reader and unpack unchanged; the reader yields the same
 * frames however the stream is sliced; lengths over the maximum, garbage,
 * unknown fields and misplaced fds are refused with the right code and
 * without leaking an fd; and fds really travel over a socketpair with their
 * frame, through partial reads and writes, up to an EOF in mid-frame.
 *
 * Closed fds are checked with fcntl(F_GETFD) right after the call that
 * should close them (before anything could reuse the number), and leaks of
 * fds the test never sees (received ones) by counting /proc/self/fd.
 */
#include "test_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "frame.h"
#include "test_assert.h" /* assert_prc, assert_pok */

#define KEYS 6

/* ---- sample messages --------------------------------------------------------- */

/* Storage for one sample Envelope of any type, every field set to something
 * other than its default, so a field lost on the way changes the bytes. */
typedef struct {
    Vqkv__Envelope env;
    Vqkv__Error error;
    Vqkv__Hello hello;
    Vqkv__Welcome welcome;
    Vqkv__Device dev[2];
    Vqkv__Device *devp[2];
    Vqkv__Layout layout;
    Vqkv__RegisterModel register_model;
    Vqkv__ModelRegistered model_registered;
    Vqkv__RegisterRegion register_region;
    Vqkv__RegionRegistered region_registered;
    Vqkv__Put put;
    Vqkv__PutDone put_done;
    Vqkv__Lookup lookup;
    Vqkv__LookupResult lookup_result;
    Vqkv__Get get;
    Vqkv__GetDone get_done;
    Vqkv__Release release;
    Vqkv__Pin pin;
    Vqkv__Unpin unpin;
    Vqkv__Ack ack;
    Vqkv__Stats stats;
    Vqkv__StatsReply stats_reply;
    Vqkv__TenantStats tenant[2];
    Vqkv__Evict evict;
    Vqkv__FindModel find_model;
    Vqkv__Flush flush;
    Vqkv__RegionPieces region_pieces;
    uint64_t piece_bytes[3];
    Vqkv__TenantStats *tenantp[2];
    uint8_t keys[KEYS][VQKV_PROTO_KEY_BYTES];
    ProtobufCBinaryData key_bd[KEYS], parent_bd[KEYS];
    uint32_t slots[KEYS];
    Vqkv__PutStatus status[5];
    uint8_t blob[80]; /* uuids, salts, CUDA handles */
} sample_t;

static void sample_keys(sample_t *s, uint64_t seed)
{
    test_rng_t rng = {seed};
    for (int i = 0; i < KEYS; i++) {
        for (int b = 0; b < VQKV_PROTO_KEY_BYTES; b++)
            s->keys[i][b] = (uint8_t)test_rng_next(&rng);
        s->key_bd[i] = (ProtobufCBinaryData){VQKV_PROTO_KEY_BYTES, s->keys[i]};
        /* A chain: the first block is a root (empty parent). */
        s->parent_bd[i] = i == 0 ? (ProtobufCBinaryData){0, NULL}
                                 : (ProtobufCBinaryData){VQKV_PROTO_KEY_BYTES, s->keys[i - 1]};
        s->slots[i] = 1000u + 37u * (uint32_t)i;
    }
    for (int b = 0; b < (int)sizeof s->blob; b++)
        s->blob[b] = (uint8_t)(0xa0 + b);
}

/* Fills s->env with a sample of body_case; 0 when the case is unknown
 * here (so a message added to the schema without a sample fails). */
static int sample_build(sample_t *s, uint32_t body_case, uint64_t request_id)
{
    memset(s, 0, sizeof *s);
    sample_keys(s, request_id * 7 + body_case);
    s->env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    s->env.request_id = request_id;
    s->env.body_case = (Vqkv__Envelope__BodyCase)body_case;
    switch (body_case) {
    case VQKV__ENVELOPE__BODY_ERROR:
        s->error = (Vqkv__Error)VQKV__ERROR__INIT;
        s->error.code = VQKV_ELEASE;
        s->error.message = "lease 7 expired";
        s->env.error = &s->error;
        return 1;
    case VQKV__ENVELOPE__BODY_HELLO:
        s->hello = (Vqkv__Hello)VQKV__HELLO__INIT;
        s->hello.protocol_version = VQKV_PROTO_VERSION;
        s->hello.client_name = "vllm-worker-tp1";
        s->env.hello = &s->hello;
        return 1;
    case VQKV__ENVELOPE__BODY_WELCOME:
        s->welcome = (Vqkv__Welcome)VQKV__WELCOME__INIT;
        for (int i = 0; i < 2; i++) {
            s->dev[i] = (Vqkv__Device)VQKV__DEVICE__INIT;
            s->dev[i].index = (uint32_t)i + 1;
            s->dev[i].name = i ? "gpu-b" : "gpu-a";
            s->dev[i].uuid = (ProtobufCBinaryData){16, s->blob + 16 * i};
            s->dev[i].pool_bytes = (80ull << 30) + (uint64_t)i;
            s->devp[i] = &s->dev[i];
        }
        s->welcome.protocol_version = VQKV_PROTO_VERSION;
        s->welcome.max_frame_bytes = VQKV_FRAME_DEFAULT_MAX;
        s->welcome.max_inflight = 64;
        s->welcome.max_regions = 128;
        s->welcome.backend = "cuda";
        s->welcome.n_devices = 2;
        s->welcome.devices = s->devp;
        s->welcome.tenant = "uid:1000";
        s->welcome.tenant_salt = (ProtobufCBinaryData){32, s->blob + 32};
        s->welcome.server_version = "0.1.0";
        s->env.welcome = &s->welcome;
        return 1;
    case VQKV__ENVELOPE__BODY_REGISTER_MODEL:
        s->layout = (Vqkv__Layout)VQKV__LAYOUT__INIT;
        s->layout.num_layers = 30;
        s->layout.num_kv_heads = 4;
        s->layout.head_dim = 64;
        s->layout.block_tokens = 16;
        s->layout.dtype = VQKV__DTYPE__DTYPE_BF16;
        s->register_model = (Vqkv__RegisterModel)VQKV__REGISTER_MODEL__INIT;
        s->register_model.model_id = "HuggingFaceTB/SmolLM2-135M@main";
        s->register_model.layout = &s->layout;
        s->register_model.kv_head_first = 2;
        s->register_model.kv_head_count = 2;
        s->register_model.codec = "rvq:d=8,b=8,r=2";
        s->env.register_model = &s->register_model;
        return 1;
    case VQKV__ENVELOPE__BODY_MODEL_REGISTERED:
        s->model_registered = (Vqkv__ModelRegistered)VQKV__MODEL_REGISTERED__INIT;
        s->model_registered.model_handle = 0x1122334455667788ull;
        s->model_registered.codec = "rvq:d=8,b=8,r=2,kgroup=strided";
        s->model_registered.block_bytes = 123456;
        s->model_registered.codebooks_ready = 1;
        s->env.model_registered = &s->model_registered;
        return 1;
    case VQKV__ENVELOPE__BODY_REGISTER_REGION:
        s->register_region = (Vqkv__RegisterRegion)VQKV__REGISTER_REGION__INIT;
        s->register_region.model_handle = 9;
        s->register_region.kind = VQKV__REGION_KIND__REGION_KIND_CUDA_IPC;
        s->register_region.region_bytes = 70ull << 30;
        s->register_region.offset = 4096;
        s->register_region.layer_stride = 1ull << 33;
        s->register_region.kv_stride = 1ull << 32;
        s->register_region.slot_stride = 65536;
        s->register_region.token_stride = 512;
        s->register_region.head_stride = 128;
        s->register_region.num_slots = 4000000;
        s->register_region.num_fds = 0;
        s->register_region.cuda_ipc_handle = (ProtobufCBinaryData){64, s->blob};
        s->register_region.gpu_uuid = (ProtobufCBinaryData){16, s->blob + 64};
        s->register_region.device = 1;
        s->piece_bytes[0] = s->piece_bytes[1] = 20ull << 20;
        s->piece_bytes[2] = (70ull << 30) - (40ull << 20);
        s->register_region.n_piece_bytes = 3;
        s->register_region.piece_bytes = s->piece_bytes;
        s->env.register_region = &s->register_region;
        return 1;
    case VQKV__ENVELOPE__BODY_REGION_REGISTERED:
        s->region_registered = (Vqkv__RegionRegistered)VQKV__REGION_REGISTERED__INIT;
        s->region_registered.region_handle = 77;
        s->env.region_registered = &s->region_registered;
        return 1;
    case VQKV__ENVELOPE__BODY_PUT:
        s->put = (Vqkv__Put)VQKV__PUT__INIT;
        s->put.model_handle = 9;
        s->put.region_handle = 77;
        s->put.n_keys = s->put.n_parent_keys = s->put.n_slots = KEYS;
        s->put.keys = s->key_bd;
        s->put.parent_keys = s->parent_bd;
        s->put.slots = s->slots;
        s->put.cuda_event = (ProtobufCBinaryData){64, s->blob};
        s->env.put = &s->put;
        return 1;
    case VQKV__ENVELOPE__BODY_PUT_DONE:
        s->put_done = (Vqkv__PutDone)VQKV__PUT_DONE__INIT;
        s->status[0] = VQKV__PUT_STATUS__PUT_STORED;
        s->status[1] = VQKV__PUT_STATUS__PUT_PRESENT;
        s->status[2] = VQKV__PUT_STATUS__PUT_NO_PARENT;
        s->status[3] = VQKV__PUT_STATUS__PUT_NO_SPACE;
        s->status[4] = VQKV__PUT_STATUS__PUT_OVER_QUOTA;
        s->put_done.stored = 1;
        s->put_done.n_status = 5;
        s->put_done.status = s->status;
        s->env.put_done = &s->put_done;
        return 1;
    case VQKV__ENVELOPE__BODY_LOOKUP:
        s->lookup = (Vqkv__Lookup)VQKV__LOOKUP__INIT;
        s->lookup.model_handle = 9;
        s->lookup.n_keys = KEYS;
        s->lookup.keys = s->key_bd;
        s->env.lookup = &s->lookup;
        return 1;
    case VQKV__ENVELOPE__BODY_LOOKUP_RESULT:
        s->lookup_result = (Vqkv__LookupResult)VQKV__LOOKUP_RESULT__INIT;
        s->lookup_result.present = 5;
        s->lookup_result.lease_id = 0xdeadbeefcafeull;
        s->lookup_result.lease_ttl_ms = 30000;
        s->env.lookup_result = &s->lookup_result;
        return 1;
    case VQKV__ENVELOPE__BODY_GET:
        s->get = (Vqkv__Get)VQKV__GET__INIT;
        s->get.lease_id = 0xdeadbeefcafeull;
        s->get.region_handle = 77;
        s->get.n_slots = KEYS;
        s->get.slots = s->slots;
        s->env.get = &s->get;
        return 1;
    case VQKV__ENVELOPE__BODY_GET_DONE:
        s->get_done = (Vqkv__GetDone)VQKV__GET_DONE__INIT;
        s->get_done.written = KEYS;
        s->get_done.cuda_event = (ProtobufCBinaryData){64, s->blob};
        s->env.get_done = &s->get_done;
        return 1;
    case VQKV__ENVELOPE__BODY_RELEASE:
        s->release = (Vqkv__Release)VQKV__RELEASE__INIT;
        s->release.lease_id = 0xdeadbeefcafeull;
        s->env.release = &s->release;
        return 1;
    case VQKV__ENVELOPE__BODY_PIN:
        s->pin = (Vqkv__Pin)VQKV__PIN__INIT;
        s->pin.model_handle = 9;
        s->pin.n_keys = 3;
        s->pin.keys = s->key_bd;
        s->pin.ttl_ms = 600000;
        s->env.pin = &s->pin;
        return 1;
    case VQKV__ENVELOPE__BODY_UNPIN:
        s->unpin = (Vqkv__Unpin)VQKV__UNPIN__INIT;
        s->unpin.model_handle = 9;
        s->unpin.n_keys = 2;
        s->unpin.keys = s->key_bd + 1;
        s->env.unpin = &s->unpin;
        return 1;
    case VQKV__ENVELOPE__BODY_ACK:
        s->ack = (Vqkv__Ack)VQKV__ACK__INIT;
        s->ack.count = 3;
        s->env.ack = &s->ack;
        return 1;
    case VQKV__ENVELOPE__BODY_STATS:
        s->stats = (Vqkv__Stats)VQKV__STATS__INIT;
        s->env.stats = &s->stats;
        return 1;
    case VQKV__ENVELOPE__BODY_STATS_REPLY:
        s->stats_reply = (Vqkv__StatsReply)VQKV__STATS_REPLY__INIT;
        for (int i = 0; i < 2; i++) {
            Vqkv__TenantStats *t = &s->tenant[i];
            *t = (Vqkv__TenantStats)VQKV__TENANT_STATS__INIT;
            t->tenant = i ? "batch" : "interactive";
            t->hits = 10u + (uint64_t)i;
            t->misses = 20u + (uint64_t)i;
            t->blocks = 30u + (uint64_t)i;
            t->bytes_stored = 40u + (uint64_t)i;
            t->bytes_logical = 50u + (uint64_t)i;
            t->evictions = 60u + (uint64_t)i;
            t->quota_bytes = 70u + (uint64_t)i;
            s->tenantp[i] = t;
        }
        s->stats_reply.hits = 21;
        s->stats_reply.misses = 41;
        s->stats_reply.blocks = 61;
        s->stats_reply.bytes_stored = 81;
        s->stats_reply.bytes_logical = 101;
        s->stats_reply.evictions = 121;
        s->stats_reply.clients = 5;
        s->stats_reply.pool_bytes = 1ull << 36;
        s->stats_reply.leases = 3;
        s->stats_reply.n_tenants = 2;
        s->stats_reply.tenants = s->tenantp;
        s->env.stats_reply = &s->stats_reply;
        return 1;
    case VQKV__ENVELOPE__BODY_EVICT:
        s->evict = (Vqkv__Evict)VQKV__EVICT__INIT;
        s->evict.model_handle = 9;
        s->evict.n_keys = 2;
        s->evict.keys = s->key_bd;
        s->env.evict = &s->evict;
        return 1;
    case VQKV__ENVELOPE__BODY_FIND_MODEL:
        s->find_model = (Vqkv__FindModel)VQKV__FIND_MODEL__INIT;
        s->find_model.model_id = "HuggingFaceTB/SmolLM2-135M@main";
        s->find_model.kv_head_first = 2;
        s->find_model.kv_head_count = 2;
        s->env.find_model = &s->find_model;
        return 1;
    case VQKV__ENVELOPE__BODY_FLUSH:
        s->flush = (Vqkv__Flush)VQKV__FLUSH__INIT;
        s->env.flush = &s->flush;
        return 1;
    case VQKV__ENVELOPE__BODY_REGION_PIECES:
        s->region_pieces = (Vqkv__RegionPieces)VQKV__REGION_PIECES__INIT;
        s->region_pieces.num_fds = 4;
        s->env.region_pieces = &s->region_pieces;
        return 1;
    }
    return 0;
}

/* Every member of the Envelope's oneof, by field number. */
static size_t body_cases(uint32_t *cases, size_t cap)
{
    const ProtobufCMessageDescriptor *d = &vqkv__envelope__descriptor;
    size_t n = 0;
    for (unsigned i = 0; i < d->n_fields; i++)
        if ((d->fields[i].flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && n < cap)
            cases[n++] = d->fields[i].id;
    return n;
}

/* The packed Envelope alone (what a frame's data must equal). */
static uint8_t *pack_env(const Vqkv__Envelope *env, size_t *len)
{
    *len = vqkv__envelope__get_packed_size(env);
    uint8_t *buf = malloc(*len + 1);
    assert_non_null(buf);
    assert_int_equal(vqkv__envelope__pack(env, buf), *len);
    return buf;
}

/* ---- helpers ------------------------------------------------------------- */

static int fd_is_closed(int fd)
{
    errno = 0;
    return fcntl(fd, F_GETFD) == -1 && errno == EBADF;
}

static int make_memfd(const void *content, size_t len)
{
    int fd = memfd_create("vqkv-test", MFD_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, len), (ssize_t)len);
    return fd;
}

static void make_pipe_fds(int *fds, int n)
{
    for (int i = 0; i < n; i += 2) {
        int p[2];
        assert_int_equal(pipe2(p, O_CLOEXEC), 0);
        fds[i] = p[0];
        if (i + 1 < n)
            fds[i + 1] = p[1];
        else
            close(p[1]);
    }
}

static void socket_pair(int sv[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

/* sendmsg of buf with any number of fds, for what vqkv_frame_send refuses. */
static void send_raw(int sock, const void *buf, size_t len, const int *fds, size_t n_fds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * 16)];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (n_fds > 0) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
    }
    assert_int_equal(sendmsg(sock, &msg, MSG_NOSIGNAL), (ssize_t)len);
}

static void encode_sample(uint32_t body_case, uint64_t request_id, uint8_t **buf, size_t *len)
{
    sample_t *s = malloc(sizeof *s);
    assert_non_null(s);
    assert_true(sample_build(s, body_case, request_id));
    assert_pok(vqkv_frame_encode(&s->env, VQKV_FRAME_DEFAULT_MAX, buf, len));
    free(s);
}

/* A stream of one frame of every type plus an empty Envelope (a frame of
 * length 0), with the expected payloads. */
typedef struct {
    uint8_t *bytes;
    size_t len;
    size_t n_frames;
    uint8_t *payload[32];
    size_t payload_len[32];
} stream_t;

static void stream_build(stream_t *st)
{
    uint32_t cases[32];
    size_t n = body_cases(cases, 32);
    memset(st, 0, sizeof *st);
    for (size_t i = 0; i <= n; i++) {
        sample_t *s = malloc(sizeof *s);
        assert_non_null(s);
        if (i < n) {
            assert_true(sample_build(s, cases[i], 100 + i));
        } else {
            memset(s, 0, sizeof *s);
            s->env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
        }
        uint8_t *frame;
        size_t flen;
        assert_pok(vqkv_frame_encode(&s->env, VQKV_FRAME_DEFAULT_MAX, &frame, &flen));
        st->payload[i] = pack_env(&s->env, &st->payload_len[i]);
        st->bytes = realloc(st->bytes, st->len + flen);
        assert_non_null(st->bytes);
        memcpy(st->bytes + st->len, frame, flen);
        st->len += flen;
        st->n_frames++;
        free(frame);
        free(s);
    }
    assert_int_equal(st->payload_len[n], 0);
}

static void stream_free(stream_t *st)
{
    for (size_t i = 0; i < st->n_frames; i++)
        free(st->payload[i]);
    free(st->bytes);
}

/* Feeds the stream in chunks ending at cuts[0..n_cuts) (ascending) and
 * checks the frames that come out. */
static void stream_check_cuts(const stream_t *st, const size_t *cuts, size_t n_cuts)
{
    vqkv_frame_reader_t r;
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    size_t from = 0, got = 0;
    for (size_t c = 0; c <= n_cuts; c++) {
        size_t to = c < n_cuts ? cuts[c] : st->len;
        assert_pok(vqkv_frame_reader_feed(&r, st->bytes + from, to - from, NULL, 0));
        vqkv_frame_t f;
        int rc;
        while ((rc = vqkv_frame_reader_next(&r, &f)) == 1) {
            assert_true(got < st->n_frames);
            assert_int_equal(f.len, st->payload_len[got]);
            if (f.len > 0)
                assert_memory_equal(f.data, st->payload[got], f.len);
            assert_int_equal(f.n_fds, 0);
            vqkv_frame_clear(&f);
            got++;
        }
        assert_prc(rc, 0);
        from = to;
    }
    assert_int_equal(got, st->n_frames);
    assert_prc(vqkv_frame_reader_eof(&r), VQKV_ECLOSED);
    vqkv_frame_reader_free(&r);
}

/* ---- round trips ----------------------------------------------------------- */

static void test_every_message_round_trip(void **state)
{
    (void)state;
    uint32_t cases[32];
    size_t n = body_cases(cases, 32);
    assert_int_equal(n, 23);
    for (size_t i = 0; i < n; i++) {
        sample_t *s = malloc(sizeof *s);
        assert_non_null(s);
        if (!sample_build(s, cases[i], 1000 + i)) {
            print_error("no sample for Envelope body field %u\n", cases[i]);
            fail();
        }
        size_t want_len;
        uint8_t *want = pack_env(&s->env, &want_len);
        assert_pok(vqkv_frame_check(&s->env));

        uint8_t *buf;
        size_t len;
        assert_pok(vqkv_frame_encode(&s->env, VQKV_FRAME_DEFAULT_MAX, &buf, &len));
        assert_int_equal(len, VQKV_FRAME_HEADER_BYTES + want_len);
        assert_int_equal(buf[0] | buf[1] << 8 | buf[2] << 16 | (uint32_t)buf[3] << 24, want_len);

        vqkv_frame_reader_t r;
        vqkv_frame_t f;
        assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
        assert_pok(vqkv_frame_reader_feed(&r, buf, len, NULL, 0));
        assert_prc(vqkv_frame_reader_next(&r, &f), 1);
        assert_int_equal(f.len, want_len);
        assert_memory_equal(f.data, want, want_len);
        assert_prc(vqkv_frame_reader_next(&r, &f), 0);

        Vqkv__Envelope *env = NULL;
        assert_pok(vqkv_frame_unpack(f.data, f.len, &env));
        assert_pok(vqkv_frame_check(env));
        assert_int_equal(env->request_id, 1000 + i);
        assert_int_equal(env->body_case, cases[i]);
        /* Packing is deterministic (fields in number order), so equal
         * bytes after the round trip mean every field came through. */
        size_t again_len;
        uint8_t *again = pack_env(env, &again_len);
        assert_int_equal(again_len, want_len);
        assert_memory_equal(again, want, want_len);

        if (env->body_case == VQKV__ENVELOPE__BODY_PUT) {
            assert_int_equal(env->put->n_keys, KEYS);
            assert_memory_equal(env->put->keys[3].data, s->keys[3], VQKV_PROTO_KEY_BYTES);
            assert_int_equal(env->put->parent_keys[0].len, 0);
            assert_memory_equal(env->put->parent_keys[3].data, s->keys[2], VQKV_PROTO_KEY_BYTES);
            assert_int_equal(env->put->slots[5], s->slots[5]);
        } else if (env->body_case == VQKV__ENVELOPE__BODY_ERROR) {
            assert_int_equal(env->error->code, VQKV_ELEASE);
            assert_string_equal(env->error->message, "lease 7 expired");
        } else if (env->body_case == VQKV__ENVELOPE__BODY_REGISTER_REGION) {
            assert_int_equal(env->register_region->region_bytes, 70ull << 30);
            assert_int_equal(env->register_region->layer_stride, 1ull << 33);
        }

        free(again);
        vqkv_frame_envelope_free(env);
        vqkv_frame_clear(&f);
        vqkv_frame_reader_free(&r);
        free(buf);
        free(want);
        free(s);
    }
}

static void test_split_at_every_byte(void **state)
{
    (void)state;
    stream_t st;
    stream_build(&st);
    assert_int_equal(st.n_frames, 24);

    stream_check_cuts(&st, NULL, 0);
    for (size_t k = 0; k <= st.len; k++)
        stream_check_cuts(&st, &k, 1);

    /* One byte at a time. */
    size_t *cuts = malloc(st.len * sizeof *cuts);
    assert_non_null(cuts);
    for (size_t k = 0; k < st.len; k++)
        cuts[k] = k;
    stream_check_cuts(&st, cuts, st.len);

    /* Random slicings, chunks of 1 to 16 bytes. */
    test_rng_t rng = {5};
    for (int trial = 0; trial < 200; trial++) {
        size_t n = 0;
        for (size_t at = 1 + test_rng_next(&rng) % 16; at < st.len;
             at += 1 + test_rng_next(&rng) % 16)
            cuts[n++] = at;
        stream_check_cuts(&st, cuts, n);
    }
    free(cuts);
    stream_free(&st);
}

static void test_many_frames_in_one_buffer(void **state)
{
    (void)state;
    enum { N = 2000 };
    uint8_t *all = NULL;
    size_t all_len = 0;
    for (uint64_t i = 1; i <= N; i++) {
        uint8_t *buf;
        size_t len;
        encode_sample(i % 2 ? VQKV__ENVELOPE__BODY_LOOKUP : VQKV__ENVELOPE__BODY_RELEASE, i, &buf,
                      &len);
        all = realloc(all, all_len + len);
        assert_non_null(all);
        memcpy(all + all_len, buf, len);
        all_len += len;
        free(buf);
    }
    vqkv_frame_reader_t r;
    assert_pok(vqkv_frame_reader_init(&r, 4096));
    assert_pok(vqkv_frame_reader_feed(&r, all, all_len, NULL, 0));
    vqkv_frame_t f;
    uint64_t want = 1;
    int rc;
    while ((rc = vqkv_frame_reader_next(&r, &f)) == 1) {
        Vqkv__Envelope *env;
        assert_pok(vqkv_frame_unpack(f.data, f.len, &env));
        assert_int_equal(env->request_id, want);
        assert_int_equal(env->body_case,
                         want % 2 ? VQKV__ENVELOPE__BODY_LOOKUP : VQKV__ENVELOPE__BODY_RELEASE);
        vqkv_frame_envelope_free(env);
        vqkv_frame_clear(&f);
        want++;
    }
    assert_prc(rc, 0);
    assert_int_equal(want, N + 1);
    /* The chunk is used up: the reader takes the next one. */
    assert_pok(vqkv_frame_reader_feed(&r, all, 3, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_prc(vqkv_frame_reader_eof(&r), VQKV_ETRUNC);
    vqkv_frame_reader_free(&r);
    free(all);
}

/* ---- refusals ---------------------------------------------------------------- */

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void test_length_over_max_refused(void **state)
{
    (void)state;
    enum { MAX = 1000 };
    uint8_t bytes[VQKV_FRAME_HEADER_BYTES + MAX] = {0};
    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    int fds[3];

    /* Exactly the maximum is a frame. */
    put_le32(bytes, MAX);
    assert_pok(vqkv_frame_reader_init(&r, MAX));
    assert_pok(vqkv_frame_reader_feed(&r, bytes, sizeof bytes, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_int_equal(f.len, MAX);
    vqkv_frame_clear(&f);
    vqkv_frame_reader_free(&r);

    /* One more is refused, and the fds that came with it are closed. */
    put_le32(bytes, MAX + 1);
    make_pipe_fds(fds, 2);
    assert_pok(vqkv_frame_reader_init(&r, MAX));
    assert_pok(vqkv_frame_reader_feed(&r, bytes, sizeof bytes, fds, 2));
    assert_prc(vqkv_frame_reader_next(&r, &f), VQKV_ETOOBIG);
    assert_true(fd_is_closed(fds[0]));
    assert_true(fd_is_closed(fds[1]));
    assert_int_equal(f.n_fds, 0);
    assert_null(f.data);
    /* Sticky: the stream cannot be trusted after a bad length. */
    assert_prc(vqkv_frame_reader_error(&r), VQKV_ETOOBIG);
    assert_prc(vqkv_frame_reader_next(&r, &f), VQKV_ETOOBIG);
    make_pipe_fds(fds, 1);
    assert_prc(vqkv_frame_reader_feed(&r, bytes, 4, fds, 1), VQKV_ETOOBIG);
    assert_true(fd_is_closed(fds[0]));
    assert_prc(vqkv_frame_reader_eof(&r), VQKV_ETOOBIG);
    vqkv_frame_reader_free(&r);

    /* The length split across reads, fds with its first half: the frame
     * holds them until the length completes, then they are closed. */
    put_le32(bytes, 0xffffffffu);
    make_pipe_fds(fds, 3);
    assert_pok(vqkv_frame_reader_init(&r, MAX));
    assert_pok(vqkv_frame_reader_feed(&r, bytes, 2, fds, 3));
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_false(fd_is_closed(fds[0]));
    assert_pok(vqkv_frame_reader_feed(&r, bytes + 2, 2, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), VQKV_ETOOBIG);
    for (int i = 0; i < 3; i++)
        assert_true(fd_is_closed(fds[i]));
    vqkv_frame_reader_free(&r);

    /* The encoder refuses the same before allocating. */
    sample_t *s = malloc(sizeof *s);
    assert_non_null(s);
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_PUT, 1));
    size_t packed = vqkv__envelope__get_packed_size(&s->env);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_prc(vqkv_frame_encode(&s->env, (uint32_t)packed - 1, &buf, &len), VQKV_ETOOBIG);
    assert_null(buf);
    assert_pok(vqkv_frame_encode(&s->env, (uint32_t)packed, &buf, &len));
    free(buf);
    assert_prc(vqkv_frame_encode(&s->env, 0, &buf, &len), VQKV_EINVAL);
    assert_prc(vqkv_frame_encode(&s->env, VQKV_FRAME_LIMIT + 1, &buf, &len), VQKV_EINVAL);
    assert_prc(vqkv_frame_send(-1, &s->env, NULL, 0, VQKV_FRAME_DEFAULT_MAX), VQKV_EINVAL);
    free(s);

    assert_prc(vqkv_frame_reader_init(&r, 0), VQKV_EINVAL);
    assert_prc(vqkv_frame_reader_init(&r, VQKV_FRAME_LIMIT + 1), VQKV_EINVAL);
}

static void test_garbage_refused(void **state)
{
    (void)state;
    static const struct {
        const char *what;
        uint8_t bytes[8];
        size_t len;
    } bad[] = {
        {"varint cut short", {0x08, 0x80}, 2},
        {"varint without value", {0x08}, 1},
        {"length past the end", {0x1a, 0x05, 0x01}, 3},
        {"wire type 7", {0x0f, 0x00}, 2},
        {"field number 0", {0x00, 0x00}, 2},
        {"bad varint inside Hello", {0x1a, 0x02, 0x08, 0xff}, 4},
        {"request_id as a length", {0x0a, 0x01, 0x00}, 3},
        {"Hello as a varint", {0x18, 0x01}, 2},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        Vqkv__Envelope *env = NULL;
        int rc = vqkv_frame_unpack(bad[i].bytes, bad[i].len, &env);
        if (rc != VQKV_EMALFORMED) {
            print_error("%s: got %d (%s)\n", bad[i].what, rc, vqkv_proto_strerror(rc));
            fail();
        }
        assert_null(env);
    }

    /* A garbage frame is still a frame: the reader yields it, unpacking
     * refuses it, and the stream goes on. */
    uint8_t stream[4 + 3 + 64];
    put_le32(stream, 3);
    memcpy(stream + 4, bad[2].bytes, 3);
    uint8_t *good;
    size_t good_len;
    encode_sample(VQKV__ENVELOPE__BODY_HELLO, 5, &good, &good_len);
    assert_true(good_len <= 64);
    memcpy(stream + 7, good, good_len);
    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    Vqkv__Envelope *env;
    assert_pok(vqkv_frame_reader_init(&r, 64));
    assert_pok(vqkv_frame_reader_feed(&r, stream, 7 + good_len, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_prc(vqkv_frame_unpack(f.data, f.len, &env), VQKV_EMALFORMED);
    vqkv_frame_clear(&f);
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_pok(vqkv_frame_unpack(f.data, f.len, &env));
    assert_int_equal(env->request_id, 5);
    vqkv_frame_envelope_free(env);
    vqkv_frame_clear(&f);
    vqkv_frame_reader_free(&r);
    free(good);

    /* Random bytes and random damage to real messages: an error or an
     * Envelope, never a crash or a leak (ASan). */
    stream_t st;
    stream_build(&st);
    test_rng_t rng = {11};
    uint8_t junk[256];
    for (int trial = 0; trial < 20000; trial++) {
        size_t len;
        if (trial % 2) {
            len = test_rng_next(&rng) % sizeof junk;
            for (size_t b = 0; b < len; b++)
                junk[b] = (uint8_t)test_rng_next(&rng);
        } else {
            size_t which = test_rng_next(&rng) % (st.n_frames - 1);
            len = st.payload_len[which] < sizeof junk ? st.payload_len[which] : sizeof junk;
            memcpy(junk, st.payload[which], len);
            for (int flips = 1 + (int)(test_rng_next(&rng) % 3); flips > 0 && len > 0; flips--)
                junk[test_rng_next(&rng) % len] ^= (uint8_t)(1 + test_rng_next(&rng) % 255);
        }
        env = NULL;
        int rc = vqkv_frame_unpack(junk, len, &env);
        if (rc == VQKV_OK) {
            rc = vqkv_frame_check(env);
            assert_true(rc == VQKV_OK || rc == VQKV_EUNKNOWN);
            vqkv_frame_envelope_free(env);
        } else {
            assert_true(rc == VQKV_EMALFORMED || rc == VQKV_ETOOBIG);
            assert_null(env);
        }
    }
    stream_free(&st);
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    for (; v >= 0x80; v >>= 7)
        p[n++] = (uint8_t)(v | 0x80);
    p[n++] = (uint8_t)v;
    return n;
}

/* Bytes that unpack to far more than they weigh are refused: a StatsReply
 * of 40000 empty tenant entries, 2 bytes each on the wire. */
static void test_unpack_allocation_capped(void **state)
{
    (void)state;
    enum { N = 40000 };
    size_t body = 2 * N;
    uint8_t *bytes = malloc(body + 16);
    assert_non_null(bytes);
    size_t at = 0;
    bytes[at++] = 0xa2; /* field 20 (stats_reply), length-delimited */
    bytes[at++] = 0x01;
    at += put_varint(bytes + at, body);
    for (size_t i = 0; i < N; i++) {
        bytes[at++] = 0x52; /* field 10 (tenants), length-delimited */
        bytes[at++] = 0x00;
    }
    Vqkv__Envelope *env = NULL;
    assert_prc(vqkv_frame_unpack(bytes, at, &env), VQKV_ETOOBIG);
    assert_null(env);
    free(bytes);

    /* A real large message fits easily: a Put of 8192 chained blocks. */
    enum { B = 8192 };
    uint8_t(*keys)[VQKV_PROTO_KEY_BYTES] = malloc(B * sizeof *keys);
    ProtobufCBinaryData *kb = malloc(B * sizeof *kb), *pb = malloc(B * sizeof *pb);
    uint32_t *slots = malloc(B * sizeof *slots);
    assert_true(keys && kb && pb && slots);
    test_rng_t rng = {3};
    for (size_t i = 0; i < B; i++) {
        for (int b = 0; b < VQKV_PROTO_KEY_BYTES; b++)
            keys[i][b] = (uint8_t)test_rng_next(&rng);
        kb[i] = (ProtobufCBinaryData){VQKV_PROTO_KEY_BYTES, keys[i]};
        pb[i] = i ? kb[i - 1] : (ProtobufCBinaryData){0, NULL};
        slots[i] = (uint32_t)(B - i);
    }
    Vqkv__Put put = VQKV__PUT__INIT;
    put.model_handle = 1;
    put.region_handle = 2;
    put.n_keys = put.n_parent_keys = put.n_slots = B;
    put.keys = kb;
    put.parent_keys = pb;
    put.slots = slots;
    Vqkv__Envelope big = VQKV__ENVELOPE__INIT;
    big.request_id = 1;
    big.body_case = VQKV__ENVELOPE__BODY_PUT;
    big.put = &put;
    uint8_t *buf;
    size_t len;
    assert_pok(vqkv_frame_encode(&big, VQKV_FRAME_DEFAULT_MAX, &buf, &len));
    assert_pok(
        vqkv_frame_unpack(buf + VQKV_FRAME_HEADER_BYTES, len - VQKV_FRAME_HEADER_BYTES, &env));
    assert_int_equal(env->put->n_keys, B);
    assert_memory_equal(env->put->parent_keys[B - 1].data, keys[B - 2], VQKV_PROTO_KEY_BYTES);
    vqkv_frame_envelope_free(env);
    free(buf);
    free(keys);
    free(kb);
    free(pb);
    free(slots);
}

/* Packs env, appends extra bytes (unknown fields) and unpacks the result. */
static Vqkv__Envelope *unpack_with_suffix(const Vqkv__Envelope *src, const uint8_t *extra,
                                          size_t extra_len)
{
    size_t len;
    uint8_t *buf = pack_env(src, &len);
    buf = realloc(buf, len + extra_len + 1);
    assert_non_null(buf);
    if (extra_len > 0)
        memcpy(buf + len, extra, extra_len);
    Vqkv__Envelope *env = NULL;
    assert_pok(vqkv_frame_unpack(buf, len + extra_len, &env));
    free(buf);
    return env;
}

static void test_strict_check(void **state)
{
    (void)state;
    sample_t *s = malloc(sizeof *s);
    assert_non_null(s);
    Vqkv__Envelope *env;

    /* An unknown field in the Envelope; an unknown body type. */
    static const uint8_t field100[] = {0xa0, 0x06, 0x01};
    static const uint8_t body99[] = {0x9a, 0x06, 0x00};
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_RELEASE, 1));
    env = unpack_with_suffix(&s->env, field100, sizeof field100);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);
    Vqkv__Envelope bare = VQKV__ENVELOPE__INIT;
    bare.request_id = 4;
    env = unpack_with_suffix(&bare, body99, sizeof body99);
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY__NOT_SET);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);

    /* No body at all. */
    env = unpack_with_suffix(&bare, NULL, 0);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);

    /* An unknown field inside a nested message: Hello + field 15. */
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_HELLO, 1));
    uint8_t hello[64], wrapped[80];
    size_t hlen = vqkv__hello__pack(&s->hello, hello);
    hello[hlen++] = 0x78; /* field 15, varint */
    hello[hlen++] = 0x2a;
    size_t wlen = 0;
    wrapped[wlen++] = 0x1a; /* field 3 (hello), length-delimited */
    wrapped[wlen++] = (uint8_t)hlen;
    memcpy(wrapped + wlen, hello, hlen);
    wlen += hlen;
    assert_pok(vqkv_frame_unpack(wrapped, wlen, &env));
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_HELLO);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);

    /* Enum values outside the enum, singular, nested and repeated. */
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_REGISTER_MODEL, 1));
    s->layout.dtype = (Vqkv__DType)7;
    assert_prc(vqkv_frame_check(&s->env), VQKV_EUNKNOWN);
    env = unpack_with_suffix(&s->env, NULL, 0);
    assert_int_equal(env->register_model->layout->dtype, 7);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_REGISTER_REGION, 1));
    s->register_region.kind = (Vqkv__RegionKind)-1;
    assert_prc(vqkv_frame_check(&s->env), VQKV_EUNKNOWN);
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_PUT_DONE, 1));
    s->status[4] = (Vqkv__PutStatus)5;
    env = unpack_with_suffix(&s->env, NULL, 0);
    assert_prc(vqkv_frame_check(env), VQKV_EUNKNOWN);
    vqkv_frame_envelope_free(env);

    assert_prc(vqkv_frame_check(NULL), VQKV_EINVAL);
    free(s);
}

/* ---- fds over a real socket ---------------------------------------------- */

static void test_memfd_over_socketpair(void **state)
{
    (void)state;
    enum { REGION = 3 * 4096 + 17 };
    uint8_t *content = malloc(REGION), *back = malloc(REGION);
    assert_true(content && back);
    for (size_t i = 0; i < REGION; i++)
        content[i] = (uint8_t)(i * 31 + 7);
    int memfd = make_memfd(content, REGION);
    int sv[2];
    socket_pair(sv);
    int baseline = count_open_fds();

    sample_t *s = malloc(sizeof *s);
    assert_non_null(s);
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_REGISTER_REGION, 42));
    s->register_region.kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    s->register_region.region_bytes = REGION;
    s->register_region.num_fds = 1;
    s->register_region.cuda_ipc_handle = (ProtobufCBinaryData){0, NULL};
    assert_pok(vqkv_frame_send(sv[0], &s->env, &memfd, 1, VQKV_FRAME_DEFAULT_MAX));
    /* The sender still owns its fd. */
    assert_false(fd_is_closed(memfd));

    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_recv(sv[1], &r, &f));
    assert_int_equal(f.n_fds, 1);
    assert_int_not_equal(f.fds[0], memfd);
    assert_int_equal(f.fds[1], -1);
    assert_true(fcntl(f.fds[0], F_GETFD) & FD_CLOEXEC);
    Vqkv__Envelope *env;
    assert_pok(vqkv_frame_unpack(f.data, f.len, &env));
    assert_pok(vqkv_frame_check(env));
    assert_int_equal(env->request_id, 42);
    assert_int_equal(env->register_region->num_fds, f.n_fds);
    struct stat stbuf;
    assert_int_equal(fstat(f.fds[0], &stbuf), 0);
    assert_int_equal(stbuf.st_size, env->register_region->region_bytes);
    /* The receiver sees the sender's memory: what the daemon would map. */
    void *map = mmap(NULL, REGION, PROT_READ, MAP_SHARED, f.fds[0], 0);
    assert_true(map != MAP_FAILED);
    assert_memory_equal(map, content, REGION);
    content[5] ^= 0xff;
    assert_int_equal(pwrite(memfd, content + 5, 1, 5), 1);
    assert_int_equal(((const uint8_t *)map)[5], content[5]);
    munmap(map, REGION);
    assert_int_equal(pread(f.fds[0], back, REGION, 0), REGION);
    assert_memory_equal(back, content, REGION);
    vqkv_frame_envelope_free(env);

    int received = f.fds[0];
    vqkv_frame_clear(&f);
    assert_true(fd_is_closed(received));
    assert_int_equal(count_open_fds(), baseline);

    vqkv_frame_reader_free(&r);
    close(memfd);
    close(sv[0]);
    close(sv[1]);
    free(s);
    free(content);
    free(back);
}

/* Frames with and without fds sent back to back before the receiver reads
 * anything: each frame gets exactly its own fds. */
static void test_fds_stay_with_their_frames(void **state)
{
    (void)state;
    static const size_t per_frame[] = {0, 1, 0, 2, 0, 4, 1, 0};
    enum { N = sizeof per_frame / sizeof per_frame[0] };
    int sv[2];
    socket_pair(sv);
    int baseline = count_open_fds();
    int tag = 0;
    for (size_t i = 0; i < N; i++) {
        int fds[VQKV_FRAME_MAX_FDS];
        char text[16];
        for (size_t k = 0; k < per_frame[i]; k++) {
            int n = snprintf(text, sizeof text, "fd-%d", tag++);
            fds[k] = make_memfd(text, (size_t)n);
        }
        sample_t *s = malloc(sizeof *s);
        assert_non_null(s);
        assert_true(
            sample_build(s, i % 2 ? VQKV__ENVELOPE__BODY_PUT : VQKV__ENVELOPE__BODY_ACK, i + 1));
        assert_pok(vqkv_frame_send(sv[0], &s->env, fds, per_frame[i], VQKV_FRAME_DEFAULT_MAX));
        for (size_t k = 0; k < per_frame[i]; k++)
            close(fds[k]);
        free(s);
    }

    vqkv_frame_reader_t r;
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    tag = 0;
    for (size_t i = 0; i < N; i++) {
        vqkv_frame_t f;
        Vqkv__Envelope *env;
        assert_pok(vqkv_frame_recv(sv[1], &r, &f));
        assert_pok(vqkv_frame_unpack(f.data, f.len, &env));
        assert_int_equal(env->request_id, i + 1);
        vqkv_frame_envelope_free(env);
        assert_int_equal(f.n_fds, per_frame[i]);
        for (size_t k = 0; k < f.n_fds; k++) {
            char want[16], got[16] = {0};
            int n = snprintf(want, sizeof want, "fd-%d", tag++);
            assert_int_equal(pread(f.fds[k], got, sizeof got, 0), n);
            assert_string_equal(got, want);
        }
        vqkv_frame_clear(&f);
    }
    close(sv[0]);
    vqkv_frame_t f;
    assert_prc(vqkv_frame_recv(sv[1], &r, &f), VQKV_ECLOSED);
    vqkv_frame_reader_free(&r);
    close(sv[1]);
    assert_int_equal(count_open_fds(), baseline - 2);
}

typedef struct {
    int sock;
    const uint8_t *buf;
    size_t len;
    int fd;
    int rc;
} sender_t;

static void *sender_main(void *arg)
{
    sender_t *s = arg;
    s->rc = vqkv_frame_send_buf(s->sock, s->buf, s->len, &s->fd, 1);
    return NULL;
}

/* A frame far larger than the socket buffers, with an fd: the sender's
 * writes and the receiver's reads both come in pieces. */
static void test_partial_reads_and_writes(void **state)
{
    (void)state;
    enum { B = 6000 };
    uint8_t(*keys)[VQKV_PROTO_KEY_BYTES] = malloc(B * sizeof *keys);
    ProtobufCBinaryData *kb = malloc(B * sizeof *kb);
    assert_true(keys && kb);
    test_rng_t rng = {8};
    for (size_t i = 0; i < B; i++) {
        for (int b = 0; b < VQKV_PROTO_KEY_BYTES; b++)
            keys[i][b] = (uint8_t)test_rng_next(&rng);
        kb[i] = (ProtobufCBinaryData){VQKV_PROTO_KEY_BYTES, keys[i]};
    }
    Vqkv__Lookup lookup = VQKV__LOOKUP__INIT;
    lookup.model_handle = 3;
    lookup.n_keys = B;
    lookup.keys = kb;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = 77;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
    env.lookup = &lookup;
    uint8_t *buf;
    size_t len;
    assert_pok(vqkv_frame_encode(&env, VQKV_FRAME_DEFAULT_MAX, &buf, &len));
    assert_true(len > 100000);

    int sv[2];
    socket_pair(sv);
    int small = 4096;
    assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    assert_int_equal(setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    int memfd = make_memfd("partial", 7);
    sender_t snd = {sv[0], buf, len, memfd, 1};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, sender_main, &snd), 0);

    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_recv(sv[1], &r, &f));
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_pok(snd.rc);
    assert_int_equal(f.len, len - VQKV_FRAME_HEADER_BYTES);
    assert_memory_equal(f.data, buf + VQKV_FRAME_HEADER_BYTES, f.len);
    assert_int_equal(f.n_fds, 1);
    char got[8] = {0};
    assert_int_equal(pread(f.fds[0], got, 7, 0), 7);
    assert_string_equal(got, "partial");
    vqkv_frame_clear(&f);

    /* The same frame trickled in by hand, the fd with the first byte, the
     * next 63 bytes one at a time, then 3000 at a time, each read as soon
     * as it is sent; a non-blocking read in between finds nothing. */
    send_raw(sv[0], buf, 1, &memfd, 1);
    assert_int_equal(vqkv_frame_reader_recv(&r, sv[1], MSG_DONTWAIT), 1);
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_prc(vqkv_frame_reader_recv(&r, sv[1], MSG_DONTWAIT), VQKV_EAGAIN);
    size_t sent = 1;
    int rc = 0;
    while (sent < len) {
        size_t n = sent < 64 ? 1 : 3000; /* the length and first bytes singly */
        if (n > len - sent)
            n = len - sent;
        send_raw(sv[0], buf + sent, n, NULL, 0);
        sent += n;
        assert_true(vqkv_frame_reader_recv(&r, sv[1], MSG_DONTWAIT) > 0);
        rc = vqkv_frame_reader_next(&r, &f);
        assert_true(rc >= 0);
        if (rc == 1)
            break;
    }
    while (rc == 0) {
        assert_true(vqkv_frame_reader_recv(&r, sv[1], MSG_DONTWAIT) > 0);
        rc = vqkv_frame_reader_next(&r, &f);
        assert_true(rc >= 0);
    }
    assert_int_equal(sent, len);
    assert_int_equal(f.len, len - VQKV_FRAME_HEADER_BYTES);
    assert_memory_equal(f.data, buf + VQKV_FRAME_HEADER_BYTES, f.len);
    assert_int_equal(f.n_fds, 1);
    vqkv_frame_clear(&f);

    vqkv_frame_reader_free(&r);
    close(memfd);
    close(sv[0]);
    close(sv[1]);
    free(buf);
    free(keys);
    free(kb);
}

static void test_eof_mid_frame(void **state)
{
    (void)state;
    uint8_t *buf;
    size_t len;
    encode_sample(VQKV__ENVELOPE__BODY_WELCOME, 9, &buf, &len);
    /* Cut in the length, right after it, in the payload; and no cut. */
    size_t cuts[] = {2, VQKV_FRAME_HEADER_BYTES, len / 2, len};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        int sv[2];
        socket_pair(sv);
        int baseline = count_open_fds();
        int memfd = make_memfd("x", 1);
        send_raw(sv[0], buf, cuts[c], &memfd, 1);
        close(memfd);
        close(sv[0]);
        vqkv_frame_reader_t r;
        vqkv_frame_t f;
        assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
        if (cuts[c] == len) {
            assert_pok(vqkv_frame_recv(sv[1], &r, &f));
            assert_int_equal(f.n_fds, 1);
            vqkv_frame_clear(&f);
            assert_prc(vqkv_frame_recv(sv[1], &r, &f), VQKV_ECLOSED);
        } else {
            assert_prc(vqkv_frame_recv(sv[1], &r, &f), VQKV_ETRUNC);
        }
        assert_prc(vqkv_frame_recv(sv[1], &r, &f), cuts[c] == len ? VQKV_ECLOSED : VQKV_ETRUNC);
        /* The fd that came with the unfinished frame is closed too. */
        vqkv_frame_reader_free(&r);
        assert_int_equal(count_open_fds(), baseline - 1);
        close(sv[1]);
    }

    /* The same through the feed interface. */
    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    int fds[2];
    make_pipe_fds(fds, 2);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_reader_feed(&r, buf, len - 1, fds, 2));
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_false(fd_is_closed(fds[0]));
    assert_prc(vqkv_frame_reader_eof(&r), VQKV_ETRUNC);
    assert_true(fd_is_closed(fds[0]));
    assert_true(fd_is_closed(fds[1]));
    vqkv_frame_reader_free(&r);
    free(buf);
}

static void test_misplaced_fds_refused(void **state)
{
    (void)state;
    uint8_t *buf;
    size_t len;
    encode_sample(VQKV__ENVELOPE__BODY_PUT, 3, &buf, &len);
    vqkv_frame_reader_t r;
    vqkv_frame_t f;
    int fds[6];

    /* Fds with bytes in the middle of a frame. */
    make_pipe_fds(fds, 1);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_reader_feed(&r, buf, 10, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_pok(vqkv_frame_reader_feed(&r, buf + 10, 10, fds, 1));
    assert_prc(vqkv_frame_reader_next(&r, &f), VQKV_EFDS);
    assert_true(fd_is_closed(fds[0]));
    vqkv_frame_reader_free(&r);

    /* A frame ends and the next begins in one chunk: the fds belong to the
     * one that starts there. A chunk ending exactly at a frame's end, with
     * fds, gives them to that frame. */
    uint8_t two[2048];
    assert_true(2 * len <= sizeof two);
    memcpy(two, buf, len);
    memcpy(two + len, buf, len);
    make_pipe_fds(fds, 2);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_reader_feed(&r, two, 5, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_pok(vqkv_frame_reader_feed(&r, two + 5, len + 3, fds, 1));
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_int_equal(f.n_fds, 0);
    vqkv_frame_clear(&f);
    assert_prc(vqkv_frame_reader_next(&r, &f), 0);
    assert_pok(vqkv_frame_reader_feed(&r, two + len + 8, len - 8, NULL, 0));
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_int_equal(f.n_fds, 1);
    assert_int_equal(f.fds[0], fds[0]);
    vqkv_frame_clear(&f);
    assert_true(fd_is_closed(fds[0]));
    assert_pok(vqkv_frame_reader_feed(&r, two, len, fds + 1, 1));
    assert_prc(vqkv_frame_reader_next(&r, &f), 1);
    assert_int_equal(f.n_fds, 1);
    assert_int_equal(f.fds[0], fds[1]);
    vqkv_frame_clear(&f);
    vqkv_frame_reader_free(&r);

    /* Fds with no bytes; more fds than a frame may carry. */
    make_pipe_fds(fds, 6);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_prc(vqkv_frame_reader_feed(&r, buf, 0, fds, 1), VQKV_EFDS);
    assert_true(fd_is_closed(fds[0]));
    vqkv_frame_reader_free(&r);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_prc(vqkv_frame_reader_feed(&r, buf, len, fds + 1, 5), VQKV_EFDS);
    for (int i = 1; i < 6; i++)
        assert_true(fd_is_closed(fds[i]));
    /* Feeding before the last chunk is used up is a caller error. */
    vqkv_frame_reader_free(&r);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_pok(vqkv_frame_reader_feed(&r, buf, len, NULL, 0));
    assert_prc(vqkv_frame_reader_feed(&r, buf, len, NULL, 0), VQKV_EINVAL);
    vqkv_frame_reader_free(&r);

    /* Over a socket: vqkv_frame_send refuses five fds; sent anyway, the
     * receiver refuses the frame and nothing leaks. */
    int sv[2];
    socket_pair(sv);
    make_pipe_fds(fds, 6);
    sample_t *s = malloc(sizeof *s);
    assert_non_null(s);
    assert_true(sample_build(s, VQKV__ENVELOPE__BODY_HELLO, 1));
    assert_prc(vqkv_frame_send(sv[0], &s->env, fds, 5, VQKV_FRAME_DEFAULT_MAX), VQKV_EINVAL);
    assert_prc(vqkv_frame_send_buf(sv[0], buf, len - 1, NULL, 0), VQKV_EINVAL);
    free(s);
    int baseline = count_open_fds();
    send_raw(sv[0], buf, len, fds, 6);
    assert_pok(vqkv_frame_reader_init(&r, VQKV_FRAME_DEFAULT_MAX));
    assert_prc(vqkv_frame_recv(sv[1], &r, &f), VQKV_EFDS);
    vqkv_frame_reader_free(&r);
    assert_int_equal(count_open_fds(), baseline);

    /* A frame over the reader's maximum, with an fd: refused, fd closed. */
    send_raw(sv[0], buf, len, fds, 1);
    assert_pok(vqkv_frame_reader_init(&r, (uint32_t)(len - VQKV_FRAME_HEADER_BYTES - 1)));
    assert_prc(vqkv_frame_recv(sv[1], &r, &f), VQKV_ETOOBIG);
    vqkv_frame_reader_free(&r);
    assert_int_equal(count_open_fds(), baseline);

    for (int i = 0; i < 6; i++)
        close(fds[i]);
    close(sv[0]);
    close(sv[1]);
    free(buf);
}

static void test_frame_clear_and_free_are_safe(void **state)
{
    (void)state;
    int baseline = count_open_fds();
    vqkv_frame_t zero;
    memset(&zero, 0, sizeof zero);
    vqkv_frame_clear(&zero); /* n_fds 0: fd 0 stays open */
    vqkv_frame_clear(&zero);
    vqkv_frame_clear(NULL);
    assert_int_equal(count_open_fds(), baseline);
    vqkv_frame_reader_t r;
    assert_pok(vqkv_frame_reader_init(&r, 16));
    vqkv_frame_reader_free(&r);
    vqkv_frame_reader_free(&r);
    vqkv_frame_reader_free(NULL);
    vqkv_frame_envelope_free(NULL);
    assert_string_equal(vqkv_proto_strerror(VQKV_ETOOBIG),
                        "frame or message exceeds the size limit");
    assert_string_equal(vqkv_proto_strerror(VQKV_ENOMEM), vqkv_strerror(VQKV_ENOMEM));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_message_round_trip),
        cmocka_unit_test(test_split_at_every_byte),
        cmocka_unit_test(test_many_frames_in_one_buffer),
        cmocka_unit_test(test_length_over_max_refused),
        cmocka_unit_test(test_garbage_refused),
        cmocka_unit_test(test_unpack_allocation_capped),
        cmocka_unit_test(test_strict_check),
        cmocka_unit_test(test_memfd_over_socketpair),
        cmocka_unit_test(test_fds_stay_with_their_frames),
        cmocka_unit_test(test_partial_reads_and_writes),
        cmocka_unit_test(test_eof_mid_frame),
        cmocka_unit_test(test_misplaced_fds_refused),
        cmocka_unit_test(test_frame_clear_and_free_are_safe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
