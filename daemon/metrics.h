/* metrics.h -- vqkvd's HTTP endpoint for Prometheus: GET /metrics (text
 * exposition format 0.0.4, every name in docs/METRICS.md) and GET /healthz
 * ("ok" while the event loop answers), served by libmicrohttpd on a
 * loopback address when the configuration names one (metrics_address,
 * --metrics-address), and the counters the server keeps for it on top of
 * what the store and the pool count.
 *
 * The endpoint lives on libmicrohttpd's thread and never reads the server
 * itself: it asks the loop for a snapshot (metrics.c says how and what it
 * costs). The counting helpers below run on the loop's thread, like
 * everything that touches a vqkvd_server_t.
 */
#ifndef VQKVD_METRICS_H
#define VQKVD_METRICS_H

#include <stdint.h>

#include "server.h"

typedef struct vqkvd_metrics vqkvd_metrics_t;

/* Starts the endpoint on s->cfg.metrics_address (already checked by
 * vqkvd_config_parse_address) for the server s, which must have started.
 * With no address it does nothing: *out is NULL and 0 is returned. Logs
 * the address it listens on (the port picked when the address asks for
 * port 0) or why it cannot; returns VQKV_OK, VQKV_EINVAL, VQKV_ENOMEM or
 * VQKV_EIO (it cannot listen there). */
int vqkvd_metrics_start(vqkvd_metrics_t **out, vqkvd_server_t *s);

/* Stops the endpoint and frees it; NULL is a no-op. Call once uv_run has
 * returned and before the loop is closed: requests still waiting for the
 * loop get 503, libmicrohttpd's thread is joined, and the loop is run once
 * more to close the handle that woke it. */
void vqkvd_metrics_stop(vqkvd_metrics_t *m);

/* A request of this Envelope body case was received. */
void vqkvd_metrics_count_request(vqkvd_counters_t *c, int body_case);

/* An Error reply with this (negative) code was sent. */
void vqkvd_metrics_count_error(vqkvd_counters_t *c, int code);

/* A request of kind VQKVD_TIMED_* was answered ns nanoseconds after it was
 * handed to the thread pool. */
void vqkvd_metrics_observe(vqkvd_counters_t *c, int kind, uint64_t ns);

#endif
