/* codec.c -- the codec registry and everything codecs have in common: spec
 * strings, layouts, views over worker memory and their bounds checks.
 *
 * Encode and decode walk the block as layers x {K, V} parts and hand each
 * codec one tile at a time, so the bounds check happens once per block here
 * and no codec computes an address from a client-supplied stride itself.
 */
#include "codec_internal.h"
#include "kmeans.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const vqkv__codec_ops_t *const vqkv__codecs[] = {
    &vqkv__fp16_ops, &vqkv__fp8_ops,  &vqkv__kivi2_ops,  &vqkv__kivi4_ops,
    &vqkv__rvq_ops,  &vqkv__vqkv_ops, &vqkv__commvq_ops,
};

const char *vqkv_strerror(int err)
{
    switch (err) {
    case VQKV_OK: return "success";
    case VQKV_EINVAL: return "invalid argument";
    case VQKV_ESPEC: return "codec spec not understood";
    case VQKV_ERANGE: return "block lies outside the registered region";
    case VQKV_ENOMEM: return "out of memory";
    case VQKV_ENOCODEBOOK: return "codec has no codebooks yet (train or load them)";
    case VQKV_EIO: return "file could not be read or written";
    case VQKV_EFORMAT: return "file is malformed, truncated or fails its checksum";
    case VQKV_EMISMATCH: return "layout or codec does not match (a model, region or file)";
    case VQKV_EDEVICE: return "no CUDA device, or a CUDA call failed";
    default: return "unknown error";
    }
}

size_t vqkv_dtype_size(vqkv_dtype_t dtype)
{
    switch (dtype) {
    case VQKV_DTYPE_F16:
    case VQKV_DTYPE_BF16: return 2;
    case VQKV_DTYPE_F32: return 4;
    }
    return 0;
}

int vqkv_layout_check(const vqkv_layout_t *layout)
{
    if (layout == NULL || vqkv_dtype_size(layout->dtype) == 0)
        return VQKV_EINVAL;
    if (layout->num_layers == 0 || layout->num_layers > 1024)
        return VQKV_EINVAL;
    if (layout->num_kv_heads == 0 || layout->num_kv_heads > 1024)
        return VQKV_EINVAL;
    if (layout->head_dim == 0 || layout->head_dim % 2 != 0 || layout->head_dim > VQKV_MAX_HEAD_DIM)
        return VQKV_EINVAL;
    if (layout->block_tokens == 0 || layout->block_tokens > 4096)
        return VQKV_EINVAL;
    return VQKV_OK;
}

static uint64_t vqkv__tensor_bytes(const vqkv_layout_t *layout, uint32_t num_slots)
{
    return (uint64_t)num_slots * layout->block_tokens * layout->num_kv_heads * layout->head_dim *
           vqkv_dtype_size(layout->dtype);
}

static void vqkv__view_inner(vqkv_kv_view_t *view, const vqkv_layout_t *layout, uint32_t num_slots)
{
    size_t esize = vqkv_dtype_size(layout->dtype);
    memset(view, 0, sizeof *view);
    view->num_slots = num_slots;
    view->head_stride = (uint64_t)layout->head_dim * esize;
    view->token_stride = view->head_stride * layout->num_kv_heads;
    view->slot_stride = view->token_stride * layout->block_tokens;
}

void vqkv_kv_view_vllm(vqkv_kv_view_t *view, const vqkv_layout_t *layout, uint32_t num_slots)
{
    vqkv__view_inner(view, layout, num_slots);
    view->kv_stride = vqkv__tensor_bytes(layout, num_slots);
    view->layer_stride = 2 * view->kv_stride;
    view->region_bytes = view->layer_stride * layout->num_layers;
}

void vqkv_kv_view_split(vqkv_kv_view_t *view, const vqkv_layout_t *layout, uint32_t num_slots,
                        uint64_t gap)
{
    vqkv__view_inner(view, layout, num_slots);
    view->kv_stride = vqkv__tensor_bytes(layout, num_slots) + gap;
    view->layer_stride = 2 * view->kv_stride;
    view->region_bytes = view->layer_stride * layout->num_layers;
}

