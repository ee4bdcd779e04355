/* progress.c -- the terminal progress line (progress.h). */
#include "progress.h"

#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* Seconds between redraws: often enough to look alive, rarely enough to
 * cost nothing next to the work. */
#define VQKV__PROGRESS_PERIOD 0.2

static double vqkv__progress_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The terminal's columns, 80 when it does not say. */
static size_t vqkv__progress_columns(FILE *out)
{
    struct winsize ws;
    if (ioctl(fileno(out), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 80;
}

/* "M:SS", or "H:MM:SS" from an hour on; "-:--" when unknown. */
static void vqkv__progress_eta(char *buf, size_t len, double seconds)
{
    if (!(seconds >= 0.0)) {
        snprintf(buf, len, "-:--");
        return;
    }
    if (seconds > 359999.0)
        seconds = 359999.0;
    unsigned s = (unsigned)(seconds + 0.5);
    if (s >= 3600)
        snprintf(buf, len, "%u:%02u:%02u", s / 3600, s / 60 % 60, s % 60);
    else
        snprintf(buf, len, "%u:%02u", s / 60, s % 60);
}

void vqkv_progress_start(vqkv_progress_t *p, FILE *out)
{
    memset(p, 0, sizeof *p);
    p->out = out != NULL && isatty(fileno(out)) ? out : NULL;
    p->start = vqkv__progress_now();
}

bool vqkv_progress_due(const vqkv_progress_t *p)
{
    return p->out != NULL && (!p->drawn || vqkv__progress_now() - p->last >= VQKV__PROGRESS_PERIOD);
}

const char *vqkv_progress_count(char *buf, size_t len, uint64_t n)
{
    char digits[24];
    int nd = snprintf(digits, sizeof digits, "%llu", (unsigned long long)n);
    size_t o = 0;
    for (int i = 0; i < nd && o + 1 < len; i++) {
        if (i > 0 && (nd - i) % 3 == 0 && o + 2 < len)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    if (len > 0)
        buf[o] = '\0';
    return buf;
}

void vqkv_progress_update(vqkv_progress_t *p, double done, double total, const char *unit,
                          const char *fmt, ...)
{
    if (!vqkv_progress_due(p))
        return;
    double now = vqkv__progress_now(), elapsed = now - p->start;
    double rate = elapsed > 0.0 && done > 0.0 ? done / elapsed : 0.0;
    char text[256], tail[128], rate_text[32], eta[32], line[512];
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(text, sizeof text, fmt, ap) < 0)
        text[0] = '\0';
    va_end(ap);
    if (rate >= 100.0)
        vqkv_progress_count(rate_text, sizeof rate_text, (uint64_t)(rate + 0.5));
    else
        snprintf(rate_text, sizeof rate_text, rate >= 10.0 ? "%.1f" : "%.2f", rate);
    vqkv__progress_eta(eta, sizeof eta, rate > 0.0 && total >= done ? (total - done) / rate : -1.0);
    snprintf(tail, sizeof tail, ", %s %s/s, ETA %s", rate_text, unit, eta);
    /* Past the last column the terminal wraps, and '\r' would go back to
     * the start of the wrapped part only: keep to one row, shortening the
     * text ("...") before the figures. */
    size_t room = vqkv__progress_columns(p->out) - 1, tail_len = strlen(tail);
    if (2 + strlen(text) + tail_len > room && room >= 2 + tail_len + 6)
        memcpy(text + (room - 2 - tail_len - 3), "...", 4);
    snprintf(line, sizeof line, "  %s%s", text, tail);
    size_t width = strlen(line) < room ? strlen(line) : room;
    fputc('\r', p->out);
    fwrite(line, 1, width, p->out);
    for (size_t i = width; i < p->width; i++)
        fputc(' ', p->out);
    fflush(p->out);
    p->width = width;
    p->drawn = true;
    p->last = now;
}

void vqkv_progress_end(vqkv_progress_t *p)
{
    if (p->out == NULL || !p->drawn)
        return;
    fputc('\r', p->out);
    for (size_t i = 0; i < p->width; i++)
        fputc(' ', p->out);
    fputc('\r', p->out);
    fflush(p->out);
    p->drawn = false;
    p->width = 0;
}
