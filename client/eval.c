/* eval.c -- measuring codecs on a real KV dump.
 *
 * The held-out tokens are laid out once as a vLLM-style paged cache of f32
 * [layers][2][blocks][block_tokens][kv_heads][head_dim]; each codec encodes
 * every block out of it and decodes into a second cache of the same shape,
 * exactly as the daemon would. Errors are sums of squares over everything,
 * so long and short layers weigh by their values, not by their count.
 *
 * The held-out window is the start of the sequence, so attention there is
 * exact causal attention: the query at position p attends to keys 0..p,
 * the attention sink included, with the dump's real
 * (RoPE'd) queries, grouped-query heads mapped as h_kv = h_q / (q_heads /
 * kv_heads). That costs O(queries * p * heads * head_dim) per layer, so only
 * every attn_stride-th query is scored; the reference outputs are computed
 * once and shared by all codecs.
 *
 * With opts->progress the run says where it is in layer steps (eval.h): the
 * reference attention's layers, each layer a codec trains (K and V), each
 * layer a codec's attention is scored on; codecs with nothing to train count
 * no training steps, so the ETA is not thrown off by their instant ones.
 */
#include "eval.h"

#include "safetensors.h"
#include "vqkv_codec.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    vqkv_st_file_t file;
    uint32_t layers, tokens, q_heads, kv_heads, head_dim;
    const vqkv_st_tensor_t **q, **k, **v; /* [layers] */
} vqkv__dump_t;

static int vqkv__eval_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return rc;
}

static double vqkv__now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static const vqkv_st_tensor_t *vqkv__dump_tensor(const vqkv__dump_t *dump, uint32_t layer,
                                                 char which)
{
    char name[64];
    snprintf(name, sizeof name, "layers.%u.%c", layer, which);
    return vqkv_st_find(&dump->file, name);
}

static void vqkv__dump_close(vqkv__dump_t *dump)
{
    vqkv_st_close(&dump->file);
    free(dump->q);
    free(dump->k);
    free(dump->v);
}

/* Opens the dump and checks that every layer has q, k, v of one shape. */
static int vqkv__dump_open(const char *path, vqkv__dump_t *dump, char *err, size_t errlen)
{
    memset(dump, 0, sizeof *dump);
    int rc = vqkv_st_open(path, &dump->file, err, errlen);
    if (rc != VQKV_OK)
        return rc;
    while (dump->layers < 1024 && vqkv__dump_tensor(dump, dump->layers, 'k') != NULL)
        dump->layers++;
    if (dump->layers == 0) {
        rc = vqkv__eval_fail(err, errlen, VQKV_EFORMAT, "%s: no tensor layers.0.k", path);
        goto fail;
    }
    dump->q = calloc(dump->layers, sizeof *dump->q);
    dump->k = calloc(dump->layers, sizeof *dump->k);
    dump->v = calloc(dump->layers, sizeof *dump->v);
    if (dump->q == NULL || dump->k == NULL || dump->v == NULL) {
        rc = vqkv__eval_fail(err, errlen, VQKV_ENOMEM, "out of memory");
        goto fail;
    }
    for (uint32_t l = 0; l < dump->layers; l++) {
        const vqkv_st_tensor_t *q = vqkv__dump_tensor(dump, l, 'q');
        const vqkv_st_tensor_t *k = vqkv__dump_tensor(dump, l, 'k');
        const vqkv_st_tensor_t *v = vqkv__dump_tensor(dump, l, 'v');
        if (q == NULL || v == NULL || q->ndim != 3 || k->ndim != 3 || v->ndim != 3) {
            rc = vqkv__eval_fail(err, errlen, VQKV_EFORMAT,
                                 "layer %u: need layers.%u.q, .k and .v, each 3-dimensional", l, l);
            goto fail;
        }
        if (l == 0) {
            dump->tokens = (uint32_t)k->shape[0];
            dump->kv_heads = (uint32_t)k->shape[1];
            dump->head_dim = (uint32_t)k->shape[2];
            dump->q_heads = (uint32_t)q->shape[1];
        }
        if (k->shape[0] != dump->tokens || k->shape[1] != dump->kv_heads ||
            k->shape[2] != dump->head_dim || memcmp(k->shape, v->shape, sizeof k->shape) != 0 ||
            q->shape[0] != dump->tokens || q->shape[1] != dump->q_heads ||
            q->shape[2] != dump->head_dim) {
            rc = vqkv__eval_fail(err, errlen, VQKV_EFORMAT,
                                 "layer %u: q must be [tokens, q_heads, head_dim] and k, v "
                                 "[tokens, kv_heads, head_dim] as in layer 0",
                                 l);
            goto fail;
        }
        dump->q[l] = q;
        dump->k[l] = k;
        dump->v[l] = v;
    }
    if (dump->kv_heads == 0 || dump->q_heads == 0 || dump->q_heads % dump->kv_heads != 0 ||
        dump->tokens == 0 || dump->tokens > (1u << 24)) {
        rc = vqkv__eval_fail(err, errlen, VQKV_EFORMAT,
                             "q_heads (%u) must be a multiple of kv_heads (%u), tokens (%u) "
                             "at least 1",
                             dump->q_heads, dump->kv_heads, dump->tokens);
        goto fail;
    }
    return VQKV_OK;
fail:
    vqkv__dump_close(dump);
    return rc;
}