/* *acc += a * b, false on overflow. */
static bool vqkv__mul_add(uint64_t *acc, uint64_t a, uint64_t b)
{
    uint64_t prod;
    return !__builtin_mul_overflow(a, b, &prod) && !__builtin_add_overflow(*acc, prod, acc);
}

int vqkv_kv_view_check(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, uint32_t slot)
{
    if (view == NULL || vqkv_layout_check(layout) != VQKV_OK)
        return VQKV_EINVAL;
    if (slot >= view->num_slots)
        return VQKV_ERANGE;
    /* The last byte the block touches, computed without wrapping: from the
     * layer that starts last. O(layers) with layer_offsets. */
    uint64_t end = view->offset;
    uint64_t row = (uint64_t)layout->head_dim * vqkv_dtype_size(layout->dtype);
    uint64_t last_layer = 0;
    if (view->layer_offsets != NULL) {
        for (uint32_t l = 0; l < layout->num_layers; l++)
            if (view->layer_offsets[l] > last_layer)
                last_layer = view->layer_offsets[l];
    }
    if ((view->layer_offsets != NULL
             ? !vqkv__mul_add(&end, 1, last_layer)
             : !vqkv__mul_add(&end, layout->num_layers - 1, view->layer_stride)) ||
        !vqkv__mul_add(&end, 1, view->kv_stride) || !vqkv__mul_add(&end, slot, view->slot_stride) ||
        !vqkv__mul_add(&end, layout->block_tokens - 1, view->token_stride) ||
        !vqkv__mul_add(&end, layout->num_kv_heads - 1, view->head_stride) ||
        !vqkv__mul_add(&end, 1, row))
        return VQKV_ERANGE;
    return end <= view->region_bytes ? VQKV_OK : VQKV_ERANGE;
}

static int vqkv__u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int vqkv_kv_view_disjoint(const vqkv_layout_t *layout, const vqkv_kv_view_t *view,
                          const char **stride)
{
    typedef struct {
        const char *name;
        uint64_t stride, count;
    } vqkv__dim_t;
    /* With layer_offsets the layers are checked apart, below. */
    vqkv__dim_t dims[5] = {
        {"head_stride", view->head_stride, layout->num_kv_heads},
        {"token_stride", view->token_stride, layout->block_tokens},
        {"slot_stride", view->slot_stride, view->num_slots},
        {"kv_stride", view->kv_stride, 2},
        {"layer_stride", view->layer_stride, view->layer_offsets != NULL ? 1 : layout->num_layers},
    };
    if (stride != NULL)
        *stride = NULL;
    if (vqkv_layout_check(layout) != VQKV_OK)
        return VQKV_EINVAL;
    /* Insertion sort by stride: five entries. */
    for (int i = 1; i < 5; i++)
        for (int j = i; j > 0 && dims[j].stride < dims[j - 1].stride; j--) {
            vqkv__dim_t t = dims[j];
            dims[j] = dims[j - 1];
            dims[j - 1] = t;
        }
    uint64_t span = (uint64_t)layout->head_dim * vqkv_dtype_size(layout->dtype);
    for (int i = 0; i < 5; i++) {
        if (dims[i].count <= 1)
            continue;
        if (dims[i].stride < span) {
            if (stride != NULL)
                *stride = dims[i].name;
            return VQKV_EINVAL;
        }
        uint64_t reach = 0;
        if (!vqkv__mul_add(&reach, dims[i].count - 1, dims[i].stride) ||
            __builtin_add_overflow(reach, span, &span))
            return VQKV_EINVAL;
    }
    if (view->layer_offsets == NULL)
        return VQKV_OK;
    /* Layers placed apart: sorted by start, each must begin at or after
     * the end of the one before. O(layers log layers). */
    uint64_t starts[1024];
    memcpy(starts, view->layer_offsets, layout->num_layers * sizeof *starts);
    qsort(starts, layout->num_layers, sizeof *starts, vqkv__u64_cmp);
    for (uint32_t l = 1; l < layout->num_layers; l++)
        if (starts[l] - starts[l - 1] < span) {
            if (stride != NULL)
                *stride = "layer_offsets";
            return VQKV_EINVAL;
        }
    return VQKV_OK;
}

