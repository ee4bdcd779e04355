/* make_seeds.c -- writes the seed corpora of the fuzz targets:
 *
 *   fuzz_make_seeds tests/fuzz daemon/vqkvd.conf
 *
 * Seeds are small meaningful inputs the fuzzer starts from: valid frames of
 * every request type, request sequences that walk a session through
 * models, regions, Put, Lookup, Get and the rest (and through the errors a
 * client can provoke), real codebook files, the shipped configuration and
 * a few variants, the documented block-key vector, and a segment file
 * from the disk tier's writer (whole, sealed, torn, damaged). The output is
 * deterministic, so regenerating changes nothing unless this file or a
 * format changed; the files are committed, and the replay tests run them.
 */
#include <errno.h>
#include <msgpack.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "segment.h"

static const char *seeds__root;

/* Requests wait for the replies before them, as a client that waits for
 * PutDone before its Lookup; the fuzzer takes the flag off to pipeline. */
#define SEEDS_OP (FUZZ_OP_FRAME | FUZZ_OP_SYNC)

static void seeds__write(const char *target, const char *name, const void *data, size_t len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s/corpus/%s", seeds__root, target, name);
    FILE *f = fopen(path, "wb");
    FUZZ_CHECK(f != NULL, "%s: %s", path, strerror(errno));
    FUZZ_CHECK(fwrite(data, 1, len, f) == len && fclose(f) == 0, "%s: write failed", path);
}

/* ---- envelopes ------------------------------------------------------------ */

/* A key whose bytes all equal b. */
static ProtobufCBinaryData seeds__key(uint8_t b)
{
    static uint8_t keys[256][VQKV_PROTO_KEY_BYTES];
    memset(keys[b], b, VQKV_PROTO_KEY_BYTES);
    return (ProtobufCBinaryData){.len = VQKV_PROTO_KEY_BYTES, .data = keys[b]};
}

/* One request of each kind, filled in by the callers' arguments. */
typedef struct {
    uint8_t *buf;
    size_t len;
    uint64_t next_id;
} seeds__session_t;

static Vqkv__Envelope seeds__env(seeds__session_t *s, Vqkv__Envelope__BodyCase body)
{
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = s->next_id++;
    env.body_case = body;
    return env;
}

/* Put of n blocks chained from key first (the first block a root), in
 * slots 0..n-1 of region 1 of model 1. */
/* A Put of blocks first.. in slots 0..; with a worker's CUDA event when
 * event is not NULL (a CPU daemon refuses it). */
static void seeds__put_chain(seeds__session_t *s, uint8_t first, size_t n,
                             const ProtobufCBinaryData *event)
{
    ProtobufCBinaryData keys[8], parents[8];
    uint32_t slots[8];
    for (size_t i = 0; i < n; i++) {
        keys[i] = seeds__key((uint8_t)(first + i));
        parents[i] = i ? seeds__key((uint8_t)(first + i - 1)) : (ProtobufCBinaryData){0};
        slots[i] = (uint32_t)i;
    }
    Vqkv__Put put = VQKV__PUT__INIT;
    put.model_handle = 1;
    put.region_handle = 1;
    put.n_keys = put.n_parent_keys = put.n_slots = n;
    put.keys = keys;
    put.parent_keys = parents;
    put.slots = slots;
    if (event != NULL)
        put.cuda_event = *event;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_PUT);
    env.put = &put;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__lookup(seeds__session_t *s, uint8_t first, size_t n)
{
    ProtobufCBinaryData keys[8];
    for (size_t i = 0; i < n; i++)
        keys[i] = seeds__key((uint8_t)(first + i));
    Vqkv__Lookup lk = VQKV__LOOKUP__INIT;
    lk.model_handle = 1;
    lk.n_keys = n;
    lk.keys = keys;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_LOOKUP);
    env.lookup = &lk;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

/* Get of lease 1 (the first lease of a connection) into slots 4..; with a
 * worker's CUDA event when event is not NULL. */
