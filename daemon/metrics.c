/* metrics.c -- vqkvd's Prometheus and health endpoint (metrics.h), served
 * by libmicrohttpd; it reads the server's figures and counts nothing itself.
 *
 * Threads. libmicrohttpd answers on one internal polling thread of its own,
 * while every figure lives on the loop's thread, read and written without
 * a lock. So the request handler never reads the server: it bumps a
 * request generation under a mutex, wakes the loop with uv_async_send and
 * waits on a condition variable, for at most VQKVD_METRICS_WAIT_MS, until
 * the loop has copied everything into a fresh snapshot (the totals
 * vqkvd_session_totals gathers for Stats too, the counters, the store's
 * tenant table) and handed it over under the same mutex. The handler then
 * formats the text on its own thread and frees the snapshot. An answer
 * within the bound is also what /healthz checks: a stuck loop, or one that
 * is stopping, gets 503.
 *
 * Cost: per request, one wakeup of the loop, one malloc and an
 * O(clients + tenants) copy on it (microseconds; the mutex is held for a
 * few instructions on either side, so the loop never waits on the other
 * thread); the formatting, the larger part, stays off the loop. The
 * alternative, the loop publishing a snapshot on a timer, would spend loop
 * time while nobody scrapes and would judge the loop's health by the age
 * of a timestamp. The price of asking: while the loop does not answer,
 * libmicrohttpd's one thread waits out the bound for each request, so
 * requests queue behind each other; connections are capped and time out.
 *
 * The async handle is unreferenced, so it never keeps uv_run from
 * returning on shutdown. vqkvd_metrics_stop then wakes a waiting handler
 * (503), stops libmicrohttpd, which joins its thread, and only then closes
 * the handle, so uv_async_send is never called on a closing handle.
 */
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <microhttpd.h>

#include "config.h"
#include "log.h"
#include "session.h"
#include "vqkv_proto.h"

#ifndef VQKVD_VERSION
#define VQKVD_VERSION "0.0.0"
#endif

/* How long a request waits for the loop before it gets 503. */
#define VQKVD_METRICS_WAIT_MS 1000
/* Connections at once, and the seconds an idle one is kept: a scraper
 * needs one, so these only bound what a misbehaving local peer can hold. */
#define VQKVD_METRICS_MAX_CONNS 16
#define VQKVD_METRICS_IDLE_S 10

#define VQKVD_METRICS_TEXT "text/plain; version=0.0.4; charset=utf-8"
#define VQKVD_PLAIN_TEXT "text/plain; charset=utf-8"

/* What the loop hands the handler: a copy, owned by whoever holds it. */
typedef struct {
    int stopping;
    const char *backend; /* a static name */
    vqkvd_totals_t totals;
    vqkvd_counters_t counters;
    uint32_t n_tenants;
    vqkvd_tenant_stats_t tenants[];
} vqkvd__snapshot_t;

struct vqkvd_metrics {
    vqkvd_server_t *server;
    struct MHD_Daemon *mhd;
    uv_async_t async; /* the handler's "take a snapshot" */
    pthread_mutex_t lock;
    pthread_cond_t cond; /* on CLOCK_MONOTONIC */
    /* Under lock. The handler's request number, the one the loop answered
     * last, and that answer (NULL once taken, or when malloc failed). */
    uint64_t asked, answered;
    vqkvd__snapshot_t *snap;
    int stopped; /* set by vqkvd_metrics_stop: nobody will answer */
};

/* ---- snapshots: taken on the loop, waited for on libmicrohttpd's thread -- */

static vqkvd__snapshot_t *vqkvd__snapshot_take(const vqkvd_server_t *s)
{
    uint32_t n = vqkvd_store_tenant_count(&s->store);
    vqkvd__snapshot_t *snap = malloc(sizeof *snap + (size_t)n * sizeof snap->tenants[0]);
    if (snap == NULL)
        return NULL;
    snap->stopping = s->stopping;
    snap->backend = s->backend->ops->name;
    vqkvd_session_totals(s, &snap->totals);
    snap->counters = s->counters;
    snap->n_tenants = n;
    for (uint32_t i = 0; i < n; i++)
        snap->tenants[i] = *vqkvd_store_tenant_at(&s->store, i);
    return snap;
}