/* Where the run is, for opts->progress: done of total layer steps, and the
 * codec being measured (1-based; 0 during the reference). */
typedef struct {
    vqkv_progress_t *p;
    double done, total;
    size_t codec, codecs;
    const char *spec;
} vqkv__eval_progress_t;

/* Draws the progress line (when due) for the step about to run: phase, and
 * layer of layers when layers is not 0. */
static void vqkv__eval_show(const vqkv__eval_progress_t *ep, const char *phase, uint32_t layer,
                            uint32_t layers)
{
    if (ep->p == NULL || !vqkv_progress_due(ep->p))
        return;
    char where[160], step[64] = "";
    if (ep->codec == 0)
        snprintf(where, sizeof where, "eval reference:");
    else
        snprintf(where, sizeof where, "eval %zu/%zu %s:", ep->codec, ep->codecs, ep->spec);
    if (layers != 0)
        snprintf(step, sizeof step, " layer %u/%u", layer + 1, layers);
    double pct = ep->total > 0.0 ? 100.0 * ep->done / ep->total : 0.0;
    vqkv_progress_update(ep->p, ep->done, ep->total, "layers", "%s %s%s, %.0f%%", where, phase,
                         step, pct);
}

/* What every codec is measured against. */
typedef struct {
    vqkv_layout_t layout;
    vqkv_kv_view_t view;
    uint32_t train_tokens, blocks, queries, attn_stride;
    float *cache;    /* held-out KV, paged */
    float *restored; /* a codec's decode of it */
    float *q;        /* [layers][queries][q_heads][head_dim] */
    float *attn_ref; /* same shape: attention over the original cache */
    float *attn_out; /* one layer of a codec's attention */
    float *scores;   /* one query's attention weights, [held-out tokens] */
} vqkv__bench_t;

static const float *vqkv__cache_at(const vqkv__bench_t *b, const float *cache, uint32_t layer,
                                   int kv)
{
    const vqkv_layout_t *l = &b->layout;
    return cache + ((size_t)layer * 2 + (size_t)kv) * b->blocks * l->block_tokens *
                       l->num_kv_heads * l->head_dim;
}

/* out[queries][q_heads][D] for one layer, from the paged cache. */
static void vqkv__attention(const vqkv__bench_t *b, const vqkv__dump_t *dump, const float *cache,
                            uint32_t layer, uint32_t stride, float *out)
{
    uint32_t D = dump->head_dim, Hq = dump->q_heads, Hkv = dump->kv_heads;
    const float *K = vqkv__cache_at(b, cache, layer, 0), *V = vqkv__cache_at(b, cache, layer, 1);
    const float *Q = b->q + (size_t)layer * b->queries * Hq * D;
    float scale = 1.0f / sqrtf((float)D);
    float *p = b->scores;
    for (uint32_t qi = 0; qi < b->queries; qi++) {
        uint32_t pos = qi * stride;
        for (uint32_t hq = 0; hq < Hq; hq++) {
            const float *qv = Q + ((size_t)qi * Hq + hq) * D;
            uint32_t hk = hq / (Hq / Hkv);
            float top = -INFINITY, sum = 0.0f;
            for (uint32_t j = 0; j <= pos; j++) {
                const float *kv = K + ((size_t)j * Hkv + hk) * D;
                float s = 0.0f;
                for (uint32_t d = 0; d < D; d++)
                    s += qv[d] * kv[d];
                p[j] = s * scale;
                top = fmaxf(top, p[j]);
            }
            float *o = out + ((size_t)qi * Hq + hq) * D;
            memset(o, 0, D * sizeof *o);
            for (uint32_t j = 0; j <= pos; j++) {
                float w = expf(p[j] - top);
                const float *vv = V + ((size_t)j * Hkv + hk) * D;
                sum += w;
                for (uint32_t d = 0; d < D; d++)
                    o[d] += w * vv[d];
            }
            for (uint32_t d = 0; d < D; d++)
                o[d] /= sum;
        }
    }
}

