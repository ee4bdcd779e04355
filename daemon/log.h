/* log.h -- vqkvd's logging: one line per message on stderr. When stderr is
 * the journal (a systemd service) a line starts with its syslog priority in
 * angle brackets ("<6>" for info), which journald turns into the entry's
 * priority; anywhere else (a terminal, a file) with "vqkvd: info: ". Messages above the configured
 * level are dropped before they are formatted, so a debug line costs one compare when debug is off.
 * Info, the default, logs what happens to the daemon (start, stop, reloads, trained codebooks),
 * never a line per request or connection: those are debug.
 */
#ifndef VQKVD_LOG_H
#define VQKVD_LOG_H

/* The syslog priorities journald reads from the prefix. */
enum {
    VQKVD_LOG_ERROR = 3,
    VQKVD_LOG_WARN = 4,
    VQKVD_LOG_INFO = 6,
    VQKVD_LOG_DEBUG = 7,
};

/* Messages with a priority above this are dropped; info by default. */
extern int vqkvd_log_level;

/* The priority named "debug", "info", "warn" or "error", or -1. */
int vqkvd_log_parse_level(const char *name);

/* The name of a priority vqkvd_log_parse_level returns ("info"), or "?". */
const char *vqkvd_log_level_name(int prio);

/* Writes one line (no trailing newline in fmt) with one write, so lines of
 * one process never interleave mid-line. */
void vqkvd_log(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
