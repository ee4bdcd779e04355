/* vqkvctl.c -- the vqkv admin command line.
 *
 * One subcommand per job; every subcommand prints a readable table, or
 * with --json one JSON document on stdout, and exits non-zero with a
 * message on stderr when anything fails.
 *   eval    codec fidelity on a KV dump (see eval.h); on a terminal it
 *           shows a progress line on stderr (progress.h)
 *   stats   the daemon's counters, totals and per tenant (libvqkv, vqkv.h)
 *   health  exit 0 when the daemon answers Hello, non-zero otherwise
 *   pin, unpin, evict   act on the full blocks of a token sequence (or, for
 *           evict, of a whole model) of a model the tenant registered
 * --socket PATH before the daemon's commands names its socket (default:
 * vqkv_default_socket, vqkv.h).
 */
#include "eval.h"
#include "vqkv.h"
#include "vqkv_codec.h"

#include <errno.h>
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
          "       vqkvctl --version\n"
          "       vqkvctl [--socket PATH] stats [--json]\n"
          "       vqkvctl [--socket PATH] health\n"
          "       vqkvctl [--socket PATH] pin --model ID [--heads FIRST:COUNT]\n"
          "               (--tokens 1,2,3,...|--tokens-file FILE) [--ttl-ms N] [--json]\n"
          "       vqkvctl [--socket PATH] unpin --model ID [--heads FIRST:COUNT]\n"
          "               (--tokens 1,2,3,...|--tokens-file FILE) [--json]\n"
          "       vqkvctl [--socket PATH] evict --model ID [--heads FIRST:COUNT]\n"
          "               (--tokens 1,2,3,...|--tokens-file FILE|--all) [--json]\n"
          "       vqkvctl [--socket PATH] flush\n"
          "\n"
          "stats: the daemon's counters (blocks, bytes, hits, misses, evictions, ...), in\n"
          "total and per tenant (every tenant for an admin, else the caller's own).\n"
          "health: exit 0 when the daemon answers, 1 with a message otherwise.\n"
          "pin, unpin, evict: the full blocks of the token ids (decimal, separated by\n"
          "commas or white space) of a model this user's workers registered, keyed as\n"
          "they key them. evict also takes each block's descendants; --all evicts\n"
          "every block of the model that is not leased or pinned (nor above one).\n"
          "flush: write every block memory holds that the disk tier lacks, and return\n"
          "once all are on disk (admin_uids, root or vqkvd's own user).\n"
          "  --heads FIRST:COUNT   the registered kv head range (default: the one\n"
          "                        starting at head 0)\n"
          "  --ttl-ms N            how long the pin lasts (default: 4294967295, about\n"
          "                        49 days; unpin ends it)\n"
          "  --socket PATH         the daemon's socket, before or after the command\n"
          "                        (default: $VQKV_SOCKET, else your own\n"
          "                        $XDG_RUNTIME_DIR/vqkv/vqkv.sock if it exists, else\n"
          "                        /run/vqkv/vqkv.sock)\n"
          "\n"
          "eval: train each codec's codebooks on the last tokens of a KV dump and\n"
          "measure it on the held-out tokens before them (from position 0). On a\n"
          "terminal, stderr shows a progress line (codec, layer, rate, ETA).\n"
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

/* The results as JSON into path (--json-file): 0, or 1 with the reason
 * on stderr. */
static int vqkvctl_write_json(const char *path, const vqkv_eval_result_t *res, size_t n)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "vqkvctl eval: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    vqkvctl_print_json(f, res, n);
    if (fclose(f) != 0) {
        fprintf(stderr, "vqkvctl eval: cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    return 0;
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
    /* Where the run is, on stderr when that is a terminal (progress.h),
     * erased before the table, the JSON or the error. */
    vqkv_progress_t progress;
    vqkv_progress_start(&progress, stderr);
    opts.progress = &progress;
    int rc = vqkv_eval_run(&opts, results, err, sizeof err);
    vqkv_progress_end(&progress);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkvctl eval: %s\n", err);
        return 1;
    }
    if (json)
        vqkvctl_print_json(stdout, results, opts.n_specs);
    else
        vqkvctl_print_table(results, opts.n_specs);
    return json_file != NULL ? vqkvctl_write_json(json_file, results, opts.n_specs) : 0;
}

