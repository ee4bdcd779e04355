/* codec_vq.c -- the vector-quantization codecs, rvq, vqkv and commvq, as one
 * engine.
 *
 * Both quantize each token-head vector as one or two "branches": a branch
 * is an ordered subset of the head's channels with its own fp16 RMS norm,
 * cut into groups of d consecutive (in branch order) channels, each group
 * coded by r residual stages of 2^b-entry codebooks. Codebooks are per
 * (layer, K|V, branch, group, stage), shared by all kv heads unless ph=1.
 *   rvq:  one branch per side; key channels strided (group g holds channels
 *         g, g+G, g+2G, ... so every group mixes RoPE frequencies and holds
 *         whole rotate-half pairs) or contiguous; values contiguous,
 *         with a d and r of their own (dv, rv) where bits are better spent
 *         on keys.
 *   vqkv: keys in two branches, the high-frequency RoPE pairs (index <
 *         head_dim/4) and the low-frequency ones, each pair's two channels
 *         kept adjacent; product VQ (r = 1) with sub-vectors dhi and dlo;
 *         values one contiguous branch of sub-vectors dv.
 *   commvq: keys in one branch of whole RoPE pairs, (re, im) adjacent,
 *         coded by r stages of RoPE-commutative codebooks (commute.h)
 *         trained by EM; values one contiguous branch as rvq's.
 *
 * Encoding is a nearest-codeword search per group and stage, O(2^b * d) per
 * group: the cost of the codec, paid on put. Decoding is table lookups and
 * adds. Training runs one k-means per stage of each (branch, group) chain,
 * then refines the chain jointly (kmeans.h), the chains spread over worker
 * threads; each chain has its own derived seed, so results do
 * not depend on the thread count.
 */
#include "bitpack.h"
#include "codec_internal.h"
#include "commute.h"
#include "kmeans.h"
#include "numeric_x86.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define VQKV__MAX_BITS 12
#define VQKV__MAX_STAGES 8
#define VQKV__MAX_ESCAPES 8
/* An escape: u32 vector index (all ones: unused), f16 scale, e4m3[D]. */
#define VQKV__ESCAPE_BYTES(D) (4u + 2u + (D))

/* A branch's codebooks are free codewords, or (commute) commutative tables
 * of 2^(b/2) rows from which the codewords are expanded. */
typedef struct {
    uint32_t n_channels;
    uint32_t d;
    uint32_t stages;
    uint32_t groups;
    bool commute;
    uint32_t first_code; /* index of this branch's first code in a vector */
    size_t first_word;   /* codewords of its side before this branch's */
    size_t first_float;  /* codebook parameter floats of its side before this branch's */
    size_t first_wfloat; /* codeword floats of its side before this branch's */
    size_t first_xfloat; /* expanded commutative codeword floats likewise */
    uint16_t chan[VQKV_MAX_HEAD_DIM];
} vqkv__branch_t;

typedef struct {
    uint32_t n_branches;
    vqkv__branch_t br[2];
    uint32_t codes; /* codes per token-head vector */
    /* Where each channel's value is among a vector's group sums laid out
     * in code order (branch by branch, group by group): the permutation a
     * decode applies; in_order where it is the identity. */
    int32_t order[VQKV_MAX_HEAD_DIM];
    bool in_order;
    /* One branch of d = 8 whose group g holds channels g, g + G, g + 2G, ...
     * (rvq's strided keys) with G a multiple of 8: decoded eight groups at a
     * time and transposed in registers (vqkv__vq_decode_bytes8_x86). */
    bool strided8;
    /* One branch of d = 8 in channel order (values' contiguous groups),
     * with a multiple of 8 groups: decoded by the same loop, each group's
     * register stored where it is. */
    bool contig8;
    /* One branch of d = 4 in channel order with D a multiple of 64: the
     * same loop, two groups a register. */
    bool contig4;
    /* Channel p and p + D/2 (a rotate-half RoPE pair) adjacent in code
     * order, pair by pair (vqkv's keys): channel p is sum 2p, channel
     * p + D/2 sum 2p + 1, with D a multiple of 16: decoded as a
     * de-interleave of two registers of sums instead of a gather. */
    bool pairs;
    size_t words;   /* codewords per layer */
    size_t floats;  /* codebook parameter floats per layer (what files hold) */
    size_t wfloats; /* codeword floats per layer */
    size_t xfloats; /* codeword floats of commute branches per layer */
} vqkv__side_t;

/* Codebook floats are laid out [layer][set][K then V][branch][group]
 * [stage][2^b][d] (a set per kv head with ph=1, else one), followed by the channel statistics
 * [layer][K then V][head] {mean[head_dim], scale[head_dim]}. `search` holds each codebook's search
 * form (kmeans.h), (d + 1) floats per codeword in codebook order, so a codebook's search form
 * starts at its word offset plus its codeword float offset. `expanded` holds the codewords of
 * commute branches, expanded from their tables, [layer][set][K then V][branch][group][stage]
 * [2^b][d] over those branches only; free codewords are read from `books` itself. */
typedef struct {
    uint32_t bits;
    bool channel_scale; /* divide by the channel's std as well as centering */
    uint32_t sets;      /* codebook sets per layer: 1, or one per kv head */
    bool block_center;  /* keys carry their per-block channel means */
    uint32_t escapes;   /* outlier vectors per part kept in fp8 */
    vqkv__side_t side[2];
    float *books;
    float *search;
    float *expanded;
    uint8_t *trained; /* [layers][2] */
} vqkv__vq_t;

/* One codebook: its parameters (what training writes and files hold), its
 * codewords (the same floats unless the branch commutes) and search form. */
typedef struct {
    float *params;
    float *words;
    float *search;
} vqkv__book_t;

/* Parameter floats of one codebook of br: 2^b codewords, or a commutative
 * table of 2^(b/2) rows. */
static size_t vqkv__book_params(const vqkv__vq_t *vq, const vqkv__branch_t *br)
{
    return ((size_t)1 << (br->commute ? vq->bits / 2 : vq->bits)) * br->d;
}

static void vqkv__branch_add(vqkv__vq_t *vq, int kv, const uint16_t *chan, uint32_t n, uint32_t d,
                             uint32_t r, bool commute)
{
    vqkv__side_t *side = &vq->side[kv];
    vqkv__branch_t *br = &side->br[side->n_branches++];
    br->n_channels = n;
    br->d = d;
    br->stages = r;
    br->groups = n / d;
    br->commute = commute;
    br->first_code = side->codes;
    br->first_word = side->words;
    br->first_float = side->floats;
    br->first_wfloat = side->wfloats;
    br->first_xfloat = side->xfloats;
    memcpy(br->chan, chan, n * sizeof *chan);
    size_t books = (size_t)br->groups * r, words = books << vq->bits;
    side->codes += br->groups * r;
    side->words += words;
    side->floats += books * vqkv__book_params(vq, br);
    side->wfloats += words * d;
    side->xfloats += commute ? words * d : 0;
}

static vqkv__book_t vqkv__book(const vqkv__vq_t *vq, uint32_t layer, int kv,
                               const vqkv__branch_t *br, uint32_t g, uint32_t s)
{
    const vqkv__side_t *k = &vq->side[0], *v = &vq->side[1];
    size_t book_index = (size_t)g * br->stages + s, index = book_index << vq->bits;
    size_t word = layer * (k->words + v->words) + (kv ? k->words : 0) + br->first_word + index;
    size_t wflt = layer * (k->wfloats + v->wfloats) + (kv ? k->wfloats : 0) + br->first_wfloat +
                  index * br->d;
    size_t flt = layer * (k->floats + v->floats) + (kv ? k->floats : 0) + br->first_float +
                 book_index * vqkv__book_params(vq, br);
    vqkv__book_t book = {vq->books + flt, vq->books + flt, vq->search + word + wflt};
    if (br->commute)
        book.words = vq->expanded + layer * (k->xfloats + v->xfloats) + (kv ? k->xfloats : 0) +
                     br->first_xfloat + index * br->d;
    return book;
}

/* Makes a codebook usable once its parameters are in place: expands a
 * commutative table into codewords, then builds the search form. */
static void vqkv__book_ready(const vqkv__vq_t *vq, const vqkv__branch_t *br, vqkv__book_t book)
{
    if (br->commute)
        vqkv__commute_expand(book.params, br->d, vq->bits / 2, book.words);
    vqkv__search_prepare_nearest(book.words, br->d, 1u << vq->bits, book.search);
}

/* Codebooks are addressed by "set layer" layer * sets + set. */
static uint32_t vqkv__set_layer(const vqkv__vq_t *vq, uint32_t layer, uint32_t head)
{
    return layer * vq->sets + (vq->sets > 1 ? head : 0);
}

static size_t vqkv__vq_book_floats(const vqkv_codec_t *codec)
{
    const vqkv__vq_t *vq = codec->state;
    return (size_t)codec->layout.num_layers * vq->sets * (vq->side[0].floats + vq->side[1].floats);
}

static size_t vqkv__vq_total_floats(const vqkv_codec_t *codec)
{
    const vqkv_layout_t *l = &codec->layout;
    return vqkv__vq_book_floats(codec) +
           (size_t)l->num_layers * 2 * l->num_kv_heads * 2 * l->head_dim;
}

/* mean[head_dim] of (layer, kv, head); scale[head_dim] follows it. */
static float *vqkv__channel_stats(const vqkv_codec_t *codec, uint32_t layer, int kv, uint32_t head)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv_layout_t *l = &codec->layout;
    size_t index = ((size_t)layer * 2 + (size_t)kv) * l->num_kv_heads + head;
    return vq->books + vqkv__vq_book_floats(codec) + index * 2 * l->head_dim;
}

static void vqkv__vq_free(void *state)
{
    vqkv__vq_t *vq = state;
    free(vq->books);
    free(vq->search);
    free(vq->expanded);
    free(vq->trained);
    free(vq);
}

/* Bytes of the per-block channel means that start a part: f16
 * [heads][head_dim] for keys with bc=1, none otherwise. */
