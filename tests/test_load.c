/* test_load.c -- vqkvd under load: 64 worker processes (fork; each its own
 * connection and memfd region, one model, so they share blocks) run a
 * seeded random mix of put, lookup, get, release, pin, unpin and stats for
 * VQKV_LOAD_SECONDS against a daemon whose pool holds half of the distinct
 * blocks they put, so eviction runs the whole time. What it asserts is
 * what a worker relies on under that pressure:
 *
 *   - every byte a get writes is the byte that key was put with: the codec
 *     is fp16, lossless for f16 data, and a block's data is a pure function
 *     of its key (client/worker.h vqkv_worker_fill_synthetic), so each
 *     client regenerates what any other one stored and compares every row;
 *     target slots are poisoned with f16 NaNs first, so a get that reports
 *     a block it did not write is caught too;
 *   - every call returns: a success or a documented outcome (a Put status,
 *     or VQKV_ELEASE for a lease that expired before its get); a timeout
 *     (the library gives up after 30 s), a dropped connection or any other
 *     error fails the test, and every client must finish;
 *   - the daemon stays inside its memory: the pool's bytes_stored, sampled
 *     every 20 ms, never exceeds --pool-bytes; its shared memory (the pool
 *     and the clients' regions, both memfd mappings) never exceeds their
 *     sizes; and its whole RSS never exceeds what it was before the load
 *     plus those two, one Put's staging per client (a client has one
 *     request in flight) and a fixed slack (VQKV_LOAD_RSS_SLACK_MB, 32 MiB:
 *     heap for 64 connections, frame buffers, libuv's and the thread
 *     pool's stacks; the ASan build's ctest entry allows more, see
 *     tests/CMakeLists.txt);
 *   - when the clients are gone their leases and pins are too (leases 0),
 *     and the daemon exits 0 on SIGTERM (under ASan: no leak).
 *
 * It prints a table (calls, ops/s, p50 and p99 latency per kind, errors by
 * code, put statuses) and writes the same as JSON to VQKV_LOAD_JSON
 * (default test_load.json in the working directory). Latencies are exact
 * percentiles of every call while each client makes at most
 * LOAD_SAMPLES calls of a kind; past that a client keeps a uniform sample
 * (reservoir sampling) and the table says "sampled". The seed is printed;
 * VQKV_LOAD_SEED repeats its request mix (not its interleaving, which is
 * the scheduler's). VQKV_LOAD_CLIENTS changes the client count.
 *
 * No timing is asserted: the figures are printed, not judged.
 */
#include <math.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "libvqkv_harness.h"
#include "worker.h"

#define LOAD_MODEL "test/load@main"
/* Blocks per sequence: a put, lookup or pin names one sequence's chain. */
#define LOAD_CHAIN 4
/* Region slots: LOAD_CHAIN to put from, LOAD_CHAIN to get into. */
#define LOAD_SLOTS (2 * LOAD_CHAIN)
#define LOAD_POOL_BYTES (16u << 20)
#define LOAD_MAX_CLIENTS 256
/* Latency samples kept per client and kind (reservoir past that), in
 * microseconds as floats: 64 clients x 7 kinds x 64 KiB of shared memory,
 * touched only as far as the calls go. */
#define LOAD_SAMPLES 16384
/* Error codes are counted by -code; the last bucket takes anything beyond. */
#define LOAD_CODES 128
/* Pins held with ttl_ms 0 are unpinned by the client's next pin; the
 * others expire on their own after this. */
#define LOAD_PIN_TTL_MS 2000
/* What a client may take past the end of the run before it counts as
 * hung: one call's library timeout plus its shutdown. */
#define LOAD_GRACE_MS 45000
#define LOAD_SAMPLE_MS 20

/* 2 layers, 2 kv heads, head_dim 64, 16 tokens: 16 KiB of f16 a block,
 * small enough that requests, not memcpy, are what the daemon spends on. */
static const vqkv_layout_t load_layout = {2, 2, 64, 16, VQKV_DTYPE_F16};

enum {
    LOAD_PUT,
    LOAD_LOOKUP,
    LOAD_GET,
    LOAD_RELEASE,
    LOAD_PIN,
    LOAD_UNPIN,
    LOAD_STATS,
    LOAD_KINDS
};
static const char *const load_kind_names[LOAD_KINDS] = {"put", "lookup", "get",  "release",
                                                        "pin", "unpin",  "stats"};