static void vqkv__bench_free(vqkv__bench_t *b)
{
    free(b->cache);
    free(b->restored);
    free(b->q);
    free(b->attn_ref);
    free(b->attn_out);
    free(b->scores);
}

static int vqkv__bench_init(vqkv__bench_t *b, const vqkv__dump_t *dump,
                            const vqkv_eval_opts_t *opts, vqkv__eval_progress_t *ep, char *err,
                            size_t errlen)
{
    memset(b, 0, sizeof *b);
    vqkv_layout_t *l = &b->layout;
    l->num_layers = dump->layers;
    l->num_kv_heads = dump->kv_heads;
    l->head_dim = dump->head_dim;
    l->block_tokens = opts->block_tokens ? opts->block_tokens : 32;
    l->dtype = VQKV_DTYPE_F32;
    if (vqkv_layout_check(l) != VQKV_OK)
        return vqkv__eval_fail(err, errlen, VQKV_EFORMAT,
                               "dump shape (kv_heads %u, head_dim %u) or block_tokens %u is not "
                               "a valid layout",
                               l->num_kv_heads, l->head_dim, l->block_tokens);
    if (ep->p != NULL) {
        /* The steps: the reference, then each codec's attention and, when
         * it has codebooks to train, its training. A spec that does not
         * make a codec fails in vqkv__eval_codec, with its reason. */
        ep->total = (double)l->num_layers * (double)(1 + opts->n_specs);
        for (size_t i = 0; i < opts->n_specs; i++) {
            vqkv_codec_t *codec = NULL;
            if (vqkv_codec_create(opts->specs[i], l, &codec) == VQKV_OK &&
                vqkv_codec_needs_training(codec))
                ep->total += l->num_layers;
            vqkv_codec_free(codec);
        }
    }
    b->train_tokens = opts->train_tokens ? opts->train_tokens : dump->tokens / 2;
    if (b->train_tokens >= dump->tokens)
        return vqkv__eval_fail(err, errlen, VQKV_EINVAL,
                               "train tokens (%u) leave nothing of the %u tokens to evaluate",
                               b->train_tokens, dump->tokens);
    b->blocks = (dump->tokens - b->train_tokens) / l->block_tokens;
    if (b->blocks == 0)
        return vqkv__eval_fail(err, errlen, VQKV_EINVAL,
                               "fewer than %u held-out tokens: no whole block to evaluate",
                               l->block_tokens);
    uint32_t stride = opts->attn_stride ? opts->attn_stride : 4;
    b->attn_stride = stride;
    uint32_t held_out = b->blocks * l->block_tokens;
    b->queries = (held_out + stride - 1) / stride;
    vqkv_kv_view_vllm(&b->view, l, b->blocks);

    size_t cache_floats = b->view.region_bytes / sizeof(float);
    size_t q_floats = (size_t)l->num_layers * b->queries * dump->q_heads * dump->head_dim;
    b->cache = malloc(cache_floats * sizeof(float));
    b->restored = malloc(cache_floats * sizeof(float));
    b->q = malloc(q_floats * sizeof(float));
    b->attn_ref = malloc(q_floats * sizeof(float));
    b->attn_out = malloc(q_floats / l->num_layers * sizeof(float));
    b->scores = malloc((size_t)held_out * sizeof(float));
    if (!b->cache || !b->restored || !b->q || !b->attn_ref || !b->attn_out || !b->scores) {
        vqkv__bench_free(b);
        return vqkv__eval_fail(err, errlen, VQKV_ENOMEM, "out of memory");
    }
    size_t row = (size_t)l->num_kv_heads * l->head_dim, qrow = (size_t)dump->q_heads * l->head_dim;
    for (uint32_t layer = 0; layer < l->num_layers; layer++) {
        for (int kv = 0; kv < 2; kv++) {
            const vqkv_st_tensor_t *t = kv ? dump->v[layer] : dump->k[layer];
            vqkv_st_read_f32(t, 0, held_out * row, (float *)vqkv__cache_at(b, b->cache, layer, kv));
        }
        for (uint32_t qi = 0; qi < b->queries; qi++)
            vqkv_st_read_f32(dump->q[layer], (uint64_t)qi * stride * qrow, qrow,
                             b->q + ((size_t)layer * b->queries + qi) * qrow);
        vqkv__eval_show(ep, "attention", layer, l->num_layers);
        vqkv__attention(b, dump, b->cache, layer, stride,
                        b->attn_ref + (size_t)layer * b->queries * qrow);
        ep->done++;
    }
    return VQKV_OK;
}

