/* counters.h -- what vqkvd counts for its metrics endpoint beyond the
 * store's and the pool's figures: requests by type, Error replies by code,
 * and the latency of the requests that run on the thread pool. A leaf:
 * bumped by the layers that see the events (server.c, conn.c, jobs.c), read
 * by metrics.c, calling nothing. Loop thread only.
 */
#ifndef VQKVD_COUNTERS_H
#define VQKVD_COUNTERS_H

#include <stdint.h>

/* Envelope body cases are below this (requests are counted by case). */
#define VQKVD_BODY_CASES 32
/* Error codes are -1 .. -(this - 1); Error replies are counted by -code. */
#define VQKVD_ERROR_CODES 128
/* Buckets of the latency histogram (vqkvd_latency_bounds_ns). */
#define VQKVD_LATENCY_BUCKETS 14

/* The requests whose latency is kept: the ones that run on the thread pool. */
enum { VQKVD_TIMED_PUT, VQKVD_TIMED_GET, VQKVD_TIMED_KINDS };

/* What the server counts for the metrics endpoint (metrics.h) on top of
 * the store's and the pool's counters. */
typedef struct {
    uint64_t requests[VQKVD_BODY_CASES]; /* by Envelope body case */
    uint64_t errors[VQKVD_ERROR_CODES];  /* by -code; [0]: codes outside the table */
    /* Per timed kind: requests whose reply came within bucket i (the last
     * one: later than every bound), and the sum of their latencies. */
    uint64_t latency[VQKVD_TIMED_KINDS][VQKVD_LATENCY_BUCKETS + 1];
    uint64_t latency_ns[VQKVD_TIMED_KINDS];
} vqkvd_counters_t;

/* Upper bounds of the latency buckets in nanoseconds, 100 us to 2.5 s;
 * a last, unbounded bucket follows them in vqkvd_counters_t.latency. */
extern const uint64_t vqkvd_latency_bounds_ns[VQKVD_LATENCY_BUCKETS];

/* A request of this Envelope body case was received. */
void vqkvd_counters_request(vqkvd_counters_t *c, int body_case);

/* An Error reply with this (negative) code was sent. */
void vqkvd_counters_error(vqkvd_counters_t *c, int code);

/* A request of kind VQKVD_TIMED_* was answered ns nanoseconds after it was
 * handed to the thread pool. O(buckets). */
void vqkvd_counters_observe(vqkvd_counters_t *c, int kind, uint64_t ns);

#endif