static void vqkvd__metrics_on_async(uv_async_t *async)
{
    vqkvd_metrics_t *m = async->data;
    pthread_mutex_lock(&m->lock);
    uint64_t asked = m->asked;
    int due = asked != m->answered;
    pthread_mutex_unlock(&m->lock);
    if (!due)
        return;
    vqkvd__snapshot_t *snap = vqkvd__snapshot_take(m->server);
    pthread_mutex_lock(&m->lock);
    free(m->snap); /* an answer nobody waited for any more */
    m->snap = snap;
    m->answered = asked;
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
}

/* Asks the loop for a snapshot and waits for it. Returns it (the caller
 * frees it), or NULL with *status 503 (no answer within the bound, or the
 * endpoint is stopping) or 500 (the loop ran out of memory). */
static vqkvd__snapshot_t *vqkvd__metrics_ask(vqkvd_metrics_t *m, unsigned *status)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += VQKVD_METRICS_WAIT_MS / 1000;
    deadline.tv_nsec += (long)(VQKVD_METRICS_WAIT_MS % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    vqkvd__snapshot_t *snap = NULL;
    pthread_mutex_lock(&m->lock);
    free(m->snap); /* a late answer to a request that gave up */
    m->snap = NULL;
    uint64_t mine = ++m->asked;
    if (!m->stopped)
        uv_async_send(&m->async);
    int rc = 0;
    while (!m->stopped && m->answered < mine && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&m->cond, &m->lock, &deadline);
    *status = MHD_HTTP_SERVICE_UNAVAILABLE;
    if (m->answered >= mine) {
        snap = m->snap;
        m->snap = NULL;
        *status = snap != NULL ? MHD_HTTP_OK : MHD_HTTP_INTERNAL_SERVER_ERROR;
    }
    pthread_mutex_unlock(&m->lock);
    return snap;
}

/* ---- the exposition format ---------------------------------------------- */

static void vqkvd__family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A family of one sample without labels. */
static void vqkvd__scalar(FILE *f, const char *name, const char *type, const char *help,
                          uint64_t value)
{
    vqkvd__family(f, name, type, help);
    fprintf(f, "%s %llu\n", name, (unsigned long long)value);
}

/* The per-tenant families: one sample per tenant, labelled with its uid. */
static const struct {
    const char *name, *type, *help;
    size_t offset; /* of a uint64_t in vqkvd_tenant_stats_t */
} vqkvd__tenant_families[] = {
    {"vqkv_tenant_lookup_hits_total", "counter", "Blocks the tenant's lookups found.",
     offsetof(vqkvd_tenant_stats_t, hits)},
    {"vqkv_tenant_lookup_misses_total", "counter",
     "Blocks the tenant's lookups asked for past the found prefix.",
     offsetof(vqkvd_tenant_stats_t, misses)},
    {"vqkv_tenant_evictions_total", "counter", "The tenant's blocks evicted.",
     offsetof(vqkvd_tenant_stats_t, evictions)},
    {"vqkv_tenant_blocks", "gauge", "Blocks the tenant holds.",
     offsetof(vqkvd_tenant_stats_t, blocks)},
    {"vqkv_tenant_stored_bytes", "gauge", "Compressed bytes the tenant holds.",
     offsetof(vqkvd_tenant_stats_t, bytes_stored)},
    {"vqkv_tenant_logical_bytes", "gauge", "The tenant's blocks uncompressed, in bytes.",
     offsetof(vqkvd_tenant_stats_t, bytes_logical)},
    {"vqkv_tenant_quota_bytes", "gauge", "The tenant's quota on stored bytes; 0 is unlimited.",
     offsetof(vqkvd_tenant_stats_t, quota_bytes)},
};

/* The disk tier's figures, all zero without one. */
static void vqkvd__render_disk(FILE *f, const vqkvd_disk_stats_t *d)
{
    vqkvd__scalar(f, "vqkv_disk_blocks", "gauge", "Blocks the disk tier holds.", d->blocks);
    vqkvd__scalar(f, "vqkv_disk_bytes", "gauge", "Bytes of the disk tier's segment files.",
                  d->bytes);
    vqkvd__scalar(f, "vqkv_disk_capacity_bytes", "gauge", "The disk tier's limit (disk_bytes).",
                  d->limit_bytes);
    vqkvd__scalar(f, "vqkv_disk_writes_total", "counter", "Blocks written to the disk tier.",
                  d->writes);
    vqkvd__scalar(f, "vqkv_disk_reads_total", "counter",
                  "Blocks read back from the disk tier by lookups.", d->reads);
    vqkvd__scalar(f, "vqkv_disk_bad_records_total", "counter",
                  "Damaged disk records found and dropped.", d->bad_records);
    vqkvd__scalar(f, "vqkv_disk_write_errors_total", "counter",
                  "Blocks whose disk write failed (ENOSPC, ...).", d->write_errors);
    vqkvd__scalar(f, "vqkv_disk_queue_full_total", "counter",
                  "Evicted blocks not written: the write queue was full.", d->queue_full);
    vqkvd__scalar(f, "vqkv_disk_dropped_total", "counter",
                  "Blocks dropped with the disk tier's oldest segments.", d->dropped);
    vqkvd__scalar(f, "vqkv_disk_compactions_total", "counter",
                  "Disk segments compacted: live records moved on, the file deleted.",
                  d->compactions);
}