static const char *const load_status_names[] = {"stored", "present", "no_parent", "no_space",
                                                "over_quota"};
#define LOAD_STATUSES (sizeof load_status_names / sizeof load_status_names[0])

/* A client's counts, and the run's (their sum). */
typedef struct {
    uint64_t calls[LOAD_KINDS];
    uint64_t errors[LOAD_KINDS][LOAD_CODES]; /* by -code */
    uint64_t statuses[LOAD_STATUSES];        /* per block put */
    uint64_t blocks_found, blocks_asked, blocks_got, bytes_checked, wrong_bytes;
    uint64_t stats_over_pool; /* StatsReplies with bytes_stored > pool_bytes */
} load_counts_t;

/* What one client process reports, in memory shared with the parent. */
typedef struct {
    load_counts_t n;
    float samples_us[LOAD_KINDS][LOAD_SAMPLES];
    uint64_t end_ns;
    _Atomic int ready, setup_failed; /* polled by the parent */
    char error[256];                 /* the first unexpected error, for the report */
} load_client_t;

typedef struct {
    _Atomic int go;
    uint64_t deadline_ns;
    load_client_t clients[];
} load_shared_t;

/* One run's settings and what the parent measured about the daemon. */
typedef struct {
    uint32_t clients, seconds, sequences;
    uint64_t seed, block_bytes, region_bytes, slack_bytes;
    uint64_t rss0, max_rss, max_shmem, max_bytes_stored, samples;
    uint64_t evictions, hits, misses;
    double elapsed_s;
} load_run_t;