static size_t vqkv__block_mean_bytes(const vqkv_codec_t *codec, int kv)
{
    const vqkv__vq_t *vq = codec->state;
    return vq->block_center && kv == 0
               ? (size_t)2 * codec->layout.num_kv_heads * codec->layout.head_dim
               : 0;
}

/* Sizes the parts and allocates the codebooks once the branches exist. */
static int vqkv__vq_finish(vqkv_codec_t *codec)
{
    vqkv__vq_t *vq = codec->state;
    const vqkv_layout_t *l = &codec->layout;
    size_t vectors = (size_t)l->block_tokens * l->num_kv_heads;
    for (int kv = 0; kv < 2; kv++) {
        vqkv__side_t *side = &vq->side[kv];
        uint32_t G = l->head_dim / 8;
        for (uint32_t bi = 0, at = 0; bi < side->n_branches; at += side->br[bi++].n_channels)
            for (uint32_t i = 0; i < side->br[bi].n_channels; i++)
                side->order[side->br[bi].chan[i]] = (int32_t)(at + i);
        side->in_order = true;
        side->strided8 = side->n_branches == 1 && side->br[0].d == 8 && G % 8 == 0;
        side->pairs = l->head_dim % 16 == 0;
        uint32_t half = l->head_dim / 2;
        for (uint32_t c = 0; c < l->head_dim; c++) {
            side->in_order = side->in_order && side->order[c] == (int32_t)c;
            /* channel c = j * G + g is value j of group g: code order g * 8 + j */
            side->strided8 = side->strided8 && side->order[c] == (int32_t)(c % G * 8 + c / G);
            side->pairs = side->pairs && side->order[c] == (int32_t)(c % half * 2 + c / half);
        }
        side->contig8 = side->n_branches == 1 && side->br[0].d == 8 && G % 8 == 0 && side->in_order;
        side->contig4 = side->n_branches == 1 && side->br[0].d == 4 && G % 8 == 0 && side->in_order;
        codec->part_bytes[kv] = vqkv__block_mean_bytes(codec, kv) + vectors * side->n_branches * 2 +
                                vqkv__bits_bytes(vectors * side->codes, vq->bits) +
                                (size_t)vq->escapes * VQKV__ESCAPE_BYTES(l->head_dim);
    }
    size_t set_layers = (size_t)l->num_layers * vq->sets;
    size_t words = set_layers * (vq->side[0].words + vq->side[1].words);
    size_t wfloats = set_layers * (vq->side[0].wfloats + vq->side[1].wfloats);
    size_t xfloats = set_layers * (vq->side[0].xfloats + vq->side[1].xfloats);
    vq->books = calloc(vqkv__vq_total_floats(codec), sizeof(float));
    vq->search = calloc(words + wfloats, sizeof(float));
    vq->expanded = calloc(xfloats > 0 ? xfloats : 1, sizeof(float));
    vq->trained = calloc((size_t)l->num_layers * 2, 1);
    if (vq->books == NULL || vq->search == NULL || vq->expanded == NULL || vq->trained == NULL)
        return VQKV_ENOMEM;
    return VQKV_OK;
}

/* Parses what rvq and vqkv share, b, cs, ph, bc and esc, and allocates the
 * state. Writes "b=..,cs=..,ph=..,bc=..,esc=.." for the canonical spec into
 * tail. */
static int vqkv__vq_alloc(vqkv_codec_t *codec, vqkv__spec_t *spec, char *tail, size_t tail_len)
{
    uint32_t b, cs, ph, bc, esc;
    int rc;
    if ((rc = vqkv__spec_num(spec, "b", 8, 1, VQKV__MAX_BITS, &b)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "cs", 0, 0, 1, &cs)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "ph", 0, 0, 1, &ph)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "bc", 0, 0, 1, &bc)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "esc", 0, 0, VQKV__MAX_ESCAPES, &esc)) != VQKV_OK)
        return rc;
    vqkv__vq_t *vq = calloc(1, sizeof *vq);
    if (vq == NULL)
        return VQKV_ENOMEM;
    vq->bits = b;
    vq->channel_scale = cs != 0;
    vq->sets = ph ? codec->layout.num_kv_heads : 1;
    vq->block_center = bc != 0;
    vq->escapes = esc;
    codec->state = vq;
    snprintf(tail, tail_len, "b=%u,cs=%u,ph=%u,bc=%u,esc=%u", b, cs, ph, bc, esc);
    return VQKV_OK;
}

static int vqkv__rvq_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    static const char *const kgroups[] = {"strided", "contig", NULL};
    uint32_t D = codec->layout.head_dim, d, r, dv, rv, kgroup;
    uint16_t chan[VQKV_MAX_HEAD_DIM];
    char tail[48], values[32] = "";
    int rc;

    if ((rc = vqkv__spec_num(spec, "d", 8, 1, D, &d)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "r", 2, 1, VQKV__MAX_STAGES, &r)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "dv", d, 1, D, &dv)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "rv", r, 1, VQKV__MAX_STAGES, &rv)) != VQKV_OK ||
        (rc = vqkv__spec_word(spec, "kgroup", kgroups, 0, &kgroup)) != VQKV_OK)
        return rc;
    if (D % d != 0 || D % dv != 0)
        return VQKV_ESPEC;
    if ((rc = vqkv__vq_alloc(codec, spec, tail, sizeof tail)) != VQKV_OK)
        return rc;

    uint32_t G = D / d;
    for (uint32_t i = 0; i < D; i++)
        chan[i] = (uint16_t)(kgroup == 0 ? (i % d) * G + i / d : i);
    vqkv__branch_add(codec->state, 0, chan, D, d, r, false);
    for (uint32_t i = 0; i < D; i++)
        chan[i] = (uint16_t)i;
    vqkv__branch_add(codec->state, 1, chan, D, dv, rv, false);
    /* Values' d and r are spelled out only where they differ from the keys':
     * the canonical spec stays a function of the codec, and the specs (so
     * model identities and codebook files) of symmetric codecs stay what
     * they were before values could differ. */
    if (dv != d || rv != r)
        snprintf(values, sizeof values, "dv=%u,rv=%u,", dv, rv);
    /* Cannot overflow for the bounds checked above; checked all the same,
     * since a cut spec would name another codec. */
    int n = snprintf(codec->spec, sizeof codec->spec, "rvq:d=%u,r=%u,%skgroup=%s,%s", d, r, values,
                     kgroups[kgroup], tail);
    if (n < 0 || (size_t)n >= sizeof codec->spec)
        return VQKV_ESPEC;
    return vqkv__vq_finish(codec);
}

static int vqkv__vqkv_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    uint32_t D = codec->layout.head_dim, dlo, dhi, dv;
    uint16_t chan[VQKV_MAX_HEAD_DIM];
    char tail[48];
    int rc;

    if ((rc = vqkv__spec_num(spec, "dlo", 4, 2, D, &dlo)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "dhi", 8, 2, D, &dhi)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "dv", 4, 1, D, &dv)) != VQKV_OK)
        return rc;
    /* Each branch holds D/4 whole rotate-half pairs, cut into sub-vectors
     * of whole pairs. */
    if (D % 4 != 0 || dlo % 2 != 0 || dhi % 2 != 0 || (D / 2) % dlo != 0 || (D / 2) % dhi != 0 ||
        D % dv != 0)
        return VQKV_ESPEC;
    if ((rc = vqkv__vq_alloc(codec, spec, tail, sizeof tail)) != VQKV_OK)
        return rc;

    for (int lo = 0; lo < 2; lo++) {
        uint32_t first_pair = lo ? D / 4 : 0;
        for (uint32_t p = 0; p < D / 4; p++) {
            chan[2 * p] = (uint16_t)(first_pair + p);
            chan[2 * p + 1] = (uint16_t)(first_pair + p + D / 2);
        }
        vqkv__branch_add(codec->state, 0, chan, D / 2, lo ? dlo : dhi, 1, false);
    }
    for (uint32_t i = 0; i < D; i++)
        chan[i] = (uint16_t)i;
    vqkv__branch_add(codec->state, 1, chan, D, dv, 1, false);
    snprintf(codec->spec, sizeof codec->spec, "vqkv:dlo=%u,dhi=%u,dv=%u,%s", dlo, dhi, dv, tail);
    return vqkv__vq_finish(codec);
}

/* commvq: keys as D/d groups of d/2 whole RoPE pairs, group g holding pairs
 * g, g + D/d, g + 2D/d, ... (every group mixes frequencies, as rvq's
 * strided keys do), each pair (re, im) adjacent; pair p is channels
 * (p, p + D/2) with rope=neox (rotate-half, as vLLM and HF Llama cache keys)
 * or (2p, 2p + 1) with rope=inter (interleaved, as GGUF/llama.cpp). */
static int vqkv__commvq_init(vqkv_codec_t *codec, vqkv__spec_t *spec)
{
    /* In vqkv_rope_style_t's order. */
    static const char *const ropes[] = {"neox", "inter", NULL};
    uint32_t D = codec->layout.head_dim, d, r, dv, rv, rope;
    uint16_t chan[VQKV_MAX_HEAD_DIM];
    char tail[48];
    int rc;

    if ((rc = vqkv__spec_num(spec, "d", 8, 2, D, &d)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "r", 2, 1, VQKV__MAX_STAGES, &r)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "dv", d, 1, D, &dv)) != VQKV_OK ||
        (rc = vqkv__spec_num(spec, "rv", r, 1, VQKV__MAX_STAGES, &rv)) != VQKV_OK ||
        (rc = vqkv__spec_word(spec, "rope", ropes, 0, &rope)) != VQKV_OK)
        return rc;
    if (d % 2 != 0 || D % d != 0 || D % dv != 0)
        return VQKV_ESPEC;
    if ((rc = vqkv__vq_alloc(codec, spec, tail, sizeof tail)) != VQKV_OK)
        return rc;
    vqkv__vq_t *vq = codec->state;
    if (vq->bits % 2 != 0) /* a codeword is a pair of table rows of b/2 bits each */
        return VQKV_ESPEC;

    uint32_t G = D / d;
    for (uint32_t g = 0; g < G; g++) {
        for (uint32_t j = 0; j < d / 2; j++) {
            uint32_t re, im;
            vqkv__rope_pair((vqkv_rope_style_t)rope, D, g + j * G, &re, &im);
            chan[g * d + 2 * j] = (uint16_t)re;
            chan[g * d + 2 * j + 1] = (uint16_t)im;
        }
    }
    vqkv__branch_add(vq, 0, chan, D, d, r, true);
    for (uint32_t i = 0; i < D; i++)
        chan[i] = (uint16_t)i;
    vqkv__branch_add(vq, 1, chan, D, dv, rv, false);
    snprintf(codec->spec, sizeof codec->spec, "commvq:d=%u,r=%u,dv=%u,rv=%u,rope=%s,%s", d, r, dv,
             rv, ropes[rope], tail);
    return vqkv__vq_finish(codec);
}

