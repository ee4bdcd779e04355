/* progress.h -- a progress line on a terminal, for the commands that work
 * for minutes: vqkv-benchmark --capacity and vqkvctl eval.
 *
 * One line on the stream given (stderr), redrawn in place with '\r' at
 * most every 0.2 s, the first time at once:
 *
 *     "  TEXT, RATE UNIT/s, ETA M:SS"
 *
 * TEXT is the caller's (what it is on, how far along); the rate is the
 * units done since vqkv_progress_start over the seconds since, and the ETA
 * what is left at that rate ("ETA -:--" until there is a rate). The line is
 * cut to the terminal's width, so '\r' always gets back to its start, and
 * vqkv_progress_end erases it, so what the command prints next (its table,
 * or an error) starts on a clean line.
 *
 * Only on a terminal: when the stream is not one (a pipe, a file, a CI log,
 * a script reading JSON), vqkv_progress_start turns the progress off and
 * every other call does nothing, so not a byte of it is written.
 */
#ifndef VQKV_PROGRESS_H
#define VQKV_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct {
    FILE *out;    /* NULL: off (not a terminal) */
    double start; /* CLOCK_MONOTONIC seconds at vqkv_progress_start */
    double last;  /* when the line was last drawn */
    bool drawn;   /* a line is on the terminal now */
    size_t width; /* its length, to blank a longer one's tail */
} vqkv_progress_t;

/* Starts the clock; the progress is on only when out is a terminal. */
void vqkv_progress_start(vqkv_progress_t *p, FILE *out);

/* Whether vqkv_progress_update would draw now: on, and never drawn or
 * drawn 0.2 s ago or more. For callers whose TEXT costs something to
 * make; vqkv_progress_update checks it itself. */
bool vqkv_progress_due(const vqkv_progress_t *p);

/* Draws "  TEXT, RATE UNIT/s, ETA M:SS" when due, with TEXT from fmt: done
 * of total units are done (total may be an estimate; not above done means
 * no ETA). */
void vqkv_progress_update(vqkv_progress_t *p, double done, double total, const char *unit,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* n with thousands separators ("12,345") into buf; returns buf. */
const char *vqkv_progress_count(char *buf, size_t len, uint64_t n);

/* Erases the line if one is drawn. The progress stays on: a later update
 * draws again. */
void vqkv_progress_end(vqkv_progress_t *p);

#endif