/* Error sums: num += sum (a-b)^2, den += sum a^2 over n floats. */
typedef struct {
    double num, den;
} vqkv__err_t;

static void vqkv__err_add(vqkv__err_t *e, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        e->num += d * d;
        e->den += (double)a[i] * (double)a[i];
    }
}

static double vqkv__err_rel(const vqkv__err_t *e)
{
    return e->den > 0.0 ? sqrt(e->num / e->den) : sqrt(e->num);
}

static int vqkv__train(vqkv_codec_t *codec, const vqkv__dump_t *dump, const vqkv__bench_t *b,
                       const vqkv_eval_opts_t *opts, vqkv__eval_progress_t *ep)
{
    /* As counted in vqkv__bench_init: steps only for codebooks to train. */
    bool counted = vqkv_codec_needs_training(codec);
    size_t n = (size_t)b->train_tokens * dump->kv_heads;
    uint64_t first = ((uint64_t)dump->tokens - b->train_tokens) * dump->kv_heads * dump->head_dim;
    float *x = malloc(n * dump->head_dim * sizeof *x);
    if (x == NULL)
        return VQKV_ENOMEM;
    vqkv_train_opts_t topts = {.seed = opts->seed, .threads = opts->threads};
    int rc = VQKV_OK;
    for (uint32_t layer = 0; layer < dump->layers && rc == VQKV_OK; layer++) {
        if (counted)
            vqkv__eval_show(ep, "training", layer, dump->layers);
        for (int kv = 0; kv < 2 && rc == VQKV_OK; kv++) {
            vqkv_st_read_f32(kv ? dump->v[layer] : dump->k[layer], first, n * dump->head_dim, x);
            rc = vqkv_codec_train(codec, layer, kv, x, n, &topts);
        }
        if (counted)
            ep->done++;
    }
    free(x);
    return rc;
}

/* Codebook file name for spec: its characters that are not [A-Za-z0-9=.-]
 * become '_'. */
static void vqkv__codebook_path(char *out, size_t len, const char *dir, const char *spec)
{
    int n = snprintf(out, len, "%s/", dir);
    for (const char *c = spec; *c != '\0' && n + 1 < (int)len; c++, n++) {
        bool keep = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                    (*c >= '0' && *c <= '9') || *c == '=' || *c == '.' || *c == '-';
        out[n] = keep ? *c : '_';
    }
    snprintf(out + n, len - (size_t)n, ".vqcb");
}