static void seeds__get(seeds__session_t *s, size_t n, const ProtobufCBinaryData *event)
{
    uint32_t slots[8];
    for (size_t i = 0; i < n; i++)
        slots[i] = (uint32_t)(4 + i);
    Vqkv__Get get = VQKV__GET__INIT;
    get.lease_id = 1;
    get.region_handle = 1;
    get.n_slots = n;
    get.slots = slots;
    if (event != NULL)
        get.cuda_event = *event;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_GET);
    env.get = &get;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__release(seeds__session_t *s, uint64_t lease)
{
    Vqkv__Release rel = VQKV__RELEASE__INIT;
    rel.lease_id = lease;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_RELEASE);
    env.release = &rel;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__pin(seeds__session_t *s, uint8_t first, size_t n, uint32_t ttl_ms, int unpin)
{
    ProtobufCBinaryData keys[8];
    for (size_t i = 0; i < n; i++)
        keys[i] = seeds__key((uint8_t)(first + i));
    Vqkv__Pin pin = VQKV__PIN__INIT;
    Vqkv__Unpin un = VQKV__UNPIN__INIT;
    Vqkv__Envelope env;
    if (unpin) {
        un.model_handle = 1;
        un.n_keys = n;
        un.keys = keys;
        env = seeds__env(s, VQKV__ENVELOPE__BODY_UNPIN);
        env.unpin = &un;
    } else {
        pin.model_handle = 1;
        pin.n_keys = n;
        pin.keys = keys;
        pin.ttl_ms = ttl_ms;
        env = seeds__env(s, VQKV__ENVELOPE__BODY_PIN);
        env.pin = &pin;
    }
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__evict(seeds__session_t *s, uint8_t first, size_t n, int all)
{
    ProtobufCBinaryData keys[8];
    for (size_t i = 0; i < n; i++)
        keys[i] = seeds__key((uint8_t)(first + i));
    Vqkv__Evict ev = VQKV__EVICT__INIT;
    ev.model_handle = 1;
    ev.n_keys = n;
    ev.keys = keys;
    ev.all = all;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_EVICT);
    env.evict = &ev;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__find_model(seeds__session_t *s, const char *model_id)
{
    Vqkv__FindModel fm = VQKV__FIND_MODEL__INIT;
    fm.model_id = (char *)model_id;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_FIND_MODEL);
    env.find_model = &fm;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__stats(seeds__session_t *s)
{
    Vqkv__Stats st = VQKV__STATS__INIT;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_STATS);
    env.stats = &st;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

static void seeds__hello(seeds__session_t *s, uint32_t version)
{
    Vqkv__Hello hello = VQKV__HELLO__INIT;
    hello.protocol_version = version;
    hello.client_name = "seed";
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_HELLO);
    env.hello = &hello;
    fuzz_record_envelope(&s->buf, &s->len, SEEDS_OP, &env);
}

/* A second region of model 1 over the second half of the memfd, split K
 * and V tensors, sent with op (so also without its fd). */
static void seeds__region(seeds__session_t *s, int op)
{
    vqkv_kv_view_t view;
    vqkv_kv_view_split(&view, &fuzz_layout, 2, 64);
    Vqkv__RegisterRegion rr;
    fuzz_region_request(&rr, &view);
    rr.region_bytes = FUZZ_REGION_MEMFD_BYTES;
    rr.offset = FUZZ_REGION_MEMFD_BYTES / 2;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_REGISTER_REGION);
    env.register_region = &rr;
    fuzz_record_envelope(&s->buf, &s->len, op, &env);
}

/* A CUDA region of model 1 (a legacy IPC handle, or a VMM fd: the memfd
 * stands in for it), which a daemon without a GPU refuses; mutations reach
 * the payload checks with every size of handle and UUID. */
static void seeds__cuda_region(seeds__session_t *s, Vqkv__RegionKind kind)
{
    static const uint8_t handle[64] = {1, 2, 3}, uuid[16] = {0xde, 0xad, 0xbe, 0xef};
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &fuzz_layout, 4);
    Vqkv__RegisterRegion rr;
    fuzz_region_request(&rr, &view);
    rr.kind = kind;
    bool ipc = kind == VQKV__REGION_KIND__REGION_KIND_CUDA_IPC;
    rr.num_fds = ipc ? 0 : 1;
    if (ipc)
        rr.cuda_ipc_handle = (ProtobufCBinaryData){sizeof handle, (uint8_t *)handle};
    rr.gpu_uuid = (ProtobufCBinaryData){sizeof uuid, (uint8_t *)uuid};
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_REGISTER_REGION);
    env.register_region = &rr;
    fuzz_record_envelope(&s->buf, &s->len, ipc ? FUZZ_OP_FRAME : FUZZ_OP_FRAME_REGION, &env);
}