/* Splits "name:k=v,k=v" into spec. */
static int vqkv__spec_parse(const char *text, vqkv__spec_t *spec)
{
    memset(spec, 0, sizeof *spec);
    size_t name_len = strcspn(text, ":");
    if (name_len == 0 || name_len >= sizeof spec->name)
        return VQKV_ESPEC;
    memcpy(spec->name, text, name_len);
    const char *p = text + name_len;
    if (*p == '\0')
        return VQKV_OK;
    if (*++p == '\0') /* "name:" with nothing after the colon */
        return VQKV_ESPEC;
    while (*p != '\0') {
        if (spec->n == VQKV__MAX_PARAMS)
            return VQKV_ESPEC;
        vqkv__param_t *param = &spec->p[spec->n++];
        size_t key_len = strcspn(p, "=,");
        if (key_len == 0 || key_len >= sizeof param->key || p[key_len] != '=')
            return VQKV_ESPEC;
        memcpy(param->key, p, key_len);
        p += key_len + 1;
        size_t val_len = strcspn(p, ",");
        if (val_len == 0 || val_len >= sizeof param->word)
            return VQKV_ESPEC;
        memcpy(param->word, p, val_len);
        param->is_num = strspn(param->word, "0123456789") == val_len && val_len <= 9;
        if (param->is_num)
            param->num = (uint32_t)strtoul(param->word, NULL, 10);
        p += val_len;
        if (*p == ',' && *++p == '\0')
            return VQKV_ESPEC;
        for (uint32_t i = 0; i + 1 < spec->n; i++)
            if (strcmp(spec->p[i].key, param->key) == 0)
                return VQKV_ESPEC;
    }
    return VQKV_OK;
}

static vqkv__param_t *vqkv__spec_find(vqkv__spec_t *spec, const char *key)
{
    for (uint32_t i = 0; i < spec->n; i++) {
        if (strcmp(spec->p[i].key, key) == 0) {
            spec->p[i].used = true;
            return &spec->p[i];
        }
    }
    return NULL;
}

int vqkv__spec_num(vqkv__spec_t *spec, const char *key, uint32_t dflt, uint32_t lo, uint32_t hi,
                   uint32_t *out)
{
    vqkv__param_t *param = vqkv__spec_find(spec, key);
    *out = dflt;
    if (param == NULL)
        return VQKV_OK;
    if (!param->is_num || param->num < lo || param->num > hi)
        return VQKV_ESPEC;
    *out = param->num;
    return VQKV_OK;
}

int vqkv__spec_word(vqkv__spec_t *spec, const char *key, const char *const *choices, uint32_t dflt,
                    uint32_t *out)
{
    vqkv__param_t *param = vqkv__spec_find(spec, key);
    *out = dflt;
    if (param == NULL)
        return VQKV_OK;
    for (uint32_t i = 0; choices[i] != NULL; i++) {
        if (strcmp(param->word, choices[i]) == 0) {
            *out = i;
            return VQKV_OK;
        }
    }
    return VQKV_ESPEC;
}

int vqkv_codec_create(const char *spec_text, const vqkv_layout_t *layout, vqkv_codec_t **out)
{
    vqkv__spec_t spec;
    vqkv_codec_t *codec = NULL;
    int rc;

    if (out == NULL || spec_text == NULL || vqkv_layout_check(layout) != VQKV_OK)
        return VQKV_EINVAL;
    *out = NULL;
    rc = vqkv__spec_parse(spec_text, &spec);
    if (rc != VQKV_OK)
        return rc;

    const vqkv__codec_ops_t *ops = NULL;
    for (size_t i = 0; i < sizeof vqkv__codecs / sizeof vqkv__codecs[0]; i++)
        if (strcmp(vqkv__codecs[i]->name, spec.name) == 0)
            ops = vqkv__codecs[i];
    if (ops == NULL)
        return VQKV_ESPEC;

    codec = calloc(1, sizeof *codec);
    if (codec == NULL)
        return VQKV_ENOMEM;
    codec->ops = ops;
    codec->layout = *layout;
    rc = ops->init(codec, &spec);
    if (rc != VQKV_OK)
        goto fail;
    for (uint32_t i = 0; i < spec.n; i++) {
        if (!spec.p[i].used) {
            rc = VQKV_ESPEC;
            goto fail;
        }
    }
    codec->block_bytes = (codec->part_bytes[0] + codec->part_bytes[1]) * layout->num_layers;
    *out = codec;
    return VQKV_OK;

fail:
    vqkv_codec_free(codec);
    return rc;
}

