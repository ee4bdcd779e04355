/* calib_cpu.c -- how long vqkvd's online calibration takes on this CPU:
 * the codebooks of every (layer, K|V) of a model shape trained from N
 * tokens, as vqkvd trains them (vqkv_codec_train, seed 1, the default
 * iterations and one thread per CPU), and what they are worth: the
 * relative squared error of a round trip through the codec on held-out
 * tokens of the same distribution.
 *
 * The baseline, measured in the same run: the same training with the CPU's
 * vector instructions turned off (a child process with VQKV_CPU_SIMD=0),
 * on --baseline-layers layers only (the scalar path is the slow one), its
 * time scaled to the whole model.
 *
 * usage: calib_cpu [--shape llama3-8b|smollm2-135m] [--tokens N]
 *                  [--baseline-layers L] [--json FILE] [SPEC ...]
 */
#include "bench_util.h"

#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    const char *name;
    vqkv_layout_t layout;
} calib_shape_t;

static const calib_shape_t calib_shapes[] = {
    {"llama3-8b", {32, 8, 128, 16, VQKV_DTYPE_F16}},
    {"smollm2-135m", {30, 3, 64, 16, VQKV_DTYPE_F16}},
};

typedef struct {
    double seconds; /* training, all layers (scaled when fewer ran) */
    double rel_err; /* held-out round trip, sum (x - y)^2 / sum x^2 */
} calib_result_t;

/* n token-head vectors of one (layer, kv) as floats: bench_fill's values
 * (per-channel scales, as keys have), whole vectors drawn from a pool of
 * twice as many in an order set by seed, so that layers and the held-out
 * set differ. */
static void calib_vectors(float *x, size_t n, uint32_t head_dim, uint64_t seed)
{
    size_t pool = 2 * n;
    uint16_t *h = malloc(pool * head_dim * sizeof *h);
    if (h == NULL)
        return;
    bench_fill(h, pool * head_dim, head_dim);
    for (size_t i = 0; i < n; i++) {
        size_t v = (i * 2654435761u + seed * 40503u) % pool;
        vqkv_dtype_to_f32(VQKV_DTYPE_F16, h + v * head_dim, head_dim, x + i * head_dim);
    }
    free(h);
}

/* Trains codec's codebooks of layers [first, end) from tokens tokens;
 * the seconds it took. */
static int calib_train(vqkv_codec_t *codec, uint32_t first, uint32_t end, uint32_t tokens,
                       double *seconds)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    size_t n = (size_t)tokens * l->num_kv_heads;
    float *x = malloc(n * l->head_dim * sizeof *x);
    if (x == NULL)
        return VQKV_ENOMEM;
    vqkv_train_opts_t opts = {.seed = 1};
    int rc = VQKV_OK;
    *seconds = 0.0;
    for (uint32_t layer = first; layer < end && rc == VQKV_OK; layer++)
        for (int kv = 0; kv < 2 && rc == VQKV_OK; kv++) {
            calib_vectors(x, n, l->head_dim, 2 * layer + (uint64_t)kv);
            double t0 = bench_now();
            rc = vqkv_codec_train(codec, layer, kv, x, n, &opts);
            *seconds += bench_now() - t0;
        }
    free(x);
    return rc;
}

/* The codec's round-trip error on one held-out block per trained layer. */
static double calib_error(const vqkv_codec_t *codec, uint32_t layers)
{
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, l, 1);
    size_t per_side = (size_t)l->block_tokens * l->num_kv_heads * l->head_dim;
    uint16_t *in = calloc(view.region_bytes, 1), *out = calloc(view.region_bytes, 1);
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    float *x = malloc(per_side * sizeof *x);
    double err = 0.0, ref = 0.0;
    if (in == NULL || out == NULL || block == NULL || x == NULL)
        goto out;
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (int kv = 0; kv < 2; kv++) {
            calib_vectors(x, per_side / l->head_dim, l->head_dim, 1000 + 2 * layer + (uint64_t)kv);
            uint8_t *at = (uint8_t *)in + vqkv_kv_view_layer(&view, layer) + kv * view.kv_stride;
            vqkv_dtype_from_f32(VQKV_DTYPE_F16, x, per_side, at);
        }
    if (vqkv_codec_encode(codec, in, &view, 0, block) != VQKV_OK ||
        vqkv_codec_decode(codec, block, out, &view, 0) != VQKV_OK)
        goto out;
    for (uint32_t layer = 0; layer < layers; layer++)
        for (size_t kv = 0; kv < 2; kv++) {
            size_t at = (vqkv_kv_view_layer(&view, layer) + kv * view.kv_stride) / 2;
            for (size_t i = 0; i < per_side; i++) {
                float a, b;
                vqkv_dtype_to_f32(VQKV_DTYPE_F16, &in[at + i], 1, &a);
                vqkv_dtype_to_f32(VQKV_DTYPE_F16, &out[at + i], 1, &b);
                err += (double)(a - b) * (a - b);
                ref += (double)a * a;
            }
        }
out:
    free(in);
    free(out);
    free(block);
    free(x);
    return ref > 0.0 ? err / ref : -1.0;
}

/* Trains spec on layers [0, layers) from tokens tokens and measures it,
 * the time scaled to every layer, the error over layers [0, err_layers). A codec encodes whole
 * blocks, so the other layers get codebooks too, from one block of tokens, untimed. */