#define VQKVCTL_TIMEOUT_MS 5000
/* A flush writes down what memory holds: minutes for a large pool. */
#define VQKVCTL_FLUSH_TIMEOUT_MS (30 * 60 * 1000)

/* Connects for a command; prints why not and returns NULL on failure. */
static vqkv_client_t *vqkvctl_connect(const char *cmd, const char *socket_path, int timeout_ms)
{
    char path[108];
    if (socket_path == NULL) {
        if (vqkv_default_socket(path, sizeof path) != VQKV_OK) {
            fprintf(stderr, "vqkvctl %s: the default socket path is too long; give --socket PATH\n",
                    cmd);
            return NULL;
        }
        socket_path = path;
    }
    vqkv_client_t *client;
    errno = 0;
    int rc = vqkv_connect(socket_path, "vqkvctl", timeout_ms, &client);
    if (rc != VQKV_OK) {
        int e = errno;
        fprintf(stderr, "vqkvctl %s: cannot talk to vqkvd at %s: %s%s%s\n", cmd, socket_path,
                vqkv_client_strerror(rc), rc == VQKV_EIO && e != 0 ? ": " : "",
                rc == VQKV_EIO && e != 0 ? strerror(e) : "");
        return NULL;
    }
    return client;
}

static int vqkvctl_health(int argc, char **argv, const char *socket_path)
{
    if (argc != 1) {
        vqkvctl_usage(stderr);
        return 2;
    }
    (void)argv;
    vqkv_client_t *client = vqkvctl_connect("health", socket_path, VQKVCTL_TIMEOUT_MS);
    if (client == NULL)
        return 1;
    printf("ok: vqkvd %s, %s backend, tenant %s\n", vqkv_client_server_version(client),
           vqkv_client_backend(client), vqkv_client_tenant(client));
    vqkv_close(client);
    return 0;
}

static int vqkvctl_flush(int argc, char **argv, const char *socket_path)
{
    if (argc != 1) {
        vqkvctl_usage(stderr);
        return 2;
    }
    (void)argv;
    vqkv_client_t *client = vqkvctl_connect("flush", socket_path, VQKVCTL_FLUSH_TIMEOUT_MS);
    if (client == NULL)
        return 1;
    size_t written = 0;
    int rc = vqkv_flush(client, &written);
    if (rc != VQKV_OK)
        fprintf(stderr, "vqkvctl: flush: %s\n", vqkv_last_error(client));
    else
        printf("flushed: %zu blocks written to the disk tier\n", written);
    vqkv_close(client);
    return rc == VQKV_OK ? 0 : 1;
}

/* n bytes as "12.3 MiB" (powers of 1024), or "512 B". */
static const char *vqkvctl_bytes(uint64_t n, char *buf, size_t size)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)n;
    size_t u = 0;
    while (v >= 1024.0 && u + 1 < sizeof units / sizeof units[0]) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, size, "%llu B", (unsigned long long)n);
    else
        snprintf(buf, size, "%.1f %s", v, units[u]);
    return buf;
}

/* Hits over lookups' blocks asked, as "87.5%", "-" before any. */
static const char *vqkvctl_rate(uint64_t hits, uint64_t misses, char *buf, size_t size)
{
    if (hits + misses == 0)
        snprintf(buf, size, "-");
    else
        snprintf(buf, size, "%.1f%%", 100.0 * (double)hits / (double)(hits + misses));
    return buf;
}

/* The stats for a person: sizes in KiB/MiB/GiB, the compression ratio, the
 * hit rate; --json has the exact counts. */