static uint64_t load_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64: one stream per client, from the run's seed. */
static uint64_t load_rand(uint64_t *state)
{
    uint64_t x = (*state += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t load_env_u64(const char *name, uint64_t fallback, uint64_t max)
{
    const char *v = getenv(name);
    if (v == NULL || v[0] == '\0')
        return fallback;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (errno != 0 || *end != '\0' || x == 0 || x > max)
        fail_msg("%s=\"%s\" is not a count in 1..%llu", name, v, (unsigned long long)max);
    return x;
}

/* ---- one client ------------------------------------------------------------ */

typedef struct {
    vqkv_worker_t w;
    load_client_t *out;
    uint64_t rng, sample_rng;
    uint32_t sequences;
    uint8_t *expect; /* one slot of a private view: the block a key must hold */
    vqkv_kv_view_t expect_view;
    uint8_t pinned[LOAD_CHAIN][VQKV_KEY_BYTES]; /* held with ttl_ms 0 */
    size_t n_pinned;
    int closed; /* the connection is gone: stop */
} load_worker_t;

static void load_sample(load_worker_t *lw, int kind, uint64_t ns)
{
    uint64_t seen = lw->out->n.calls[kind]++;
    uint64_t j = seen < LOAD_SAMPLES ? seen : load_rand(&lw->sample_rng) % (seen + 1);
    if (j < LOAD_SAMPLES)
        lw->out->samples_us[kind][j] = (float)ns / 1e3f;
}

/* Counts rc for kind; a negative code that is not `allowed` is
 * unexpected: its message is kept, and a closed connection stops the
 * client. Returns rc. */
static int load_count(load_worker_t *lw, int kind, int rc, int allowed, uint64_t t0)
{
    load_sample(lw, kind, load_now_ns() - t0);
    if (rc >= 0)
        return rc;
    lw->out->n.errors[kind][-rc < LOAD_CODES ? -rc : LOAD_CODES - 1]++;
    if (rc == allowed)
        return rc;
    if (lw->out->error[0] == '\0')
        snprintf(lw->out->error, sizeof lw->out->error, "%s: %s (%d): %s", load_kind_names[kind],
                 vqkv_client_strerror(rc), rc, vqkv_last_error(lw->w.client));
    if (rc == VQKV_ECLOSED || rc == VQKV_EIO || rc == VQKV_ETRUNC)
        lw->closed = 1;
    return rc;
}

/* The keys of sequence s: its own first token, so every sequence is a
 * chain of its own. */
static void load_keys(const load_worker_t *lw, uint32_t s, uint8_t (*keys)[VQKV_KEY_BYTES])
{
    uint32_t tokens[LOAD_CHAIN * 16];
    size_t n_tokens = (size_t)LOAD_CHAIN * load_layout.block_tokens, n = 0;
    for (size_t i = 0; i < n_tokens; i++)
        tokens[i] = i == 0 ? s : (uint32_t)(s * 2654435761u + i * 40503u) % 50000u;
    vqkv_model_block_keys(lw->w.model, NULL, tokens, n_tokens, NULL, 0, keys, LOAD_CHAIN, &n);
}

static const uint8_t *load_row(const vqkv_kv_view_t *v, const uint8_t *base, uint32_t layer,
                               uint32_t kv, uint32_t slot, uint32_t token, uint32_t head)
{
    return base + v->offset + layer * v->layer_stride + kv * v->kv_stride + slot * v->slot_stride +
           token * v->token_stride + head * v->head_stride;
}

/* Compares slot `slot` of the region with the block `key` must decode to;
 * returns the bytes that differ. */
static uint64_t load_check_block(load_worker_t *lw, uint32_t slot, const uint8_t *key)
{
    const vqkv_layout_t *l = &load_layout;
    size_t row_bytes = (size_t)l->head_dim * vqkv_dtype_size(l->dtype);
    uint64_t wrong = 0;
    vqkv_worker_fill_synthetic(l, &lw->expect_view, lw->expect, 0, key);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++) {
                    const uint8_t *got = load_row(&lw->w.view, lw->w.base, layer, kv, slot, t, h);
                    const uint8_t *want =
                        load_row(&lw->expect_view, lw->expect, layer, kv, 0, t, h);
                    if (memcmp(got, want, row_bytes) == 0)
                        continue;
                    for (size_t i = 0; i < row_bytes; i++)
                        wrong += got[i] != want[i];
                }
    lw->out->n.bytes_checked += vqkv_worker_block_logical_bytes(l);
    return wrong;
}

/* Sets every value of slot `slot` to an f16 NaN (0xffff), which synthetic
 * data never holds. */
static void load_poison(load_worker_t *lw, uint32_t slot)
{
    const vqkv_layout_t *l = &load_layout;
    size_t row_bytes = (size_t)l->head_dim * vqkv_dtype_size(l->dtype);
    for (uint32_t layer = 0; layer < l->num_layers; layer++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < l->block_tokens; t++)
                for (uint32_t h = 0; h < l->num_kv_heads; h++)
                    memset((uint8_t *)load_row(&lw->w.view, lw->w.base, layer, kv, slot, t, h),
                           0xff, row_bytes);
}

static void load_put(load_worker_t *lw, uint32_t s)
{
    uint8_t keys[LOAD_CHAIN][VQKV_KEY_BYTES];
    uint32_t slots[LOAD_CHAIN];
    vqkv_put_status_t st[LOAD_CHAIN];
    load_keys(lw, s, keys);
    for (uint32_t i = 0; i < LOAD_CHAIN; i++) {
        slots[i] = i;
        vqkv_worker_fill_synthetic(&load_layout, &lw->w.view, lw->w.base, i, keys[i]);
    }
    uint64_t t0 = load_now_ns();
    int rc = vqkv_put(lw->w.client, lw->w.model, lw->w.region,
                      (const uint8_t(*)[VQKV_KEY_BYTES])keys, NULL, slots, LOAD_CHAIN, st);
    if (load_count(lw, LOAD_PUT, rc, 0, t0) < 0)
        return;
    for (uint32_t i = 0; i < LOAD_CHAIN; i++)
        lw->out->n.statuses[(unsigned)st[i] < LOAD_STATUSES ? st[i] : LOAD_STATUSES - 1]++;
}

/* Lookup of the first 1..LOAD_CHAIN blocks of s; then, mostly, a get of
 * what was found, checked byte for byte; then the release. */
static void load_lookup_get(load_worker_t *lw, uint32_t s)
{
    uint8_t keys[LOAD_CHAIN][VQKV_KEY_BYTES];
    size_t want = 1 + load_rand(&lw->rng) % LOAD_CHAIN, found = 0;
    vqkv_lease_t lease = 0;
    load_keys(lw, s, keys);
    uint64_t t0 = load_now_ns();
    int rc = vqkv_lookup(lw->w.client, lw->w.model, (const uint8_t(*)[VQKV_KEY_BYTES])keys, want,
                         &found, &lease);
    if (load_count(lw, LOAD_LOOKUP, rc, 0, t0) < 0)
        return;
    lw->out->n.blocks_asked += want;
    lw->out->n.blocks_found += found;
    if (found == 0)
        return;
    if (load_rand(&lw->rng) % 10 != 0) {
        uint32_t slots[LOAD_CHAIN];
        for (uint32_t i = 0; i < found; i++) {
            slots[i] = LOAD_CHAIN + i;
            load_poison(lw, slots[i]);
        }
        t0 = load_now_ns();
        rc = vqkv_get(lw->w.client, lease, lw->w.region, slots, found);
        if (load_count(lw, LOAD_GET, rc, VQKV_ELEASE, t0) >= 0) {
            lw->out->n.blocks_got += (uint64_t)rc;
            for (int i = 0; i < rc; i++)
                lw->out->n.wrong_bytes += load_check_block(lw, slots[i], keys[i]);
        }
    }
    t0 = load_now_ns();
    load_count(lw, LOAD_RELEASE, vqkv_release(lw->w.client, lease), 0, t0);
}

/* Unpins what this client pinned for good last time, then pins the chain
 * of s: for good (until the next pin) or for LOAD_PIN_TTL_MS. At most one
 * chain per client is pinned for good, so pins never fill the pool. */
static void load_pin(load_worker_t *lw, uint32_t s)
{
    uint8_t keys[LOAD_CHAIN][VQKV_KEY_BYTES];
    size_t count = 0;
    uint64_t t0;
    if (lw->n_pinned > 0) {
        t0 = load_now_ns();
        load_count(lw, LOAD_UNPIN,
                   vqkv_unpin(lw->w.client, lw->w.model,
                              (const uint8_t(*)[VQKV_KEY_BYTES])lw->pinned, lw->n_pinned, &count),
                   0, t0);
        lw->n_pinned = 0;
    }
    load_keys(lw, s, keys);
    uint32_t ttl = load_rand(&lw->rng) % 2 == 0 ? 0 : LOAD_PIN_TTL_MS;
    t0 = load_now_ns();
    int rc = vqkv_pin(lw->w.client, lw->w.model, (const uint8_t(*)[VQKV_KEY_BYTES])keys, LOAD_CHAIN,
                      ttl, &count);
    if (load_count(lw, LOAD_PIN, rc, 0, t0) >= 0 && ttl == 0) {
        memcpy(lw->pinned, keys, sizeof keys);
        lw->n_pinned = LOAD_CHAIN;
    }
}

static void load_stats(load_worker_t *lw)
{
    vqkv_stats_t st;
    uint64_t t0 = load_now_ns();
    if (load_count(lw, LOAD_STATS, vqkv_stats(lw->w.client, &st), 0, t0) >= 0 &&
        st.bytes_stored > st.pool_bytes)
        lw->out->n.stats_over_pool++;
}

/* The body of client `index`: set up, wait for the start, run the mix
 * until the deadline. Never returns. */
static void load_client_main(load_shared_t *sh, uint32_t index, const daemon_t *d,
                             const load_run_t *run)
{
    load_worker_t lw = {.out = &sh->clients[index], .sequences = run->sequences};
    char name[32], err[200] = "out of memory";
    lw.rng = run->seed ^ (0x100000001b3ull * (index + 1));
    lw.sample_rng = lw.rng ^ 0x5a5a5a5a5a5a5a5aull;
    snprintf(name, sizeof name, "load-%u", index);
    vqkv_kv_view_vllm(&lw.expect_view, &load_layout, 1);
    lw.expect = malloc(lw.expect_view.region_bytes);
    int rc = lw.expect == NULL
                 ? VQKV_ENOMEM
                 : vqkv_worker_open(&lw.w, d->path, name, VQKV_WORKER_TIMEOUT_MS, LOAD_MODEL,
                                    &load_layout, "fp16", LOAD_SLOTS, err, sizeof err);
    if (rc != VQKV_OK) {
        snprintf(lw.out->error, sizeof lw.out->error, "setup: %s", err);
        atomic_store(&lw.out->setup_failed, 1);
        _exit(1);
    }
    atomic_store(&lw.out->ready, 1);
    while (atomic_load(&sh->go) == 0)
        sleep_ms(1);
    while (!lw.closed && load_now_ns() < sh->deadline_ns) {
        uint32_t s = (uint32_t)(load_rand(&lw.rng) % lw.sequences);
        unsigned r = (unsigned)(load_rand(&lw.rng) % 100);
        if (r < 25)
            load_put(&lw, s);
        else if (r < 80)
            load_lookup_get(&lw, s);
        else if (r < 92)
            load_pin(&lw, s);
        else
            load_stats(&lw);
    }
    lw.out->end_ns = load_now_ns();
    vqkv_worker_close(&lw.w);
    free(lw.expect);
    _exit(0);
}

/* ---- the daemon's memory --------------------------------------------------- */

/* VmRSS and RssShmem of pid, in bytes; 0 when not readable. */
static void load_read_rss(pid_t pid, uint64_t *rss, uint64_t *shmem)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    *rss = *shmem = 0;
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    unsigned long long kb;
    while (fgets(line, sizeof line, f) != NULL) {
        if (sscanf(line, "VmRSS: %llu kB", &kb) == 1)
            *rss = kb * 1024;
        else if (sscanf(line, "RssShmem: %llu kB", &kb) == 1)
            *shmem = kb * 1024;
    }
    fclose(f);
}

