/* fuzz_util.c -- helpers of the fuzz targets and the seed generator
 * (fuzz.h): fd counting, memfds, the session target's model and records,
 * and deterministic codebooks.
 */
#include "fuzz.h"

#include <dirent.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

const vqkv_layout_t fuzz_layout = {
    .num_layers = 2, .num_kv_heads = 2, .head_dim = 8, .block_tokens = 4, .dtype = VQKV_DTYPE_F16};

const char *const fuzz_codecs[FUZZ_N_CODECS] = {
    "fp16",
    "fp8",
    "kivi2:g=4",
    "kivi4",
    "rvq:d=4,r=2,b=4",
    "rvq:d=8,r=1,b=3,esc=1,bc=1,cs=1",
    "vqkv:dlo=2,dhi=4,dv=4,b=4",
    "vqkv:dlo=2,dhi=2,dv=2,b=2,ph=1,esc=2",
};

const char *const fuzz_vq_specs[FUZZ_N_VQ_SPECS] = {
    "rvq:d=4,r=2,b=4",
    "rvq:d=8,r=1,b=3,esc=1,bc=1,cs=1",
    "rvq:d=2,r=3,b=2,kgroup=contig,ph=1",
    "rvq:d=8,r=2,b=5,esc=8",
    "vqkv:dlo=2,dhi=4,dv=4,b=4",
    "vqkv:dlo=2,dhi=2,dv=2,b=2,ph=1,esc=2",
    "vqkv:dlo=4,dhi=4,dv=8,b=6,cs=1,bc=1",
    "vqkv:dlo=2,dhi=2,dv=1,b=1",
};

int fuzz_fd_count(void)
{
    DIR *d = opendir("/proc/self/fd");
    FUZZ_CHECK(d != NULL, "cannot list /proc/self/fd");
    int n = 0;
    for (struct dirent *e = readdir(d); e != NULL; e = readdir(d))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

int fuzz_memfd(const char *name, const void *data, size_t len)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    FUZZ_CHECK(fd >= 0, "memfd_create failed");
    FUZZ_CHECK(len == 0 || pwrite(fd, data, len, 0) == (ssize_t)len, "memfd write failed");
    return fd;
}

void fuzz_kv_values(uint64_t seed, float *out, size_t n)
{
    uint64_t x = seed * UINT64_C(0x9e3779b97f4a7c15) + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        /* Uniform in [-1, 1), with every fifth channel offset like the
         * outlier channels of real keys. */
        float u = (float)(x >> 40) / (float)(UINT64_C(1) << 23) - 1.0f;
        out[i] = u + (i % 5 == 0 ? 4.0f : 0.0f);
    }
}

int fuzz_codec_needs_books(const char *spec)
{
    vqkv_codec_t *codec = NULL;
    FUZZ_CHECK(vqkv_codec_create(spec, &fuzz_layout, &codec) == VQKV_OK, "spec %s", spec);
    int needs = vqkv_codec_needs_training(codec);
    vqkv_codec_free(codec);
    return needs;
}

int fuzz_codebook_make(const char *spec, const vqkv_layout_t *layout, uint8_t **buf, size_t *len)
{
    enum { TOKENS = 64 };
    vqkv_codec_t *codec = NULL;
    int rc = vqkv_codec_create(spec, layout, &codec);
    if (rc != VQKV_OK)
        return rc;
    size_t n_vectors = (size_t)TOKENS * layout->num_kv_heads;
    float *x = malloc(n_vectors * layout->head_dim * sizeof *x);
    if (x == NULL) {
        vqkv_codec_free(codec);
        return VQKV_ENOMEM;
    }
    vqkv_train_opts_t opts = {.seed = 1, .iterations = 4, .threads = 1};
    for (uint32_t layer = 0; layer < layout->num_layers && rc == VQKV_OK; layer++) {
        for (int kv = 0; kv < 2 && rc == VQKV_OK; kv++) {
            fuzz_kv_values(layer * 2u + (uint32_t)kv, x, n_vectors * layout->head_dim);
            rc = vqkv_codec_train(codec, layer, kv, x, n_vectors, &opts);
        }
    }
    if (rc == VQKV_OK)
        rc = vqkv_codebook_save_buffer(codec, buf, len);
    free(x);
    vqkv_codec_free(codec);
    return rc;
}

