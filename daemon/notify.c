/* notify.c -- READY=1, STATUS=, RELOADING=1, STOPPING=1 and WATCHDOG=1 to
 * the service manager (notify.h).
 *
 * sd_notify sends one datagram on a blocking socket to NOTIFY_SOCKET, so in
 * principle it could wait if the manager stopped reading its queue. systemd
 * reads that queue from its own event loop, and a manager that has stopped
 * reading is also the one that would restart a wedged service, so the loop
 * calls it directly: a non-blocking sender of our own would duplicate
 * libsystemd's address handling (paths, abstract names, vsock) for a case
 * that does not come up. The sends are rare: one per watchdog half-period,
 * one per status change at most every VQKVD_NOTIFY_STATUS_MS.
 *
 * The watchdog pings come from a timer on the loop, never from a thread of
 * their own, because what they vouch for is that the loop still turns.
 */
#include "notify.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "log.h"

/* Sends state (one or more "KEY=value" lines) when NOTIFY_SOCKET is set.
 * A failure is logged once: the manager is unlikely to come back, and a
 * line per ping would flood the log. */
static void vqkvd__notify_send(vqkvd_notify_t *n, const char *state)
{
    if (!n->enabled)
        return;
    int rc = sd_notify(0, state);
    if (rc >= 0 || n->failed)
        return;
    n->failed = 1;
    vqkvd_log(VQKVD_LOG_WARN, "telling the service manager %.*s: %s (not logged again)",
              (int)strcspn(state, "\n"), state, strerror(-rc));
}

/* A size the way people read one: "312 MiB", "1 GiB", "1.5 GiB". */
static void vqkvd__notify_size(char *buf, size_t size, uint64_t bytes)
{
    if (bytes >= 1ull << 30 && bytes % (1ull << 30) != 0)
        snprintf(buf, size, "%.1f GiB", (double)bytes / (double)(1ull << 30));
    else if (bytes >= 1ull << 30)
        snprintf(buf, size, "%llu GiB", (unsigned long long)(bytes >> 30));
    else if (bytes >= 1ull << 20)
        snprintf(buf, size, "%llu MiB", (unsigned long long)(bytes >> 20));
    else if (bytes >= 1ull << 10)
        snprintf(buf, size, "%llu KiB", (unsigned long long)(bytes >> 10));
    else
        snprintf(buf, size, "%llu B", (unsigned long long)bytes);
}

/* Recomputes n->status_line; 1 when it differs from the one last sent. */
static int vqkvd__notify_update_status(vqkvd_notify_t *n)
{
    vqkvd_server_status_t st;
    vqkvd_server_status(n->server, &st);
    char hit[32], used[32], total[32], line[sizeof n->status_line];
    uint64_t asked = st.hits + st.misses;
    if (asked == 0)
        snprintf(hit, sizeof hit, "no lookups yet");
    else
        snprintf(hit, sizeof hit, "hit rate %.1f%%", 100.0 * (double)st.hits / (double)asked);
    vqkvd__notify_size(used, sizeof used, st.bytes_stored);
    vqkvd__notify_size(total, sizeof total, st.pool_bytes);
    snprintf(line, sizeof line, "%s, pool %s of %s used, %u client%s", hit, used, total,
             (unsigned)st.clients, st.clients == 1 ? "" : "s");
    if (strcmp(line, n->status_line) == 0)
        return 0;
    memcpy(n->status_line, line, sizeof line);
    return 1;
}

static void vqkvd__notify_on_watchdog(uv_timer_t *timer)
{
    vqkvd__notify_send(timer->data, "WATCHDOG=1");
}

static void vqkvd__notify_on_status(uv_timer_t *timer)
{
    vqkvd_notify_t *n = timer->data;
    if (!vqkvd__notify_update_status(n))
        return;
    char state[sizeof n->status_line + 8];
    snprintf(state, sizeof state, "STATUS=%s", n->status_line);
    vqkvd__notify_send(n, state);
}

void vqkvd_notify_start(vqkvd_notify_t *n, uv_loop_t *loop, const vqkvd_server_t *server)
{
    memset(n, 0, sizeof *n);
    n->server = server;
    const char *socket = getenv("NOTIFY_SOCKET");
    if (socket == NULL || socket[0] == '\0')
        return;
    n->enabled = 1;
    uint64_t usec = 0;
    int rc = sd_watchdog_enabled(0, &usec);
    if (rc < 0)
        vqkvd_log(VQKVD_LOG_WARN, "WATCHDOG_USEC or WATCHDOG_PID: %s; no watchdog pings",
                  strerror(-rc));
    n->watchdog_usec = rc > 0 ? usec : 0;

    uv_timer_init(loop, &n->watchdog); /* cannot fail */
    uv_timer_init(loop, &n->status);
    n->watchdog.data = n->status.data = n;
    n->timers = 1;
    vqkvd_notify_ready(n);
    if (n->watchdog_usec > 0) {
        /* Half the interval, so one late ping is not yet a missed one. */
        uint64_t every_ms = n->watchdog_usec / 2000 > 0 ? n->watchdog_usec / 2000 : 1;
        uv_timer_start(&n->watchdog, vqkvd__notify_on_watchdog, 0, every_ms);
        vqkvd_log(VQKVD_LOG_DEBUG, "watchdog: a ping every %llu ms", (unsigned long long)every_ms);
    }
    uv_timer_start(&n->status, vqkvd__notify_on_status, VQKVD_NOTIFY_STATUS_MS,
                   VQKVD_NOTIFY_STATUS_MS);
}

void vqkvd_notify_reloading(vqkvd_notify_t *n)
{
    /* MONOTONIC_USEC lets Type=notify-reload tell this reload from an
     * earlier one; managers that do not know it ignore the line. */
    char state[64];
    snprintf(state, sizeof state, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)(uv_hrtime() / 1000));
    vqkvd__notify_send(n, state);
}

void vqkvd_notify_ready(vqkvd_notify_t *n)
{
    if (!n->enabled)
        return;
    vqkvd__notify_update_status(n);
    char state[sizeof n->status_line + 16];
    snprintf(state, sizeof state, "READY=1\nSTATUS=%s", n->status_line);
    vqkvd__notify_send(n, state);
}

void vqkvd_notify_stop(vqkvd_notify_t *n)
{
    vqkvd__notify_send(n, "STOPPING=1\nSTATUS=stopping");
    n->enabled = 0;
    if (!n->timers)
        return;
    n->timers = 0;
    uv_close((uv_handle_t *)&n->watchdog, NULL);
    uv_close((uv_handle_t *)&n->status, NULL);
}
