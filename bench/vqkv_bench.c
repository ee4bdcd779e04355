/* vqkv_bench.c -- vqkv-benchmark, vqkvd's serving benchmark in the manner
 * of redis-benchmark.
 *
 * Serving mode: N client processes (fork), each with its own connection,
 * memfd KV region and the same model id, so they share blocks as the
 * workers of one node would. A setup phase, before any client starts,
 * puts P prefixes of K blocks each and pins them for the run (so the
 * puts the clients make cannot evict what they look up). Then, for S
 * seconds, every client loops: look up a random prefix, get its blocks
 * into its own slots, release the lease; every put_every-th loop it first
 * puts a fresh prefix of K blocks, as a worker offloading a new request
 * would. Each request's latency goes into a log-linear histogram (32
 * buckets per power of two: within 3%) in memory shared with the parent,
 * which merges them when the clients are done. Processes rather than
 * threads, because a real node's workers are processes, and so that the
 * client side never contends on one allocator or one lock.
 *
 * Capacity mode (--capacity): one client puts distinct one-block prefixes
 * into a daemon that holds nothing yet, reading the daemon's counters after
 * every put, until the first eviction. The most blocks held before it,
 * times block_tokens, over the pool's GiB, is the tokens a GiB of pool
 * holds with that codec: measured, so slot rounding, chunk tails and the
 * eviction watermark are all in it. It needs a fresh daemon per codec and
 * shape, as a daemon refuses a second codec under one model id. A VQ codec
 * the daemon has no codebooks for is stored fp16 while it calibrates, so
 * either mode first puts --warmup-tokens of other blocks, waits for the
 * codebooks, evicts those blocks and measures from there: the fallback's
 * chunks go back to the pool but for the one its class keeps (pool.h).
 * When stderr is a terminal the fill shows a progress line there
 * (client/progress.h): blocks held, blocks/s, how full the pool is and an
 * ETA to the daemon's 90% eviction watermark; it is erased before the table.
 *
 * The KV data is synthetic (client/worker.h): the codecs' speed barely
 * depends on the values, and capacity not at all.
 *
 * usage: vqkv-benchmark --socket PATH [--clients N] [--seconds S]
 *          [--codec SPEC] [--shape smollm2-135m|llama3-8b]
 *          [--blocks-per-get K] [--prefixes P] [--put-every M]
 *          [--capacity] [--warmup-tokens N] [--json FILE]
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "progress.h"
#include "vqkv.h"
#include "worker.h"

#define BENCH_MAX_CLIENTS 1024
/* Log-linear histogram of nanoseconds: exact below 64, then 32 buckets per
 * power of two, up to 2^64. */
#define BENCH_HIST_SUB 32
#define BENCH_HIST_BUCKETS (60 * BENCH_HIST_SUB)
/* vqkvd evicts when a put would take the pool above this fraction
 * (VQKVD_HIGH_WATER, daemon/session.c): where a capacity fill ends. */
#define BENCH_EVICT_FRACTION 0.9

enum { BENCH_LOOKUP, BENCH_GET, BENCH_RELEASE, BENCH_PUT, BENCH_KINDS };
static const char *const bench_kind_names[BENCH_KINDS] = {"lookup", "get", "release", "put"};

typedef struct {
    uint64_t n;
    uint64_t counts[BENCH_HIST_BUCKETS];
} bench_hist_t;

/* What one client process reports, in memory shared with the parent. */
typedef struct {
    bench_hist_t hist[BENCH_KINDS];
    uint64_t hits, misses, blocks_got;
    uint64_t end_ns; /* CLOCK_MONOTONIC, comparable across processes */
    int failed;
    char error[256];
} bench_result_t;

typedef struct {
    const char *socket_path;
    const char *codec;
    const char *shape;
    const char *json_path;
    uint32_t clients, blocks_per_get, prefixes, put_every;
    double seconds;
    int capacity;
    uint32_t warmup_tokens;
} bench_opts_t;

typedef struct {
    bench_opts_t o;
    vqkv_layout_t layout;
    char model_id[64];
    char codec[128]; /* the canonical spec the daemon answered at setup */
} bench_t;

static uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- latency histograms ------------------------------------------------------ */

static unsigned bench_hist_bucket(uint64_t ns)
{
    if (ns < 2 * BENCH_HIST_SUB)
        return (unsigned)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned shift = msb - 5u; /* keeps the top bit and 5 more */
    return (shift + 1u) * BENCH_HIST_SUB + (unsigned)((ns >> shift) & (BENCH_HIST_SUB - 1));
}

/* The middle of bucket i, in nanoseconds. */
static double bench_hist_value(unsigned i)
{
    if (i < 2 * BENCH_HIST_SUB)
        return (double)i;
    unsigned shift = i / BENCH_HIST_SUB - 1u;
    double lower = (double)((uint64_t)(BENCH_HIST_SUB + i % BENCH_HIST_SUB) << shift);
    return lower + (double)(1ull << shift) / 2.0;
}