/* Samples the daemon (RSS, shared memory, bytes_stored) until every
 * client has exited or the grace time after the deadline is over; returns
 * the clients still running then. */
static uint32_t load_watch(const daemon_t *d, vqkv_client_t *c, load_shared_t *sh, pid_t *pids,
                           load_run_t *run)
{
    uint32_t left = run->clients;
    long give_up = now_ms() + (long)run->seconds * 1000 + LOAD_GRACE_MS;
    while (left > 0 && now_ms() < give_up) {
        uint64_t rss, shmem;
        vqkv_stats_t st;
        load_read_rss(d->pid, &rss, &shmem);
        run->max_rss = rss > run->max_rss ? rss : run->max_rss;
        run->max_shmem = shmem > run->max_shmem ? shmem : run->max_shmem;
        assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
        if (st.bytes_stored > run->max_bytes_stored)
            run->max_bytes_stored = st.bytes_stored;
        run->samples++;
        for (uint32_t i = 0; i < run->clients; i++) {
            int status;
            if (pids[i] > 0 && waitpid(pids[i], &status, WNOHANG) == pids[i]) {
                if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                    fail_msg("client %u ended with wait status %#x: %s", i, status,
                             sh->clients[i].error);
                pids[i] = -1;
                left--;
            }
        }
        sleep_ms(LOAD_SAMPLE_MS);
    }
    return left;
}