/* A CUDA_VMM_FD region of two pieces, the first sent ahead in RegionPieces
 * (each frame with the session's one fd). */
static void seeds__vmm_pieces(seeds__session_t *s)
{
    static const uint8_t uuid[16] = {0xde, 0xad, 0xbe, 0xef};
    Vqkv__RegionPieces rp = VQKV__REGION_PIECES__INIT;
    rp.num_fds = 1;
    Vqkv__Envelope env = seeds__env(s, VQKV__ENVELOPE__BODY_REGION_PIECES);
    env.region_pieces = &rp;
    fuzz_record_envelope(&s->buf, &s->len, FUZZ_OP_FRAME_REGION, &env);
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &fuzz_layout, 4);
    Vqkv__RegisterRegion rr;
    fuzz_region_request(&rr, &view);
    rr.kind = VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD;
    rr.num_fds = 1;
    uint64_t pieces[2] = {view.region_bytes / 2, view.region_bytes - view.region_bytes / 2};
    rr.n_piece_bytes = 2;
    rr.piece_bytes = pieces;
    rr.gpu_uuid = (ProtobufCBinaryData){sizeof uuid, (uint8_t *)uuid};
    env = seeds__env(s, VQKV__ENVELOPE__BODY_REGISTER_REGION);
    env.register_region = &rr;
    fuzz_record_envelope(&s->buf, &s->len, FUZZ_OP_FRAME_REGION, &env);
}

/* ---- session ---------------------------------------------------------------- */

static void seeds__session_begin(seeds__session_t *s, uint8_t setup)
{
    s->buf = malloc(1);
    FUZZ_CHECK(s->buf != NULL, "out of memory");
    s->buf[0] = setup;
    s->len = 1;
    s->next_id = 10;
}

/* Takes FUZZ_OP_SYNC off every record: the requests pipeline. */
static void seeds__pipeline(seeds__session_t *s)
{
    for (size_t off = 1; off + 3 <= s->len;
         off += 3 + ((size_t)s->buf[off + 1] | (size_t)s->buf[off + 2] << 8))
        s->buf[off] &= (uint8_t)~FUZZ_OP_SYNC;
}

static void seeds__session_end(seeds__session_t *s, const char *name)
{
    seeds__write("session", name, s->buf, s->len);
    free(s->buf);
}

