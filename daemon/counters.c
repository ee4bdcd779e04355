/* counters.c -- the server's request, error and latency counters
 * (counters.h).
 */
#include "counters.h"

const uint64_t vqkvd_latency_bounds_ns[VQKVD_LATENCY_BUCKETS] = {
    100000,   250000,   500000,    1000000,   2500000,   5000000,    10000000,
    25000000, 50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000,
};

void vqkvd_counters_request(vqkvd_counters_t *c, int body_case)
{
    if (body_case >= 0 && body_case < VQKVD_BODY_CASES)
        c->requests[body_case]++;
}

void vqkvd_counters_error(vqkvd_counters_t *c, int code)
{
    c->errors[code < 0 && code > -VQKVD_ERROR_CODES ? -code : 0]++;
}

void vqkvd_counters_observe(vqkvd_counters_t *c, int kind, uint64_t ns)
{
    int i = 0;
    while (i < VQKVD_LATENCY_BUCKETS && ns > vqkvd_latency_bounds_ns[i])
        i++;
    c->latency[kind][i]++;
    c->latency_ns[kind] += ns;
}