static void bench_hist_add(bench_hist_t *h, uint64_t ns)
{
    h->counts[bench_hist_bucket(ns)]++;
    h->n++;
}

static void bench_hist_merge(bench_hist_t *into, const bench_hist_t *h)
{
    for (unsigned i = 0; i < BENCH_HIST_BUCKETS; i++)
        into->counts[i] += h->counts[i];
    into->n += h->n;
}

/* The q-quantile in microseconds; 0 for an empty histogram. */
static double bench_hist_quantile_us(const bench_hist_t *h, double q)
{
    if (h->n == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(q * (double)h->n);
    if (rank >= h->n)
        rank = h->n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < BENCH_HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen > rank)
            return bench_hist_value(i) / 1e3;
    }
    return 0.0;
}

/* ---- prefixes ---------------------------------------------------------------- */

static uint32_t bench_mix32(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* The keys of prefix `id` (K blocks) into keys: token ids that no other id
 * shares, so every prefix is its own chain. Setup prefixes are ids
 * 0..P-1; the ones clients put during the run have the top bits set. */
static int bench_prefix_keys(const bench_t *b, const vqkv_model_t *model, uint64_t id,
                             uint32_t *tokens, uint8_t (*keys)[VQKV_KEY_BYTES])
{
    size_t n_tokens = (size_t)b->o.blocks_per_get * b->layout.block_tokens, n = 0;
    for (size_t i = 0; i < n_tokens; i++)
        tokens[i] = 1u + bench_mix32(id * 0x9e3779b97f4a7c15ull + i) % 49151u;
    /* The id itself in the first two tokens: distinct ids give distinct
     * first blocks, hence distinct chains, whatever the mixing does. */
    tokens[0] = (uint32_t)id;
    tokens[1] = (uint32_t)(id >> 32);
    int rc = vqkv_model_block_keys(model, NULL, tokens, n_tokens, NULL, 0, keys,
                                   b->o.blocks_per_get, &n);
    return rc != VQKV_OK ? rc : (n == b->o.blocks_per_get ? VQKV_OK : VQKV_EINVAL);
}

/* Fills slots first..first+K-1 with the blocks of keys and puts them;
 * fails unless every block is stored or was already held. */
static int bench_put_prefix(const bench_t *b, vqkv_worker_t *w, uint32_t first,
                            const uint8_t (*keys)[VQKV_KEY_BYTES], char *err, size_t errlen)
{
    uint32_t slots[64];
    vqkv_put_status_t st[64];
    for (uint32_t i = 0; i < b->o.blocks_per_get; i++)
        slots[i] = first + i;
    int rc = vqkv_put(w->client, w->model, w->region, keys, NULL, slots, b->o.blocks_per_get, st);
    if (rc < 0) {
        snprintf(err, errlen, "put: %s", vqkv_last_error(w->client));
        return rc;
    }
    for (uint32_t i = 0; i < b->o.blocks_per_get; i++) {
        if (st[i] != VQKV_PUT_STORED && st[i] != VQKV_PUT_PRESENT) {
            snprintf(err, errlen, "put: block %u not stored (status %d%s)", i, (int)st[i],
                     st[i] == VQKV_PUT_NO_SPACE ? ": the pool is full, give vqkvd a larger "
                                                  "--pool-bytes or use fewer --prefixes"
                                                : "");
            return VQKV_EINVAL;
        }
    }
    return VQKV_OK;
}

/* ---- warm-up ------------------------------------------------------------------ */

/* Puts block `id` of the fill, a one-block prefix of its own, from slot 0;
 * with fill, first writes the block's own synthetic KV there (calibration
 * needs varied data; the count does not). */
static int bench_put_block(const bench_t *b, vqkv_worker_t *w, uint64_t id, int fill,
                           vqkv_put_status_t *ps)
{
    uint32_t tokens[64];
    uint8_t key[1][VQKV_KEY_BYTES];
    size_t n = 0;
    const uint32_t slot = 0;
    for (uint32_t i = 0; i < b->layout.block_tokens; i++)
        tokens[i] = 1u + bench_mix32(id * 64 + i) % 49151u;
    tokens[0] = (uint32_t)id;
    int rc =
        vqkv_model_block_keys(w->model, NULL, tokens, b->layout.block_tokens, NULL, 0, key, 1, &n);
    if (rc != VQKV_OK)
        return rc;
    if (fill)
        vqkv_worker_fill_synthetic(&b->layout, &w->view, w->base, slot, key[0]);
    *ps = VQKV_PUT_STORED;
    return vqkv_put(w->client, w->model, w->region, (const uint8_t(*)[VQKV_KEY_BYTES])key, NULL,
                    &slot, 1, ps);
}

/* Block ids the warm-up takes: 0 up to this one. */
static uint64_t bench_warmup_blocks(const bench_t *b)
{
    return b->o.warmup_tokens / b->layout.block_tokens;
}

/* Puts --warmup-tokens of blocks (ids below bench_warmup_blocks) for the
 * daemon to calibrate the codec on (one it has no codebooks for stores fp16
 * until then), waits for its codebooks and evicts those blocks again: both
 * modes measure the codec asked for, not the fallback. 0, or -1 said on
 * stderr when any step fails. */
static int bench_warmup(const bench_t *b, vqkv_worker_t *w)
{
    char err[512];
    uint64_t id = 0, warmup_blocks = bench_warmup_blocks(b);
    vqkv_put_status_t ps = VQKV_PUT_STORED;
    size_t evicted = 0;
    int rc = VQKV_OK;
    for (; id < warmup_blocks && rc >= 0; id++)
        rc = bench_put_block(b, w, id, 1, &ps);
    if (rc >= 0)
        rc = vqkv_worker_wait_codebooks(w, b->model_id, 1800.0, err, sizeof err);
    else
        snprintf(err, sizeof err, "warm-up put: %s", vqkv_last_error(w->client));
    if (rc >= 0 && (rc = vqkv_evict(w->client, w->model, NULL, 0, 1, &evicted)) < 0)
        snprintf(err, sizeof err, "evict the warm-up: %s", vqkv_last_error(w->client));
    if (rc < 0) {
        fprintf(stderr, "vqkv-benchmark: warm-up: %s\n", err);
        return -1;
    }
    return 0;
}

/* ---- serving mode ------------------------------------------------------------- */

/* Puts the shared prefixes and pins them for the run (and a minute more),
 * on a connection of its own that is closed before any client starts. */
static int bench_setup(bench_t *b)
{
    char err[512];
    vqkv_worker_t w;
    if (vqkv_worker_open(&w, b->o.socket_path, "vqkv-benchmark-setup", VQKV_WORKER_TIMEOUT_MS,
                         b->model_id, &b->layout, b->o.codec, b->o.blocks_per_get, err,
                         sizeof err) != VQKV_OK) {
        fprintf(stderr, "vqkv-benchmark: %s\n", err);
        return -1;
    }
    snprintf(b->codec, sizeof b->codec, "%s", vqkv_model_codec(w.model));
    if (!vqkv_model_codebooks_ready(w.model) && bench_warmup(b, &w) < 0) {
        vqkv_worker_close(&w);
        return -1;
    }
    size_t n_tokens = (size_t)b->o.blocks_per_get * b->layout.block_tokens;
    uint32_t *tokens = malloc(n_tokens * sizeof *tokens);
    uint8_t(*keys)[VQKV_KEY_BYTES] = malloc(b->o.blocks_per_get * sizeof *keys);
    int rc = tokens == NULL || keys == NULL ? VQKV_ENOMEM : VQKV_OK;
    snprintf(err, sizeof err, "out of memory");
    uint32_t ttl_ms = (uint32_t)((b->o.seconds + 60.0) * 1000.0);
    for (uint32_t p = 0; p < b->o.prefixes && rc == VQKV_OK; p++) {
        rc = bench_prefix_keys(b, w.model, p, tokens, keys);
        if (rc != VQKV_OK) {
            snprintf(err, sizeof err, "block keys: %s", vqkv_client_strerror(rc));
            break;
        }
        for (uint32_t i = 0; i < b->o.blocks_per_get; i++)
            vqkv_worker_fill_synthetic(&b->layout, &w.view, w.base, i, keys[i]);
        rc = bench_put_prefix(b, &w, 0, (const uint8_t(*)[VQKV_KEY_BYTES])keys, err, sizeof err);
        if (rc == VQKV_OK) {
            rc = vqkv_pin(w.client, w.model, (const uint8_t(*)[VQKV_KEY_BYTES])keys,
                          b->o.blocks_per_get, ttl_ms, NULL);
            if (rc != VQKV_OK)
                snprintf(err, sizeof err, "pin: %s", vqkv_last_error(w.client));
        }
    }
    if (rc != VQKV_OK)
        fprintf(stderr, "vqkv-benchmark: setup: %s\n", err);
    free(tokens);
    free(keys);
    vqkv_worker_close(&w);
    return rc == VQKV_OK ? 0 : -1;
}

/* A client's timed loop, from go to the deadline; an error ends it and is
 * reported through r. */
static void bench_client_loop(const bench_t *b, vqkv_worker_t *w, uint32_t index,
                              const uint8_t (*keys)[VQKV_KEY_BYTES], uint32_t *tokens,
                              uint8_t (*put_keys)[VQKV_KEY_BYTES], bench_result_t *r)
{
    uint32_t k = b->o.blocks_per_get;
    uint32_t slots[64];
    for (uint32_t i = 0; i < k; i++)
        slots[i] = i;
    uint64_t rng = 0x243f6a8885a308d3ull ^ ((uint64_t)index << 32 | index);
    uint64_t deadline = bench_now_ns() + (uint64_t)(b->o.seconds * 1e9);
    for (uint64_t loop = 1; bench_now_ns() < deadline; loop++) {
        uint64_t t0 = bench_now_ns(), t1;
        int rc;
        if (b->o.put_every != 0 && loop % b->o.put_every == 0) {
            uint64_t id = 1ull << 63 | (uint64_t)index << 40 | loop;
            rc = bench_prefix_keys(b, w->model, id, tokens, put_keys);
            if (rc == VQKV_OK)
                rc = bench_put_prefix(b, w, k, (const uint8_t(*)[VQKV_KEY_BYTES])put_keys, r->error,
                                      sizeof r->error);
            if (rc != VQKV_OK) {
                r->failed = 1;
                break;
            }
            t1 = bench_now_ns();
            bench_hist_add(&r->hist[BENCH_PUT], t1 - t0);
            t0 = t1;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        const uint8_t(*want)[VQKV_KEY_BYTES] = keys + (size_t)(rng % b->o.prefixes) * k;
        size_t found = 0;
        vqkv_lease_t lease = 0;
        rc = vqkv_lookup(w->client, w->model, want, k, &found, &lease);
        if (rc != VQKV_OK) {
            snprintf(r->error, sizeof r->error, "lookup: %s", vqkv_last_error(w->client));
            r->failed = 1;
            break;
        }
        t1 = bench_now_ns();
        bench_hist_add(&r->hist[BENCH_LOOKUP], t1 - t0);
        r->hits += found;
        r->misses += k - found;
        if (found == 0)
            continue;
        rc = vqkv_get(w->client, lease, w->region, slots, found);
        uint64_t t2 = bench_now_ns();
        if (rc != (int)found) {
            snprintf(r->error, sizeof r->error, "get: %s",
                     rc < 0 ? vqkv_last_error(w->client) : "fewer blocks than leased");
            r->failed = 1;
            break;
        }
        bench_hist_add(&r->hist[BENCH_GET], t2 - t1);
        r->blocks_got += found;
        rc = vqkv_release(w->client, lease);
        if (rc != VQKV_OK) {
            snprintf(r->error, sizeof r->error, "release: %s", vqkv_last_error(w->client));
            r->failed = 1;
            break;
        }
        bench_hist_add(&r->hist[BENCH_RELEASE], bench_now_ns() - t2);
    }
    r->end_ns = bench_now_ns();
}

/* One client's whole life: set up, say ready, wait for go, loop until the
 * deadline. Errors end the loop and are reported through r. */
static void bench_client(const bench_t *b, uint32_t index, bench_result_t *r, int ready_fd,
                         int go_fd)
{
    char name[48];
    snprintf(name, sizeof name, "vqkv-benchmark-%u", index);
    vqkv_worker_t w;
    uint32_t k = b->o.blocks_per_get;
    /* Slots 0..K-1 take gets, K..2K-1 hold the blocks this client puts. */
    int rc = vqkv_worker_open(&w, b->o.socket_path, name, VQKV_WORKER_TIMEOUT_MS, b->model_id,
                              &b->layout, b->o.codec, 2 * k, r->error, sizeof r->error);
    size_t n_tokens = (size_t)k * b->layout.block_tokens;
    uint32_t *tokens = malloc(n_tokens * sizeof *tokens);
    uint8_t(*keys)[VQKV_KEY_BYTES] = malloc((size_t)b->o.prefixes * k * sizeof *keys);
    uint8_t(*put_keys)[VQKV_KEY_BYTES] = malloc(k * sizeof *put_keys);
    if (rc == VQKV_OK && (tokens == NULL || keys == NULL || put_keys == NULL)) {
        snprintf(r->error, sizeof r->error, "out of memory");
        rc = VQKV_ENOMEM;
    }
    for (uint32_t p = 0; p < b->o.prefixes && rc == VQKV_OK; p++)
        rc = bench_prefix_keys(b, w.model, p, tokens, keys + (size_t)p * k);
    if (rc == VQKV_OK)
        for (uint32_t i = 0; i < k; i++)
            vqkv_worker_fill_synthetic(&b->layout, &w.view, w.base, k + i, keys[i]);
    r->failed = rc != VQKV_OK;
    if (r->failed && r->error[0] == '\0')
        snprintf(r->error, sizeof r->error, "block keys: %s", vqkv_client_strerror(rc));

    char byte = 1;
    if (write(ready_fd, &byte, 1) == 1 && !r->failed && read(go_fd, &byte, 1) == 1)
        bench_client_loop(b, &w, index, (const uint8_t(*)[VQKV_KEY_BYTES])keys, tokens, put_keys,
                          r);
    free(tokens);
    free(keys);
    free(put_keys);
    vqkv_worker_close(&w);
}

/* Writes all of buf, or fails. */
static int bench_write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The --json file, opened for writing; NULL, said on stderr, when it cannot be. */
static FILE *bench_json_open(const char *path)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        fprintf(stderr, "vqkv-benchmark: cannot write %s: %s\n", path, strerror(errno));
    return f;
}

/* The clients' figures, merged once they are done. */
typedef struct {
    bench_hist_t merged[BENCH_KINDS], all;
    uint64_t hits, misses, got;
    uint64_t start_ns, end_ns; /* when the clients were let go, when the last one stopped */
} bench_totals_t;

/* Forks the clients, lets them go together once all are ready and waits
 * for them: how many started into *started_out, when they were let go into
 * *start_ns. 1 when a client failed to fork or died, else 0. */
static int bench_serve_clients(const bench_t *b, bench_result_t *results, int ready[2], int go[2],
                               uint32_t *started_out, uint64_t *start_ns)
{
    fflush(NULL);
    uint32_t started = 0;
    pid_t pids[BENCH_MAX_CLIENTS];
    for (; started < b->o.clients; started++) {
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "vqkv-benchmark: fork: %s\n", strerror(errno));
            break;
        }
        if (pid == 0) {
            close(ready[0]);
            close(go[1]);
            bench_client(b, started, &results[started], ready[1], go[0]);
            _exit(0);
        }
        pids[started] = pid;
    }
    *started_out = started;
    close(ready[1]);
    /* Every client has connected and registered (or failed) before the
     * clock starts: setup never counts. A client that died early shows as
     * end of file here. */
    uint32_t ready_count = 0;
    char byte;
    while (ready_count < started) {
        ssize_t n = read(ready[0], &byte, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        ready_count++;
    }
    char go_bytes[BENCH_MAX_CLIENTS];
    memset(go_bytes, 1, sizeof go_bytes);
    *start_ns = bench_now_ns();
    /* The parent keeps go[0] open, so this cannot SIGPIPE when clients
     * that failed their setup are gone. */
    int status = bench_write_all(go[1], go_bytes, started) == 0 ? 0 : 1;
    close(go[1]);
    for (uint32_t i = 0; i < started; i++) {
        int ws = 0;
        if (waitpid(pids[i], &ws, 0) != pids[i] || !WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
            fprintf(stderr, "vqkv-benchmark: client %u died (wait status %#x)\n", i, ws);
            status = 1;
        }
    }
    close(ready[0]);
    close(go[0]);
    if (started < b->o.clients)
        status = 1;
    return status;
}

