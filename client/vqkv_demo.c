/* vqkv_demo.c -- vqkv-demo, one inference worker of the two-worker demo
 * (tools/demo.sh runs one of each, as separate processes).
 *
 * Both workers serve a SmolLM2-135M-shaped model (30 layers, 3 kv heads,
 * head_dim 64, 16-token blocks, f16) and keep their paged KV cache in a
 * memfd of their own, in vLLM's layout, registered with vqkvd. Their
 * prompts share a long system prompt and then differ.
 *
 *   --role offload  fills its slots with the KV of its prompt and puts
 *                   every full block (the partial tail stays local)
 *   --role restore  computes the keys of its own prompt, looks them up,
 *                   gets the shared prefix straight into its own slots,
 *                   and checks every restored byte against what the codec
 *                   decodes from the same KV, encoded here in-process
 *
 * KV data comes from a dump of SmolLM2-135M's real cache (--kv FILE, as
 * tools/kvdump.py writes it: block i holds the dump's tokens 16i..16i+15)
 * or, without one, is synthetic and a function of each block's key, so the
 * restoring process regenerates exactly what the offloading one stored.
 * The dump keeps no token ids, so token ids are stand-ins in both cases:
 * keys depend only on them, and the KV only on the block's position (dump)
 * or key (synthetic).
 *
 * A VQ codec needs codebooks, which the daemon trains online on the first
 * blocks it stores. With --warmup-tokens N the offload worker first puts N
 * tokens of other traffic and waits until the daemon has trained, so its
 * own prompt is stored compressed. The restoring worker checks bytes
 * exactly when --codebook names the file the daemon saved (under its state
 * dir), and otherwise against a bound on the relative reconstruction
 * error, --max-rel-err.
 *
 * usage: vqkv-demo --role offload|restore [--socket PATH] [--codec SPEC]
 *                  [--kv FILE] [--prefix-tokens N] [--user-tokens N]
 *                  [--warmup-tokens N] [--codebook FILE] [--max-rel-err X]
 *                  [--timeout-ms N]
 * Exit status 0 when everything was stored, found and restored exactly as
 * expected, 1 otherwise, 2 for a usage error.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "safetensors.h"
#include "vqkv.h"
#include "worker.h"

#define DEMO_MODEL_ID "HuggingFaceTB/SmolLM2-135M-Instruct"

typedef struct {
    const char *role;
    const char *socket_path; /* NULL: the daemon's default socket */
    const char *codec;
    const char *kv_path;
    const char *codebook; /* restore: the daemon's codebook file */
    uint32_t prefix_tokens, user_tokens, warmup_tokens;
    double max_rel_err;
    int timeout_ms; /* for every reply */
} demo_opts_t;

/* One worker's prompt, its block keys and where its KV comes from. */
typedef struct {
    vqkv_layout_t layout;
    uint32_t *tokens;
    size_t n_tokens;
    uint8_t (*keys)[VQKV_KEY_BYTES];
    size_t n_keys;
    size_t shared_blocks; /* full blocks inside the common system prompt */
    vqkv_st_file_t dump;
    int have_dump;
    const char *codec_name; /* as the user gave it; the canonical spec is long */
} demo_t;

static double demo_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void demo_usage(FILE *f)
{
    fputs("usage: vqkv-demo --role offload|restore [--socket PATH] [--codec SPEC] [--kv FILE]\n"
          "                 [--prefix-tokens N] [--user-tokens N] [--warmup-tokens N]\n"
          "                 [--codebook FILE] [--max-rel-err X] [--timeout-ms N]\n"
          "  --role offload   put the KV blocks of prompt A (system prompt + user A)\n"
          "  --role restore   look up prompt B (same system prompt + user B), get the\n"
          "                   shared prefix into this worker's slots and verify it\n"
          "  --codec SPEC     the codec vqkvd stores blocks with (default kivi4)\n"
          "  --kv FILE        real SmolLM2-135M KV from tools/kvdump.py (default: synthetic)\n"
          "  --prefix-tokens  tokens of the shared system prompt (default 1024)\n"
          "  --user-tokens    tokens after it, different per role (default 264)\n"
          "  --warmup-tokens  offload: first put this many tokens of other traffic and\n"
          "                   wait until the daemon has trained the codec's codebooks\n"
          "  --codebook FILE  restore: the codebooks the daemon saved, for a byte check\n"
          "  --max-rel-err    bound on the relative error for codecs with codebooks and\n"
          "                   no --codebook (default 0.5; others must match bit for bit)\n"
          "  --timeout-ms N   how long to wait for any reply of vqkvd (default 30000;\n"
          "                   longer for a daemon under valgrind)\n",
          f);
}

