/* metrics.h -- vqkvd's HTTP endpoint for Prometheus: GET /metrics (text
 * exposition format 0.0.4, every name in docs/METRICS.md) and GET /healthz
 * ("ok" while the event loop answers), served by libmicrohttpd on a
 * loopback address when the configuration names one (metrics_address,
 * --metrics-address). It shows the store's, the pool's and counters.h's
 * figures; nothing below it calls it.
 *
 * The endpoint lives on libmicrohttpd's thread and never reads the server
 * itself: it asks the loop for a snapshot (metrics.c says how and what it
 * costs).
 */
#ifndef VQKVD_METRICS_H
#define VQKVD_METRICS_H

#include <stdint.h>

#include "state.h"

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

#endif