static void seeds__session(void)
{
    seeds__session_t s;
    char name[64];

    /* The main path once per codec: Put a chain, look it up, get it back,
     * release, and count (for VQ codecs without a file, the Puts fill
     * calibration and the third trains the codebooks). */
    for (int c = 0; c < FUZZ_N_CODECS; c++) {
        for (int books = 0; books < 2; books++) {
            if (books && !fuzz_codec_needs_books(fuzz_codecs[c]))
                continue;
            seeds__session_begin(
                &s, (uint8_t)(c << FUZZ_SETUP_CODEC_SHIFT | (books ? FUZZ_SETUP_CODEBOOK : 0)));
            seeds__put_chain(&s, 1, 3, NULL);
            seeds__put_chain(&s, 1, 4, NULL);
            seeds__lookup(&s, 1, 4);
            seeds__get(&s, 4, NULL);
            seeds__release(&s, 1);
            seeds__stats(&s);
            snprintf(name, sizeof name, "put-lookup-get-%d%s", c, books ? "-books" : "");
            seeds__session_end(&s, name);
        }
    }

    /* Pins, unpins, evictions and FindModel. */
    seeds__session_begin(&s, 0);
    seeds__put_chain(&s, 1, 4, NULL);
    seeds__pin(&s, 1, 2, 0, 0);
    seeds__pin(&s, 3, 2, 5000, 0);
    seeds__evict(&s, 1, 1, 0);
    seeds__pin(&s, 1, 1, 0, 1);
    seeds__evict(&s, 0, 0, 1);
    seeds__find_model(&s, "fuzz");
    seeds__find_model(&s, "other");
    seeds__stats(&s);
    uint8_t *copy = malloc(s.len);
    FUZZ_CHECK(copy != NULL, "out of memory");
    memcpy(copy, s.buf, s.len);
    seeds__session_end(&s, "pin-evict-find");
    s.buf = copy; /* the same requests without waiting for replies */
    seeds__pipeline(&s);
    seeds__session_end(&s, "pin-evict-find-pipelined");

    /* A lease held across an evict, a second region, a Get through it. */
    seeds__session_begin(&s, 0);
    seeds__put_chain(&s, 20, 2, NULL);
    seeds__lookup(&s, 20, 2);
    seeds__evict(&s, 0, 0, 1);
    seeds__region(&s, FUZZ_OP_FRAME_REGION);
    seeds__get(&s, 1, NULL);
    seeds__release(&s, 1);
    seeds__release(&s, 1);
    seeds__session_end(&s, "lease-region-evict");

    /* Worker memory with NaN, infinities and huge values, then Puts. */
    for (int c = 0; c < 4; c++) {
        seeds__session_begin(&s, (uint8_t)(c << FUZZ_SETUP_CODEC_SHIFT));
        const uint8_t poke[] = {0, 0, 0, 0, 0x00, 0x7c, 0x00, 0xfc, 0x01, 0x7e, 0xff, 0x7b};
        fuzz_record_bytes(&s.buf, &s.len, FUZZ_OP_POKE, poke, sizeof poke);
        seeds__put_chain(&s, 40, 2, NULL);
        seeds__lookup(&s, 40, 2);
        seeds__get(&s, 2, NULL);
        snprintf(name, sizeof name, "nonfinite-kv-%d", c);
        seeds__session_end(&s, name);
    }

    /* The session from nothing: requests before Hello, a wrong version,
     * the prelude by hand, Hello twice. */
    seeds__session_begin(&s, FUZZ_SETUP_NO_PRELUDE);
    seeds__stats(&s);
    seeds__hello(&s, VQKV_PROTO_VERSION + 1);
    fuzz_prelude(&s.buf, &s.len, 4 << FUZZ_SETUP_CODEC_SHIFT | FUZZ_SETUP_CODEBOOK);
    seeds__hello(&s, VQKV_PROTO_VERSION);
    seeds__put_chain(&s, 1, 2, NULL);
    seeds__session_end(&s, "no-prelude");

    /* Errors a client can provoke: fds where none belong or missing,
     * request_id 0, a reply sent as a request, bytes that are no
     * Envelope, a frame over max_frame. */
    seeds__session_begin(&s, 0);
    seeds__region(&s, FUZZ_OP_FRAME);
    seeds__region(&s, FUZZ_OP_FRAME_REGION | FUZZ_OP_STRAY_FD);
    seeds__cuda_region(&s, VQKV__REGION_KIND__REGION_KIND_CUDA_IPC);
    seeds__cuda_region(&s, VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD);
    seeds__vmm_pieces(&s);
    {
        static uint8_t event_bytes[64] = {7};
        const ProtobufCBinaryData event = {sizeof event_bytes, event_bytes};
        seeds__put_chain(&s, 1, 1, &event);
        seeds__get(&s, 1, &event);
    }
    seeds__put_chain(&s, 1, 1, NULL);
    {
        Vqkv__Ack ack = VQKV__ACK__INIT;
        Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
        env.body_case = VQKV__ENVELOPE__BODY_ACK;
        env.ack = &ack;
        fuzz_record_envelope(&s.buf, &s.len, FUZZ_OP_FRAME, &env); /* id 0, a reply */
        env.request_id = 99;
        fuzz_record_envelope(&s.buf, &s.len, FUZZ_OP_FRAME | FUZZ_OP_STRAY_FD, &env);
    }
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0x0f, 0x12};
    fuzz_record_bytes(&s.buf, &s.len, FUZZ_OP_FRAME, junk, sizeof junk);
    seeds__lookup(&s, 1, 1);
    seeds__session_end(&s, "errors");

    seeds__session_begin(&s, 0);
    seeds__stats(&s);
    static uint8_t big[20000];
    fuzz_record_bytes(&s.buf, &s.len, FUZZ_OP_FRAME, big, sizeof big);
    seeds__session_end(&s, "frame-too-big");
}