/* Stand-in token ids: the system prompt's are the same for both roles,
 * the user turn's depend on the role. */
static uint32_t demo_token(size_t i, uint32_t prefix_tokens, int role_salt)
{
    uint32_t x =
        (uint32_t)i * 2654435761u + (i < prefix_tokens ? 0u : 40503u * (uint32_t)role_salt);
    return 1u + (x >> 8) % 49151u; /* SmolLM2's vocabulary has 49152 entries */
}

/* Regenerates (or reads) the original KV of block i into slot of view at base. */
static void demo_fill(const demo_t *d, const vqkv_kv_view_t *view, void *base, uint32_t slot,
                      size_t i)
{
    if (d->have_dump)
        vqkv_worker_fill_dump(&d->layout, view, base, slot, &d->dump,
                              (uint64_t)i * d->layout.block_tokens);
    else
        vqkv_worker_fill_synthetic(&d->layout, view, base, slot, d->keys[i]);
}

static void demo_print_stats(vqkv_client_t *client)
{
    vqkv_stats_t st;
    if (vqkv_stats(client, &st) != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: stats: %s\n", vqkv_last_error(client));
        return;
    }
    double mib = 1024.0 * 1024.0;
    double ratio = st.bytes_stored > 0 ? (double)st.bytes_logical / (double)st.bytes_stored : 0.0;
    printf("daemon: %llu blocks held, %.1f MiB stored for %.1f MiB of f16 KV: %.2fx smaller, "
           "%.1f MiB saved; lookups so far %llu hits, %llu misses\n",
           (unsigned long long)st.blocks, (double)st.bytes_stored / mib,
           (double)st.bytes_logical / mib, ratio,
           (double)(st.bytes_logical - st.bytes_stored) / mib, (unsigned long long)st.hits,
           (unsigned long long)st.misses);
}

/* Seconds the offload worker waits for the daemon's codebook training. */
#define DEMO_TRAIN_WAIT_S 300.0

/* Other traffic before the prompt, while the daemon has no codebooks for a
 * VQ codec: `tokens` tokens (rounded down to blocks) of their own chain,
 * put in batches through the prompt's slots with the prompt's KV (block j
 * of the warm-up carries the KV of prompt block j mod n_keys), then waits
 * until the daemon has trained. Nothing to do when it has codebooks. */
static int demo_warmup(demo_t *d, vqkv_worker_t *w, uint32_t tokens)
{
    if (vqkv_model_codebooks_ready(w->model) || tokens < d->layout.block_tokens)
        return 0;
    size_t n = tokens / d->layout.block_tokens, batch = d->n_keys;
    uint32_t *ids = malloc((size_t)tokens * sizeof *ids);
    uint8_t(*keys)[VQKV_KEY_BYTES] = malloc(n * sizeof *keys);
    uint32_t *slots = malloc(batch * sizeof *slots);
    int status = 1;
    if (ids == NULL || keys == NULL || slots == NULL || batch == 0) {
        fprintf(stderr, "vqkv-demo: out of memory\n");
        goto out;
    }
    for (size_t i = 0; i < tokens; i++)
        ids[i] = demo_token(i, 0, 3);
    size_t got = 0;
    int rc = vqkv_model_block_keys(w->model, NULL, ids, tokens, NULL, 0, keys, n, &got);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: warm-up keys: %s\n", vqkv_client_strerror(rc));
        goto out;
    }
    printf("offload: vqkvd has no codebooks for %s yet: it stores fp16 while it calibrates on "
           "the first blocks, and re-encodes those once trained; putting %zu blocks of warm-up "
           "traffic\n",
           d->codec_name, n);
    double t0 = demo_now();
    for (size_t first = 0; first < n; first += batch) {
        size_t m = n - first < batch ? n - first : batch;
        for (size_t i = 0; i < m; i++) {
            slots[i] = (uint32_t)i;
            if (d->have_dump)
                demo_fill(d, &w->view, w->base, slots[i], (first + i) % d->n_keys);
            else
                vqkv_worker_fill_synthetic(&d->layout, &w->view, w->base, slots[i],
                                           keys[first + i]);
        }
        rc = vqkv_put(w->client, w->model, w->region, keys + first, first ? keys + first - 1 : NULL,
                      slots, m, NULL);
        if (rc < 0) {
            fprintf(stderr, "vqkv-demo: warm-up put: %s\n", vqkv_last_error(w->client));
            goto out;
        }
    }
    char err[256];
    rc = vqkv_worker_wait_codebooks(w, DEMO_MODEL_ID, DEMO_TRAIN_WAIT_S, err, sizeof err);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: %s\n", err);
        goto out;
    }
    printf("offload: vqkvd trained its codebooks: %.1f s after the warm-up began\n",
           demo_now() - t0);
    status = 0;