/* Rows the normalization takes at once. */
#define VQKV__NORM_ROWS 8u

/* The branch's fp16 RMS norm of each of n rows (stride apart) in norms[],
 * and the rows' branch channels divided by it in u[n][n_channels] (zeros
 * for a zero or NaN norm). Training and encoding share it, so codebooks
 * are trained on exactly what gets quantized. Each row's sum of squares
 * runs in channel order, as for a row alone, but VQKV__NORM_ROWS rows go
 * at once so that their chains of dependent adds overlap, and the
 * divisions run over contiguous floats, which the compiler vectorizes
 * (IEEE division is exact either way): one row at a time, its 128
 * dependent adds and 128 divisions one by one were a tenth of rvq's
 * encode. */
static void vqkv__branch_normalize(const vqkv__branch_t *br, const float *rows, size_t stride,
                                   uint32_t n, float *u, uint16_t *norms)
{
    uint32_t C = br->n_channels;
    for (uint32_t i0 = 0; i0 < n; i0 += VQKV__NORM_ROWS) {
        uint32_t m = n - i0 < VQKV__NORM_ROWS ? n - i0 : VQKV__NORM_ROWS;
        const float *r0 = rows + i0 * stride;
        float ss[VQKV__NORM_ROWS] = {0.0f};
        for (uint32_t c = 0; c < C; c++)
            for (uint32_t v = 0; v < m; v++) {
                float x = r0[v * stride + br->chan[c]];
                ss[v] += x * x;
            }
        for (uint32_t v = 0; v < m; v++) {
            const float *row = r0 + v * stride;
            float *uv = u + (size_t)(i0 + v) * C;
            uint16_t norm_h = vqkv_f32_to_f16(fminf(sqrtf(ss[v] / (float)C), VQKV_F16_MAX));
            float norm = vqkv_f16_to_f32(norm_h);
            norms[i0 + v] = norm_h;
            for (uint32_t c = 0; c < C; c++)
                uv[c] = row[br->chan[c]];
            for (uint32_t c = 0; c < C; c++)
                uv[c] = norm > 0.0f ? uv[c] / norm : 0.0f;
        }
    }
}

/* Centers (and with cs=1 scales) row by its head's channel statistics, so
 * codebooks shared by all heads see each head's channels around zero. */
static void vqkv__channel_whiten(const vqkv_codec_t *codec, uint32_t layer, int kv, uint32_t head,
                                 float *row)
{
    if (!((const vqkv__vq_t *)codec->state)->channel_scale)
        return; /* cs=0 statistics are the identity */
    const float *mean = vqkv__channel_stats(codec, layer, kv, head);
    const float *scale = mean + codec->layout.head_dim;
    for (uint32_t c = 0; c < codec->layout.head_dim; c++)
        row[c] = (row[c] - mean[c]) / scale[c];
}

/* x limited to the finite f16 range, so a stored mean or norm never
 * becomes inf for bf16 or f32 memory. */
static float vqkv__f16_clamp(float x)
{
    return fminf(fmaxf(x, -VQKV_F16_MAX), VQKV_F16_MAX);
}

/* The vectors of one part: in worker memory (encode) or a dense
 * [tokens][heads][head_dim] array (training), so that both choose block
 * means and escapes by the very same code. */
typedef struct {
    const vqkv__tile_t *tile;
    const float *dense;
    uint32_t tokens;
} vqkv__rows_t;

static void vqkv__rows_get(const vqkv_codec_t *codec, const vqkv__rows_t *rows, uint32_t t,
                           uint32_t h, float *out)
{
    const vqkv_layout_t *l = &codec->layout;
    if (rows->tile != NULL)
        vqkv__tile_load(rows->tile, t, h, l->head_dim, out);
    else
        memcpy(out, rows->dense + ((size_t)t * l->num_kv_heads + h) * l->head_dim,
               l->head_dim * sizeof *out);
}

static bool vqkv__is_escape(const uint32_t *escapes, uint32_t n, uint32_t v)
{
    for (uint32_t i = 0; i < n; i++)
        if (escapes[i] == v)
            return true;
    return false;
}

/* Writes each head's channel means over the part's tokens, the escapes left
 * out, as f16 [heads][head_dim]: a float sum in token order over the count.
 * One pass over the rows per call; no copy of them. */
static void vqkv__block_means(const vqkv_codec_t *codec, const vqkv__rows_t *rows,
                              const uint32_t *escapes, uint32_t n_escapes, uint8_t *out)
{
    const vqkv_layout_t *l = &codec->layout;
    float row[VQKV_MAX_HEAD_DIM], sum[VQKV_MAX_HEAD_DIM];
    for (uint32_t h = 0; h < l->num_kv_heads; h++) {
        uint32_t count = 0;
        memset(sum, 0, l->head_dim * sizeof *sum);
        for (uint32_t t = 0; t < rows->tokens; t++) {
            if (vqkv__is_escape(escapes, n_escapes, t * l->num_kv_heads + h))
                continue;
            vqkv__rows_get(codec, rows, t, h, row);
            for (uint32_t c = 0; c < l->head_dim; c++)
                sum[c] += row[c];
            count++;
        }
        for (uint32_t c = 0; c < l->head_dim; c++)
            sum[c] = count > 0 ? vqkv__f16_clamp(sum[c] / (float)count) : 0.0f;
        vqkv_dtype_from_f32(VQKV_DTYPE_F16, sum, l->head_dim, out + 2 * (size_t)h * l->head_dim);
    }
}

/* Picks the part's escapes: the vectors farthest (squared L2) from their
 * head's reference, which is the all-token block mean `means` (f16) for
 * centered keys and the trained channel mean otherwise. These are the
 * outliers shared codebooks cannot follow, the attention-sink token first
 * among them. Largest distance first, ties to the lower index; returns how
 * many (at most vq->escapes). O(tokens * heads * (head_dim + escapes)). */
static uint32_t vqkv__pick_escapes(const vqkv_codec_t *codec, uint32_t layer, int kv,
                                   const vqkv__rows_t *rows, const uint8_t *means,
                                   uint32_t *escapes)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv_layout_t *l = &codec->layout;
    uint32_t H = l->num_kv_heads, D = l->head_dim, n = 0;
    float row[VQKV_MAX_HEAD_DIM], ref[VQKV_MAX_HEAD_DIM], dist[VQKV__MAX_ESCAPES];
    for (uint32_t h = 0; h < H; h++) {
        if (means != NULL)
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, means + 2 * (size_t)h * D, D, ref);
        else
            memcpy(ref, vqkv__channel_stats(codec, layer, kv, h), D * sizeof *ref);
        for (uint32_t t = 0; t < rows->tokens; t++) {
            vqkv__rows_get(codec, rows, t, h, row);
            float d2 = 0.0f;
            for (uint32_t c = 0; c < D; c++)
                d2 += (row[c] - ref[c]) * (row[c] - ref[c]);
            uint32_t v = t * H + h, at = n;
            /* Insertion by distance; equal distances keep the lower index first. */
            while (at > 0 && (d2 > dist[at - 1] || (d2 == dist[at - 1] && v < escapes[at - 1])))
                at--;
            if (at >= vq->escapes)
                continue;
            uint32_t keep = n < vq->escapes ? n : vq->escapes - 1; /* entries that survive */
            memmove(&escapes[at + 1], &escapes[at], (keep - at) * sizeof *escapes);
            memmove(&dist[at + 1], &dist[at], (keep - at) * sizeof *dist);
            escapes[at] = v;
            dist[at] = d2;
            n = keep + 1;
        }
    }
    return n;
}

/* Chooses the part's escapes and, for centered keys, stores the means of
 * the other tokens (the escapes were picked against the all-token means):
 * an outlier must not drag the mean the rest is coded against. */
static uint32_t vqkv__center_and_escape(const vqkv_codec_t *codec, uint32_t layer, int kv,
                                        const vqkv__rows_t *rows, uint8_t *means, uint32_t *escapes)
{
    const vqkv__vq_t *vq = codec->state;
    if (means != NULL)
        vqkv__block_means(codec, rows, NULL, 0, means);
    if (vq->escapes == 0)
        return 0;
    uint32_t n = vqkv__pick_escapes(codec, layer, kv, rows, means, escapes);
    if (means != NULL)
        vqkv__block_means(codec, rows, escapes, n, means);
    return n;
}

/* Vectors encoded together share every codebook search (vqkv__nearest_batch,
 * which loads each codeword once for four of them, keeps the codebook in
 * L1 across the batch, and with VNNI scales it to integers once a batch):
 * all of a part's vectors with one codebook set, one head's tokens with a
 * set per head. Their rows and residuals live on the stack,
 * VQKV__CHUNK_FLOATS floats each (64 KiB; vqkvd's pool threads have 8 MiB
 * of stack): a 32-token block's 256 vectors of head_dim 128 at once, never
 * more than VQKV__CHUNK_VECTORS. Batches of 256 rather than 32 made rvq's
 * encode about a fifth faster with the VNNI search (bench/RESULTS.md). */
#define VQKV__CHUNK_FLOATS 16384u
#define VQKV__CHUNK_VECTORS 256u

/* A chunk: n vectors v0, v0 + step, ..., of one codebook set. */
typedef struct {
    size_t v0, step;
    uint32_t n;
} vqkv__chunk_t;

/* The chunk's rows as the codebooks see them: minus the block means
 * (keys with bc=1) and whitened by the channel statistics. */