void vqkv_codec_free(vqkv_codec_t *codec)
{
    if (codec == NULL)
        return;
    if (codec->state != NULL && codec->ops->free_state != NULL)
        codec->ops->free_state(codec->state);
    free(codec);
}

const char *vqkv_codec_spec(const vqkv_codec_t *codec)
{
    return codec->spec;
}

const vqkv_layout_t *vqkv_codec_layout(const vqkv_codec_t *codec)
{
    return &codec->layout;
}

size_t vqkv_codec_block_bytes(const vqkv_codec_t *codec)
{
    return codec->block_bytes;
}

double vqkv_codec_bits_per_value(const vqkv_codec_t *codec)
{
    const vqkv_layout_t *l = &codec->layout;
    double values = 2.0 * l->num_layers * l->num_kv_heads * l->head_dim * l->block_tokens;
    return (double)codec->block_bytes * 8.0 / values;
}

int vqkv_codec_needs_training(const vqkv_codec_t *codec)
{
    return codec->ops->needs_training != NULL && codec->ops->needs_training(codec);
}

int vqkv_rope_check(const vqkv_rope_t *rope)
{
    /* The upper bound keeps theta^(-2i/D) a normal double. */
    if (rope == NULL || !(rope->theta > 1.0 && rope->theta <= 1e30))
        return VQKV_EINVAL;
    return rope->style == VQKV_ROPE_NEOX || rope->style == VQKV_ROPE_INTERLEAVED ? VQKV_OK
                                                                                 : VQKV_EINVAL;
}

/* Copies the keys x[n_vectors / heads][heads][head_dim] into out, each
 * block of block_tokens tokens turned by RoPE through one offset in [0,
 * opts->rope_positions) drawn from the seed and layer: a block moves as a
 * whole, so the relative positions inside it, which block centering (bc=1)
 * sees, stay as they were. O(n_vectors * head_dim), one sin/cos per pair
 * and block. */
static void vqkv__rope_turn(const vqkv_codec_t *codec, uint32_t layer, const float *x,
                            size_t n_vectors, const vqkv_train_opts_t *opts, float *out)
{
    const vqkv_layout_t *l = &codec->layout;
    uint32_t D = l->head_dim, half = D / 2;
    size_t block_vectors = (size_t)l->block_tokens * l->num_kv_heads;
    for (size_t first = 0; first < n_vectors; first += block_vectors) {
        uint64_t draw = vqkv__mix64(opts->seed ^ vqkv__mix64(((uint64_t)layer << 40) ^ first));
        double offset = (double)(draw % opts->rope_positions);
        size_t end = first + block_vectors < n_vectors ? first + block_vectors : n_vectors;
        for (uint32_t i = 0; i < half; i++) {
            double angle = offset * pow(opts->rope.theta, -2.0 * i / D);
            double c = cos(angle), s = sin(angle);
            uint32_t a, b;
            vqkv__rope_pair(opts->rope.style, D, i, &a, &b);
            for (size_t v = first; v < end; v++) {
                const float *k = x + v * D;
                out[v * D + a] = (float)(k[a] * c - k[b] * s);
                out[v * D + b] = (float)(k[b] * c + k[a] * s);
            }
        }
    }
}