out:
    free(ids);
    free(keys);
    free(slots);
    return status;
}

static int demo_offload(demo_t *d, vqkv_worker_t *w)
{
    uint32_t *slots = malloc(d->n_keys * sizeof *slots);
    vqkv_put_status_t *st = malloc(d->n_keys * sizeof *st);
    if (slots == NULL || st == NULL) {
        free(slots);
        free(st);
        fprintf(stderr, "vqkv-demo: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < d->n_keys; i++) {
        slots[i] = (uint32_t)i;
        demo_fill(d, &w->view, w->base, slots[i], i);
    }
    double t0 = demo_now();
    int rc = vqkv_put(w->client, w->model, w->region, d->keys, NULL, slots, d->n_keys, st);
    double dt = demo_now() - t0;
    int status = 0;
    if (rc < 0) {
        fprintf(stderr, "vqkv-demo: put: %s\n", vqkv_last_error(w->client));
        status = 1;
    } else {
        size_t present = 0;
        for (size_t i = 0; i < d->n_keys; i++) {
            if (st[i] == VQKV_PUT_PRESENT)
                present++;
            else if (st[i] != VQKV_PUT_STORED && status == 0) {
                fprintf(stderr, "vqkv-demo: put: block %zu not stored (status %d)\n", i, st[i]);
                status = 1;
            }
        }
        double mib = (double)d->n_keys * vqkv_worker_block_logical_bytes(&d->layout) / 1048576.0;
        printf("offload: put %zu blocks (%.1f MiB of f16 KV) in %.1f ms: %d stored, %zu "
               "already held; the last %zu tokens stay in the worker\n",
               d->n_keys, mib, dt * 1e3, rc, present,
               d->n_tokens - d->n_keys * d->layout.block_tokens);
    }
    free(slots);
    free(st);
    return status;
}

/* Compares block i, restored into slot of w's region, with the original KV
 * and, when expect (a 1-slot cache) is given, byte for byte with it.
 * Adds to the squared error and norm sums; returns 0 when the bytes match. */
static int demo_compare(const demo_t *d, const vqkv_worker_t *w, uint32_t slot, const void *orig,
                        const vqkv_kv_view_t *one, const void *expect, float *a, float *b,
                        double *err2, double *norm2)
{
    size_t values = one->slot_stride / vqkv_dtype_size(d->layout.dtype);
    int mismatch = 0;
    for (uint32_t l = 0; l < d->layout.num_layers; l++) {
        for (uint32_t kv = 0; kv < 2; kv++) {
            const uint8_t *got = w->base + l * w->view.layer_stride + kv * w->view.kv_stride +
                                 slot * w->view.slot_stride;
            uint64_t at = l * one->layer_stride + kv * one->kv_stride;
            if (expect != NULL && memcmp(got, (const uint8_t *)expect + at, one->slot_stride) != 0)
                mismatch = 1;
            vqkv_dtype_to_f32(d->layout.dtype, got, values, a);
            vqkv_dtype_to_f32(d->layout.dtype, (const uint8_t *)orig + at, values, b);
            for (size_t j = 0; j < values; j++) {
                *err2 += ((double)a[j] - b[j]) * ((double)a[j] - b[j]);
                *norm2 += (double)b[j] * b[j];
            }
        }
    }
    return mismatch;
}

/* The relative error codec spec gives on blocks 0..n-1 of the demo's KV, by
 * a local encode and decode, and its bits a value into *bits; negative when
 * it cannot be measured. */
static double demo_codec_error(const demo_t *d, const char *spec, size_t n, double *bits)
{
    vqkv_codec_t *codec = NULL;
    if (vqkv_codec_create(spec, &d->layout, &codec) != VQKV_OK)
        return -1.0;
    *bits = vqkv_codec_bits_per_value(codec);
    vqkv_kv_view_t one;
    vqkv_kv_view_vllm(&one, &d->layout, 1);
    size_t values = one.region_bytes / vqkv_dtype_size(d->layout.dtype);
    uint8_t *orig = malloc(one.region_bytes), *back = malloc(one.region_bytes);
    uint8_t *packed = malloc(vqkv_codec_block_bytes(codec));
    float *a = malloc(values * sizeof *a), *b = malloc(values * sizeof *b);
    double err2 = 0.0, norm2 = 0.0;
    int rc = orig && back && packed && a && b ? VQKV_OK : VQKV_ENOMEM;
    for (size_t i = 0; i < n && rc == VQKV_OK; i++) {
        demo_fill(d, &one, orig, 0, i);
        rc = vqkv_codec_encode(codec, orig, &one, 0, packed);
        if (rc == VQKV_OK)
            rc = vqkv_codec_decode(codec, packed, back, &one, 0);
        vqkv_dtype_to_f32(d->layout.dtype, orig, values, a);
        vqkv_dtype_to_f32(d->layout.dtype, back, values, b);
        for (size_t j = 0; rc == VQKV_OK && j < values; j++) {
            err2 += ((double)a[j] - b[j]) * ((double)a[j] - b[j]);
            norm2 += (double)a[j] * a[j];
        }
    }
    free(orig);
    free(back);
    free(packed);
    free(a);
    free(b);
    vqkv_codec_free(codec);
    return rc == VQKV_OK && norm2 > 0.0 ? sqrt(err2 / norm2) : -1.0;
}

/* What a codec's relative error means: the plain codecs' on the same KV,
 * as "fp8 0.021 at 8.25 bits/value, ..." into buf. */
static void demo_error_context(const demo_t *d, size_t n, char *buf, size_t size)
{
    static const char *const baselines[] = {"fp8", "kivi4", "kivi2"};
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof baselines / sizeof baselines[0] && len < size; i++) {
        double bits = 0.0, e = demo_codec_error(d, baselines[i], n < 8 ? n : 8, &bits);
        if (e >= 0.0)
            len += (size_t)snprintf(buf + len, size - len, "%s%s %.3f at %.2f", len ? ", " : "",
                                    baselines[i], e, bits);
    }
}