static int calib_run(const char *spec, const vqkv_layout_t *layout, uint32_t layers,
                     uint32_t err_layers, uint32_t tokens, calib_result_t *r)
{
    vqkv_codec_t *codec = NULL;
    double rest = 0.0;
    int rc = vqkv_codec_create(spec, layout, &codec);
    if (rc == VQKV_OK)
        rc = calib_train(codec, 0, layers, tokens, &r->seconds);
    if (rc == VQKV_OK)
        rc = calib_train(codec, layers, layout->num_layers, layout->block_tokens, &rest);
    r->seconds *= (double)layout->num_layers / layers;
    if (rc == VQKV_OK)
        r->rel_err = calib_error(codec, err_layers);
    vqkv_codec_free(codec);
    return rc;
}

/* The scalar baseline in a child with VQKV_CPU_SIMD=0, its result through
 * a pipe. */
static int calib_baseline(const char *spec, const vqkv_layout_t *layout, uint32_t layers,
                          uint32_t tokens, calib_result_t *r)
{
    int fds[2];
    if (pipe(fds) < 0)
        return VQKV_EIO;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        setenv("VQKV_CPU_SIMD", "0", 1);
        calib_result_t cr = {0};
        int rc = calib_run(spec, layout, layers, layers, tokens, &cr);
        _exit(rc == VQKV_OK && write(fds[1], &cr, sizeof cr) == (ssize_t)sizeof cr ? 0 : 1);
    }
    close(fds[1]);
    ssize_t got = pid > 0 ? read(fds[0], r, sizeof *r) : -1;
    close(fds[0]);
    int status = 0;
    if (pid > 0)
        waitpid(pid, &status, 0);
    return got == (ssize_t)sizeof *r && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? VQKV_OK
                                                                                      : VQKV_EIO;
}

int main(int argc, char **argv)
{
    const calib_shape_t *shape = &calib_shapes[0];
    uint32_t tokens = 1024, baseline_layers = 2;
    const char *json_path = NULL, *specs[16];
    size_t n_specs = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc) {
            const char *want = argv[++i];
            shape = NULL;
            for (size_t s = 0; s < sizeof calib_shapes / sizeof calib_shapes[0]; s++)
                if (strcmp(calib_shapes[s].name, want) == 0)
                    shape = &calib_shapes[s];
        } else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
            tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--baseline-layers") == 0 && i + 1 < argc) {
            baseline_layers = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
            json_path = argv[++i];
        } else if (argv[i][0] != '-' && n_specs < 16) {
            specs[n_specs++] = argv[i];
        } else {
            shape = NULL;
            break;
        }
    }
    if (shape == NULL || tokens == 0 || baseline_layers == 0 ||
        baseline_layers > shape->layout.num_layers) {
        fprintf(stderr, "usage: calib_cpu [--shape llama3-8b|smollm2-135m] [--tokens N] "
                        "[--baseline-layers L] [--json FILE] [SPEC ...]\n");
        return 2;
    }
    if (n_specs == 0)
        specs[n_specs++] = "rvq:d=8,b=8,r=2";
    /* The scalar children first: the parent must not have asked about the
     * CPU's vector instructions before they set VQKV_CPU_SIMD. */
    calib_result_t base[16] = {0}, fast[16] = {0};
    for (size_t i = 0; i < n_specs; i++)
        if (calib_baseline(specs[i], &shape->layout, baseline_layers, tokens, &base[i]) != VQKV_OK)
            fprintf(stderr, "calib_cpu: %s: the scalar baseline failed\n", specs[i]);
    FILE *json = json_path != NULL ? fopen(json_path, "w") : NULL;
    if (json_path != NULL && json == NULL) {
        fprintf(stderr, "calib_cpu: cannot write %s\n", json_path);
        return 1;
    }
    printf("calibration of %s (%u layers), %u tokens, one thread per CPU\n", shape->name,
           (unsigned)shape->layout.num_layers, (unsigned)tokens);
    printf("%-22s %10s %12s %10s %14s %10s\n", "codec", "train s", "scalar s", "speedup",
           "rel sq err", "scalar err");
    if (json != NULL)
        fprintf(json, "{\"shape\": \"%s\", \"tokens\": %u, \"baseline_layers\": %u, \"codecs\": [",
                shape->name, (unsigned)tokens, (unsigned)baseline_layers);
    int status = 0;
    for (size_t i = 0; i < n_specs; i++) {
        if (calib_run(specs[i], &shape->layout, shape->layout.num_layers, baseline_layers, tokens,
                      &fast[i]) != VQKV_OK) {
            fprintf(stderr, "calib_cpu: %s: training failed\n", specs[i]);
            status = 1;
            continue;
        }
        double speedup = base[i].seconds > 0.0 ? base[i].seconds / fast[i].seconds : 0.0;
        printf("%-22s %10.2f %12.2f %9.2fx %14.6f %10.6f\n", specs[i], fast[i].seconds,
               base[i].seconds, speedup, fast[i].rel_err, base[i].rel_err);
        if (json != NULL)
            fprintf(json,
                    "%s{\"spec\": \"%s\", \"train_seconds\": %.3f, \"scalar_seconds\": %.3f, "
                    "\"rel_sq_err\": %.6g, \"scalar_rel_sq_err\": %.6g}",
                    i ? ", " : "", specs[i], fast[i].seconds, base[i].seconds, fast[i].rel_err,
                    base[i].rel_err);
    }
    printf("scalar: VQKV_CPU_SIMD=0 on %u layer%s, its time scaled to %u; both errors over "
           "those layers (equal: the same codebooks)\n",
           (unsigned)baseline_layers, baseline_layers == 1 ? "" : "s",
           (unsigned)shape->layout.num_layers);
    if (json != NULL) {
        fprintf(json, "]}\n");
        fclose(json);
    }
    return status;
}