/* ---- frame ------------------------------------------------------------------ */

static void seeds__frame(void)
{
    /* Every request of the session seeds, as one framed stream. */
    seeds__session_t s;
    seeds__session_begin(&s, 0);
    fuzz_prelude(&s.buf, &s.len, 4 << FUZZ_SETUP_CODEC_SHIFT);
    seeds__put_chain(&s, 1, 3, NULL);
    seeds__lookup(&s, 1, 3);
    seeds__get(&s, 3, NULL);
    seeds__release(&s, 1);
    seeds__pin(&s, 1, 2, 0, 0);
    seeds__pin(&s, 1, 2, 0, 1);
    seeds__evict(&s, 1, 1, 0);
    seeds__find_model(&s, "fuzz");
    seeds__stats(&s);
    /* Records to frames: the u16 length becomes the u32 one. */
    uint8_t *stream = malloc(2 + s.len * 2);
    FUZZ_CHECK(stream != NULL, "out of memory");
    size_t n = 2;
    for (size_t off = 1; off + 3 <= s.len;) {
        size_t len = (size_t)s.buf[off + 1] | (size_t)s.buf[off + 2] << 8;
        stream[n++] = (uint8_t)len;
        stream[n++] = (uint8_t)(len >> 8);
        stream[n++] = 0;
        stream[n++] = 0;
        memcpy(stream + n, s.buf + off + 3, len);
        n += len;
        off += 3 + len;
    }
    free(s.buf);
    static const struct {
        uint8_t mode, seed;
        const char *name;
    } runs[] = {
        {0x0f, 0, "requests-whole"},         {0x0d, 1, "requests-8-byte-chunks"},
        {0x0c, 2, "requests-1-byte-chunks"}, {0x1e, 3, "requests-chunks-fds"},
        {0x01, 4, "requests-max-16"},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        stream[0] = runs[i].mode;
        stream[1] = runs[i].seed;
        seeds__write("frame", runs[i].name, stream, n);
    }
    /* A cut stream, an empty frame, a length over every maximum. */
    stream[0] = 0x0f;
    seeds__write("frame", "requests-cut", stream, n - 3);
    const uint8_t edges[] = {0x0f, 0,    0,    0,    0,    0,    4,    0,    0,
                             0,    0x08, 0x01, 0x1a, 0x00, 0xff, 0xff, 0xff, 0xff};
    seeds__write("frame", "empty-then-too-big", edges, sizeof edges);
    free(stream);
}

/* ---- codebook --------------------------------------------------------------- */

/* The body bin of a codebook file. */
static void seeds__body(const uint8_t *file, size_t len, const char **body, size_t *body_len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    FUZZ_CHECK(msgpack_unpack_next(&u, (const char *)file, len, &off) == MSGPACK_UNPACK_SUCCESS,
               "a codebook file does not unpack");
    *body = NULL;
    const msgpack_object_map *map = &u.data.via.map;
    for (uint32_t i = 0; i < map->size; i++)
        if (map->ptr[i].key.via.str.size == 4 &&
            memcmp(map->ptr[i].key.via.str.ptr, "body", 4) == 0) {
            /* The object points into file, which outlives u. */
            *body = map->ptr[i].val.via.bin.ptr;
            *body_len = map->ptr[i].val.via.bin.size;
        }
    msgpack_unpacked_destroy(&u);
    FUZZ_CHECK(*body != NULL, "a codebook file without a body");
}