/* ---- the report ------------------------------------------------------------ */

static void load_counts_add(load_counts_t *into, const load_counts_t *n)
{
    for (int k = 0; k < LOAD_KINDS; k++) {
        into->calls[k] += n->calls[k];
        for (int e = 0; e < LOAD_CODES; e++)
            into->errors[k][e] += n->errors[k][e];
    }
    for (size_t i = 0; i < LOAD_STATUSES; i++)
        into->statuses[i] += n->statuses[i];
    into->blocks_found += n->blocks_found;
    into->blocks_asked += n->blocks_asked;
    into->blocks_got += n->blocks_got;
    into->bytes_checked += n->bytes_checked;
    into->wrong_bytes += n->wrong_bytes;
    into->stats_over_pool += n->stats_over_pool;
}

/* Errors that are not documented outcomes: all but a get's expired lease. */
static uint64_t load_unexpected(const load_counts_t *n)
{
    uint64_t sum = 0;
    for (int k = 0; k < LOAD_KINDS; k++)
        for (int e = 1; e < LOAD_CODES; e++)
            if (!(k == LOAD_GET && e == -VQKV_ELEASE))
                sum += n->errors[k][e];
    return sum;
}

static int load_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    uint64_t calls, ok, errors[LOAD_CODES];
    double ops_s, p50_us, p99_us, max_us;
    int sampled;
} load_kind_t;

/* The run's figures for kind from the totals, with its percentiles over
 * the samples of all clients. */