static void vqkv__chunk_rows(const vqkv_codec_t *codec, uint32_t layer, int kv,
                             const vqkv__tile_t *tile, const uint8_t *block_means,
                             const vqkv__chunk_t *chunk, float *rows)
{
    const vqkv_layout_t *l = &codec->layout;
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    float bm[VQKV_MAX_HEAD_DIM];
    for (uint32_t i = 0; i < chunk->n; i++) {
        size_t v = chunk->v0 + i * chunk->step;
        uint32_t h = (uint32_t)(v % H);
        float *row = rows + (size_t)i * D;
        vqkv__tile_load(tile, (uint32_t)(v / H), h, D, row);
        if (block_means != NULL) {
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, block_means + 2 * (size_t)h * D, D, bm);
            for (uint32_t c = 0; c < D; c++)
                row[c] -= bm[c];
        }
        vqkv__channel_whiten(codec, layer, kv, h, row);
    }
}

/* The codewords of br's codebook `book` fetched toward the caches while
 * the book before it is searched. A Llama-8B block's rvq encode reads 35
 * MB of codebooks (per layer 2 sides x 16 groups x 2 stages of 17 KB),
 * which no cache holds from one block to the next. The search reads its
 * search form from start to end, which the hardware prefetcher follows;
 * the residual update reads the codewords in code order, scattered: on
 * demand, those reads took 2.8 ms of a block's 27, 1.1 ms prefetched
 * (bench/RESULTS.md). Prefetching the search form as well measured no
 * faster (perf then put a third of the encoder loop's own samples on the
 * prefetch instructions). */
static void vqkv__book_prefetch(const vqkv__vq_t *vq, const vqkv__branch_t *br, vqkv__book_t book)
{
    const char *at = (const char *)book.words;
    size_t bytes = ((size_t)1 << vq->bits) * br->d * sizeof(float);
    for (size_t off = 0; off < bytes; off += 64)
        __builtin_prefetch(at + off, 0, 2);
}

/* Encodes a chunk: per branch each vector's norm, then per group and stage
 * one batch search for all of its vectors and, but after the last stage,
 * their residuals' update. */
static void vqkv__vq_encode_chunk(const vqkv_codec_t *codec, uint32_t layer, int kv,
                                  const vqkv__tile_t *tile, const uint8_t *block_means,
                                  const vqkv__chunk_t *chunk, uint8_t *norms, uint8_t *codes)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv__side_t *side = &vq->side[kv];
    uint32_t b = vq->bits, D = codec->layout.head_dim;
    uint32_t set_layer =
        vqkv__set_layer(vq, layer, (uint32_t)(chunk->v0 % codec->layout.num_kv_heads));
    float rows[VQKV__CHUNK_FLOATS], u[VQKV__CHUNK_FLOATS];
    uint32_t found[VQKV__CHUNK_VECTORS];
    uint16_t norm_h[VQKV__CHUNK_VECTORS];

    vqkv__chunk_rows(codec, layer, kv, tile, block_means, chunk, rows);
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        const vqkv__branch_t *br = &side->br[bi];
        vqkv__branch_normalize(br, rows, D, chunk->n, u, norm_h);
        for (uint32_t i = 0; i < chunk->n; i++) {
            size_t v = chunk->v0 + i * chunk->step;
            vqkv__put_u16(norms + 2 * (v * side->n_branches + bi), norm_h[i]);
        }
        for (uint32_t g = 0; g < br->groups; g++)
            for (uint32_t s = 0; s < br->stages; s++) {
                vqkv__book_t book = vqkv__book(vq, set_layer, kv, br, g, s);
                uint32_t next_s = s + 1 < br->stages ? s + 1 : 0, next_g = next_s ? g : g + 1;
                if (next_g < br->groups)
                    vqkv__book_prefetch(vq, br, vqkv__book(vq, set_layer, kv, br, next_g, next_s));
                float *resid = u + (size_t)g * br->d;
                /* The last stage's residual is never read. */
                vqkv__rvq_stage(resid, chunk->n, br->n_channels, book.words, book.search, br->d,
                                1u << b, found, s + 1 < br->stages);
                for (uint32_t i = 0; i < chunk->n; i++) {
                    uint64_t v = chunk->v0 + i * chunk->step;
                    uint64_t pos = v * side->codes + br->first_code + g * br->stages + s;
                    vqkv__bits_put(codes, pos * b, b, found[i]);
                }
            }
    }
}

/* The part's escapes: their entries, each vector's index and its fp8 row,
 * unused entries all ones and zeros. */
static void vqkv__vq_encode_escapes(const vqkv_codec_t *codec, const vqkv__tile_t *tile,
                                    const uint32_t *escapes, uint32_t n_escapes, uint8_t *out)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv_layout_t *l = &codec->layout;
    float row[VQKV_MAX_HEAD_DIM];
    for (uint32_t i = 0; i < vq->escapes; i++, out += VQKV__ESCAPE_BYTES(l->head_dim)) {
        uint32_t v = i < n_escapes ? escapes[i] : UINT32_MAX;
        for (int k = 0; k < 4; k++)
            out[k] = (uint8_t)(v >> (8 * k));
        if (i < n_escapes) {
            vqkv__tile_load(tile, v / l->num_kv_heads, v % l->num_kv_heads, l->head_dim, row);
            vqkv__fp8_row_encode(row, l->head_dim, out + 4, out + 6);
        } else {
            memset(out + 4, 0, 2 + l->head_dim);
        }
    }
}

static void vqkv__vq_encode(const vqkv_codec_t *codec, uint32_t layer, int kv,
                            const vqkv__tile_t *tile, uint8_t *out)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv__side_t *side = &vq->side[kv];
    const vqkv_layout_t *l = &codec->layout;
    uint32_t H = l->num_kv_heads;
    size_t vectors = (size_t)l->block_tokens * H;
    size_t mean_bytes = vqkv__block_mean_bytes(codec, kv);
    uint8_t *block_means = mean_bytes > 0 ? out : NULL, *norms = out + mean_bytes;
    uint8_t *codes = norms + 2 * vectors * side->n_branches;
    size_t code_bytes = vqkv__bits_bytes(vectors * side->codes, vq->bits);
    vqkv__rows_t rows = {tile, NULL, l->block_tokens};
    uint32_t escapes[VQKV__MAX_ESCAPES];

    memset(codes, 0, code_bytes);
    uint32_t n_escapes = vqkv__center_and_escape(codec, layer, kv, &rows, block_means, escapes);
    vqkv__vq_encode_escapes(codec, tile, escapes, n_escapes, codes + code_bytes);
    /* Chunks of one set: every vector in order, or each head's tokens. */
    uint32_t sets = vq->sets > 1 ? H : 1, per = VQKV__CHUNK_FLOATS / l->head_dim;
    size_t count = vectors / sets;
    per = per < VQKV__CHUNK_VECTORS ? per : VQKV__CHUNK_VECTORS;
    for (uint32_t h = 0; h < sets; h++)
        for (size_t i = 0; i < count; i += per) {
            vqkv__chunk_t chunk = {h + i * sets, sets,
                                   (uint32_t)(count - i < per ? count - i : per)};
            vqkv__vq_encode_chunk(codec, layer, kv, tile, block_means, &chunk, norms, codes);
        }
}

/* The codeword tables of one (set layer, side), by code position in a
 * vector (branch's first code + group * stages + stage): looked up once per
 * head rather than once per value. */
static void vqkv__vq_tables(const vqkv__vq_t *vq, uint32_t set_layer, int kv, const float **tables)
{
    const vqkv__side_t *side = &vq->side[kv];
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        const vqkv__branch_t *br = &side->br[bi];
        for (uint32_t g = 0; g < br->groups; g++)
            for (uint32_t s = 0; s < br->stages; s++)
                tables[br->first_code + g * br->stages + s] =
                    vqkv__book(vq, set_layer, kv, br, g, s).words;
    }
}

/* One branch of one vector: per group the sum of its stages' codewords
 * (float adds in stage order, from 0) times the branch's norm, placed at
 * the branch's channels. Inlined with d a constant, the common group sizes
 * become straight-line code whose codeword loads overlap across groups. */
static inline __attribute__((always_inline)) void
vqkv__vq_decode_branch(const vqkv__branch_t *br, uint32_t d, uint32_t b, const float *const *tables,
                       const uint8_t *codes, uint64_t first_code, float norm, float *row)
{
    for (uint32_t g = 0; g < br->groups; g++) {
        uint32_t at = br->first_code + g * br->stages;
        float acc[VQKV_MAX_HEAD_DIM];
        for (uint32_t j = 0; j < d; j++)
            acc[j] = 0.0f;
        for (uint32_t s = 0; s < br->stages; s++) {
            uint64_t pos = first_code + at + s;
            uint32_t code = b == 8 ? codes[pos] : vqkv__bits_get(codes, pos * b, b);
            const float *w = tables[at + s] + (size_t)code * d;
            for (uint32_t j = 0; j < d; j++)
                acc[j] += w[j];
        }
        const uint16_t *chan = br->chan + (size_t)g * d;
        for (uint32_t j = 0; j < d; j++)
            row[chan[j]] = acc[j] * norm;
    }
}

/* One vector's channels from its codes, branch by branch. b = 8 reads
 * codes as bytes. */
static void vqkv__vq_decode_vector(const vqkv__vq_t *vq, const vqkv__side_t *side,
                                   const float *const *tables, const uint8_t *norms,
                                   const uint8_t *codes, uint64_t first_code, float *row)
{
    uint32_t b = vq->bits;
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        const vqkv__branch_t *br = &side->br[bi];
        float norm = vqkv_f16_to_f32(vqkv__get_u16(norms + 2 * bi));
        switch (br->d) {
        case 4: vqkv__vq_decode_branch(br, 4, b, tables, codes, first_code, norm, row); break;
        case 8: vqkv__vq_decode_branch(br, 8, b, tables, codes, first_code, norm, row); break;
        case 16: vqkv__vq_decode_branch(br, 16, b, tables, codes, first_code, norm, row); break;
        default: vqkv__vq_decode_branch(br, br->d, b, tables, codes, first_code, norm, row);
        }
    }
}