int vqkv_codec_train(vqkv_codec_t *codec, uint32_t layer, int kv, const float *x, size_t n_vectors,
                     const vqkv_train_opts_t *opts)
{
    static const vqkv_train_opts_t defaults = {0};
    if (codec == NULL || layer >= codec->layout.num_layers || (kv != 0 && kv != 1))
        return VQKV_EINVAL;
    if (opts == NULL)
        opts = &defaults;
    if (opts->rope_positions > 0 && vqkv_rope_check(&opts->rope) != VQKV_OK)
        return VQKV_EINVAL;
    if (codec->ops->train == NULL)
        return VQKV_OK;
    if (x == NULL || n_vectors == 0)
        return VQKV_EINVAL;
    if (kv != 0 || opts->rope_positions == 0)
        return codec->ops->train(codec, layer, kv, x, n_vectors, opts);
    float *turned = malloc(n_vectors * codec->layout.head_dim * sizeof *turned);
    if (turned == NULL)
        return VQKV_ENOMEM;
    vqkv__rope_turn(codec, layer, x, n_vectors, opts, turned);
    int rc = codec->ops->train(codec, layer, kv, turned, n_vectors, opts);
    free(turned);
    return rc;
}

/* The tile of (layer, kv) of a checked slot. */
static vqkv__tile_t vqkv__tile_at(const vqkv_codec_t *codec, const void *base,
                                  const vqkv_kv_view_t *view, uint32_t slot, uint32_t layer, int kv)
{
    vqkv__tile_t tile;
    tile.base = (uint8_t *)base + view->offset + vqkv_kv_view_layer(view, layer) +
                (uint64_t)kv * view->kv_stride + slot * view->slot_stride;
    tile.token_stride = view->token_stride;
    tile.head_stride = view->head_stride;
    tile.dtype = codec->layout.dtype;
    return tile;
}

static int vqkv__codec_check(const vqkv_codec_t *codec, const void *base, const void *block,
                             const vqkv_kv_view_t *view, uint32_t slot)
{
    if (codec == NULL || base == NULL || block == NULL || view == NULL)
        return VQKV_EINVAL;
    if (vqkv_codec_needs_training(codec))
        return VQKV_ENOCODEBOOK;
    return vqkv_kv_view_check(&codec->layout, view, slot);
}

/* A batch's arguments, every block's slot among them, checked before any
 * block is touched. */
static int vqkv__batch_check(const vqkv_codec_t *codec, const void *base,
                             const uint8_t *const *blocks, const vqkv_kv_view_t *view,
                             const uint32_t *slots, size_t n, uint32_t first_layer,
                             uint32_t end_layer)
{
    if (codec == NULL || (n > 0 && (blocks == NULL || slots == NULL)) || first_layer > end_layer ||
        end_layer > codec->layout.num_layers)
        return VQKV_EINVAL;
    for (size_t i = 0; i < n; i++) {
        int rc = vqkv__codec_check(codec, base, blocks[i], view, slots[i]);
        if (rc != VQKV_OK)
            return rc;
    }
    return VQKV_OK;
}

int vqkv_codec_encode(const vqkv_codec_t *codec, const void *base, const vqkv_kv_view_t *view,
                      uint32_t slot, uint8_t *out)
{
    return vqkv_codec_encode_batch(codec, base, view, &slot, &out, 1, 0,
                                   codec != NULL ? codec->layout.num_layers : 0);
}

int vqkv_codec_encode_batch(const vqkv_codec_t *codec, const void *base, const vqkv_kv_view_t *view,
                            const uint32_t *slots, uint8_t *const *out, size_t n,
                            uint32_t first_layer, uint32_t end_layer)
{
    int rc = vqkv__batch_check(codec, base, (const uint8_t *const *)out, view, slots, n,
                               first_layer, end_layer);
    if (rc != VQKV_OK)
        return rc;
    /* Layer-major, as decode: a VQ codec's codebooks for one (layer, kv)
     * (544 KB for rvq on a Llama-8B layer) stay in L2 over all the blocks,
     * where block by block the 35 MB of a block's codebooks come from
     * memory again for every block (bench/RESULTS.md). */
    size_t layer_bytes = codec->part_bytes[0] + codec->part_bytes[1];
    for (uint32_t layer = first_layer; layer < end_layer; layer++)
        for (int kv = 0; kv < 2; kv++)
            for (size_t i = 0; i < n; i++) {
                vqkv__tile_t tile = vqkv__tile_at(codec, base, view, slots[i], layer, kv);
                codec->ops->encode_part(codec, layer, kv, &tile,
                                        out[i] + layer * layer_bytes +
                                            (kv ? codec->part_bytes[0] : 0));
            }
    return VQKV_OK;
}