/* Checks every restored block: exact against a local encode and decode
 * (with the daemon's codebooks from the file codebook, for a VQ codec), or
 * within max_rel_err for a VQ codec without them. */
static int demo_verify(const demo_t *d, const vqkv_worker_t *w, const uint32_t *slots, size_t n,
                       const char *codebook, double max_rel_err)
{
    vqkv_codec_t *codec = NULL;
    const char *spec = vqkv_model_codec(w->model);
    int rc = vqkv_codec_create(spec, &d->layout, &codec);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: cannot create codec %s locally: %s\n", spec, vqkv_strerror(rc));
        return 1;
    }
    if (codebook != NULL && (rc = vqkv_codebook_load(codec, codebook)) != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: %s: %s\n", codebook, vqkv_strerror(rc));
        vqkv_codec_free(codec);
        return 1;
    }
    int exact = !vqkv_codec_needs_training(codec);
    vqkv_kv_view_t one;
    vqkv_kv_view_vllm(&one, &d->layout, 1);
    size_t values = one.slot_stride / vqkv_dtype_size(d->layout.dtype);
    uint8_t *orig = malloc(one.region_bytes), *expect = malloc(one.region_bytes);
    uint8_t *packed = malloc(vqkv_codec_block_bytes(codec));
    float *a = malloc(values * sizeof *a), *b = malloc(values * sizeof *b);
    int status = 0;
    size_t mismatched = 0;
    double err2 = 0.0, norm2 = 0.0;
    if (orig == NULL || expect == NULL || packed == NULL || a == NULL || b == NULL) {
        fprintf(stderr, "vqkv-demo: out of memory\n");
        status = 1;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        demo_fill(d, &one, orig, 0, i);
        if (exact) {
            rc = vqkv_codec_encode(codec, orig, &one, 0, packed);
            if (rc == VQKV_OK)
                rc = vqkv_codec_decode(codec, packed, expect, &one, 0);
            if (rc != VQKV_OK) {
                fprintf(stderr, "vqkv-demo: local %s round trip: %s\n", spec, vqkv_strerror(rc));
                status = 1;
                goto out;
            }
        }
        mismatched += (size_t)demo_compare(d, w, slots[i], orig, &one, exact ? expect : NULL, a, b,
                                           &err2, &norm2);
    }
    double rel = norm2 > 0.0 ? sqrt(err2 / norm2) : 0.0;
    char context[160];
    demo_error_context(d, n, context, sizeof context);
    if (exact && mismatched == 0)
        printf("restore: verified: every restored byte equals the %s decode of the original KV; "
               "its relative error is %.4f at %.2f bits/value (on the same KV: %s)\n",
               d->codec_name, rel, vqkv_codec_bits_per_value(codec), context);
    else if (exact) {
        fprintf(stderr, "vqkv-demo: %zu of %zu restored blocks differ from the local %s decode\n",
                mismatched, n, d->codec_name);
        status = 1;
    } else if (rel <= max_rel_err)
        printf("restore: %s needs codebooks the daemon trained, so no byte check: relative error "
               "%.4f <= %.4f (on the same KV: %s)\n",
               d->codec_name, rel, max_rel_err, context);
    else {
        fprintf(stderr, "vqkv-demo: relative error %.4f of %s is over the bound %.4f\n", rel,
                d->codec_name, max_rel_err);
        status = 1;
    }