/* The codewords a part's decode fetches ahead (vqkv__ahead_t): its share
 * of the next part's, a few 64-byte lines a vector, so that the fetches
 * overlap the decode's own work. The next part's codewords are one span
 * per branch (a branch's books follow each other), taken as laid end to
 * end. With ph=1 a part's codebooks are a set per head (2 MiB for rvq on
 * Llama-8B, four times a Zen 3 core's L2), and fetching the next part's
 * as well was not measured: nothing is fetched. */
typedef struct {
    const char *span[2]; /* per branch of the next part: its first codeword */
    size_t lines[2];     /* and its lines */
    size_t next, end;    /* this share's lines still to fetch */
    uint32_t per_vector;
} vqkv__warm_t;

static void vqkv__warm_init(const vqkv_codec_t *codec, const vqkv__ahead_t *ahead,
                            vqkv__warm_t *warm)
{
    const vqkv__vq_t *vq = codec->state;
    *warm = (vqkv__warm_t){{NULL, NULL}, {0, 0}, 0, 0, 0};
    if (ahead == NULL || vq->sets > 1)
        return;
    const vqkv__side_t *side = &vq->side[ahead->kv];
    size_t total = 0, books = 0;
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        const vqkv__branch_t *br = &side->br[bi];
        vqkv__book_t first =
            vqkv__book(vq, vqkv__set_layer(vq, ahead->layer, 0), ahead->kv, br, 0, 0);
        warm->span[bi] = (const char *)first.words;
        warm->lines[bi] =
            ((size_t)br->groups * br->stages * br->d * sizeof(float) << vq->bits) / 64;
        total += warm->lines[bi];
        books += (size_t)br->groups * br->stages;
    }
    /* Only where the batch's lookups into the next part are at least twice
     * its lines, so that nearly all the lines fetched are read (a line
     * escapes twice as many random lookups with odds about e^-2). Under
     * that, fetching every line cost more than the misses it saved:
     * SmolLM2's rvq decode at 1, 2 and 4 blocks (0.4, 0.8 and 1.5 lookups
     * a line) ran at 0.45x, 0.61x and 0.78x, at 6 and 8 blocks (2.3, 3)
     * at 1.52x and 1.42x; Llama-8B's at 2-16 blocks at 1.22-1.29x (a
     * one-off A/B with a temporary switch, bench/RESULTS.md). */
    size_t vectors = (size_t)codec->layout.block_tokens * codec->layout.num_kv_heads;
    if (vectors * books * ahead->shares < 2 * total)
        return;
    warm->next = total * ahead->share / ahead->shares;
    warm->end = total * (ahead->share + 1) / ahead->shares;
    warm->per_vector = (uint32_t)((warm->end - warm->next + vectors - 1) / vectors);
}

/* The next per_vector lines of the share; O(per_vector), the lines are
 * fetched, never waited for. */
static inline void vqkv__warm_step(vqkv__warm_t *warm)
{
    for (uint32_t i = 0; i < warm->per_vector && warm->next < warm->end; i++, warm->next++) {
        size_t k = warm->next;
        __builtin_prefetch(k < warm->lines[0] ? warm->span[0] + 64 * k
                                              : warm->span[1] + 64 * (k - warm->lines[0]),
                           0, 3);
    }
}

/* One head's vectors of a part being decoded: where their codes, norms and
 * codeword tables are, and what the rows get after the codewords. */
typedef struct {
    const vqkv__vq_t *vq;
    const vqkv__side_t *side;
    const float *const *tables;
    const uint8_t *norms, *codes;
    const float *mean, *scale; /* channel statistics; NULL with cs=0 (the identity) */
    const float *bm;           /* block means; NULL without them */
    const vqkv__tile_t *tile;
    vqkv__warm_t *warm; /* stepped once a vector */
    uint32_t head, heads, head_dim, tokens;
} vqkv__head_decode_t;

/* What channel c's value x gets after the codewords: its statistics
 * (multiply, then add) and its block mean. */
static inline float vqkv__value_finish(const vqkv__head_decode_t *hd, uint32_t c, float x)
{
    if (hd->scale != NULL)
        x = x * hd->scale[c] + hd->mean[c];
    if (hd->bm != NULL)
        x += hd->bm[c];
    return x;
}

/* The scalar reference: each vector's channels from its codes, then what
 * each value gets after them, then stored. */
static void vqkv__vq_decode_head(const vqkv__head_decode_t *hd)
{
    const vqkv__side_t *side = hd->side;
    uint32_t D = hd->head_dim;
    float row[VQKV_MAX_HEAD_DIM];
    for (uint32_t t = 0; t < hd->tokens; t++) {
        size_t v = (size_t)t * hd->heads + hd->head;
        vqkv__warm_step(hd->warm);
        vqkv__vq_decode_vector(hd->vq, side, hd->tables, hd->norms + 2 * v * side->n_branches,
                               hd->codes, (uint64_t)v * side->codes, row);
        for (uint32_t c = 0; c < D; c++)
            row[c] = vqkv__value_finish(hd, c, row[c]);
        vqkv__tile_store(hd->tile, t, hd->head, D, row);
    }
}

#if defined(__x86_64__)
/* ---- decode with AVX2 --------------------------------------------------
 *
 * vqkv__vq_decode_head's operations on each value, in the same order and
 * each rounded on its own (the target has no FMA to contract into), so the
 * bytes are the reference's: a group's stage sums are one register add a
 * codeword per 8 (or 4) channels instead of one add per value, and the
 * channel permutation is a gather from the group sums laid out in code
 * order, side->order, instead of a store per value, or where the shape is
 * known data movement in registers: a transpose for rvq's strided keys, a
 * de-interleave for vqkv's rotate-half pairs. Under
 * callgrind (bench/instr.sh) rvq's decode went from 15.9 instructions a
 * value to 5.2. */

/* Eight channels of a group: the stage sum from 0 in stage order, times
 * the norm. */
VQKV__X86 static inline __m256 vqkv__sum8_x86(const float *const *w, uint32_t stages, uint32_t j,
                                              __m256 norm)
{
    __m256 acc = _mm256_setzero_ps();
    for (uint32_t s = 0; s < stages; s++)
        acc = _mm256_add_ps(acc, _mm256_loadu_ps(w[s] + j));
    return _mm256_mul_ps(acc, norm);
}

/* One group's stage sums times the branch norm, from 0 in stage order, d
 * values to out. Inlined with d a constant, so d = 4, 8, 16 unroll. */
VQKV__X86 static inline __attribute__((always_inline)) void
vqkv__group_sums_x86(const float *const *w, uint32_t stages, uint32_t d, float norm, float *out)
{
    uint32_t j = 0;
    for (; j + 8 <= d; j += 8)
        _mm256_storeu_ps(out + j, vqkv__sum8_x86(w, stages, j, _mm256_set1_ps(norm)));
    for (; j + 4 <= d; j += 4) {
        __m128 acc = _mm_setzero_ps();
        for (uint32_t s = 0; s < stages; s++)
            acc = _mm_add_ps(acc, _mm_loadu_ps(w[s] + j));
        _mm_storeu_ps(out + j, _mm_mul_ps(acc, _mm_set1_ps(norm)));
    }
    for (; j < d; j++) {
        float acc = 0.0f;
        for (uint32_t s = 0; s < stages; s++)
            acc += w[s][j];
        out[j] = acc * norm;
    }
}

/* Two adjacent d = 4 groups with byte codes as one register: each's stage
 * sum from 0 in stage order, times the norm (codes: the first group's
 * stages, then the second's; base: the first group's first table). */
VQKV__X86 static inline __m256 vqkv__pair4_sum_x86(const float *base, const uint8_t *codes,
                                                   uint32_t stages, __m256 norm)
{
    size_t table = (size_t)256 * 4; /* floats from one stage's table to the next */
    __m256 acc = _mm256_setzero_ps();
    for (uint32_t s = 0; s < stages; s++)
        acc = _mm256_add_ps(acc,
                            _mm256_set_m128(_mm_loadu_ps(base + (stages + s) * table +
                                                         (size_t)codes[stages + s] * 4),
                                            _mm_loadu_ps(base + s * table + (size_t)codes[s] * 4)));
    return _mm256_mul_ps(acc, norm);
}

/* One branch's group sums when codes are bytes (b = 8): a group's stage
 * tables follow each other from the branch's first, so code position i of
 * the branch picks codeword base + ((i << 8) + code) * d. Inlined with d
 * and stages constants, the common shapes run straight-line code. */
VQKV__X86 static inline __attribute__((always_inline)) void
vqkv__branch_sums8_x86(const float *base, const uint8_t *codes, uint32_t groups, uint32_t stages,
                       uint32_t d, float norm, float *sums)
{
    const float *w[VQKV__MAX_STAGES];
    size_t table = (size_t)256 * d; /* floats from one stage's table to the next */
    uint32_t g = 0;
    /* d = 4: two groups a register, so that a later 8-channel load of the
     * sums is forwarded from one store (from two it stalls). */
    for (; d == 4 && g + 2 <= groups;
         g += 2, sums += 8, codes += 2 * stages, base += 2 * stages * table)
        _mm256_storeu_ps(sums, vqkv__pair4_sum_x86(base, codes, stages, _mm256_set1_ps(norm)));
#pragma GCC unroll 4
    for (; g < groups; g++, sums += d, codes += stages, base += stages * table) {
        for (uint32_t s = 0; s < stages; s++)
            w[s] = base + s * table + (size_t)codes[s] * d;
        vqkv__group_sums_x86(w, stages, d, norm, sums);
    }
}

