/* vqkvctl.c -- the vqkv admin command line.
 *
 * One subcommand per job; every subcommand prints a readable table, or
 * with --json one JSON document on stdout, and exits non-zero with a
 * message on stderr when anything fails.
 *   eval   codec fidelity on a KV dump (see eval.h)
 */
#include "eval.h"
#include "vqkv_codec.h"

#include <getopt.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VQKVCTL_MAX_CODECS 32

static void vqkvctl_usage(FILE *out)
{
    fputs("usage: vqkvctl eval --kv FILE --codec SPEC [--codec SPEC ...] [options]\n"
          "\n"
          "eval: train each codec's codebooks on the last tokens of a KV dump and\n"
          "measure it on the held-out tokens before them (from position 0).\n"
          "  --kv FILE             safetensors with layers.N.q/k/v\n"
          "  --codec SPEC          codec to evaluate (repeatable), e.g. rvq:d=8,b=8,r=2\n"
          "  --block-tokens N      tokens per block (default 32)\n"
          "  --train-tokens N      last tokens to train on (default: half the dump)\n"
          "  --attn-stride N       score every N-th held-out query (default 4)\n"
          "  --seed N              training seed (default 0)\n"
          "  --threads N           training threads (default: all CPUs)\n"
          "  --save-codebooks DIR  write each trained codec's codebook file to DIR\n"
          "  --json                one JSON array on stdout instead of the table\n"
          "  --json-file FILE      also write that JSON array to FILE\n",
          out);
}

/* Parses a whole unsigned decimal into *out, false otherwise. */
static bool vqkvctl_parse_u64(const char *text, uint64_t max, uint64_t *out)
{
    char *end;
    if (text[0] < '0' || text[0] > '9')
        return false;
    unsigned long long v = strtoull(text, &end, 10);
    if (*end != '\0' || v > max)
        return false;
    *out = v;
    return true;
}

static void vqkvctl_print_json(FILE *out, const vqkv_eval_result_t *res, size_t n)
{
    struct json_object *arr = json_object_new_array();
    for (size_t i = 0; i < n; i++) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "codec", json_object_new_string(res[i].spec));
        json_object_object_add(o, "bits_per_value", json_object_new_double(res[i].bits_per_value));
        json_object_object_add(o, "compression_ratio",
                               json_object_new_double(res[i].compression_ratio));
        json_object_object_add(o, "k_rel_err", json_object_new_double(res[i].k_rel_err));
        json_object_object_add(o, "v_rel_err", json_object_new_double(res[i].v_rel_err));
        json_object_object_add(o, "attn_rel_err", json_object_new_double(res[i].attn_rel_err));
        json_object_object_add(o, "train_seconds_per_layer",
                               json_object_new_double(res[i].train_seconds_per_layer));
        json_object_object_add(o, "encode_gbps", json_object_new_double(res[i].encode_gbps));
        json_object_object_add(o, "decode_gbps", json_object_new_double(res[i].decode_gbps));
        json_object_array_add(arr, o);
    }
    fprintf(out, "%s\n", json_object_to_json_string_ext(arr, JSON_C_TO_STRING_PRETTY));
    json_object_put(arr);
}

static void vqkvctl_print_table(const vqkv_eval_result_t *res, size_t n)
{
    printf("%-34s %6s %6s %8s %8s %8s %9s %8s %8s\n", "codec", "bits", "ratio", "K err", "V err",
           "attn err", "train s/L", "enc GB/s", "dec GB/s");
    for (size_t i = 0; i < n; i++)
        printf("%-34s %6.3f %6.2f %8.4f %8.4f %8.4f %9.3f %8.3f %8.3f\n", res[i].spec,
               res[i].bits_per_value, res[i].compression_ratio, res[i].k_rel_err, res[i].v_rel_err,
               res[i].attn_rel_err, res[i].train_seconds_per_layer, res[i].encode_gbps,
               res[i].decode_gbps);
}

static int vqkvctl_eval(int argc, char **argv)
{
    static const struct option options[] = {
        {"kv", required_argument, NULL, 'k'},
        {"codec", required_argument, NULL, 'c'},
        {"block-tokens", required_argument, NULL, 'b'},
        {"train-tokens", required_argument, NULL, 't'},
        {"attn-stride", required_argument, NULL, 'a'},
        {"seed", required_argument, NULL, 's'},
        {"threads", required_argument, NULL, 'j'},
        {"save-codebooks", required_argument, NULL, 'o'},
        {"json", no_argument, NULL, 'J'},
        {"json-file", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *specs[VQKVCTL_MAX_CODECS];
    vqkv_eval_opts_t opts = {.specs = specs};
    vqkv_eval_result_t results[VQKVCTL_MAX_CODECS];
    bool json = false;
    const char *json_file = NULL;
    uint64_t num;
    int c;

    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'k': opts.kv_path = optarg; break;
        case 'c':
            if (opts.n_specs == VQKVCTL_MAX_CODECS) {
                fprintf(stderr, "vqkvctl eval: at most %d codecs\n", VQKVCTL_MAX_CODECS);
                return 2;
            }
            specs[opts.n_specs++] = optarg;
            break;
        case 'o': opts.save_dir = optarg; break;
        case 'J': json = true; break;
        case 'f': json_file = optarg; break;
        case 'h': vqkvctl_usage(stdout); return 0;
        case 'b':
        case 't':
        case 'a':
        case 's':
        case 'j':
            if (!vqkvctl_parse_u64(optarg, c == 's' ? UINT64_MAX : UINT32_MAX, &num)) {
                fprintf(stderr, "vqkvctl eval: '%s' is not a valid number\n", optarg);
                return 2;
            }
            if (c == 'b')
                opts.block_tokens = (uint32_t)num;
            else if (c == 't')
                opts.train_tokens = (uint32_t)num;
            else if (c == 'a')
                opts.attn_stride = (uint32_t)num;
            else if (c == 's')
                opts.seed = num;
            else
                opts.threads = (uint32_t)num;
            break;
        default: vqkvctl_usage(stderr); return 2;
        }
    }
    if (opts.kv_path == NULL || opts.n_specs == 0 || optind != argc) {
        vqkvctl_usage(stderr);
        return 2;
    }
    char err[512] = "";
    int rc = vqkv_eval_run(&opts, results, err, sizeof err);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkvctl eval: %s\n", err);
        return 1;
    }
    if (json)
        vqkvctl_print_json(stdout, results, opts.n_specs);
    else
        vqkvctl_print_table(results, opts.n_specs);
    if (json_file != NULL) {
        FILE *f = fopen(json_file, "w");
        if (f == NULL) {
            fprintf(stderr, "vqkvctl eval: cannot write %s\n", json_file);
            return 1;
        }
        vqkvctl_print_json(f, results, opts.n_specs);
        if (fclose(f) != 0) {
            fprintf(stderr, "vqkvctl eval: cannot write %s\n", json_file);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        vqkvctl_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "eval") == 0)
        return vqkvctl_eval(argc - 1, argv + 1);
    fprintf(stderr, "vqkvctl: unknown command '%s'\n", argv[1]);
    vqkvctl_usage(stderr);
    return 2;
}