out:
    free(orig);
    free(expect);
    free(packed);
    free(a);
    free(b);
    vqkv_codec_free(codec);
    return status;
}

static int demo_restore(demo_t *d, vqkv_worker_t *w, const char *codebook, double max_rel_err)
{
    size_t found = 0;
    vqkv_lease_t lease = 0;
    int rc = vqkv_lookup(w->client, w->model, d->keys, d->n_keys, &found, &lease);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: lookup: %s\n", vqkv_last_error(w->client));
        return 1;
    }
    printf("restore: looked up %zu blocks, hit %zu (hit rate %.1f%%): the shared %u-token "
           "system prompt is %zu blocks\n",
           d->n_keys, found, d->n_keys ? 100.0 * (double)found / (double)d->n_keys : 0.0,
           (unsigned)(d->shared_blocks * d->layout.block_tokens), d->shared_blocks);
    if (found != d->shared_blocks) {
        fprintf(stderr,
                "vqkv-demo: expected exactly the %zu blocks of the shared prefix; was "
                "the offload worker run first, with the same codec?\n",
                d->shared_blocks);
        vqkv_release(w->client, lease);
        return 1;
    }
    /* Into the last slots, last block first: slots are the worker's to
     * choose, nothing ties them to where the other worker had the block. */
    uint32_t *slots = malloc(found * sizeof *slots);
    if (slots == NULL) {
        vqkv_release(w->client, lease);
        fprintf(stderr, "vqkv-demo: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < found; i++)
        slots[i] = w->view.num_slots - 1 - (uint32_t)i;
    double t0 = demo_now();
    rc = vqkv_get(w->client, lease, w->region, slots, found);
    double dt = demo_now() - t0;
    if (rc < 0)
        fprintf(stderr, "vqkv-demo: get: %s\n", vqkv_last_error(w->client));
    vqkv_release(w->client, lease);
    int status = 1;
    if (rc == (int)found) {
        double bytes = (double)found * (double)vqkv_worker_block_logical_bytes(&d->layout);
        printf("restore: got %zu blocks = %.1f MiB of f16 KV into this worker's own slots in "
               "%.1f ms (%.2f GB/s)\n",
               found, bytes / 1048576.0, dt * 1e3, dt > 0 ? bytes / dt / 1e9 : 0.0);
        status = demo_verify(d, w, slots, found, codebook, max_rel_err);
    } else if (rc >= 0)
        fprintf(stderr, "vqkv-demo: get wrote %d of %zu blocks\n", rc, found);
    free(slots);
    return status;
}

static int demo_parse(int argc, char **argv, demo_opts_t *o)
{
    static const struct option longopts[] = {
        {"role", required_argument, NULL, 'r'},
        {"socket", required_argument, NULL, 's'},
        {"codec", required_argument, NULL, 'c'},
        {"kv", required_argument, NULL, 'k'},
        {"prefix-tokens", required_argument, NULL, 'p'},
        {"user-tokens", required_argument, NULL, 'u'},
        {"max-rel-err", required_argument, NULL, 'e'},
        {"warmup-tokens", required_argument, NULL, 'w'},
        {"codebook", required_argument, NULL, 'b'},
        {"timeout-ms", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *o = (demo_opts_t){NULL, NULL, "kivi4", NULL, NULL, 1024, 264, 0, 0.5, VQKV_WORKER_TIMEOUT_MS};
    int opt;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'r': o->role = optarg; break;
        case 's': o->socket_path = optarg; break;
        case 'c': o->codec = optarg; break;
        case 'k': o->kv_path = optarg; break;
        case 'p': o->prefix_tokens = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'u': o->user_tokens = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'e': o->max_rel_err = strtod(optarg, NULL); break;
        case 'w': o->warmup_tokens = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'b': o->codebook = optarg; break;
        case 't': o->timeout_ms = (int)strtol(optarg, NULL, 10); break;
        case 'h': demo_usage(stdout); exit(0);
        default: return -1;
        }
    }
    if (optind < argc || o->role == NULL ||
        (strcmp(o->role, "offload") != 0 && strcmp(o->role, "restore") != 0))
        return -1;
    if (o->prefix_tokens < 16 || o->prefix_tokens > (1u << 20) || o->user_tokens > (1u << 20) ||
        o->warmup_tokens > (1u << 20) || !(o->max_rel_err > 0.0) || o->timeout_ms <= 0) {
        fprintf(stderr, "vqkv-demo: --prefix-tokens must be 16..2^20 (a block at least), "
                        "--user-tokens and --warmup-tokens at most 2^20, --max-rel-err "
                        "and --timeout-ms positive\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    demo_opts_t o;
    if (demo_parse(argc, argv, &o) < 0) {
        demo_usage(stderr);
        return 2;
    }
    int restore = strcmp(o.role, "restore") == 0;
    demo_t d = {0};
    vqkv_worker_shape("smollm2-135m", &d.layout);
    d.n_tokens = (size_t)o.prefix_tokens + o.user_tokens;
    d.shared_blocks = o.prefix_tokens / d.layout.block_tokens;
    d.tokens = malloc(d.n_tokens * sizeof *d.tokens);
    size_t max_keys = d.n_tokens / d.layout.block_tokens;
    d.keys = malloc((max_keys ? max_keys : 1) * sizeof *d.keys);
    if (d.tokens == NULL || d.keys == NULL) {
        fprintf(stderr, "vqkv-demo: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < d.n_tokens; i++)
        d.tokens[i] = demo_token(i, o.prefix_tokens, restore ? 2 : 1);

    char err[512];
    if (o.kv_path != NULL) {
        /* The restoring worker only ever regenerates the shared prefix. */
        uint64_t need = restore ? (uint64_t)d.shared_blocks * d.layout.block_tokens
                                : (uint64_t)max_keys * d.layout.block_tokens;
        if (vqkv_st_open(o.kv_path, &d.dump, err, sizeof err) != VQKV_OK ||
            vqkv_worker_dump_check(&d.dump, &d.layout, need, err, sizeof err) != VQKV_OK) {
            fprintf(stderr, "vqkv-demo: %s: %s\n", o.kv_path, err);
            return 1;
        }
        d.have_dump = 1;
    }

    vqkv_worker_t w;
    char name[32];
    snprintf(name, sizeof name, "vqkv-demo-%s", o.role);
    /* Enough slots for the whole prompt's full blocks. */
    d.codec_name = o.codec;
    if (vqkv_worker_open(&w, o.socket_path, name, o.timeout_ms, DEMO_MODEL_ID, &d.layout, o.codec,
                         (uint32_t)(max_keys ? max_keys : 1), err, sizeof err) != VQKV_OK) {
        fprintf(stderr, "vqkv-demo: %s\n", err);
        return 1;
    }
    int rc = vqkv_model_block_keys(w.model, NULL, d.tokens, d.n_tokens, NULL, 0, d.keys, max_keys,
                                   &d.n_keys);
    int status = 1;
    if (rc != VQKV_OK)
        fprintf(stderr, "vqkv-demo: block keys: %s\n", vqkv_client_strerror(rc));
    else {
        uint64_t logical = vqkv_worker_block_logical_bytes(&d.layout);
        printf("%s: prompt of %zu tokens (%u shared + %u own) = %zu full blocks, codec %s (%u "
               "bytes a block, %llu in f16: %.2fx), KV %s\n",
               o.role, d.n_tokens, o.prefix_tokens, o.user_tokens, d.n_keys, d.codec_name,
               vqkv_model_block_bytes(w.model), (unsigned long long)logical,
               (double)logical / (double)vqkv_model_block_bytes(w.model),
               d.have_dump ? o.kv_path : "synthetic");
        status = restore ? demo_restore(&d, &w, o.codebook, o.max_rel_err)
                         : demo_warmup(&d, &w, o.warmup_tokens);
        if (!restore && status == 0)
            status = demo_offload(&d, &w);
        demo_print_stats(w.client);
    }
    vqkv_worker_close(&w);
    if (d.have_dump)
        vqkv_st_close(&d.dump);
    free(d.tokens);
    free(d.keys);
    return status;
}