static void load_kind_sum(const load_shared_t *sh, const load_run_t *run,
                          const load_counts_t *total, int kind, load_kind_t *k)
{
    uint64_t n = 0;
    memset(k, 0, sizeof *k);
    k->calls = k->ok = total->calls[kind];
    for (int e = 0; e < LOAD_CODES; e++) {
        k->errors[e] = total->errors[kind][e];
        k->ok -= k->errors[e];
    }
    for (uint32_t i = 0; i < run->clients; i++) {
        uint64_t calls = sh->clients[i].n.calls[kind];
        n += calls < LOAD_SAMPLES ? calls : LOAD_SAMPLES;
        k->sampled |= calls > LOAD_SAMPLES;
    }
    k->ops_s = (double)k->calls / run->elapsed_s;
    if (n == 0)
        return;
    float *all = malloc(n * sizeof *all);
    assert_non_null(all);
    uint64_t at = 0;
    for (uint32_t i = 0; i < run->clients; i++) {
        const load_client_t *cl = &sh->clients[i];
        uint64_t m = cl->n.calls[kind] < LOAD_SAMPLES ? cl->n.calls[kind] : LOAD_SAMPLES;
        memcpy(all + at, cl->samples_us[kind], m * sizeof *all);
        at += m;
    }
    qsort(all, n, sizeof *all, load_cmp_float);
    k->p50_us = all[(n - 1) / 2];
    k->p99_us = all[(uint64_t)ceil(0.99 * (double)n) - 1];
    k->max_us = all[n - 1];
    free(all);
}

