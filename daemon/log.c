/* log.c -- stderr logging with journald priority prefixes (log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int vqkvd_log_level = VQKVD_LOG_INFO;

int vqkvd_log_parse_level(const char *name)
{
    static const struct {
        const char *name;
        int prio;
    } levels[] = {
        {"debug", VQKVD_LOG_DEBUG},
        {"info", VQKVD_LOG_INFO},
        {"warn", VQKVD_LOG_WARN},
        {"error", VQKVD_LOG_ERROR},
    };
    for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++)
        if (strcmp(name, levels[i].name) == 0)
            return levels[i].prio;
    return -1;
}

void vqkvd_log(int prio, const char *fmt, ...)
{
    if (prio > vqkvd_log_level)
        return;
    /* Formatted into one buffer and written at once: stdio would split a
     * long line into several writes. Longer lines are cut, not split. */
    char line[1024];
    int n = snprintf(line, sizeof line, "<%d>", prio);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w; /* nowhere left to report a failed log write */
}