static void vqkvctl_stats_table(const vqkv_stats_t *st)
{
    char a[32], b[32], c[32];
    double ratio = st->bytes_stored > 0 ? (double)st->bytes_logical / (double)st->bytes_stored : 0;
    printf("blocks      %llu held: %s stored, %s as the workers' KV (%.2fx smaller)\n",
           (unsigned long long)st->blocks, vqkvctl_bytes(st->bytes_stored, a, sizeof a),
           vqkvctl_bytes(st->bytes_logical, b, sizeof b), ratio);
    printf("hit rate    %s (%llu blocks found, %llu missed)\n",
           vqkvctl_rate(st->hits, st->misses, a, sizeof a), (unsigned long long)st->hits,
           (unsigned long long)st->misses);
    printf("evictions   %llu\n", (unsigned long long)st->evictions);
    printf("pool        %s of %s used (%llu slots)\n",
           vqkvctl_bytes(st->pool_bytes_used, a, sizeof a),
           vqkvctl_bytes(st->pool_bytes, b, sizeof b), (unsigned long long)st->pool_slots_used);
    printf("staging     %s for %llu blocks not yet encoded (%llu puts staged, %llu waited)\n",
           vqkvctl_bytes(st->staging_bytes, a, sizeof a), (unsigned long long)st->encode_backlog,
           (unsigned long long)st->puts_staged, (unsigned long long)st->puts_staging_full);
    if (st->disk_limit_bytes > 0)
        printf("disk        %llu blocks, %s of %s; %llu written, %llu read back, %llu damaged, "
               "%llu failed writes, %llu dropped\n",
               (unsigned long long)st->disk_blocks, vqkvctl_bytes(st->disk_bytes, a, sizeof a),
               vqkvctl_bytes(st->disk_limit_bytes, b, sizeof b),
               (unsigned long long)st->disk_writes, (unsigned long long)st->disk_reads,
               (unsigned long long)st->disk_bad_records, (unsigned long long)st->disk_write_errors,
               (unsigned long long)st->disk_dropped);
    printf("clients     %u connected, %llu leases, %llu regions\n", st->clients,
           (unsigned long long)st->leases, (unsigned long long)st->regions);
    printf("\n%-12s %10s %12s %12s %9s %10s %12s\n", "tenant", "blocks", "stored", "logical",
           "hit rate", "evictions", "quota");
    for (uint32_t i = 0; i < st->n_tenants; i++) {
        const vqkv_tenant_stats_t *t = &st->tenants[i];
        char quota[32] = "unlimited";
        if (t->quota_bytes != 0)
            vqkvctl_bytes(t->quota_bytes, quota, sizeof quota);
        printf("%-12s %10llu %12s %12s %9s %10llu %12s\n", t->tenant, (unsigned long long)t->blocks,
               vqkvctl_bytes(t->bytes_stored, a, sizeof a),
               vqkvctl_bytes(t->bytes_logical, b, sizeof b),
               vqkvctl_rate(t->hits, t->misses, c, sizeof c), (unsigned long long)t->evictions,
               quota);
    }
}