void fuzz_record_bytes(uint8_t **buf, size_t *len, int op, const void *data, size_t n)
{
    FUZZ_CHECK(n <= UINT16_MAX, "a record holds at most 65535 bytes, not %zu", n);
    uint8_t *grown = realloc(*buf, *len + 3 + n);
    FUZZ_CHECK(grown != NULL, "out of memory");
    grown[*len] = (uint8_t)op;
    grown[*len + 1] = (uint8_t)n;
    grown[*len + 2] = (uint8_t)(n >> 8);
    if (n > 0)
        memcpy(grown + *len + 3, data, n);
    *buf = grown;
    *len += 3 + n;
}

void fuzz_record_envelope(uint8_t **buf, size_t *len, int op, const Vqkv__Envelope *env)
{
    size_t n = vqkv__envelope__get_packed_size(env);
    uint8_t *packed = malloc(n ? n : 1);
    FUZZ_CHECK(packed != NULL, "out of memory");
    FUZZ_CHECK(vqkv__envelope__pack(env, packed) == n, "packing changed size");
    fuzz_record_bytes(buf, len, op, packed, n);
    free(packed);
}

void fuzz_region_request(Vqkv__RegisterRegion *rr, const vqkv_kv_view_t *view)
{
    *rr = (Vqkv__RegisterRegion)VQKV__REGISTER_REGION__INIT;
    rr->model_handle = 1;
    rr->kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    rr->region_bytes = view->region_bytes;
    rr->offset = view->offset;
    rr->layer_stride = view->layer_stride;
    rr->kv_stride = view->kv_stride;
    rr->slot_stride = view->slot_stride;
    rr->token_stride = view->token_stride;
    rr->head_stride = view->head_stride;
    rr->num_slots = view->num_slots;
    rr->num_fds = 1;
}

void fuzz_prelude(uint8_t **buf, size_t *len, int setup)
{
    const char *codec = fuzz_codecs[(setup >> FUZZ_SETUP_CODEC_SHIFT) % FUZZ_N_CODECS];
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;

    Vqkv__Hello hello = VQKV__HELLO__INIT;
    hello.protocol_version = VQKV_PROTO_VERSION;
    hello.client_name = "fuzz";
    env.request_id = 1;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    fuzz_record_envelope(buf, len, FUZZ_OP_FRAME, &env);

    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = fuzz_layout.num_layers;
    wl.num_kv_heads = fuzz_layout.num_kv_heads;
    wl.head_dim = fuzz_layout.head_dim;
    wl.block_tokens = fuzz_layout.block_tokens;
    wl.dtype = (Vqkv__DType)fuzz_layout.dtype;
    Vqkv__RegisterModel rm = VQKV__REGISTER_MODEL__INIT;
    rm.model_id = "fuzz";
    rm.layout = &wl;
    rm.kv_head_count = fuzz_layout.num_kv_heads;
    rm.codec = (char *)codec;
    int books = (setup & FUZZ_SETUP_CODEBOOK) && fuzz_codec_needs_books(codec);
    rm.num_fds = books ? 1 : 0;
    env.request_id = 2;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_MODEL;
    env.register_model = &rm;
    fuzz_record_envelope(buf, len, books ? FUZZ_OP_FRAME_BOOKS : FUZZ_OP_FRAME, &env);

    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &fuzz_layout, FUZZ_REGION_SLOTS);
    Vqkv__RegisterRegion rr;
    fuzz_region_request(&rr, &view);
    env.request_id = 3;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    fuzz_record_envelope(buf, len, FUZZ_OP_FRAME_REGION, &env);
}