/* A vector's group sums in code order: branch by branch, group by group. */
VQKV__X86 static void vqkv__vq_sums_x86(const vqkv__head_decode_t *hd, size_t v, float *sums)
{
    const vqkv__side_t *side = hd->side;
    uint32_t b = hd->vq->bits;
    uint64_t first_code = (uint64_t)v * side->codes;
    const uint8_t *norms = hd->norms + 2 * v * side->n_branches;
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        const vqkv__branch_t *br = &side->br[bi];
        float norm = vqkv_f16_to_f32(vqkv__get_u16(norms + 2 * bi));
        if (b == 8) {
            const float *base = hd->tables[br->first_code];
            const uint8_t *codes = hd->codes + first_code + br->first_code;
            uint32_t shape = br->d << 4 | br->stages;
#define VQKV__SHAPE(D, R)                                                                          \
    case (D) << 4 | (R): vqkv__branch_sums8_x86(base, codes, br->groups, R, D, norm, sums); break
            switch (shape) {
                VQKV__SHAPE(4, 1);
                VQKV__SHAPE(4, 2);
                VQKV__SHAPE(8, 1);
                VQKV__SHAPE(8, 2);
                VQKV__SHAPE(8, 3);
                VQKV__SHAPE(16, 1);
                VQKV__SHAPE(16, 2);
            default: vqkv__branch_sums8_x86(base, codes, br->groups, br->stages, br->d, norm, sums);
            }
#undef VQKV__SHAPE
            sums += br->n_channels;
            continue;
        }
        for (uint32_t g = 0; g < br->groups; g++, sums += br->d) {
            uint32_t at = br->first_code + g * br->stages;
            const float *w[VQKV__MAX_STAGES];
            for (uint32_t s = 0; s < br->stages; s++) {
                uint64_t pos = first_code + at + s;
                w[s] = hd->tables[at + s] + (size_t)vqkv__bits_get(hd->codes, pos * b, b) * br->d;
            }
            vqkv__group_sums_x86(w, br->stages, br->d, norm, sums);
        }
    }
}

/* Row steps on 8 channels: statistics (multiply, then add) and block means. */
VQKV__X86 static inline __m256 vqkv__row_finish_x86(const vqkv__head_decode_t *hd, uint32_t c,
                                                    __m256 x)
{
    if (hd->scale != NULL)
        x = _mm256_add_ps(_mm256_mul_ps(x, _mm256_loadu_ps(hd->scale + c)),
                          _mm256_loadu_ps(hd->mean + c));
    if (hd->bm != NULL)
        x = _mm256_add_ps(x, _mm256_loadu_ps(hd->bm + c));
    return x;
}