/* The remote tier's figures, all zero without one. */
static void vqkvd__render_remote(FILE *f, const vqkvd_remote_stats_t *r)
{
    vqkvd__scalar(f, "vqkv_remote_up", "gauge",
                  "1 while the remote tier is connected (every node it needs), else 0.", r->up);
    vqkvd__scalar(f, "vqkv_remote_puts_sent_total", "counter", "Blocks written to the remote tier.",
                  r->puts_sent);
    vqkvd__scalar(f, "vqkv_remote_puts_stored_total", "counter",
                  "Blocks the remote tier acknowledged.", r->puts_stored);
    vqkvd__scalar(f, "vqkv_remote_puts_failed_total", "counter",
                  "Blocks written whose write failed (an error, a broken connection, no answer).",
                  r->puts_failed);
    vqkvd__scalar(f, "vqkv_remote_puts_skipped_total", "counter",
                  "Blocks not written: the remote tier down or remote_queue_bytes reached.",
                  r->puts_skipped);
    vqkvd__scalar(f, "vqkv_remote_fetches_total", "counter",
                  "Blocks lookups asked the remote tier for.", r->fetches);
    vqkvd__scalar(f, "vqkv_remote_fetch_hits_total", "counter",
                  "Blocks fetched from the remote tier into memory.", r->fetch_hits);
    vqkvd__scalar(f, "vqkv_remote_fetch_misses_total", "counter",
                  "Blocks asked for that the remote tier lacked.", r->fetch_misses);
    vqkvd__scalar(f, "vqkv_remote_fetch_late_total", "counter",
                  "Blocks asked for and not answered by the lookup's deadline.", r->fetch_late);
    vqkvd__scalar(f, "vqkv_remote_rejected_total", "counter",
                  "Values from the remote tier refused: header, length, chain, codec, codebooks "
                  "or checksum.",
                  r->rejected);
    vqkvd__scalar(f, "vqkv_remote_codebooks_published_total", "counter",
                  "Codebook sets this node published.", r->codebooks_published);
    vqkvd__scalar(f, "vqkv_remote_codebooks_adopted_total", "counter",
                  "Codebook sets adopted from another node.", r->codebooks_adopted);
    vqkvd__scalar(f, "vqkv_remote_sent_bytes_total", "counter",
                  "Bytes of blocks written to the remote tier.", r->bytes_sent);
    vqkvd__scalar(f, "vqkv_remote_fetched_bytes_total", "counter",
                  "Bytes of values fetched from the remote tier.", r->bytes_fetched);
    vqkvd__scalar(f, "vqkv_remote_reconnects_total", "counter",
                  "Connections to the remote tier made after the first.", r->reconnects);
}

