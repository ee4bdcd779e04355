/* notify.h -- what vqkvd tells the service manager (sd_notify(3), through
 * libsystemd), so that a Type=notify unit knows when the daemon serves,
 * what it is doing, and that its loop still turns:
 *
 *   READY=1             once the socket accepts and the pool is allocated,
 *                       and again when a reload is done
 *   STATUS=...          "hit rate 81.2%, pool 312 MiB of 1 GiB used,
 *                       3 clients", sent with READY=1 and then every
 *                       VQKVD_NOTIFY_STATUS_MS when it changed
 *   RELOADING=1         when SIGHUP starts a reload (with MONOTONIC_USEC=,
 *                       which Type=notify-reload asks for)
 *   STOPPING=1          when SIGINT or SIGTERM arrives
 *   WATCHDOG=1          every half of WatchdogSec= (WATCHDOG_USEC), from a
 *                       timer on the event loop: a loop that is stuck stops
 *                       the pings and the manager restarts the daemon
 *
 * Without NOTIFY_SOCKET in the environment (not run by systemd, or
 * Type=simple) nothing is sent and no timer runs. Like the server, a
 * vqkvd_notify_t belongs to one loop and every call comes from its thread.
 */
#ifndef VQKVD_NOTIFY_H
#define VQKVD_NOTIFY_H

#include <stdint.h>

#include <uv.h>

#include "server.h"

/* How often STATUS= is recomputed; it is sent only when its text changed. */
#define VQKVD_NOTIFY_STATUS_MS 2000

typedef struct {
    const vqkvd_server_t *server; /* what STATUS= describes; borrowed */
    int enabled;                  /* NOTIFY_SOCKET is set */
    int timers;                   /* the timers are initialized (closed by stop) */
    int failed;                   /* a send failed already (warned once) */
    uint64_t watchdog_usec;       /* WATCHDOG_USEC, or 0: no pings */
    uv_timer_t watchdog, status;
    char status_line[128]; /* the STATUS= text last sent */
} vqkvd_notify_t;

/* Reads NOTIFY_SOCKET and WATCHDOG_USEC (WATCHDOG_PID, when set, must be
 * this process), sends READY=1 with the first STATUS= and starts the
 * watchdog and status timers on loop. Call once the server listens. */
void vqkvd_notify_start(vqkvd_notify_t *n, uv_loop_t *loop, const vqkvd_server_t *server);

/* RELOADING=1: a reload has begun; vqkvd_notify_ready ends it. */
void vqkvd_notify_reloading(vqkvd_notify_t *n);

/* READY=1 with a fresh STATUS=: a reload is done (applied or refused). */
void vqkvd_notify_ready(vqkvd_notify_t *n);

/* STOPPING=1; closes the timers, so the loop can run dry. Safe twice, and
 * on a vqkvd_notify_t that was zeroed and never started. */
void vqkvd_notify_stop(vqkvd_notify_t *n);

#endif