/* Rows r[0..8) become the columns: r[j][k] <- r[k][j]. Data movement only. */
VQKV__X86 static inline void vqkv__transpose8_x86(__m256 *r)
{
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* A side->strided8, contig8 or contig4 head with byte codes: per token,
 * eight registers of group sums (a group each, or two for d = 4);
 * strided, transposed, so that value j of groups g0..g0+7 are channels
 * j * G + g0 .. + 7, eight adjacent channels stored at once (the
 * permutation without a gather); contiguous, each register stored at its
 * channels (no trip through a row of sums). Inlined with d, stages, dtype,
 * plain and strided constants. */
VQKV__X86 static inline __attribute__((always_inline)) void
vqkv__vq_decode_bytes8_x86(const vqkv__head_decode_t *hd, uint32_t d, uint32_t stages,
                           vqkv_dtype_t dtype, bool plain, bool strided)
{
    const vqkv__side_t *side = hd->side;
    const vqkv__tile_t *tile = hd->tile;
    uint32_t D = hd->head_dim, G = D / 8, width = dtype == VQKV_DTYPE_F32 ? 4 : 2;
    size_t table = (size_t)256 * d; /* floats from one stage's table to the next */
    uint32_t per = 8 / d;           /* groups a register */
    for (uint32_t t = 0; t < hd->tokens; t++) {
        size_t v = (size_t)t * hd->heads + hd->head;
        vqkv__warm_step(hd->warm);
        const uint8_t *codes = hd->codes + v * side->codes;
        __m256 norm = _mm256_set1_ps(vqkv_f16_to_f32(vqkv__get_u16(hd->norms + 2 * v)));
        uint8_t *out = tile->base + t * tile->token_stride + hd->head * tile->head_stride;
        const float *base = hd->tables[0];
        for (uint32_t g0 = 0; g0 < G; g0 += 8) {
            __m256 r[8];
            for (uint32_t k = 0; k < 8; k++, codes += per * stages, base += per * stages * table) {
                if (d == 4) {
                    r[k] = vqkv__pair4_sum_x86(base, codes, stages, norm);
                    continue;
                }
                const float *w[VQKV__MAX_STAGES];
                for (uint32_t s = 0; s < stages; s++)
                    w[s] = base + s * table + (size_t)codes[s] * 8;
                r[k] = vqkv__sum8_x86(w, stages, 0, norm);
            }
            if (strided)
                vqkv__transpose8_x86(r);
            for (uint32_t j = 0; j < 8; j++) {
                uint32_t c = strided ? j * G + g0 : (g0 + j) * 8;
                vqkv__store8_x86(dtype, plain ? r[j] : vqkv__row_finish_x86(hd, c, r[j]),
                                 out + (size_t)c * width);
            }
        }
    }
}

/* A side->pairs vector's sums stored: sums 2p and 2p + 1 are channels p
 * and p + D/2, so two registers of sums de-interleave into eight channels
 * of each half. Data movement only. */
VQKV__X86 static inline __attribute__((always_inline)) void
vqkv__pairs_store_x86(const vqkv__head_decode_t *hd, const float *sums, vqkv_dtype_t dtype,
                      bool plain, uint8_t *out)
{
    uint32_t half = hd->head_dim / 2, width = dtype == VQKV_DTYPE_F32 ? 4 : 2;
    for (uint32_t p = 0; p < half; p += 8) {
        __m256 a = _mm256_loadu_ps(sums + 2 * p), b = _mm256_loadu_ps(sums + 2 * p + 8);
        /* per 128-bit lane a0 a2 b0 b2 | a4 a6 b4 b6, then lanes' halves in order */
        __m256 lo = _mm256_castpd_ps(
            _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
        __m256 hi = _mm256_castpd_ps(
            _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
        vqkv__store8_x86(dtype, plain ? lo : vqkv__row_finish_x86(hd, p, lo),
                         out + (size_t)p * width);
        vqkv__store8_x86(dtype, plain ? hi : vqkv__row_finish_x86(hd, p + half, hi),
                         out + (size_t)(p + half) * width);
    }
}

/* Inlined with dtype a constant, so the store is not chosen per value,
 * and with plain (no statistics, no block means) a constant too, so the
 * common case tests neither per register. */
VQKV__X86 static inline __attribute__((always_inline)) void
vqkv__vq_decode_rows_x86(const vqkv__head_decode_t *hd, vqkv_dtype_t dtype, bool plain)
{
    const vqkv__side_t *side = hd->side;
    const vqkv__tile_t *tile = hd->tile;
    uint32_t D = hd->head_dim, width = dtype == VQKV_DTYPE_F32 ? 4 : 2;
    bool in_order = side->in_order;
    float sums[VQKV_MAX_HEAD_DIM], tail[8];
    for (uint32_t t = 0; t < hd->tokens; t++) {
        vqkv__warm_step(hd->warm);
        vqkv__vq_sums_x86(hd, (size_t)t * hd->heads + hd->head, sums);
        uint8_t *out = tile->base + t * tile->token_stride + hd->head * tile->head_stride;
        if (side->pairs) {
            vqkv__pairs_store_x86(hd, sums, dtype, plain, out);
            continue;
        }
        uint32_t c = 0;
        for (; c + 8 <= D; c += 8, out += 8 * width) {
            __m256 x = in_order
                           ? _mm256_loadu_ps(sums + c)
                           : _mm256_i32gather_ps(
                                 sums, _mm256_loadu_si256((const __m256i *)(side->order + c)), 4);
            vqkv__store8_x86(dtype, plain ? x : vqkv__row_finish_x86(hd, c, x), out);
        }
        if (c == D)
            continue;
        /* The last D % 8 channels, as vqkv__vq_decode_head does them. */
        for (uint32_t i = 0; c + i < D; i++)
            tail[i] = vqkv__value_finish(hd, c + i, sums[side->order[c + i]]);
        vqkv_dtype_from_f32(dtype, tail, D - c, out);
    }
}

VQKV__X86 static void vqkv__vq_decode_head_x86(const vqkv__head_decode_t *hd)
{
    /* The shapes in use; any other takes the row of sums below. */
    bool plain = hd->scale == NULL && hd->bm == NULL;
    bool strided = hd->side->strided8, four = hd->side->contig4;
    if ((strided || four || hd->side->contig8) && hd->vq->bits == 8) {
        uint32_t shape =
            four << 10 | strided << 9 | plain << 8 | hd->side->br[0].stages << 4 | hd->tile->dtype;
/* FLAGS: plain, strided and four as the shape's bits 8, 9 and 10. */
#define VQKV__CASE(FLAGS, D, PLAIN, STRIDED, R, DTYPE)                                             \
    case (FLAGS) << 8 | (R) << 4 | (DTYPE):                                                        \
        vqkv__vq_decode_bytes8_x86(hd, D, R, DTYPE, PLAIN, STRIDED);                               \
        return
#define VQKV__BYTES8(R, DTYPE)                                                                     \
    VQKV__CASE(0, 8, false, false, R, DTYPE);                                                      \
    VQKV__CASE(1, 8, true, false, R, DTYPE);                                                       \
    VQKV__CASE(2, 8, false, true, R, DTYPE);                                                       \
    VQKV__CASE(3, 8, true, true, R, DTYPE);                                                        \
    VQKV__CASE(4, 4, false, false, R, DTYPE);                                                      \
    VQKV__CASE(5, 4, true, false, R, DTYPE)
        switch (shape) {
            VQKV__BYTES8(1, VQKV_DTYPE_F16);
            VQKV__BYTES8(2, VQKV_DTYPE_F16);
            VQKV__BYTES8(3, VQKV_DTYPE_F16);
            VQKV__BYTES8(2, VQKV_DTYPE_BF16);
            VQKV__BYTES8(2, VQKV_DTYPE_F32);
        }
#undef VQKV__BYTES8
#undef VQKV__CASE
    }
#define VQKV__ROWS(DTYPE)                                                                          \
    case (DTYPE): vqkv__vq_decode_rows_x86(hd, DTYPE, false); break;                               \
    case 1 << 8 | (DTYPE): vqkv__vq_decode_rows_x86(hd, DTYPE, true); break
    switch (plain << 8 | hd->tile->dtype) {
        VQKV__ROWS(VQKV_DTYPE_F16);
        VQKV__ROWS(VQKV_DTYPE_BF16);
        VQKV__ROWS(VQKV_DTYPE_F32);
    }
#undef VQKV__ROWS
}
#endif

/* Heads outermost, so each head's codebook tables (its own set with ph=1),
 * statistics and block means are set up once for all its tokens. */
static void vqkv__vq_decode(const vqkv_codec_t *codec, uint32_t layer, int kv, const uint8_t *in,
                            const vqkv__tile_t *tile, const vqkv__ahead_t *ahead)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv__side_t *side = &vq->side[kv];
    const vqkv_layout_t *l = &codec->layout;
    uint32_t H = l->num_kv_heads, D = l->head_dim;
    size_t vectors = (size_t)l->block_tokens * H;
    size_t mean_bytes = vqkv__block_mean_bytes(codec, kv);
    const uint8_t *block_means = in, *norms = in + mean_bytes;
    const uint8_t *codes = norms + 2 * vectors * side->n_branches;
    float row[VQKV_MAX_HEAD_DIM], bm[VQKV_MAX_HEAD_DIM];
    const float *tables[VQKV_MAX_HEAD_DIM * VQKV__MAX_STAGES];
    vqkv__warm_t warm;
    vqkv__warm_init(codec, ahead, &warm);
    vqkv__head_decode_t hd = {vq,   side, tables, norms, codes, NULL, NULL,
                              NULL, tile, &warm,  0,     H,     D,    l->block_tokens};
#if defined(__x86_64__)
    void (*decode_head)(const vqkv__head_decode_t *) =
        vqkv__simd_enabled() ? vqkv__vq_decode_head_x86 : vqkv__vq_decode_head;
#else
    void (*decode_head)(const vqkv__head_decode_t *) = vqkv__vq_decode_head;
#endif

    for (uint32_t h = 0; h < H; h++) {
        if (h == 0 || vq->sets > 1)
            vqkv__vq_tables(vq, vqkv__set_layer(vq, layer, h), kv, tables);
        hd.head = h;
        if (vq->channel_scale) {
            hd.mean = vqkv__channel_stats(codec, layer, kv, h);
            hd.scale = hd.mean + D;
        }
        if (mean_bytes > 0) {
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, block_means + 2 * (size_t)h * D, D, bm);
            hd.bm = bm;
        }
        decode_head(&hd);
    }
    /* Escapes overwrite their vectors; an index outside the block (unused,
     * or a damaged block) is skipped, so no byte outside the slot moves. */
    const uint8_t *escape_in = codes + vqkv__bits_bytes(vectors * side->codes, vq->bits);
    for (uint32_t i = 0; i < vq->escapes; i++, escape_in += VQKV__ESCAPE_BYTES(D)) {
        uint32_t v = (uint32_t)escape_in[0] | (uint32_t)escape_in[1] << 8 |
                     (uint32_t)escape_in[2] << 16 | (uint32_t)escape_in[3] << 24;
        if (v >= vectors)
            continue;
        vqkv__fp8_row_decode(escape_in + 4, escape_in + 6, D, row);
        vqkv__tile_store(tile, v / H, v % H, D, row);
    }
}

/* ---- training --------------------------------------------------------- */

typedef struct {
    vqkv_codec_t *codec;
    uint32_t layer; /* the set layer whose codebooks are trained */
    int kv;
    const float *u[2]; /* normalized samples per branch, [m][n_channels] */
    size_t m;
    const vqkv_train_opts_t *opts;
    uint32_t n_tasks;
    uint32_t next_task;
    int rc;
    pthread_mutex_t lock;
} vqkv__train_job_t;

/* Joint refinement rounds after a chain's greedy training (kmeans.h):
 * each costs one search of the samples per stage, against the 16 Lloyd
 * iterations' per stage; what rounds gain is in bench/RESULTS.md. */
#define VQKV__REFINE_ROUNDS 2

/* Trains the r-stage chain of one (branch, group): each stage is k-means on
 * what the stages before it left over, then a plain chain (not commvq's
 * tables, whose codewords are not free) is refined jointly. */
static int vqkv__train_group(vqkv__train_job_t *job, uint32_t bi, uint32_t g)
{
    vqkv__vq_t *vq = job->codec->state;
    const vqkv__branch_t *br = &vq->side[job->kv].br[bi];
    uint32_t d = br->d, k = 1u << vq->bits;
    float *words[VQKV__MAX_STAGES], *search[VQKV__MAX_STAGES];
    float *x0 = malloc(job->m * d * sizeof *x0), *x = malloc(job->m * d * sizeof *x);
    uint32_t *codes = malloc(job->m * br->stages * sizeof *codes);
    int rc = VQKV_ENOMEM;
    if (x0 == NULL || x == NULL || codes == NULL)
        goto out;
    for (size_t i = 0; i < job->m; i++)
        memcpy(x0 + i * d, job->u[bi] + i * br->n_channels + (size_t)g * d, d * sizeof *x0);
    memcpy(x, x0, job->m * d * sizeof *x);

    for (uint32_t s = 0; s < br->stages; s++) {
        vqkv__book_t book = vqkv__book(vq, job->layer, job->kv, br, g, s);
        uint64_t seed = vqkv__mix64(job->opts->seed ^ vqkv__mix64(((uint64_t)job->layer << 32) |
                                                                  ((uint64_t)job->kv << 24) |
                                                                  (bi << 20) | (g << 8) | s));
        uint32_t iters = job->opts->iterations ? job->opts->iterations : 16;
        rc = br->commute
                 ? vqkv__commute_em(x, job->m, d, vq->bits / 2, iters, seed, book.params)
                 : vqkv__kmeans(x, job->m, d, k, iters, seed, job->opts->assigner, book.params);
        if (rc != VQKV_OK)
            goto out;
        vqkv__book_ready(vq, br, book);
        words[s] = book.words;
        search[s] = book.search;
        vqkv__rvq_stage(x, job->m, d, book.words, book.search, d, k, codes + s * job->m, true);
    }
    if (!br->commute && br->stages > 1)
        rc = vqkv__rvq_refine(x0, job->m, d, k, br->stages, VQKV__REFINE_ROUNDS, words, search,
                              codes, x);
out:
    free(x0);
    free(x);
    free(codes);
    return rc;
}

static void *vqkv__train_worker(void *arg)
{
    vqkv__train_job_t *job = arg;
    const vqkv__side_t *side = &((vqkv__vq_t *)job->codec->state)->side[job->kv];
    for (;;) {
        pthread_mutex_lock(&job->lock);
        uint32_t task = job->next_task++;
        pthread_mutex_unlock(&job->lock);
        if (task >= job->n_tasks)
            return NULL;
        uint32_t bi = task < side->br[0].groups ? 0 : 1;
        uint32_t g = bi == 0 ? task : task - side->br[0].groups;
        int rc = vqkv__train_group(job, bi, g);
        if (rc != VQKV_OK) {
            pthread_mutex_lock(&job->lock);
            job->rc = rc;
            pthread_mutex_unlock(&job->lock);
        }
    }
}

/* With cs=1, standardizes each head's channels: mean and std over all n
 * vectors, x being [tokens][kv_heads][head_dim], O(n * head_dim) in double.
 * With cs=0 the statistics are the identity (mean 0, scale 1): centering
 * lowered the average error a little but raised perplexity a lot, because
 * the attention-sink token sits far from every mean. */
static int vqkv__channel_fit(vqkv_codec_t *codec, uint32_t layer, int kv, const float *x, size_t n)
{
    const vqkv__vq_t *vq = codec->state;
    uint32_t H = codec->layout.num_kv_heads, D = codec->layout.head_dim;
    size_t per_head = n / H;
    if (n % H != 0)
        return VQKV_EINVAL;
    for (size_t i = 0; i < n * D; i++)
        if (!isfinite(x[i]))
            return VQKV_EINVAL;
    for (uint32_t h = 0; h < H; h++) {
        float *mean = vqkv__channel_stats(codec, layer, kv, h), *scale = mean + D;
        for (uint32_t c = 0; c < D; c++) {
            double sum = 0.0, sq = 0.0;
            for (size_t t = 0; t < per_head; t++) {
                double v = x[(t * H + h) * D + c];
                sum += v;
                sq += v * v;
            }
            double mu = sum / (double)per_head, var = sq / (double)per_head - mu * mu;
            mean[c] = vq->channel_scale ? (float)mu : 0.0f;
            scale[c] = vq->channel_scale && var > 1e-12 ? (float)sqrt(var) : 1.0f;
        }
    }
    return VQKV_OK;
}

/* Runs the job's (branch, group) chains on up to opts->threads threads. */
static int vqkv__train_run(vqkv__train_job_t *job)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    uint32_t threads = job->opts->threads ? job->opts->threads : (cpus > 0 ? (uint32_t)cpus : 1);
    pthread_t tids[64];
    if (threads > job->n_tasks)
        threads = job->n_tasks;
    if (threads > 64)
        threads = 64;
    job->next_task = 0;
    job->rc = VQKV_OK;
    uint32_t started = 0;
    for (; started + 1 < threads; started++)
        if (pthread_create(&tids[started], NULL, vqkv__train_worker, job) != 0)
            break;
    vqkv__train_worker(job);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    return job->rc;
}

/* out = x [tokens][heads][head_dim] minus each block's f16 channel means,
 * chosen exactly as the encoder chooses them (escapes left out); a last
 * partial block is a block of its own. */
static int vqkv__block_center(const vqkv_codec_t *codec, const float *x, size_t tokens, float *out)
{
    const vqkv_layout_t *l = &codec->layout;
    size_t row = (size_t)l->num_kv_heads * l->head_dim;
    uint8_t *means = malloc(row * 2);
    float mean[VQKV_MAX_HEAD_DIM];
    uint32_t escapes[VQKV__MAX_ESCAPES];
    if (means == NULL)
        return VQKV_ENOMEM;
    for (size_t t0 = 0; t0 < tokens; t0 += l->block_tokens) {
        size_t nt = tokens - t0 < l->block_tokens ? tokens - t0 : l->block_tokens;
        vqkv__rows_t rows = {NULL, x + t0 * row, (uint32_t)nt};
        vqkv__center_and_escape(codec, 0, 0, &rows, means, escapes);
        for (uint32_t h = 0; h < l->num_kv_heads; h++) {
            vqkv_dtype_to_f32(VQKV_DTYPE_F16, means + 2 * (size_t)h * l->head_dim, l->head_dim,
                              mean);
            for (size_t t = t0; t < t0 + nt; t++)
                for (uint32_t c = 0; c < l->head_dim; c++) {
                    size_t i = t * row + (size_t)h * l->head_dim + c;
                    out[i] = x[i] - mean[c];
                }
        }
    }
    free(means);
    return VQKV_OK;
}

