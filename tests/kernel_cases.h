/* kernel_cases.h -- what the emulated and the real GPU kernel tests share:
 * the codecs, options, dtypes and shapes they cover, codebooks trained once
 * per case, worker regions in the vLLM and the split K/V layout filled
 * with synthetic KV, and requests whose slots include the region's last.
 * Each test binary includes it once.
 */
#ifndef VQKV_KERNEL_CASES_H
#define VQKV_KERNEL_CASES_H

#include "cuda/kplan.h"
#include "test_util.h"

#define PROFILE 42u

typedef struct {
    const char *spec;
    vqkv_layout_t layout;
} kcase_t;

/* T=16, H=2, D=64, 2 layers: the shapes codec tests use; then an odd one
 * (D=10, H=3, T=3) whose KIVI-2 key rows and 3- and 5-bit VQ vectors do
 * not end on a byte. */
#define MAIN_LAYOUT                                                                                \
    {                                                                                              \
        2, 2, 64, 16, VQKV_DTYPE_F16                                                               \
    }
/* Heads wider than the key ranges a KIVI decode converts at once (1024
 * floats): its heads go in tiles, the last one short. */
#define WIDE_LAYOUT                                                                                \
    {                                                                                              \
        1, 3, 512, 2, VQKV_DTYPE_F16                                                               \
    }
/* head_dim 128: sixteen 8-channel groups, so the decode's eight-group
 * steps (strided keys, contiguous values) take more than one. */
#define D128_LAYOUT                                                                                \
    {                                                                                              \
        1, 2, 128, 4, VQKV_DTYPE_F16                                                               \
    }
#define ODD_LAYOUT                                                                                 \
    {                                                                                              \
        2, 3, 10, 3, VQKV_DTYPE_F16                                                                \
    }

static const kcase_t kcases[] = {
    {"fp16", MAIN_LAYOUT},
    {"fp8", MAIN_LAYOUT},
    {"kivi2", MAIN_LAYOUT},
    {"kivi4", MAIN_LAYOUT},
    {"kivi2:g=16", MAIN_LAYOUT},
    {"rvq", MAIN_LAYOUT},
    {"rvq:kgroup=contig", MAIN_LAYOUT},
    {"rvq:esc=2", MAIN_LAYOUT},
    {"rvq:d=4,b=6,r=3,bc=1", MAIN_LAYOUT},
    {"rvq:b=6,ph=1", MAIN_LAYOUT},
    {"rvq:r=1,ph=1", MAIN_LAYOUT},
    {"rvq:cs=1,bc=1,esc=3", MAIN_LAYOUT},
    {"rvq:d=16,b=5,r=1", MAIN_LAYOUT},
    {"rvq:r=3,dv=16,rv=2", MAIN_LAYOUT},
    {"vqkv", MAIN_LAYOUT},
    {"vqkv:bc=1,esc=1,cs=1", MAIN_LAYOUT},
    {"commvq", MAIN_LAYOUT},
    {"commvq:b=6,rope=inter,esc=1", MAIN_LAYOUT},
    {"rvq", D128_LAYOUT},
    {"rvq:cs=1,bc=1", D128_LAYOUT},
    {"kivi4", WIDE_LAYOUT},
    {"kivi2:g=16", WIDE_LAYOUT},
    {"fp16", ODD_LAYOUT},
    {"fp8", ODD_LAYOUT},
    {"kivi2", ODD_LAYOUT},
    {"kivi4:g=5", ODD_LAYOUT},
    {"rvq:d=5,b=3,r=1,esc=1", ODD_LAYOUT},
    {"rvq:d=2,b=5,r=2,bc=1", ODD_LAYOUT},
    {"rvq:d=2,b=3,r=3,dv=5,rv=1", ODD_LAYOUT},
};
#define NUM_KCASES (sizeof kcases / sizeof kcases[0])

static const vqkv_dtype_t dtypes[] = {VQKV_DTYPE_F16, VQKV_DTYPE_BF16, VQKV_DTYPE_F32};

/* Codebooks trained once per case on f16 layout, loaded for every dtype. */
static uint8_t *books_file[NUM_KCASES];
static size_t books_file_len[NUM_KCASES];