static void vqkvd__render_totals(FILE *f, const vqkvd__snapshot_t *snap)
{
    const vqkvd_totals_t *t = &snap->totals;
    vqkvd__scalar(f, "vqkv_lookup_hits_total", "counter", "Blocks lookups found.", t->store.hits);
    vqkvd__scalar(f, "vqkv_lookup_misses_total", "counter",
                  "Blocks lookups asked for past the found prefix.", t->store.misses);
    vqkvd__scalar(f, "vqkv_blocks_inserted_total", "counter", "Blocks puts stored.",
                  t->store.inserts);
    vqkvd__scalar(f, "vqkv_evictions_total", "counter",
                  "Blocks evicted, for room, for a quota or by Evict.", t->store.evictions);
    vqkvd__scalar(f, "vqkv_blocks", "gauge", "Blocks held.", t->store.blocks);
    vqkvd__scalar(f, "vqkv_stored_bytes", "gauge", "Compressed bytes held.", t->store.bytes_stored);
    vqkvd__scalar(f, "vqkv_logical_bytes", "gauge",
                  "The blocks held, uncompressed in the workers' dtype, in bytes.",
                  t->store.bytes_logical);
    vqkvd__family(f, "vqkv_compression_ratio", "gauge",
                  "Logical over stored bytes of the blocks held; NaN while none are.");
    if (t->store.bytes_stored > 0)
        fprintf(f, "vqkv_compression_ratio %.6g\n",
                (double)t->store.bytes_logical / (double)t->store.bytes_stored);
    else
        fprintf(f, "vqkv_compression_ratio NaN\n");
    vqkvd__scalar(f, "vqkv_pool_capacity_bytes", "gauge", "Bytes of the pool blocks can use.",
                  t->pool.usable_bytes);
    vqkvd__scalar(f, "vqkv_pool_used_bytes", "gauge",
                  "Bytes of the pool handed to slot classes (chunks).", t->pool.bytes_in_chunks);
    vqkvd__scalar(f, "vqkv_staging_bytes", "gauge",
                  "Bytes of the puts answered before their encode, held until it is done.",
                  t->staging.bytes);
    vqkvd__scalar(f, "vqkv_encode_backlog_blocks", "gauge",
                  "Blocks of staged puts not yet encoded.", t->staging.backlog);
    vqkvd__scalar(f, "vqkv_puts_staged_total", "counter", "Puts answered before their encode.",
                  t->staging.puts_staged);
    vqkvd__scalar(f, "vqkv_puts_staging_full_total", "counter",
                  "Puts that found staging full and waited for their encode.",
                  t->staging.puts_full);
    vqkvd__render_disk(f, &t->disk);
    vqkvd__render_remote(f, &t->remote);
    vqkvd__scalar(f, "vqkv_leases", "gauge", "Lookup leases held.", t->store.leases);
    vqkvd__scalar(f, "vqkv_clients", "gauge", "Connections open.", t->clients);
    vqkvd__scalar(f, "vqkv_models", "gauge", "Models registered since the start.", t->models);
    vqkvd__scalar(f, "vqkv_regions", "gauge", "Memory regions the open connections registered.",
                  t->regions);
    vqkvd__scalar(f, "vqkv_connection_pins", "gauge",
                  "Blocks pinned until unpinned or their connection closes (ttl_ms 0).", t->pins);
}

