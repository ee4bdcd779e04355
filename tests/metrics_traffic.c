/* metrics_traffic.c -- a worker that sends vqkvd a known amount of traffic,
 * for tests/test_metrics.py to check the metrics endpoint against.
 *
 *   metrics_traffic SOCKET BLOCKS PUTS LOOKUPS EXTRA PINS
 *
 * One connection, one model ("metrics-test", 2 layers, 2 kv heads,
 * head_dim 64, 16-token blocks, f16, codec kivi4) and one memfd region of
 * BLOCKS + EXTRA slots. It puts BLOCKS blocks of one chain in PUTS
 * requests (BLOCKS a multiple of PUTS), then looks up LOOKUPS times the
 * chain extended by EXTRA blocks it never put (so each lookup finds BLOCKS
 * and misses EXTRA), releasing every lease but the last one's, which it
 * gets into its slots and keeps. Then one Release of a lease that does not
 * exist (VQKV_ELEASE) and one Pin of the first PINS blocks until the
 * connection closes. Every result is checked against what the daemon must
 * answer.
 *
 * It then prints one JSON line (the stored bytes of one block, as the
 * daemon answered them, its logical bytes and the tenant the daemon named)
 * and holds the connection, with its region, lease and pins, until its
 * standard input closes, so the caller can read the metrics of a connected
 * client and then of none. Exit status 0, or 1 with the reason on stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqkv.h"
#include "worker.h"

#define TRAFFIC_MAX_BLOCKS 1024

/* Always 1: what returned what, against what was expected. */
static int traffic_fail(const vqkv_worker_t *w, const char *what, long got, long want)
{
    if (got < 0)
        fprintf(stderr, "metrics_traffic: %s returned %ld (%s: %s), expected %ld\n", what, got,
                vqkv_client_strerror((int)got), vqkv_last_error(w->client), want);
    else
        fprintf(stderr, "metrics_traffic: %s returned %ld, expected %ld\n", what, got, want);
    return 1;
}

static int traffic_count(const char *text, unsigned *out)
{
    char *end;
    unsigned long v = strtoul(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v > TRAFFIC_MAX_BLOCKS)
        return -1;
    *out = (unsigned)v;
    return 0;
}

/* The traffic of the header; 0, or 1 after saying what went wrong. */
static int traffic_run(vqkv_worker_t *w, unsigned blocks, unsigned puts, unsigned lookups,
                       unsigned extra, unsigned pins)
{
    static uint8_t keys[TRAFFIC_MAX_BLOCKS * 2][VQKV_KEY_BYTES];
    static uint8_t parents[TRAFFIC_MAX_BLOCKS][VQKV_KEY_BYTES];
    static uint32_t tokens[TRAFFIC_MAX_BLOCKS * 2 * 16];
    static uint32_t slots[TRAFFIC_MAX_BLOCKS * 2];
    unsigned chain = blocks + extra;
    for (unsigned i = 0; i < chain * w->layout.block_tokens; i++)
        tokens[i] = 1000 + i;
    size_t n_keys;
    int rc = vqkv_model_block_keys(w->model, NULL, tokens, (size_t)chain * w->layout.block_tokens,
                                   NULL, 0, keys, chain, &n_keys);
    if (rc < 0 || n_keys != chain)
        return traffic_fail(w, "vqkv_model_block_keys", rc < 0 ? rc : (long)n_keys, chain);
    for (unsigned i = 0; i < chain; i++) {
        slots[i] = i;
        if (i > 0)
            memcpy(parents[i], keys[i - 1], VQKV_KEY_BYTES);
        vqkv_worker_fill_synthetic(&w->layout, &w->view, w->base, i, keys[i]);
    }
    unsigned per_put = blocks / puts;
    for (unsigned p = 0; p < puts; p++) {
        unsigned first = p * per_put;
        rc = vqkv_put(w->client, w->model, w->region, keys + first, parents + first, slots + first,
                      per_put, NULL);
        if (rc != (int)per_put)
            return traffic_fail(w, "vqkv_put", rc, per_put);
    }
    vqkv_lease_t lease = 0;
    for (unsigned l = 0; l < lookups; l++) {
        size_t found;
        rc = vqkv_lookup(w->client, w->model, keys, chain, &found, &lease);
        if (rc < 0 || found != blocks)
            return traffic_fail(w, "vqkv_lookup", rc < 0 ? rc : (long)found, blocks);
        if (l + 1 < lookups && (rc = vqkv_release(w->client, lease)) < 0)
            return traffic_fail(w, "vqkv_release", rc, 0);
    }
    rc = vqkv_get(w->client, lease, w->region, slots, blocks);
    if (rc != (int)blocks)
        return traffic_fail(w, "vqkv_get", rc, blocks);
    rc = vqkv_release(w->client, lease + 1000000);
    if (rc != VQKV_ELEASE)
        return traffic_fail(w, "vqkv_release of a lease that does not exist", rc, VQKV_ELEASE);
    size_t pinned;
    rc = vqkv_pin(w->client, w->model, keys, pins, 0, &pinned);
    if (rc < 0 || pinned != pins)
        return traffic_fail(w, "vqkv_pin", rc < 0 ? rc : (long)pinned, pins);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned blocks, puts, lookups, extra, pins;
    if (argc != 7 || traffic_count(argv[2], &blocks) < 0 || traffic_count(argv[3], &puts) < 0 ||
        traffic_count(argv[4], &lookups) < 0 || traffic_count(argv[5], &extra) < 0 ||
        traffic_count(argv[6], &pins) < 0 || puts == 0 || blocks % puts != 0 || lookups == 0 ||
        pins > blocks) {
        fprintf(stderr, "usage: metrics_traffic SOCKET BLOCKS PUTS LOOKUPS EXTRA PINS\n");
        return 2;
    }
    const vqkv_layout_t layout = {.num_layers = 2,
                                  .num_kv_heads = 2,
                                  .head_dim = 64,
                                  .block_tokens = 16,
                                  .dtype = VQKV_DTYPE_F16};
    vqkv_worker_t w;
    char err[256];
    int rc = vqkv_worker_open(&w, argv[1], "metrics-traffic", VQKV_WORKER_TIMEOUT_MS,
                              "metrics-test", &layout, "kivi4", blocks + extra, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "metrics_traffic: %s\n", err);
        return 1;
    }
    int status = traffic_run(&w, blocks, puts, lookups, extra, pins);
    if (status == 0) {
        printf("{\"block_bytes\": %u, \"logical_bytes\": %llu, \"tenant\": \"%s\"}\n",
               vqkv_model_block_bytes(w.model),
               (unsigned long long)vqkv_worker_block_logical_bytes(&layout),
               vqkv_client_tenant(w.client));
        fflush(stdout);
        while (getchar() != EOF)
            ;
    }
    vqkv_worker_close(&w);
    return status;
}