/* Merges the results of clients 0..n-1 into t, saying on stderr what
 * failed in each that did; 1 when one did, else 0. */
static int bench_serve_merge(const bench_result_t *results, uint32_t n, uint64_t start_ns,
                             bench_totals_t *t)
{
    memset(t, 0, sizeof *t);
    t->start_ns = t->end_ns = start_ns;
    int status = 0;
    for (uint32_t i = 0; i < n; i++) {
        const bench_result_t *r = &results[i];
        if (r->failed) {
            fprintf(stderr, "vqkv-benchmark: client %u: %s\n", i, r->error);
            status = 1;
        }
        for (int k = 0; k < BENCH_KINDS; k++) {
            bench_hist_merge(&t->merged[k], &r->hist[k]);
            bench_hist_merge(&t->all, &r->hist[k]);
        }
        t->hits += r->hits;
        t->misses += r->misses;
        t->got += r->blocks_got;
        if (r->end_ns > t->end_ns)
            t->end_ns = r->end_ns;
    }
    return status;
}

/* The serving table on stdout and, with --json, the same figures there. */
static int bench_serve_report(const bench_t *b, const bench_totals_t *t)
{
    const bench_hist_t *merged = t->merged, *all = &t->all;
    double secs = (double)(t->end_ns - t->start_ns) / 1e9;
    double lookups_s = (double)merged[BENCH_LOOKUP].n / secs;
    double gets_s = (double)merged[BENCH_GET].n / secs;
    double puts_s = (double)merged[BENCH_PUT].n / secs;
    double gbps = (double)t->got * (double)vqkv_worker_block_logical_bytes(&b->layout) / secs / 1e9;
    uint64_t looked_up = t->hits + t->misses;
    double hit_rate = looked_up ? (double)t->hits / (double)looked_up : 0.0;
    printf("%7s %11s %9s %9s %8s %19s %19s %17s %8s\n", "clients", "lookups/s", "gets/s",
           "get GB/s", "puts/s", "lookup p50/p99 us", "get p50/p99 us", "all p50/p99 us",
           "hit rate");
    printf("%7u %11.0f %9.0f %9.3f %8.1f %9.1f/%-9.1f %9.1f/%-9.1f %8.1f/%-8.1f %7.1f%%\n",
           b->o.clients, lookups_s, gets_s, gbps, puts_s,
           bench_hist_quantile_us(&merged[BENCH_LOOKUP], 0.5),
           bench_hist_quantile_us(&merged[BENCH_LOOKUP], 0.99),
           bench_hist_quantile_us(&merged[BENCH_GET], 0.5),
           bench_hist_quantile_us(&merged[BENCH_GET], 0.99), bench_hist_quantile_us(all, 0.5),
           bench_hist_quantile_us(all, 0.99), 100.0 * hit_rate);
    if (b->o.json_path == NULL)
        return 0;
    FILE *f = bench_json_open(b->o.json_path);
    if (f == NULL)
        return 1;
    fprintf(f,
            "{\"bench\": \"vqkv-benchmark\", \"mode\": \"serve\", \"shape\": \"%s\", \"codec\": "
            "\"%s\", \"clients\": %u, \"seconds\": %.3f, \"blocks_per_get\": %u, \"prefixes\": "
            "%u, \"put_every\": %u, \"block_logical_bytes\": %llu, \"lookups\": %llu, \"gets\": "
            "%llu, \"puts\": %llu, \"lookups_per_s\": %.1f, \"gets_per_s\": %.1f, "
            "\"puts_per_s\": %.1f, \"get_gbps\": %.4f, \"hit_rate\": %.4f, \"p50_us\": %.1f, "
            "\"p99_us\": %.1f",
            b->o.shape, b->codec, b->o.clients, secs, b->o.blocks_per_get, b->o.prefixes,
            b->o.put_every, (unsigned long long)vqkv_worker_block_logical_bytes(&b->layout),
            (unsigned long long)merged[BENCH_LOOKUP].n, (unsigned long long)merged[BENCH_GET].n,
            (unsigned long long)merged[BENCH_PUT].n, lookups_s, gets_s, puts_s, gbps, hit_rate,
            bench_hist_quantile_us(all, 0.5), bench_hist_quantile_us(all, 0.99));
    for (int k = 0; k < BENCH_KINDS; k++)
        fprintf(f, ", \"%s_p50_us\": %.1f, \"%s_p99_us\": %.1f", bench_kind_names[k],
                bench_hist_quantile_us(&merged[k], 0.5), bench_kind_names[k],
                bench_hist_quantile_us(&merged[k], 0.99));
    fprintf(f, "}\n");
    return fclose(f) == 0 ? 0 : 1;
}