static void seeds__codebook(void)
{
    for (int i = 0; i < FUZZ_N_VQ_SPECS; i++) {
        uint8_t *file;
        size_t len;
        FUZZ_CHECK(fuzz_codebook_make(fuzz_vq_specs[i], &fuzz_layout, &file, &len) == VQKV_OK,
                   "codebooks for %s", fuzz_vq_specs[i]);
        uint8_t *seed = malloc(len + 1);
        FUZZ_CHECK(seed != NULL, "out of memory");
        char name[64];
        seed[0] = (uint8_t)i;
        memcpy(seed + 1, file, len);
        snprintf(name, sizeof name, "file-%d", i);
        seeds__write("codebook", name, seed, len + 1);
        /* The same file offered to the next spec: another codec's. */
        seed[0] = (uint8_t)((i + 1) % FUZZ_N_VQ_SPECS);
        snprintf(name, sizeof name, "file-%d-as-%d", i, seed[0]);
        seeds__write("codebook", name, seed, len + 1);
        const char *body;
        size_t body_len;
        seeds__body(file, len, &body, &body_len);
        seed[0] = (uint8_t)(0x80 | i);
        memcpy(seed + 1, body, body_len);
        snprintf(name, sizeof name, "body-%d", i);
        seeds__write("codebook", name, seed, body_len + 1);
        free(seed);
        free(file);
    }
}

/* ---- config ------------------------------------------------------------------ */