static int vqkvctl_stats(int argc, char **argv, const char *socket_path)
{
    bool json = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = true;
        } else {
            vqkvctl_usage(stderr);
            return 2;
        }
    }
    vqkv_client_t *client = vqkvctl_connect("stats", socket_path, VQKVCTL_TIMEOUT_MS);
    if (client == NULL)
        return 1;
    vqkv_stats_t st;
    int rc = vqkv_stats(client, &st);
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkvctl stats: %s: %s\n", vqkv_client_strerror(rc),
                vqkv_last_error(client));
        vqkv_close(client);
        return 1;
    }
    vqkv_close(client);
    if (json) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "blocks", json_object_new_uint64(st.blocks));
        json_object_object_add(o, "bytes_stored", json_object_new_uint64(st.bytes_stored));
        json_object_object_add(o, "bytes_logical", json_object_new_uint64(st.bytes_logical));
        json_object_object_add(o, "hits", json_object_new_uint64(st.hits));
        json_object_object_add(o, "misses", json_object_new_uint64(st.misses));
        json_object_object_add(o, "evictions", json_object_new_uint64(st.evictions));
        json_object_object_add(o, "clients", json_object_new_uint64(st.clients));
        json_object_object_add(o, "leases", json_object_new_uint64(st.leases));
        json_object_object_add(o, "pool_bytes", json_object_new_uint64(st.pool_bytes));
        json_object_object_add(o, "regions", json_object_new_uint64(st.regions));
        json_object_object_add(o, "pool_slots_used", json_object_new_uint64(st.pool_slots_used));
        json_object_object_add(o, "pool_bytes_used", json_object_new_uint64(st.pool_bytes_used));
        json_object_object_add(o, "staging_bytes", json_object_new_uint64(st.staging_bytes));
        json_object_object_add(o, "encode_backlog", json_object_new_uint64(st.encode_backlog));
        json_object_object_add(o, "puts_staged", json_object_new_uint64(st.puts_staged));
        json_object_object_add(o, "puts_staging_full",
                               json_object_new_uint64(st.puts_staging_full));
        json_object_object_add(o, "disk_blocks", json_object_new_uint64(st.disk_blocks));
        json_object_object_add(o, "disk_bytes", json_object_new_uint64(st.disk_bytes));
        json_object_object_add(o, "disk_limit_bytes", json_object_new_uint64(st.disk_limit_bytes));
        json_object_object_add(o, "disk_writes", json_object_new_uint64(st.disk_writes));
        json_object_object_add(o, "disk_reads", json_object_new_uint64(st.disk_reads));
        json_object_object_add(o, "disk_bad_records", json_object_new_uint64(st.disk_bad_records));
        json_object_object_add(o, "disk_write_errors",
                               json_object_new_uint64(st.disk_write_errors));
        json_object_object_add(o, "disk_dropped", json_object_new_uint64(st.disk_dropped));
        struct json_object *tenants = json_object_new_array();
        for (uint32_t i = 0; i < st.n_tenants; i++) {
            const vqkv_tenant_stats_t *t = &st.tenants[i];
            struct json_object *to = json_object_new_object();
            json_object_object_add(to, "tenant", json_object_new_string(t->tenant));
            json_object_object_add(to, "blocks", json_object_new_uint64(t->blocks));
            json_object_object_add(to, "bytes_stored", json_object_new_uint64(t->bytes_stored));
            json_object_object_add(to, "bytes_logical", json_object_new_uint64(t->bytes_logical));
            json_object_object_add(to, "hits", json_object_new_uint64(t->hits));
            json_object_object_add(to, "misses", json_object_new_uint64(t->misses));
            json_object_object_add(to, "evictions", json_object_new_uint64(t->evictions));
            json_object_object_add(to, "quota_bytes", json_object_new_uint64(t->quota_bytes));
            json_object_array_add(tenants, to);
        }
        json_object_object_add(o, "tenants", tenants);
        printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY));
        json_object_put(o);
    } else {
        vqkvctl_stats_table(&st);
    }
    return 0;
}

/* ---- pin, unpin, evict -------------------------------------------------------- */

/* What pin, unpin and evict act on. */
typedef struct {
    const char *model;
    uint32_t head_first, head_count; /* count 0: the range registered first */
    uint32_t *tokens;
    size_t n_tokens, cap_tokens;
    uint32_t ttl_ms;
    bool has_tokens, has_ttl, all, json;
} vqkvctl_blocks_t;

/* Appends the token ids in text (decimal, separated by commas or white
 * space) to b->tokens; false on anything else. */
static bool vqkvctl_parse_tokens(vqkvctl_blocks_t *b, const char *text)
{
    const char *sep = ", \t\r\n";
    const char *p = text + strspn(text, sep);
    while (*p != '\0') {
        size_t len = strcspn(p, sep);
        char word[16];
        uint64_t v;
        if (len >= sizeof word)
            return false;
        memcpy(word, p, len);
        word[len] = '\0';
        if (!vqkvctl_parse_u64(word, UINT32_MAX, &v))
            return false;
        if (b->n_tokens == b->cap_tokens) {
            size_t cap = b->cap_tokens ? 2 * b->cap_tokens : 256;
            uint32_t *grown = realloc(b->tokens, cap * sizeof *grown);
            if (grown == NULL)
                return false;
            b->tokens = grown;
            b->cap_tokens = cap;
        }
        b->tokens[b->n_tokens++] = (uint32_t)v;
        p += len;
        p += strspn(p, sep);
    }
    b->has_tokens = true;
    return true;
}