static void load_report(const load_shared_t *sh, const load_run_t *run, const load_counts_t *t)
{
    load_kind_t k[LOAD_KINDS];
    const char *json_path = getenv("VQKV_LOAD_JSON");
    if (json_path == NULL || json_path[0] == '\0')
        json_path = "test_load.json";
    FILE *f = fopen(json_path, "w");
    if (f == NULL)
        fail_msg("cannot write %s: %s", json_path, strerror(errno));

    printf("\n%u clients, %.1f s, seed %llu, pool %llu bytes, %u sequences of %d blocks of %llu "
           "bytes (working set %.2fx the pool)\n",
           run->clients, run->elapsed_s, (unsigned long long)run->seed,
           (unsigned long long)LOAD_POOL_BYTES, run->sequences, LOAD_CHAIN,
           (unsigned long long)run->block_bytes,
           (double)run->sequences * LOAD_CHAIN * (double)run->block_bytes / LOAD_POOL_BYTES);
    printf("%-8s %10s %10s %10s %10s %10s %10s  %s\n", "kind", "calls", "ok", "ops/s", "p50 us",
           "p99 us", "max us", "errors");
    fprintf(f, "{\n  \"clients\": %u,\n  \"seconds\": %.3f,\n  \"seed\": %llu,\n", run->clients,
            run->elapsed_s, (unsigned long long)run->seed);
    fprintf(f, "  \"pool_bytes\": %u,\n  \"block_bytes\": %llu,\n  \"working_set_blocks\": %llu,\n",
            LOAD_POOL_BYTES, (unsigned long long)run->block_bytes,
            (unsigned long long)run->sequences * LOAD_CHAIN);
    fprintf(f, "  \"kinds\": {");
    for (int i = 0; i < LOAD_KINDS; i++) {
        load_kind_sum(sh, run, t, i, &k[i]);
        printf("%-8s %10llu %10llu %10.0f %10.1f %10.1f %10.1f  ", load_kind_names[i],
               (unsigned long long)k[i].calls, (unsigned long long)k[i].ok, k[i].ops_s, k[i].p50_us,
               k[i].p99_us, k[i].max_us);
        fprintf(f,
                "%s\n    \"%s\": {\"calls\": %llu, \"ok\": %llu, \"ops_per_s\": %.1f, "
                "\"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, \"sampled\": %s, "
                "\"errors\": {",
                i == 0 ? "" : ",", load_kind_names[i], (unsigned long long)k[i].calls,
                (unsigned long long)k[i].ok, k[i].ops_s, k[i].p50_us, k[i].p99_us, k[i].max_us,
                k[i].sampled ? "true" : "false");
        const char *sep = "";
        for (int e = 1; e < LOAD_CODES; e++) {
            if (k[i].errors[e] == 0)
                continue;
            printf("%s%s %llu", sep, vqkv_client_strerror(-e), (unsigned long long)k[i].errors[e]);
            fprintf(f, "%s\"%d\": %llu", sep, -e, (unsigned long long)k[i].errors[e]);
            sep = ", ";
        }
        printf("%s%s\n", sep[0] == '\0' ? "none" : "", k[i].sampled ? " (sampled)" : "");
        fprintf(f, "}}");
    }
    fprintf(f, "\n  },\n  \"put_statuses\": {");
    printf("put statuses (blocks):");
    for (size_t i = 0; i < LOAD_STATUSES; i++) {
        printf(" %s %llu", load_status_names[i], (unsigned long long)t->statuses[i]);
        fprintf(f, "%s\"%s\": %llu", i == 0 ? "" : ", ", load_status_names[i],
                (unsigned long long)t->statuses[i]);
    }
    printf("\nblocks got %llu, bytes checked %llu, wrong bytes %llu; lookups found %llu of %llu "
           "blocks asked; evictions %llu\n",
           (unsigned long long)t->blocks_got, (unsigned long long)t->bytes_checked,
           (unsigned long long)t->wrong_bytes, (unsigned long long)t->blocks_found,
           (unsigned long long)t->blocks_asked, (unsigned long long)run->evictions);
    printf("daemon: max bytes_stored %llu of %u; max RSS %.1f MiB (before the load %.1f MiB, "
           "bound %.1f MiB); max RssShmem %.1f MiB (bound %.1f MiB); %llu samples\n",
           (unsigned long long)run->max_bytes_stored, LOAD_POOL_BYTES,
           (double)run->max_rss / 1048576, (double)run->rss0 / 1048576,
           (double)(run->rss0 + LOAD_POOL_BYTES + run->region_bytes + run->slack_bytes) / 1048576,
           (double)run->max_shmem / 1048576,
           (double)(LOAD_POOL_BYTES + run->region_bytes) / 1048576,
           (unsigned long long)run->samples);
    fprintf(
        f,
        "},\n  \"blocks_got\": %llu,\n  \"bytes_checked\": %llu,\n  \"wrong_bytes\": %llu,\n"
        "  \"blocks_found\": %llu,\n  \"blocks_asked\": %llu,\n  \"evictions\": %llu,\n"
        "  \"max_bytes_stored\": %llu,\n  \"rss_before_bytes\": %llu,\n"
        "  \"max_rss_bytes\": %llu,\n  \"rss_bound_bytes\": %llu,\n"
        "  \"max_rss_shmem_bytes\": %llu,\n  \"shmem_bound_bytes\": %llu\n}\n",
        (unsigned long long)t->blocks_got, (unsigned long long)t->bytes_checked,
        (unsigned long long)t->wrong_bytes, (unsigned long long)t->blocks_found,
        (unsigned long long)t->blocks_asked, (unsigned long long)run->evictions,
        (unsigned long long)run->max_bytes_stored, (unsigned long long)run->rss0,
        (unsigned long long)run->max_rss,
        (unsigned long long)(run->rss0 + LOAD_POOL_BYTES + run->region_bytes + run->slack_bytes),
        (unsigned long long)run->max_shmem,
        (unsigned long long)(LOAD_POOL_BYTES + run->region_bytes));
    fclose(f);
    printf("JSON: %s\n", json_path);
}

/* ---- the test -------------------------------------------------------------- */