static void seeds__config(const char *shipped)
{
    FILE *f = fopen(shipped, "rb");
    FUZZ_CHECK(f != NULL, "%s: %s", shipped, strerror(errno));
    static char text[65536];
    size_t n = fread(text, 1, sizeof text, f);
    fclose(f);
    seeds__write("config", "vqkvd.conf", text, n);

    static const struct {
        const char *name, *text;
    } files[] = {
        {"every-key", "[vqkvd]\nsocket = /run/vqkv/vqkv.sock\npool_bytes = 512M\n"
                      "device = cuda:0\nstate_dir = /var/lib/vqkv\nlog_level = debug\n"
                      "allow_uids = 0, 1000 1001\nallow_gids = 100\nadmin_uids = 0\n"
                      "calibration_tokens = 4096\nmax_clients = 8\nmax_inflight = 32\n"
                      "max_regions = 2\nlease_ms = 1000\n"
                      "[quota]\ndefault = 4G\nuid.1000 = unlimited\nuid.1001 = 64k\n"},
        {"lists-twice", "[vqkvd]\nallow_uids = 1\nallow_uids = 2,3\n; comment\n"
                        "# comment\nadmin_uids =\n"},
        {"bad-value", "[vqkvd]\npool_bytes = 0\n"},
        {"unknown-key", "[vqkvd]\npol_bytes = 1G\n"},
        {"twice", "[quota]\nuid.5 = 1G\nuid.5 = 2G\n"},
        {"no-section", "pool_bytes = 1G\n"},
        {"garbage", "[vqkvd\n=\n  indented = 1\n"},
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        seeds__write("config", files[i].name, files[i].text, strlen(files[i].text));
}

/* ---- block keys ---------------------------------------------------------------- */

static void seeds__block_keys(void)
{
    /* block_keys.h's vector: zero salt, "m", "fp16", tokens {1, 2}. */
    uint8_t seed[128] = {0};
    size_t n = 32;
    seed[n++] = 1;
    seed[n++] = 'm';
    seed[n++] = 4;
    memcpy(seed + n, "fp16", 4);
    n += 4;
    seed[n++] = 0; /* extra */
    seed[n++] = 2; /* block_tokens */
    seed[n++] = 0; /* split */
    seed[n++] = 0; /* slack */
    const uint8_t tokens[] = {1, 0, 0, 0, 2, 0, 0, 0};
    memcpy(seed + n, tokens, sizeof tokens);
    seeds__write("block_keys", "documented-vector", seed, n + sizeof tokens);

    /* Three blocks of 3 with extra bytes, continued at block 2. */
    uint8_t more[128];
    size_t m = 0;
    for (int i = 0; i < 32; i++)
        more[m++] = (uint8_t)(i * 7);
    more[m++] = 5;
    memcpy(more + m, "model", 5);
    m += 5;
    more[m++] = 5;
    memcpy(more + m, "kivi4", 5);
    m += 5;
    more[m++] = 3;
    memcpy(more + m, "img", 3);
    m += 3;
    more[m++] = 3;
    more[m++] = 2;
    more[m++] = 1;
    for (uint32_t t = 0; t < 10; t++) {
        uint32_t tok = 1000 + t * 37;
        memcpy(more + m, &tok, 4);
        m += 4;
    }
    seeds__write("block_keys", "three-blocks-extra", more, m);
}

/* ---- segment files ---------------------------------------------------------------- */

/* A segment of a root block, a tombstone and a child block, written by the
 * real writer in a temporary directory and read back whole into out (its
 * length back; at[] the records' offsets). */
static size_t seeds__segment_file(uint8_t *out, size_t cap, uint64_t at[3])
{
    char dir[4096], path[4200], name[VQKVD_SEGMENT_NAME_BYTES];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/vqkv-seeds-XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp");
    FUZZ_CHECK(mkdtemp(dir) != NULL, "mkdtemp: %s", strerror(errno));
    vqkvd_segment_writer_t w;
    FUZZ_CHECK(vqkvd_segment_create(&w, dir, 1) == VQKV_OK, "segment create: %s",
               strerror(w.sys_errno));
    uint8_t payload[48];
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (uint8_t)(i * 11 + 3);
    for (uint32_t i = 0; i < 3; i++) {
        vqkvd_segment_record_t r = {.seq = i + 1, .tenant = 1000, .model = 0x1234};
        memset(r.key, 0x10 + (int)i, sizeof r.key);
        if (i == 2)
            memset(r.parent, 0x10, sizeof r.parent);
        if (i == 1) {
            r.flags = VQKVD_SEGMENT_TOMBSTONE;
        } else {
            r.payload_bytes = i ? 48 : 16;
            r.logical_bytes = 4 * r.payload_bytes;
            snprintf(r.spec, sizeof r.spec, "%s", i ? "rvq:d=8,b=8,r=2" : "fp16");
            memset(r.codebooks_sha256, i ? 0xab : 0, sizeof r.codebooks_sha256);
        }
        FUZZ_CHECK(vqkvd_segment_append(&w, &r, payload, &at[i]) == VQKV_OK, "segment append");
    }
    size_t len = (size_t)w.end;
    FUZZ_CHECK(len <= cap && vqkvd_segment_close(&w) == VQKV_OK, "segment close");
    vqkvd_segment_name(1, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    FUZZ_CHECK(f != NULL && fread(out, 1, len, f) == len && fclose(f) == 0, "%s: read failed",
               path);
    FUZZ_CHECK(unlink(path) == 0 && rmdir(dir) == 0, "%s: %s", dir, strerror(errno));
    return len;
}

/* Inputs of fuzz_segment.c: a mode byte, then a file. */
static void seeds__segment(void)
{
    uint8_t file[1024], in[1025];
    uint64_t at[3];
    size_t len = seeds__segment_file(file, sizeof file, at);
    const struct {
        const char *name;
        uint8_t mode;  /* fuzz_segment.c's mode bits */
        size_t len;    /* of the file */
        size_t damage; /* a byte whose bit 0 flips, or 0 */
    } seeds[] = {
        {"three-records", 0, len, 0},
        {"three-records-sealed", 0x03, len, 0},
        {"torn-tail", 0, len - 10, 0},
        {"damaged-middle", 0, len, (size_t)at[1] + 20},
        {"stop-after-one", 0x04 | 1 << 4, len, 0},
        {"file-header-only", 0, VQKVD_SEGMENT_FILE_HEADER_BYTES, 0},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        in[0] = seeds[i].mode;
        memcpy(in + 1, file, seeds[i].len);
        if (seeds[i].damage)
            in[1 + seeds[i].damage] ^= 1;
        seeds__write("segment", seeds[i].name, in, 1 + seeds[i].len);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s FUZZ_DIR VQKVD_CONF\n", argv[0]);
        return 2;
    }
    seeds__root = argv[1];
    seeds__session();
    seeds__frame();
    seeds__codebook();
    seeds__config(argv[2]);
    seeds__block_keys();
    seeds__segment();
    return 0;
}