/* The token ids of a file (the whole file is read: token lists are small). */
static bool vqkvctl_parse_tokens_file(vqkvctl_blocks_t *b, const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    char *text = NULL;
    size_t len = 0, cap = 0, got;
    bool ok = true;
    do {
        if (len + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 8192;
            char *grown = realloc(text, cap);
            if (grown == NULL) {
                ok = false;
                break;
            }
            text = grown;
        }
        got = fread(text + len, 1, cap - len - 1, f);
        len += got;
    } while (got > 0);
    ok = ok && !ferror(f);
    fclose(f);
    if (ok) {
        text[len] = '\0';
        ok = memchr(text, '\0', len) == NULL && vqkvctl_parse_tokens(b, text);
    }
    free(text);
    return ok;
}

/* Parses the options of cmd; 0, or the exit status of a usage error. */
static int vqkvctl_blocks_parse(const char *cmd, int argc, char **argv, vqkvctl_blocks_t *b)
{
    static const struct option options[] = {
        {"model", required_argument, NULL, 'm'},  {"heads", required_argument, NULL, 'H'},
        {"tokens", required_argument, NULL, 't'}, {"tokens-file", required_argument, NULL, 'f'},
        {"ttl-ms", required_argument, NULL, 'T'}, {"all", no_argument, NULL, 'a'},
        {"json", no_argument, NULL, 'J'},         {NULL, 0, NULL, 0},
    };
    bool pin = strcmp(cmd, "pin") == 0, evict = strcmp(cmd, "evict") == 0;
    uint64_t num, first, count;
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'm': b->model = optarg; break;
        case 'H': {
            char *colon = strchr(optarg, ':');
            if (colon == NULL) {
                fprintf(stderr, "vqkvctl %s: --heads takes FIRST:COUNT\n", cmd);
                return 2;
            }
            *colon = '\0';
            if (!vqkvctl_parse_u64(optarg, UINT32_MAX, &first) ||
                !vqkvctl_parse_u64(colon + 1, UINT32_MAX, &count) || count == 0) {
                fprintf(stderr, "vqkvctl %s: --heads takes FIRST:COUNT, COUNT > 0\n", cmd);
                return 2;
            }
            b->head_first = (uint32_t)first;
            b->head_count = (uint32_t)count;
            break;
        }
        case 't':
        case 'f':
            if (!(c == 't' ? vqkvctl_parse_tokens(b, optarg)
                           : vqkvctl_parse_tokens_file(b, optarg))) {
                fprintf(stderr, "vqkvctl %s: %s%s is not a list of token ids\n", cmd,
                        c == 't' ? "" : "the file ", optarg);
                return 2;
            }
            break;
        case 'T':
            if (!pin || !vqkvctl_parse_u64(optarg, UINT32_MAX, &num) || num == 0) {
                fprintf(stderr, "vqkvctl %s: --ttl-ms is pin's, from 1 to %u\n", cmd,
                        (unsigned)UINT32_MAX);
                return 2;
            }
            b->ttl_ms = (uint32_t)num;
            b->has_ttl = true;
            break;
        case 'a':
            if (!evict) {
                vqkvctl_usage(stderr);
                return 2;
            }
            b->all = true;
            break;
        case 'J': b->json = true; break;
        default: vqkvctl_usage(stderr); return 2;
        }
    }
    if (b->model == NULL || optind != argc || b->has_tokens == b->all) {
        vqkvctl_usage(stderr);
        return 2;
    }
    /* A pin with ttl_ms 0 would end as vqkvctl disconnects: the longest
     * TTL the protocol carries instead. */
    if (pin && !b->has_ttl)
        b->ttl_ms = UINT32_MAX;
    return 0;
}