static int train_cases(void **state)
{
    (void)state;
    vqkv_train_opts_t opts = {.seed = 3, .iterations = 3, .threads = 2};
    for (size_t i = 0; i < NUM_KCASES; i++) {
        vqkv_codec_t *codec = NULL;
        int rc = vqkv_codec_create(kcases[i].spec, &kcases[i].layout, &codec);
        if (rc == VQKV_OK && vqkv_codec_needs_training(codec)) {
            rc = test_train_all(codec, PROFILE, 1026, &opts);
            if (rc == VQKV_OK)
                rc = vqkv_codebook_save_buffer(codec, &books_file[i], &books_file_len[i]);
        }
        vqkv_codec_free(codec);
        if (rc != VQKV_OK) {
            fprintf(stderr, "training %s: %s\n", kcases[i].spec, vqkv_strerror(rc));
            return -1;
        }
    }
    return 0;
}

static int free_cases(void **state)
{
    (void)state;
    for (size_t i = 0; i < NUM_KCASES; i++)
        free(books_file[i]);
    return 0;
}

static vqkv_codec_t *case_codec(size_t ci, vqkv_dtype_t dtype)
{
    vqkv_layout_t l = kcases[ci].layout;
    l.dtype = dtype;
    vqkv_codec_t *codec = NULL;
    assert_ok(vqkv_codec_create(kcases[ci].spec, &l, &codec));
    if (books_file[ci] != NULL)
        assert_ok(vqkv_codebook_load_buffer(codec, books_file[ci], books_file_len[ci]));
    return codec;
}

/* A worker region of num_slots slots in the vLLM or the split layout
 * (with an odd gap), starting `offset` bytes in, ending exactly at the last
 * slot's last byte, every slot filled with synthetic KV. */
typedef struct {
    vqkv_kv_view_t view;
    uint8_t *mem;
} region_t;

static void region_make(region_t *r, const vqkv_layout_t *l, uint32_t num_slots, int split)
{
    if (split)
        vqkv_kv_view_split(&r->view, l, num_slots, 40);
    else
        vqkv_kv_view_vllm(&r->view, l, num_slots);
    r->view.offset = 24;
    r->view.region_bytes += 24;
    if (split) /* the last tensor's gap is not part of the region */
        r->view.region_bytes -= 40;
    r->mem = malloc(r->view.region_bytes);
    assert_non_null(r->mem);
    memset(r->mem, 0x5c, r->view.region_bytes);
    float *values = malloc(test_block_values(l) * sizeof *values);
    assert_non_null(values);
    for (uint32_t s = 0; s < num_slots; s++) {
        test_synth_block(l, PROFILE, 1000 + s, values);
        /* A planted outlier vector in some slots, for the escapes. */
        if (s % 3 == 1)
            for (uint32_t d = 0; d < l->head_dim; d++)
                values[test_block_index(l, 0, 0, 1, 0, d)] = 40.0f - (float)d;
        test_write_block(l, &r->view, r->mem, s, values);
    }
    free(values);
}

static uint8_t *region_copy(const region_t *r, uint8_t fill)
{
    uint8_t *m = malloc(r->view.region_bytes);
    assert_non_null(m);
    memset(m, fill, r->view.region_bytes);
    return m;
}

/* Blocks of a request: slots spread over the region, the last slot among
 * them; block i at store offset i * block_bytes + 8 in a store with 8 spare
 * bytes at each end. */
typedef struct {
    uint32_t *slots;
    uint64_t *store_at;
    uint32_t n;
    uint64_t store_bytes;
} request_t;

static void request_make(request_t *q, uint32_t n, uint32_t num_slots, uint64_t block_bytes)
{
    q->n = n;
    q->slots = malloc(n * sizeof *q->slots);
    q->store_at = malloc(n * sizeof *q->store_at);
    assert_non_null(q->slots);
    assert_non_null(q->store_at);
    for (uint32_t i = 0; i < n; i++) {
        q->slots[i] = (uint32_t)(((uint64_t)i * 7 + num_slots - 1) % num_slots);
        q->store_at[i] = 8 + (uint64_t)i * block_bytes;
    }
    q->store_bytes = 16 + (uint64_t)n * block_bytes;
}

static void request_free(request_t *q)
{
    free(q->slots);
    free(q->store_at);
}

static size_t kcase_named(const char *spec)
{
    for (size_t i = 0; i < NUM_KCASES; i++)
        if (strcmp(kcases[i].spec, spec) == 0)
            return i;
    fail_msg("no case %s", spec);
    return 0;
}

#endif
