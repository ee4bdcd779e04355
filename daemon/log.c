/* log.c -- stderr logging, with journald priority prefixes when stderr is
 * the journal (log.h). */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int vqkvd_log_level = VQKVD_LOG_INFO;

static const struct {
    const char *name;
    int prio;
} vqkvd__log_levels[] = {
    {"debug", VQKVD_LOG_DEBUG},
    {"info", VQKVD_LOG_INFO},
    {"warn", VQKVD_LOG_WARN},
    {"error", VQKVD_LOG_ERROR},
};

int vqkvd_log_parse_level(const char *name)
{
    for (size_t i = 0; i < sizeof vqkvd__log_levels / sizeof vqkvd__log_levels[0]; i++)
        if (strcmp(name, vqkvd__log_levels[i].name) == 0)
            return vqkvd__log_levels[i].prio;
    return -1;
}

const char *vqkvd_log_level_name(int prio)
{
    for (size_t i = 0; i < sizeof vqkvd__log_levels / sizeof vqkvd__log_levels[0]; i++)
        if (vqkvd__log_levels[i].prio == prio)
            return vqkvd__log_levels[i].name;
    return "?";
}

/* Whether stderr is connected to the journal: systemd sets JOURNAL_STREAM
 * to the "device:inode" of the stream it gives a service, and a stderr
 * redirected elsewhere since no longer matches it. Asked once. */
static int vqkvd__log_to_journal(void)
{
    static int journal = -1;
    if (journal < 0) {
        const char *stream = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;
        journal = stream != NULL && sscanf(stream, "%llu:%llu", &dev, &ino) == 2 &&
                  fstat(STDERR_FILENO, &st) == 0 && (unsigned long long)st.st_dev == dev &&
                  (unsigned long long)st.st_ino == ino;
    }
    return journal;
}

void vqkvd_log(int prio, const char *fmt, ...)
{
    if (prio > vqkvd_log_level)
        return;
    /* Formatted into one buffer and written at once: stdio would split a
     * long line into several writes. Longer lines are cut, not split. */
    char line[1024];
    int n = vqkvd__log_to_journal()
                ? snprintf(line, sizeof line, "<%d>", prio)
                : snprintf(line, sizeof line, "vqkvd: %s: ", vqkvd_log_level_name(prio));
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