static int vqkv__vq_train(vqkv_codec_t *codec, uint32_t layer, int kv, const float *x, size_t n,
                          const vqkv_train_opts_t *opts)
{
    vqkv__vq_t *vq = codec->state;
    const vqkv__side_t *side = &vq->side[kv];
    uint32_t D = codec->layout.head_dim, H = codec->layout.num_kv_heads;
    /* Samples are whole tokens, evenly spaced, each with its vectors of
     * the set's heads: every head of a shared set, its own head of a set
     * per head. (A stride over single vectors takes the same heads over and
     * over whenever it is a multiple of the head count, or a fraction of
     * it: 1.5 over 3 heads never takes head 2.) */
    size_t per_token = vq->sets > 1 ? 1 : H, tokens = n / H;
    size_t cap = opts->max_samples ? opts->max_samples : 16384;
    size_t cap_tokens = cap / per_token > 0 ? cap / per_token : 1;
    size_t m_tokens = tokens < cap_tokens ? tokens : cap_tokens, m = m_tokens * per_token;
    vqkv__train_job_t job = {.codec = codec, .kv = kv, .m = m, .opts = opts};
    float *u[2] = {NULL, NULL}, *centered = NULL;
    int rc = VQKV_ENOMEM;

    if (n % H != 0)
        return VQKV_EINVAL;
    if (vqkv__block_mean_bytes(codec, kv) > 0) {
        centered = malloc(n * D * sizeof *centered);
        if (centered == NULL)
            return VQKV_ENOMEM;
        if (vqkv__block_center(codec, x, n / H, centered) != VQKV_OK) {
            free(centered);
            return VQKV_ENOMEM;
        }
        x = centered;
    }
    rc = vqkv__channel_fit(codec, layer, kv, x, n);
    if (rc != VQKV_OK)
        goto out;
    rc = VQKV_ENOMEM;
    for (uint32_t bi = 0; bi < side->n_branches; bi++) {
        u[bi] = malloc(m * side->br[bi].n_channels * sizeof(float));
        if (u[bi] == NULL)
            goto out;
        job.u[bi] = u[bi];
    }
    job.n_tasks = side->br[0].groups + (side->n_branches > 1 ? side->br[1].groups : 0);
    pthread_mutex_init(&job.lock, NULL);
    rc = VQKV_OK;
    for (uint32_t set = 0; set < vq->sets && rc == VQKV_OK; set++) {
        /* An even stride over the tokens keeps every part of the sequence. */
        for (size_t i = 0; i < m; i++) {
            size_t t = (size_t)((double)(i / per_token) * (double)tokens / (double)m_tokens);
            size_t pick = t * H + (vq->sets > 1 ? set : i % per_token);
            float row[VQKV_MAX_HEAD_DIM];
            memcpy(row, x + pick * D, D * sizeof *row);
            vqkv__channel_whiten(codec, layer, kv, (uint32_t)(pick % H), row);
            uint16_t norm_h;
            for (uint32_t bi = 0; bi < side->n_branches; bi++)
                vqkv__branch_normalize(&side->br[bi], row, 0, 1,
                                       u[bi] + i * side->br[bi].n_channels, &norm_h);
        }
        job.layer = layer * vq->sets + set;
        rc = vqkv__train_run(&job);
    }
    pthread_mutex_destroy(&job.lock);
    vq->trained[layer * 2 + kv] = rc == VQKV_OK;
out:
    free(u[0]);
    free(u[1]);
    free(centered);
    return rc;
}

static bool vqkv__vq_needs_training(const vqkv_codec_t *codec)
{
    const vqkv__vq_t *vq = codec->state;
    for (size_t i = 0; i < (size_t)codec->layout.num_layers * 2; i++)
        if (!vq->trained[i])
            return true;
    return false;
}

static const float *vqkv__vq_books(const vqkv_codec_t *codec, size_t *n_floats)
{
    *n_floats = vqkv__vq_total_floats(codec);
    return ((vqkv__vq_t *)codec->state)->books;
}

static int vqkv__vq_books_install(vqkv_codec_t *codec, const float *books)
{
    vqkv__vq_t *vq = codec->state;
    size_t stats = vqkv__vq_book_floats(codec), total = vqkv__vq_total_floats(codec);
    uint32_t D = codec->layout.head_dim;
    /* Channel scales divide on encode: only positive ones are sane. */
    for (size_t i = stats; i < total; i += 2 * D)
        for (uint32_t c = 0; c < D; c++)
            if (!(books[i + D + c] > 0.0f))
                return VQKV_EFORMAT;
    memcpy(vq->books, books, total * sizeof *books);
    for (uint32_t sl = 0; sl < codec->layout.num_layers * vq->sets; sl++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t bi = 0; bi < vq->side[kv].n_branches; bi++) {
                const vqkv__branch_t *br = &vq->side[kv].br[bi];
                for (uint32_t g = 0; g < br->groups; g++)
                    for (uint32_t s = 0; s < br->stages; s++)
                        vqkv__book_ready(vq, br, vqkv__book(vq, sl, kv, br, g, s));
            }
    memset(vq->trained, 1, (size_t)codec->layout.num_layers * 2);
    return VQKV_OK;
}

/* The kernels' view of the codec: branches with their channel maps, and the
 * codewords (commutative tables expanded), their squared norms (the search
 * form's, kmeans.h) and the channel statistics in one array (kplan.h).
 * O(codebook floats), once per codec and device. */
static int vqkv__vq_kplan(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books_out)
{
    const vqkv__vq_t *vq = codec->state;
    const vqkv_layout_t *l = &codec->layout;
    size_t set_layers = (size_t)l->num_layers * vq->sets;
    plan->kind = VQKV_KIND_VQ;
    plan->bits = vq->bits;
    plan->sets = vq->sets;
    plan->channel_scale = vq->channel_scale;
    plan->block_center = vq->block_center;
    plan->escapes = vq->escapes;
    for (int kv = 0; kv < 2; kv++) {
        const vqkv__side_t *side = &vq->side[kv];
        vqkv_kside_t *ks = &plan->side[kv];
        ks->n_branches = side->n_branches;
        ks->codes = side->codes;
        ks->words = side->words;
        ks->wfloats = side->wfloats;
        for (uint32_t bi = 0; bi < side->n_branches; bi++) {
            const vqkv__branch_t *br = &side->br[bi];
            vqkv_kbranch_t *kb = &ks->br[bi];
            kb->n_channels = br->n_channels;
            kb->d = br->d;
            kb->stages = br->stages;
            kb->groups = br->groups;
            kb->first_code = br->first_code;
            kb->first_group = ks->groups;
            kb->first_word = br->first_word;
            kb->first_wfloat = br->first_wfloat;
            memcpy(kb->chan, br->chan, br->n_channels * sizeof *br->chan);
            ks->groups += br->groups;
        }
    }
    size_t words = set_layers * (vq->side[0].words + vq->side[1].words);
    size_t stats = vqkv__vq_total_floats(codec) - vqkv__vq_book_floats(codec);
    plan->norms_at = set_layers * (vq->side[0].wfloats + vq->side[1].wfloats);
    plan->stats_at = plan->norms_at + words;
    plan->book_floats = plan->stats_at + stats;
    float *books = malloc(plan->book_floats * sizeof *books);
    if (books == NULL)
        return VQKV_ENOMEM;
    for (uint32_t sl = 0; sl < set_layers; sl++)
        for (int kv = 0; kv < 2; kv++)
            for (uint32_t bi = 0; bi < vq->side[kv].n_branches; bi++) {
                const vqkv__branch_t *br = &vq->side[kv].br[bi];
                size_t k = (size_t)1 << vq->bits;
                for (uint32_t g = 0; g < br->groups; g++)
                    for (uint32_t s = 0; s < br->stages; s++) {
                        vqkv__book_t book = vqkv__book(vq, sl, kv, br, g, s);
                        size_t index = ((size_t)g * br->stages + s) << vq->bits;
                        size_t wf = sl * (vq->side[0].wfloats + vq->side[1].wfloats) +
                                    (kv ? vq->side[0].wfloats : 0) + br->first_wfloat +
                                    index * br->d;
                        size_t w = sl * (vq->side[0].words + vq->side[1].words) +
                                   (kv ? vq->side[0].words : 0) + br->first_word + index;
                        memcpy(books + wf, book.words, k * br->d * sizeof *books);
                        memcpy(books + plan->norms_at + w, book.search, k * sizeof *books);
                    }
            }
    memcpy(books + plan->stats_at, vqkv__channel_stats(codec, 0, 0, 0), stats * sizeof *books);
    *books_out = books;
    return VQKV_OK;
}

/* The VQ codecs differ only in how a spec becomes branches (init); the
 * rest of their ops are this file's. */
#define VQKV__VQ_OPS(codec)                                                                        \
    const vqkv__codec_ops_t vqkv__##codec##_ops = {                                                \
        .name = #codec,                                                                            \
        .init = vqkv__##codec##_init,                                                              \
        .free_state = vqkv__vq_free,                                                               \
        .encode_part = vqkv__vq_encode,                                                            \
        .decode_part = vqkv__vq_decode,                                                            \
        .train = vqkv__vq_train,                                                                   \
        .needs_training = vqkv__vq_needs_training,                                                 \
        .books = vqkv__vq_books,                                                                   \
        .books_install = vqkv__vq_books_install,                                                   \
        .kplan = vqkv__vq_kplan,                                                                   \
    };

VQKV__VQ_OPS(rvq)
VQKV__VQ_OPS(vqkv)
VQKV__VQ_OPS(commvq)