static int vqkv__eval_codec(const char *spec, const vqkv__dump_t *dump, vqkv__bench_t *b,
                            const vqkv_eval_opts_t *opts, vqkv__eval_progress_t *ep,
                            vqkv_eval_result_t *res, char *err, size_t errlen)
{
    vqkv_codec_t *codec = NULL;
    uint8_t *blocks = NULL;
    int rc = vqkv_codec_create(spec, &b->layout, &codec);
    if (rc != VQKV_OK)
        return vqkv__eval_fail(err, errlen, rc, "codec '%s': %s", spec, vqkv_strerror(rc));
    memset(res, 0, sizeof *res);
    snprintf(res->spec, sizeof res->spec, "%s", vqkv_codec_spec(codec));
    res->bits_per_value = vqkv_codec_bits_per_value(codec);
    res->compression_ratio = 16.0 / res->bits_per_value;

    double t0 = vqkv__now();
    rc = vqkv__train(codec, dump, b, opts, ep);
    if (rc != VQKV_OK) {
        rc = vqkv__eval_fail(err, errlen, rc, "codec '%s': training: %s", spec, vqkv_strerror(rc));
        goto out;
    }
    res->train_seconds_per_layer = (vqkv__now() - t0) / dump->layers;
    if (opts->save_dir != NULL && !vqkv_codec_needs_training(codec)) {
        char path[4096];
        vqkv__codebook_path(path, sizeof path, opts->save_dir, res->spec);
        rc = vqkv_codebook_save(codec, path);
        if (rc == VQKV_EINVAL) /* no codebooks to save */
            rc = VQKV_OK;
        if (rc != VQKV_OK) {
            rc = vqkv__eval_fail(err, errlen, rc, "%s: %s", path, vqkv_strerror(rc));
            goto out;
        }
    }

    size_t block_bytes = vqkv_codec_block_bytes(codec);
    blocks = malloc(block_bytes * b->blocks);
    if (blocks == NULL) {
        rc = vqkv__eval_fail(err, errlen, VQKV_ENOMEM, "out of memory");
        goto out;
    }
    double fp16_bytes = (double)b->view.region_bytes / 2.0;
    vqkv__eval_show(ep, "encoding and decoding", 0, 0);
    t0 = vqkv__now();
    for (uint32_t s = 0; s < b->blocks && rc == VQKV_OK; s++)
        rc = vqkv_codec_encode(codec, b->cache, &b->view, s, blocks + s * block_bytes);
    res->encode_gbps = fp16_bytes / (vqkv__now() - t0) / 1e9;
    t0 = vqkv__now();
    for (uint32_t s = 0; s < b->blocks && rc == VQKV_OK; s++)
        rc = vqkv_codec_decode(codec, blocks + s * block_bytes, b->restored, &b->view, s);
    res->decode_gbps = fp16_bytes / (vqkv__now() - t0) / 1e9;
    if (rc != VQKV_OK) {
        rc = vqkv__eval_fail(err, errlen, rc, "codec '%s': %s", spec, vqkv_strerror(rc));
        goto out;
    }

    const vqkv_layout_t *l = &b->layout;
    size_t side = (size_t)b->blocks * l->block_tokens * l->num_kv_heads * l->head_dim;
    size_t attn = (size_t)b->queries * dump->q_heads * l->head_dim;
    vqkv__err_t e[3] = {{0, 0}, {0, 0}, {0, 0}};
    for (uint32_t layer = 0; layer < l->num_layers; layer++) {
        vqkv__eval_show(ep, "attention", layer, l->num_layers);
        for (int kv = 0; kv < 2; kv++)
            vqkv__err_add(&e[kv], vqkv__cache_at(b, b->cache, layer, kv),
                          vqkv__cache_at(b, b->restored, layer, kv), side);
        vqkv__attention(b, dump, b->restored, layer, b->attn_stride, b->attn_out);
        vqkv__err_add(&e[2], b->attn_ref + layer * attn, b->attn_out, attn);
        ep->done++;
    }
    res->k_rel_err = vqkv__err_rel(&e[0]);
    res->v_rel_err = vqkv__err_rel(&e[1]);
    res->attn_rel_err = vqkv__err_rel(&e[2]);
out:
    free(blocks);
    vqkv_codec_free(codec);
    return rc;
}

int vqkv_eval_run(const vqkv_eval_opts_t *opts, vqkv_eval_result_t *results, char *err,
                  size_t errlen)
{
    vqkv__dump_t dump;
    vqkv__bench_t bench;
    int rc;

    if (opts == NULL || opts->kv_path == NULL || results == NULL || opts->n_specs == 0)
        return vqkv__eval_fail(err, errlen, VQKV_EINVAL, "need a KV dump and at least one codec");
    rc = vqkv__dump_open(opts->kv_path, &dump, err, errlen);
    if (rc != VQKV_OK)
        return rc;
    /* A progress that is off (no terminal) costs not even the counting. */
    vqkv__eval_progress_t ep = {
        .p = opts->progress != NULL && opts->progress->out != NULL ? opts->progress : NULL,
        .codecs = opts->n_specs};
    rc = vqkv__bench_init(&bench, &dump, opts, &ep, err, errlen);
    if (rc == VQKV_OK) {
        for (size_t i = 0; i < opts->n_specs && rc == VQKV_OK; i++) {
            ep.codec = i + 1;
            ep.spec = opts->specs[i];
            rc = vqkv__eval_codec(opts->specs[i], &dump, &bench, opts, &ep, &results[i], err,
                                  errlen);
        }
        vqkv__bench_free(&bench);
    }
    vqkv__dump_close(&dump);
    return rc;
}