static void vqkvd__render_counters(FILE *f, const vqkvd_counters_t *c)
{
    /* Only the types and codes seen, as in most exporters: listing every
     * Envelope body would list the reply types too. */
    vqkvd__family(f, "vqkv_requests_total", "counter",
                  "Requests received, by type (the Envelope's body field).");
    const ProtobufCMessageDescriptor *env = &vqkv__envelope__descriptor;
    for (unsigned i = 0; i < env->n_fields; i++) {
        const ProtobufCFieldDescriptor *fd = &env->fields[i];
        if ((fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && fd->id < VQKVD_BODY_CASES &&
            c->requests[fd->id] > 0)
            fprintf(f, "vqkv_requests_total{type=\"%s\"} %llu\n", fd->name,
                    (unsigned long long)c->requests[fd->id]);
    }
    vqkvd__family(f, "vqkv_errors_total", "counter",
                  "Error replies, by VQKV_E* code (0: a code outside the table).");
    for (int i = 0; i < VQKVD_ERROR_CODES; i++)
        if (c->errors[i] > 0)
            fprintf(f, "vqkv_errors_total{code=\"%d\"} %llu\n", -i,
                    (unsigned long long)c->errors[i]);

    static const char *const timed[VQKVD_TIMED_KINDS] = {
        [VQKVD_TIMED_PUT] = "put", [VQKVD_TIMED_GET] = "get"};
    vqkvd__family(f, "vqkv_request_duration_seconds", "histogram",
                  "Put and Get requests from their hand-over to the thread pool to their reply.");
    for (int k = 0; k < VQKVD_TIMED_KINDS; k++) {
        uint64_t count = 0;
        for (int i = 0; i < VQKVD_LATENCY_BUCKETS; i++) {
            count += c->latency[k][i];
            fprintf(f, "vqkv_request_duration_seconds_bucket{type=\"%s\",le=\"%g\"} %llu\n",
                    timed[k], (double)vqkvd_latency_bounds_ns[i] / 1e9, (unsigned long long)count);
        }
        count += c->latency[k][VQKVD_LATENCY_BUCKETS];
        fprintf(f, "vqkv_request_duration_seconds_bucket{type=\"%s\",le=\"+Inf\"} %llu\n", timed[k],
                (unsigned long long)count);
        fprintf(f, "vqkv_request_duration_seconds_sum{type=\"%s\"} %.9f\n", timed[k],
                (double)c->latency_ns[k] / 1e9);
        fprintf(f, "vqkv_request_duration_seconds_count{type=\"%s\"} %llu\n", timed[k],
                (unsigned long long)count);
    }
}

/* The whole page into a malloc'd *text; -ENOMEM. Label values need no
 * escaping: they are numbers, field names and the build's version. */
static int vqkvd__render(const vqkvd__snapshot_t *snap, char **text, size_t *len)
{
    FILE *f = open_memstream(text, len);
    if (f == NULL)
        return -ENOMEM;
    vqkvd__family(f, "vqkv_build_info", "gauge", "Always 1; the labels describe this vqkvd.");
    fprintf(f, "vqkv_build_info{version=\"%s\",backend=\"%s\",protocol=\"%d\"} 1\n", VQKVD_VERSION,
            snap->backend, VQKV_PROTO_VERSION);
    vqkvd__render_totals(f, snap);
    vqkvd__render_counters(f, &snap->counters);
    for (size_t k = 0; k < sizeof vqkvd__tenant_families / sizeof vqkvd__tenant_families[0]; k++) {
        vqkvd__family(f, vqkvd__tenant_families[k].name, vqkvd__tenant_families[k].type,
                      vqkvd__tenant_families[k].help);
        for (uint32_t i = 0; i < snap->n_tenants; i++) {
            uint64_t v;
            memcpy(&v, (const char *)&snap->tenants[i] + vqkvd__tenant_families[k].offset,
                   sizeof v);
            fprintf(f, "%s{tenant=\"%u\"} %llu\n", vqkvd__tenant_families[k].name,
                    (unsigned)snap->tenants[i].tenant, (unsigned long long)v);
        }
    }
    int failed = ferror(f);
    if (fclose(f) != 0 || failed) {
        free(*text);
        *text = NULL;
        return -ENOMEM;
    }
    return 0;
}

/* ---- HTTP --------------------------------------------------------------- */

/* Queues a response; body is static unless owned, then malloc'd and taken. */
static enum MHD_Result vqkvd__respond(struct MHD_Connection *conn, unsigned status,
                                      const char *type, char *body, size_t len, int owned)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (r == NULL) {
        if (owned)
            free(body);
        return MHD_NO; /* libmicrohttpd closes the connection */
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result vqkvd__respond_text(struct MHD_Connection *conn, unsigned status,
                                           const char *text)
{
    return vqkvd__respond(conn, status, VQKVD_PLAIN_TEXT, (char *)text, strlen(text), 0);
}

static enum MHD_Result vqkvd__metrics_on_request(void *cls, struct MHD_Connection *conn,
                                                 const char *url, const char *method,
                                                 const char *version, const char *upload_data,
                                                 size_t *upload_data_size, void **req_cls)
{
    static int seen; /* its address marks a request whose headers are in */
    vqkvd_metrics_t *m = cls;
    (void)version;
    (void)upload_data;
    /* libmicrohttpd calls once with the headers, then with each piece of a
     * body, then once more: answer on that last call, dropping any body. */
    if (*req_cls == NULL) {
        *req_cls = &seen;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        *upload_data_size = 0;
        return MHD_YES;
    }
    int metrics = strcmp(url, "/metrics") == 0;
    if (!metrics && strcmp(url, "/healthz") != 0)
        return vqkvd__respond_text(conn, MHD_HTTP_NOT_FOUND, "not found: try /metrics\n");
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return vqkvd__respond_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "GET or HEAD only\n");

    unsigned status;
    vqkvd__snapshot_t *snap = vqkvd__metrics_ask(m, &status);
    if (snap == NULL)
        return vqkvd__respond_text(conn, status,
                                   status == MHD_HTTP_SERVICE_UNAVAILABLE
                                       ? "the daemon is not answering or is stopping\n"
                                       : "out of memory\n");
    enum MHD_Result rc;
    if (!metrics) {
        rc = snap->stopping ? vqkvd__respond_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "stopping\n")
                            : vqkvd__respond_text(conn, MHD_HTTP_OK, "ok\n");
        free(snap);
        return rc;
    }
    char *text;
    size_t len;
    int render_rc = vqkvd__render(snap, &text, &len);
    free(snap);
    if (render_rc < 0)
        return vqkvd__respond_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
    return vqkvd__respond(conn, MHD_HTTP_OK, VQKVD_METRICS_TEXT, text, len, 1);
}