int vqkv_codec_decode(const vqkv_codec_t *codec, const uint8_t *in, void *base,
                      const vqkv_kv_view_t *view, uint32_t slot)
{
    return vqkv_codec_decode_batch(codec, &in, base, view, &slot, 1, 0,
                                   codec != NULL ? codec->layout.num_layers : 0);
}

int vqkv_codec_decode_batch(const vqkv_codec_t *codec, const uint8_t *const *in, void *base,
                            const vqkv_kv_view_t *view, const uint32_t *slots, size_t n,
                            uint32_t first_layer, uint32_t end_layer)
{
    int rc = vqkv__batch_check(codec, base, in, view, slots, n, first_layer, end_layer);
    if (rc != VQKV_OK)
        return rc;
    /* Part-major, as encode: a part's codebooks (256 KiB for rvq's keys on
     * a Llama-8B layer) stay in cache over all the blocks, and block i
     * fetches the i-th n-th of the next part's codebooks as it decodes
     * (vqkv__ahead_t), where the batch reads most of their lines. On a
     * Zen 3 core (512 KiB of L2) the two took rvq's decode of 4 Llama-8B
     * blocks from 1.1-1.4 GB/s to 1.4-2.3 (codec_cpu --shape llama3-8b,
     * builds alternated; bench/RESULTS.md). */
    size_t layer_bytes = codec->part_bytes[0] + codec->part_bytes[1];
    for (uint32_t layer = first_layer; layer < end_layer; layer++)
        for (int kv = 0; kv < 2; kv++) {
            bool last = kv == 1 && layer + 1 == end_layer;
            vqkv__ahead_t ahead = {kv ? layer + 1 : layer, !kv, 0, (uint32_t)n};
            for (size_t i = 0; i < n; i++, ahead.share++) {
                vqkv__tile_t tile = vqkv__tile_at(codec, base, view, slots[i], layer, kv);
                codec->ops->decode_part(
                    codec, layer, kv, in[i] + layer * layer_bytes + (kv ? codec->part_bytes[0] : 0),
                    &tile, last ? NULL : &ahead);
            }
        }
    return VQKV_OK;
}

void vqkv_dtype_to_f32(vqkv_dtype_t dtype, const void *src, size_t n, float *dst)
{
    if (vqkv__rows_to_f32(dtype, src, n, dst))
        return;
    const uint8_t *p = src;
    uint16_t u16;
    switch (dtype) {
    case VQKV_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&u16, p + 2 * i, 2);
            dst[i] = vqkv_f16_to_f32(u16);
        }
        break;
    case VQKV_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&u16, p + 2 * i, 2);
            dst[i] = vqkv_bf16_to_f32(u16);
        }
        break;
    case VQKV_DTYPE_F32: memcpy(dst, p, n * 4); break;
    }
}

void vqkv_dtype_from_f32(vqkv_dtype_t dtype, const float *src, size_t n, void *dst)
{
    if (vqkv__rows_from_f32(dtype, src, n, dst))
        return;
    uint8_t *p = dst;
    uint16_t u16;
    switch (dtype) {
    case VQKV_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            u16 = vqkv_f32_to_f16(src[i]);
            memcpy(p + 2 * i, &u16, 2);
        }
        break;
    case VQKV_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            u16 = vqkv_f32_to_bf16(src[i]);
            memcpy(p + 2 * i, &u16, 2);
        }
        break;
    case VQKV_DTYPE_F32: memcpy(p, src, n * 4); break;
    }
}

void vqkv__tile_load(const vqkv__tile_t *tile, uint32_t t, uint32_t h, uint32_t n, float *out)
{
    vqkv_dtype_to_f32(tile->dtype, tile->base + t * tile->token_stride + h * tile->head_stride, n,
                      out);
}

void vqkv__tile_store(const vqkv__tile_t *tile, uint32_t t, uint32_t h, uint32_t n, const float *in)
{
    vqkv_dtype_from_f32(tile->dtype, in, n,
                        tile->base + t * tile->token_stride + h * tile->head_stride);
}