static void test_load(void **state)
{
    (void)state;
    load_run_t run = {0};
    run.clients = (uint32_t)load_env_u64("VQKV_LOAD_CLIENTS", 64, LOAD_MAX_CLIENTS);
    run.seconds = (uint32_t)load_env_u64("VQKV_LOAD_SECONDS", 60, 86400);
    run.seed = load_env_u64("VQKV_LOAD_SEED", (load_now_ns() ^ (uint64_t)getpid()) | 1, UINT64_MAX);
    printf("seed %llu (VQKV_LOAD_SEED repeats the request mix)\n", (unsigned long long)run.seed);
    fflush(stdout);

    daemon_t d;
    char pool[32];
    snprintf(pool, sizeof pool, "%u", LOAD_POOL_BYTES);
    const char *const extra[] = {"--pool-bytes", pool, "--log-level", "info", NULL};
    daemon_start(&d, extra);

    /* The parent's connection registers the model first, to learn the
     * stored block size the working set is measured in. */
    vqkv_client_t *c = NULL;
    vqkv_model_t *m = NULL;
    assert_vqkv(vqkv_connect(d.path, "load-watch", 30000, &c), VQKV_OK);
    assert_vqkv(vqkv_register_model(c, LOAD_MODEL, &load_layout, "fp16", &m), VQKV_OK);
    run.block_bytes = vqkv_model_block_bytes(m);
    /* Twice what the pool holds, in whole sequences. */
    run.sequences = (uint32_t)(2 * (LOAD_POOL_BYTES / run.block_bytes) / LOAD_CHAIN);
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &load_layout, LOAD_SLOTS);
    long page = sysconf(_SC_PAGESIZE);
    run.region_bytes = (uint64_t)run.clients *
                       ((view.region_bytes + (uint64_t)page - 1) / (uint64_t)page * (uint64_t)page);
    run.slack_bytes = load_env_u64("VQKV_LOAD_RSS_SLACK_MB", 32, 1u << 20) << 20;
    run.slack_bytes += (uint64_t)run.clients * LOAD_CHAIN * run.block_bytes;
    uint64_t shmem0;
    load_read_rss(d.pid, &run.rss0, &shmem0);
    assert_true(run.rss0 > 0);

    size_t sh_bytes = sizeof(load_shared_t) + run.clients * sizeof(load_client_t);
    load_shared_t *sh =
        mmap(NULL, sh_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(sh != MAP_FAILED);
    pid_t pids[LOAD_MAX_CLIENTS];
    fflush(stdout);
    for (uint32_t i = 0; i < run.clients; i++) {
        pid_t parent = getpid();
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            harness_die_with_parent(parent);
            load_client_main(sh, i, &d, &run);
        }
    }
    /* Every client set up (connected, model and region registered) before
     * the clock starts. */
    long setup_deadline = now_ms() + DAEMON_DEADLINE_MS * 3;
    for (uint32_t i = 0; i < run.clients; i++) {
        while (!atomic_load(&sh->clients[i].ready)) {
            if (atomic_load(&sh->clients[i].setup_failed) || now_ms() > setup_deadline)
                fail_msg("client %u did not set up: %s", i, sh->clients[i].error);
            sleep_ms(1);
        }
    }
    vqkv_stats_t st0, st;
    assert_vqkv(vqkv_stats(c, &st0), VQKV_OK);
    uint64_t start = load_now_ns();
    sh->deadline_ns = start + (uint64_t)run.seconds * 1000000000ull;
    atomic_store(&sh->go, 1);

    uint32_t hung = load_watch(&d, c, sh, pids, &run);
    for (uint32_t i = 0; i < run.clients; i++)
        if (pids[i] > 0) {
            kill(pids[i], SIGKILL);
            waitpid(pids[i], NULL, 0);
        }
    if (hung > 0)
        fail_msg("%u clients still running %d s after the end: a request hung", hung,
                 LOAD_GRACE_MS / 1000);

    uint64_t end = start;
    load_counts_t *total = calloc(1, sizeof *total);
    assert_non_null(total);
    for (uint32_t i = 0; i < run.clients; i++) {
        const load_client_t *cl = &sh->clients[i];
        end = cl->end_ns > end ? cl->end_ns : end;
        load_counts_add(total, &cl->n);
        if (cl->error[0] != '\0')
            print_error("client %u: %s\n", i, cl->error);
    }
    run.elapsed_s = (double)(end - start) / 1e9;

    /* The clients' leases and pins went with their connections. */
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    do {
        assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
        assert_true(now_ms() < deadline);
    } while (st.clients != 1 || st.leases != 0);
    run.evictions = st.evictions - st0.evictions;
    load_report(sh, &run, total);

    assert_int_equal(total->wrong_bytes, 0);
    assert_true(total->blocks_got > 0); /* gets did run and were checked */
    assert_int_equal(load_unexpected(total), 0);
    assert_int_equal(total->stats_over_pool, 0); /* the clients' own Stats agree */
    assert_true(run.evictions > 0);              /* the pool was oversubscribed */
    assert_true(run.max_bytes_stored <= LOAD_POOL_BYTES);
    assert_true(run.max_shmem <= LOAD_POOL_BYTES + run.region_bytes);
    assert_true(run.max_rss <= run.rss0 + LOAD_POOL_BYTES + run.region_bytes + run.slack_bytes);

    free(total);
    munmap(sh, sh_bytes);
    vqkv_close(c);
    daemon_stop(&d);
    daemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