/* libmicrohttpd's complaints (a failed bind, a broken connection) in the
 * daemon's log. */
static void vqkvd__mhd_log(void *cls, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

static void vqkvd__mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\n")] = '\0';
    vqkvd_log(VQKVD_LOG_WARN, "metrics endpoint: %s", msg);
}

/* ---- start and stop ------------------------------------------------------ */

static void vqkvd__metrics_free(uv_handle_t *handle)
{
    vqkvd_metrics_t *m = handle->data;
    free(m->snap);
    pthread_cond_destroy(&m->cond);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

/* The lock and the condition variable, the latter on the monotonic clock
 * so that a wall-clock step does not stretch or cut the wait. */
static int vqkvd__metrics_init_sync(vqkvd_metrics_t *m)
{
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc != 0)
        return VQKV_EIO;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(&m->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0)
        return VQKV_EIO;
    rc = pthread_mutex_init(&m->lock, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&m->cond);
        return VQKV_EIO;
    }
    return VQKV_OK;
}

int vqkvd_metrics_start(vqkvd_metrics_t **out, vqkvd_server_t *s)
{
    *out = NULL;
    const char *address = s->cfg.metrics_address;
    if (address == NULL)
        return VQKV_OK;
    vqkvd_inet_addr_t addr;
    if (vqkvd_config_parse_address(address, &addr) < 0)
        return VQKV_EINVAL;
    vqkvd_metrics_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return VQKV_ENOMEM;
    int rc = vqkvd__metrics_init_sync(m);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "metrics endpoint: cannot make its lock");
        free(m);
        return rc;
    }
    m->server = s;
    uv_async_init(s->loop, &m->async, vqkvd__metrics_on_async); /* cannot fail on Linux */
    m->async.data = m;
    uv_unref((uv_handle_t *)&m->async);

    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (addr.sa.sa_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* The logger first, so that libmicrohttpd logs nothing on its own. */
    m->mhd = MHD_start_daemon(flags, 0, NULL, NULL, vqkvd__metrics_on_request, m,
                              MHD_OPTION_EXTERNAL_LOGGER, vqkvd__mhd_log, NULL,
                              MHD_OPTION_SOCK_ADDR, &addr.sa, MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned)VQKVD_METRICS_MAX_CONNS, MHD_OPTION_CONNECTION_TIMEOUT,
                              (unsigned)VQKVD_METRICS_IDLE_S, MHD_OPTION_END);
    if (m->mhd == NULL) {
        vqkvd_log(VQKVD_LOG_ERROR, "metrics endpoint: cannot listen on %s", address);
        uv_close((uv_handle_t *)&m->async, vqkvd__metrics_free); /* freed as the loop runs */
        return VQKV_EIO;
    }
    /* The port the kernel picked when the address asked for port 0. */
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_BIND_PORT);
    char host[INET6_ADDRSTRLEN];
    const void *ip = addr.sa.sa_family == AF_INET6 ? (const void *)&addr.in6.sin6_addr
                                                   : (const void *)&addr.in.sin_addr;
    inet_ntop(addr.sa.sa_family, ip, host, sizeof host);
    vqkvd_log(VQKVD_LOG_INFO, "metrics on http://%s%s%s:%u/metrics (and /healthz)",
              addr.sa.sa_family == AF_INET6 ? "[" : "", host,
              addr.sa.sa_family == AF_INET6 ? "]" : "", info != NULL ? (unsigned)info->port : 0u);
    *out = m;
    return VQKV_OK;
}

void vqkvd_metrics_stop(vqkvd_metrics_t *m)
{
    if (m == NULL)
        return;
    pthread_mutex_lock(&m->lock);
    m->stopped = 1;
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
    MHD_stop_daemon(m->mhd);
    uv_loop_t *loop = m->server->loop;
    uv_close((uv_handle_t *)&m->async, vqkvd__metrics_free);
    uv_run(loop, UV_RUN_DEFAULT);
}