/* pin, unpin and evict: find the model, key the tokens, act, report. */
static int vqkvctl_blocks(int argc, char **argv, const char *socket_path)
{
    const char *cmd = argv[0];
    vqkvctl_blocks_t b = {0};
    uint8_t(*keys)[VQKV_KEY_BYTES] = NULL;
    vqkv_client_t *client = NULL;
    size_t n_keys = 0, count = 0;
    int status = vqkvctl_blocks_parse(cmd, argc, argv, &b);
    if (status != 0)
        goto cleanup;
    status = 1;
    client = vqkvctl_connect(cmd, socket_path, VQKVCTL_TIMEOUT_MS);
    if (client == NULL)
        goto cleanup;
    vqkv_model_t *m;
    int rc = vqkv_model_find(client, b.model, b.head_first, b.head_count, &m);
    if (rc == VQKV_OK && !b.all) {
        vqkv_layout_t layout;
        vqkv_model_layout(m, &layout);
        size_t max = b.n_tokens / layout.block_tokens;
        if (max == 0) {
            fprintf(stderr, "vqkvctl %s: %zu tokens make no full block of %u\n", cmd, b.n_tokens,
                    (unsigned)layout.block_tokens);
            goto cleanup;
        }
        keys = malloc(max * sizeof *keys);
        rc = keys == NULL ? VQKV_ENOMEM
                          : vqkv_model_block_keys(m, NULL, b.tokens, b.n_tokens, NULL, 0, keys, max,
                                                  &n_keys);
    }
    if (rc == VQKV_OK) {
        if (strcmp(cmd, "pin") == 0)
            rc = vqkv_pin(client, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, n_keys, b.ttl_ms,
                          &count);
        else if (strcmp(cmd, "unpin") == 0)
            rc = vqkv_unpin(client, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, n_keys, &count);
        else
            rc = vqkv_evict(client, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, n_keys, b.all,
                            &count);
    }
    if (rc != VQKV_OK) {
        fprintf(stderr, "vqkvctl %s: model \"%s\": %s: %s\n", cmd, b.model,
                vqkv_client_strerror(rc), vqkv_last_error(client));
        goto cleanup;
    }
    /* "pinned", "unpinned", "evicted". */
    char done[16];
    snprintf(done, sizeof done, "%s%s", cmd, strcmp(cmd, "evict") == 0 ? "ed" : "ned");
    if (b.json) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "model", json_object_new_string(b.model));
        if (!b.all)
            json_object_object_add(o, "blocks", json_object_new_uint64(n_keys));
        json_object_object_add(o, done, json_object_new_uint64(count));
        printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY));
        json_object_put(o);
    } else if (b.all) {
        printf("%s %zu blocks of %s\n", done, count, b.model);
    } else {
        printf("%s %zu of %zu blocks of %s\n", done, count, n_keys, b.model);
    }
    status = 0;

cleanup:
    vqkv_close(client);
    free(keys);
    free(b.tokens);
    return status;
}

/* Takes --socket PATH (or --socket=PATH) out of argv wherever it stands, so
 * `vqkvctl --socket X stats` and `vqkvctl stats --socket X` both work;
 * argv keeps the rest in order. 0, or -1 for a --socket without a path. */
static int vqkvctl_take_socket(int *argc, char **argv, const char **socket_path)
{
    int kept = 1;
    for (int i = 1; i < *argc; i++) {
        if (strncmp(argv[i], "--socket=", 9) == 0) {
            *socket_path = argv[i] + 9;
        } else if (strcmp(argv[i], "--socket") == 0) {
            if (i + 1 >= *argc)
                return -1;
            *socket_path = argv[++i];
        } else {
            argv[kept++] = argv[i];
        }
    }
    *argc = kept;
    argv[kept] = NULL;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        vqkvctl_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("vqkvctl %s\n", VQKV_VERSION);
        return 0;
    }
    if (strcmp(argv[1], "eval") == 0)
        return vqkvctl_eval(argc - 1, argv + 1);
    const char *socket_path = NULL;
    if (vqkvctl_take_socket(&argc, argv, &socket_path) < 0 || argc < 2) {
        vqkvctl_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "stats") == 0)
        return vqkvctl_stats(argc - 1, argv + 1, socket_path);
    if (strcmp(argv[1], "health") == 0)
        return vqkvctl_health(argc - 1, argv + 1, socket_path);
    if (strcmp(argv[1], "flush") == 0)
        return vqkvctl_flush(argc - 1, argv + 1, socket_path);
    if (strcmp(argv[1], "pin") == 0 || strcmp(argv[1], "unpin") == 0 ||
        strcmp(argv[1], "evict") == 0)
        return vqkvctl_blocks(argc - 1, argv + 1, socket_path);
    fprintf(stderr, "vqkvctl: unknown command '%s'\n", argv[1]);
    vqkvctl_usage(stderr);
    return 2;
}