static int bench_serve(bench_t *b)
{
    if (bench_setup(b) < 0)
        return 1;
    size_t shared_bytes = (size_t)b->o.clients * sizeof(bench_result_t);
    bench_result_t *results =
        mmap(NULL, shared_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int ready[2], go[2];
    if (results == MAP_FAILED || pipe(ready) < 0 || pipe(go) < 0) {
        fprintf(stderr, "vqkv-benchmark: shared memory or pipes: %s\n", strerror(errno));
        return 1;
    }
    uint32_t started;
    uint64_t start_ns;
    int status = bench_serve_clients(b, results, ready, go, &started, &start_ns);
    bench_totals_t t;
    if (bench_serve_merge(results, started, start_ns, &t) != 0)
        status = 1;
    munmap(results, shared_bytes);
    if (status != 0)
        return status;
    return bench_serve_report(b, &t);
}

/* ---- capacity mode ------------------------------------------------------------- */

/* Redraws the fill's progress line, done blocks into it. Every put adds
 * the same slot bytes, so the blocks the fill will have put are the ones so
 * far over the fraction of the way to the watermark the pool has come. */
static void bench_capacity_progress(vqkv_progress_t *progress, const vqkv_stats_t *st, double done)
{
    double used = (double)st->pool_bytes_used / (double)st->pool_bytes;
    double way = used / BENCH_EVICT_FRACTION;
    char held[32];
    vqkv_progress_update(progress, done, way > 0.0 ? done / (way < 1.0 ? way : 1.0) : 0.0, "blocks",
                         "filling: %s blocks, pool %.0f%% full",
                         vqkv_progress_count(held, sizeof held, st->blocks), 100.0 * used);
}

/* The capacity table on stdout and, with --json, the same figures there:
 * peak_blocks and peak_stored are what the pool held before its first
 * eviction. */
static int bench_capacity_report(const bench_t *b, uint32_t block_bytes, uint64_t pool_bytes,
                                 uint64_t peak_blocks, uint64_t peak_stored)
{
    double pool_gib = (double)pool_bytes / (double)(1u << 30);
    double tokens_per_gib = (double)peak_blocks * b->layout.block_tokens / pool_gib;
    double fp16_per_gib = (double)(1u << 30) / (double)vqkv_worker_block_logical_bytes(&b->layout) *
                          b->layout.block_tokens;
    int codec_width = strlen(b->codec) > 24 ? (int)strlen(b->codec) : 24;
    printf("%-14s %-*s %11s %13s %12s %15s %12s\n", "shape", codec_width, "codec", "block bytes",
           "blocks held", "pool used", "tokens per GiB", "f16 ideal");
    printf("%-14s %-*s %11u %13llu %11.1f%% %15.0f %12.0f\n", b->o.shape, codec_width, b->codec,
           block_bytes, (unsigned long long)peak_blocks,
           100.0 * (double)peak_stored / (double)pool_bytes, tokens_per_gib, fp16_per_gib);
    if (b->o.json_path == NULL)
        return 0;
    FILE *f = bench_json_open(b->o.json_path);
    if (f == NULL)
        return 1;
    fprintf(f,
            "{\"bench\": \"vqkv-benchmark\", \"mode\": \"capacity\", \"shape\": \"%s\", "
            "\"codec\": \"%s\", \"block_tokens\": %u, \"block_bytes\": %u, "
            "\"block_logical_bytes\": %llu, \"pool_bytes\": %llu, \"blocks_held\": %llu, "
            "\"bytes_stored\": %llu, \"tokens_per_gib\": %.1f, \"fp16_ideal_tokens_per_gib\": "
            "%.1f}\n",
            b->o.shape, b->codec, b->layout.block_tokens, block_bytes,
            (unsigned long long)vqkv_worker_block_logical_bytes(&b->layout),
            (unsigned long long)pool_bytes, (unsigned long long)peak_blocks,
            (unsigned long long)peak_stored, tokens_per_gib, fp16_per_gib);
    return fclose(f) == 0 ? 0 : 1;
}

static int bench_capacity(bench_t *b)
{
    char err[512];
    vqkv_worker_t w;
    if (vqkv_worker_open(&w, b->o.socket_path, "vqkv-benchmark-capacity", VQKV_WORKER_TIMEOUT_MS,
                         b->model_id, &b->layout, b->o.codec, 1, err, sizeof err) != VQKV_OK) {
        fprintf(stderr, "vqkv-benchmark: %s\n", err);
        return 1;
    }
    vqkv_stats_t st;
    int rc = vqkv_stats(w.client, &st);
    if (rc != VQKV_OK || st.blocks != 0 || st.evictions != 0) {
        fprintf(stderr,
                "vqkv-benchmark: --capacity needs a fresh daemon that holds no blocks%s%s\n",
                rc != VQKV_OK ? ": stats: " : "", rc != VQKV_OK ? vqkv_last_error(w.client) : "");
        vqkv_worker_close(&w);
        return 1;
    }
    /* One block a put, so the count is exact to the block. The slot's
     * data is put again and again under new keys: what a block holds does
     * not change its stored size. The loop ends at the first eviction, or
     * when twice the pool's worth of blocks never caused one. */
    vqkv_worker_fill_synthetic(&b->layout, &w.view, w.base, 0, (const uint8_t[VQKV_KEY_BYTES]){1});
    uint64_t id = 0, evictions_before = 0;
    vqkv_put_status_t ps = VQKV_PUT_STORED;
    if (!vqkv_model_codebooks_ready(w.model)) {
        if (bench_warmup(b, &w) < 0) {
            vqkv_worker_close(&w);
            return 1;
        }
        if (vqkv_stats(w.client, &st) != VQKV_OK) {
            fprintf(stderr, "vqkv-benchmark: stats: %s\n", vqkv_last_error(w.client));
            vqkv_worker_close(&w);
            return 1;
        }
        id = bench_warmup_blocks(b);
        evictions_before = st.evictions;
    }
    uint64_t first = id, limit = id + 2 * st.pool_bytes / vqkv_model_block_bytes(w.model) + 2;
    uint64_t peak_blocks = 0, peak_stored = 0;
    int full = 0;
    vqkv_progress_t progress;
    vqkv_progress_start(&progress, stderr);
    for (; id < limit; id++) {
        rc = bench_put_block(b, &w, id, 0, &ps);
        if (rc >= 0)
            rc = vqkv_stats(w.client, &st);
        if (rc < 0) {
            vqkv_progress_end(&progress);
            fprintf(stderr, "vqkv-benchmark: capacity fill: %s\n", vqkv_last_error(w.client));
            vqkv_worker_close(&w);
            return 1;
        }
        /* NO_SPACE without an eviction would mean nothing was evictable:
         * the pool is just as full. */
        full = st.evictions > evictions_before || ps == VQKV_PUT_NO_SPACE;
        if (full)
            break;
        peak_blocks = st.blocks;
        peak_stored = st.bytes_stored;
        if (vqkv_progress_due(&progress))
            bench_capacity_progress(&progress, &st, (double)(id + 1 - first));
    }
    vqkv_progress_end(&progress);
    uint32_t block_bytes = vqkv_model_block_bytes(w.model);
    snprintf(b->codec, sizeof b->codec, "%s", vqkv_model_codec(w.model));
    vqkv_worker_close(&w);
    if (!full) {
        fprintf(stderr,
                "vqkv-benchmark: %llu blocks and still no eviction: is --pool-bytes "
                "larger than the daemon says?\n",
                (unsigned long long)peak_blocks);
        return 1;
    }
    return bench_capacity_report(b, block_bytes, st.pool_bytes, peak_blocks, peak_stored);
}

/* ---- command line ---------------------------------------------------------------- */

static void bench_usage(FILE *f)
{
    fputs("usage: vqkv-benchmark --socket PATH [--clients N] [--seconds S] [--codec SPEC]\n"
          "                      [--shape smollm2-135m|llama3-8b] [--blocks-per-get K]\n"
          "                      [--prefixes P] [--put-every M] [--capacity]\n"
          "                      [--warmup-tokens N] [--json FILE]\n"
          "  --clients N        client processes, 1..1024 (default 1)\n"
          "  --seconds S        how long the clients loop (default 5)\n"
          "  --codec SPEC       the model's codec (default kivi4)\n"
          "  --shape NAME       the model's KV shape (default smollm2-135m)\n"
          "  --blocks-per-get K blocks per prefix, looked up and got at once, 1..64 (default 4)\n"
          "  --prefixes P       prefixes put and pinned before the run (default 64)\n"
          "  --put-every M      a client puts a new prefix every M loops (default 16, 0: never)\n"
          "  --capacity         instead: fill a fresh daemon until it evicts, report tokens/GiB\n"
          "  --warmup-tokens N  a VQ codec the daemon has no codebooks for: first put N\n"
          "                     tokens for it to calibrate on, then evict them (default 2048)\n"
          "  --json FILE        also write the figures as one JSON object\n"
          "  --version          print the version\n",
          f);
}

static int bench_parse(int argc, char **argv, bench_opts_t *o)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'},
        {"clients", required_argument, NULL, 'c'},
        {"seconds", required_argument, NULL, 't'},
        {"codec", required_argument, NULL, 'C'},
        {"shape", required_argument, NULL, 'S'},
        {"blocks-per-get", required_argument, NULL, 'k'},
        {"prefixes", required_argument, NULL, 'p'},
        {"put-every", required_argument, NULL, 'P'},
        {"capacity", no_argument, NULL, 'a'},
        {"warmup-tokens", required_argument, NULL, 'w'},
        {"json", required_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    *o = (bench_opts_t){NULL, "kivi4", "smollm2-135m", NULL, 1, 4, 64, 16, 5.0, 0, 2048};
    int opt;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's': o->socket_path = optarg; break;
        case 'c': o->clients = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 't': o->seconds = strtod(optarg, NULL); break;
        case 'C': o->codec = optarg; break;
        case 'S': o->shape = optarg; break;
        case 'k': o->blocks_per_get = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'p': o->prefixes = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'P': o->put_every = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'a': o->capacity = 1; break;
        case 'w': o->warmup_tokens = (uint32_t)strtoul(optarg, NULL, 10); break;
        case 'j': o->json_path = optarg; break;
        case 'h': bench_usage(stdout); exit(0);
        case 'V': printf("vqkv-benchmark %s\n", VQKV_VERSION); exit(0);
        default: return -1;
        }
    }
    if (optind < argc || o->socket_path == NULL) {
        fprintf(stderr, "vqkv-benchmark: --socket PATH is required\n");
        return -1;
    }
    if (o->clients < 1 || o->clients > BENCH_MAX_CLIENTS || !(o->seconds > 0.0) ||
        o->seconds > 86400.0 || o->blocks_per_get < 1 || o->blocks_per_get > 64 ||
        o->prefixes < 1) {
        fprintf(stderr,
                "vqkv-benchmark: --clients 1..%d, --seconds up to a day, "
                "--blocks-per-get 1..64, --prefixes at least 1\n",
                BENCH_MAX_CLIENTS);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    bench_t b;
    if (bench_parse(argc, argv, &b.o) < 0) {
        bench_usage(stderr);
        return 2;
    }
    if (vqkv_worker_shape(b.o.shape, &b.layout) != VQKV_OK) {
        fprintf(stderr, "vqkv-benchmark: unknown --shape %s (smollm2-135m or llama3-8b)\n",
                b.o.shape);
        return 2;
    }
    /* One model id per shape: runs with different codecs need a fresh
     * daemon each, as a daemon refuses a second codec under one id. */
    snprintf(b.model_id, sizeof b.model_id, "vqkv-benchmark/%s", b.o.shape);
    signal(SIGPIPE, SIG_IGN);
    return b.o.capacity ? bench_capacity(&b) : bench_serve(&b);
}
