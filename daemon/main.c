/* main.c -- vqkvd: reads the configuration file and then the command line
 * over it, picks the socket path and the state directory, runs the server
 * on libuv's loop until SIGINT or SIGTERM, then stops cleanly (socket file
 * removed, every client closed, exit status 0).
 *
 *   vqkvd [--config FILE] [--check-config] [--socket PATH]
 *         [--pool-bytes N[K|M|G]] [--device cpu|auto|cuda:N[,cuda:M...]] [--state-dir DIR]
 *         [--log-level debug|info|warn|error] [--allow-uid N ...] [--allow-gid N ...]
 *         [--calibration-tokens N] [--lease-ms N] [--metrics-address HOST:PORT]
 *         [--print-default-config]
 *
 * Every flag but --config, --check-config, --print-default-config, --help
 * and --version is a key of the configuration file: config.c's table of
 * keys names it, and vqkvd_config_set parses it as the file's line would,
 * so the options, --help and the flags' checks all follow from the table.
 * --print-default-config prints the shipped vqkvd.conf, from the same table.
 *
 * The configuration file (config.h; vqkvd.conf documents every key) is
 * FILE, or else the installed default when that exists: /etc/vqkv/vqkvd.conf
 * in a /usr install, PREFIX/etc/vqkv/vqkvd.conf in any other, found from
 * where the vqkvd binary is, so an install moved with `cmake --install
 * --prefix` reads its own (vqkvd --help prints the path). Flags override the file wherever they
 * stand: the command line is read twice, first for --config, --check-config and
 * --help, then, after the file, for the rest. --check-config stops there
 * and prints "ok" (exit status 0) or what is wrong (exit status 2, as for
 * any refused file or flag).
 *
 * The default socket is $XDG_RUNTIME_DIR/vqkv/vqkv.sock, or
 * /run/vqkv/vqkv.sock as root; its directory is created 0750 when missing.
 * --allow-uid and --allow-gid replace the allow lists (the file's, else the
 * defaults: the daemon's own uid and root) with the ids they name.
 * --pool-bytes sizes the block pool (default 1G; K, M and G are powers of
 * 1024). The state directory, where trained codebooks are kept, defaults to
 * $STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/vqkv as root,
 * else $XDG_STATE_HOME/vqkv or ~/.local/state/vqkv; it is created 0700 with
 * its parents, and when that fails the daemon warns and runs without one.
 * --device cpu, cuda:N[,cuda:M...] or auto (every GPU when built with
 * CUDA and one is seen, else the CPU); a cuda:N this vqkvd cannot serve
 * (built without CUDA, or no GPU N) is refused with exit status 2.
 * --metrics-address serves Prometheus metrics and a health check over HTTP
 * (metrics.h) on a loopback address; any other address is refused with
 * exit status 2.
 *
 * Under systemd. Socket activation: when the service manager passes
 * exactly one listening Unix stream socket (LISTEN_FDS=1, LISTEN_PID ours),
 * vqkvd serves on it instead of binding the socket path, and leaves its
 * file alone at exit (the socket unit owns it); any other set of fds is
 * refused with exit status 2. notify.h tells a Type=notify unit when the
 * daemon is ready, its status, and pings the watchdog.
 *
 * SIGHUP reloads: the configuration is computed again exactly as at start
 * (the same file, or the default file if it exists, then the same flags
 * over it, so a flag still wins) and what a running daemon can take is
 * applied (vqkvd_config_take_live: allow lists, admin uids, quotas,
 * log_level, lease_ms, max_clients, calibration_tokens), one log line per
 * changed key; a changed key that cannot change live is logged as needing
 * a restart and keeps its running value. A file that does not load is
 * refused whole, with its file:line in the log, and nothing changes. The
 * file is read on libuv's thread pool, since the loop never blocks.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>
#include <uv.h>

#include "config.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "server.h"

typedef struct {
    vqkvd_server_t server;
    vqkvd_notify_t notify;
    vqkvd_metrics_t *metrics; /* NULL unless metrics_address is set */
    int signal_fd;            /* signalfd of SIGINT, SIGTERM and SIGHUP */
    uv_poll_t signal_poll;    /* readable: signals to act on */
    int stopping;

    /* What SIGHUP computes the configuration from, as at start. */
    int argc;
    char **argv;
    const char *config_path;    /* --config, or NULL: the default file if it exists */
    const vqkvd_config_t *boot; /* what file and flags gave at start, before the
                                   socket and state directory defaults */
    uv_work_t reload;
    int reloading;    /* the file is being read on the thread pool */
    int reload_again; /* another SIGHUP came meanwhile */
    /* The thread pool's result; the loop reads it once the work is done. */
    vqkvd_config_t next;
    vqkvd_config_file_t next_file;
    int next_rc;
    char next_err[512];
} vqkvd_main_t;

/* The flags that are no key. A key's flag gets VQKVD__OPT_KEY + its row
 * in vqkvd_config_keys as getopt's value. */
enum { VQKVD__OPT_KEY = 256 };

static const struct option vqkvd__own_options[] = {
    {"config", required_argument, NULL, 'c'},
    {"check-config", no_argument, NULL, 'C'},
    /* the keys' flags go here, as in --help */
    {"print-default-config", no_argument, NULL, 'P'},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
};

#define VQKVD__OWN_FIRST 2 /* the own options before the keys' flags */
#define VQKVD__N_OWN (sizeof vqkvd__own_options / sizeof vqkvd__own_options[0])

/* vqkvd__own_options with the keys' flags, ended by a zeroed entry. */
static struct option vqkvd__options[VQKVD__N_OWN + VQKVD_CONFIG_N_KEYS + 1];

static void vqkvd__build_options(void)
{
    size_t n = 0;
    for (size_t i = 0; i < VQKVD__N_OWN; i++) {
        if (i == VQKVD__OWN_FIRST)
            for (size_t k = 0; k < VQKVD_CONFIG_N_KEYS; k++)
                if (vqkvd_config_keys[k].flag != NULL)
                    vqkvd__options[n++] =
                        (struct option){vqkvd_config_keys[k].flag, required_argument, NULL,
                                        VQKVD__OPT_KEY + (int)k};
        vqkvd__options[n++] = vqkvd__own_options[i];
    }
}

/* The file read when no --config is given (CMakeLists.txt): beside the
 * binary's prefix, or an absolute path for a /usr install. Computed once;
 * a binary whose own path cannot be read falls back to the path relative
 * to the working directory, which then simply does not exist. */
static const char *vqkvd__default_config(void)
{
#ifdef VQKVD_CONFIG_RELATIVE
    static char path[PATH_MAX];
    if (path[0] == '\0') {
        char exe[PATH_MAX], dir[PATH_MAX], joined[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[n > 0 ? n : 0] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash != NULL)
            *slash = '\0';
        if (snprintf(joined, sizeof joined, "%s/%s", exe, VQKVD_CONFIG_RELATIVE) >=
            (int)sizeof joined)
            return VQKVD_CONFIG_RELATIVE;
        /* Tidy "bin/../etc" when the directory exists, for messages. */
        char *base = strrchr(joined, '/');
        *base = '\0';
        if (realpath(joined, dir) == NULL)
            snprintf(dir, sizeof dir, "%s", joined);
        if (snprintf(path, sizeof path, "%s/%s", dir, base + 1) >= (int)sizeof path)
            return VQKVD_CONFIG_RELATIVE;
    }
    return path;
#else
    return VQKVD_CONFIG_ABSOLUTE;
#endif
}

/* One bracket per option, wrapped under the first. */
static void vqkvd__usage(FILE *f)
{
    static const char head[] = "usage: vqkvd";
    int col = fprintf(f, "%s", head);
    for (const struct option *o = vqkvd__options; o->name != NULL; o++) {
        char item[80];
        int len;
        if (o->val >= VQKVD__OPT_KEY) {
            const vqkvd_config_key_t *key = &vqkvd_config_keys[o->val - VQKVD__OPT_KEY];
            len = snprintf(item, sizeof item, "[--%s %s%s]", o->name, key->arg,
                           key->type == VQKVD_CONFIG_IDS ? " ..." : "");
        } else {
            len = snprintf(item, sizeof item, "[--%s%s]", o->name,
                           o->has_arg == required_argument ? " FILE" : "");
        }
        if (col + 1 + len > 79) {
            fprintf(f, "\n%*s", (int)sizeof head - 1, "");
            col = (int)sizeof head - 1;
        }
        col += fprintf(f, " %s", item);
    }
    fputc('\n', f);
}

/* --help: every option with its default; the keys' lines come from the
 * table. */
static void vqkvd__help(void)
{
    vqkvd__usage(stdout);
    printf("\nvqkvd keeps LLM KV-cache blocks for inference workers, compressed.\n\n");
    /* Not wrapped: the installation's path reads (and greps) whole. */
    printf("  --config FILE           configuration file (default: %s, if it exists)\n",
           vqkvd__default_config());
    vqkvd_config_help_line(stdout, "--check-config",
                           "check the file and flags, print \"ok\" and exit", NULL);
    vqkvd_config_help(stdout);
    vqkvd_config_help_line(stdout, "--print-default-config",
                           "print the shipped vqkvd.conf, every key with its default, and exit",
                           NULL);
    vqkvd_config_help_line(stdout, "--help", "this text", NULL);
    vqkvd_config_help_line(stdout, "--version", "the version", NULL);
    printf("\nA flag overrides the file's key of the same name; vqkvd.conf(5) lists every key.\n");
}

/* The first pass: --config, --check-config, --help, --version and
 * --print-default-config, which decide what happens before anything else is
 * read. Other flags are skipped quietly here (opterr 0) and complained
 * about by the second pass. Returns 'h', 'V' or 'P' for the last three, else
 * 0. */
static int vqkvd__first_pass(int argc, char **argv, const char **config, int *check_only)
{
    int opt;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, "h", vqkvd__options, NULL)) != -1) {
        if (opt == 'h' || opt == 'V' || opt == 'P')
            return opt;
        if (opt == 'c')
            *config = optarg;
        else if (opt == 'C')
            *check_only = 1;
    }
    opterr = 1;
    return 0;
}

/* The second pass: every other flag, over what the file set into cfg and
 * file (its strings and log level), each parsed as its key in the file
 * would be. Runs again on each reload. Returns 0, or -1 after saying what
 * is wrong. */
static int vqkvd__apply_flags(int argc, char **argv, vqkvd_config_t *cfg, vqkvd_config_file_t *file)
{
    /* A source of its own: the first --allow-* drops the file's lists. */
    vqkvd_config_source_t src = {.cfg = cfg, .file = file};
    int opt;
    /* 0, not 1: glibc then starts over completely, also after a pass. */
    optind = 0;
    while ((opt = getopt_long(argc, argv, "h", vqkvd__options, NULL)) != -1) {
        if (opt == 'c' || opt == 'C')
            continue; /* the first pass's */
        if (opt < VQKVD__OPT_KEY) {
            vqkvd__usage(stderr);
            return -1;
        }
        const vqkvd_config_key_t *key = &vqkvd_config_keys[opt - VQKVD__OPT_KEY];
        char label[64], err[512];
        snprintf(label, sizeof label, "--%s", key->flag);
        if (vqkvd_config_set(&src, key, label, optarg, err, sizeof err) < 0) {
            fprintf(stderr, "vqkvd: %s\n", err);
            return -1;
        }
    }
    if (optind < argc) {
        vqkvd__usage(stderr);
        return -1;
    }
    return 0;
}

/* The defaults, then the file over them: path, or the default file when
 * path is NULL, a missing default file meaning the defaults. The flags
 * come after (vqkvd__apply_flags). Touches no global, so a reload runs it
 * on the thread pool. Returns 0 or what vqkvd_config_load returns, the
 * message in err. */
static int vqkvd__read_file(const char *path, vqkvd_config_t *cfg, vqkvd_config_file_t *file,
                            char *err, size_t err_size)
{
    vqkvd_config_defaults(cfg);
    int rc =
        vqkvd_config_load(cfg, file, path != NULL ? path : vqkvd__default_config(), err, err_size);
    return rc == VQKV_EIO && errno == ENOENT && path == NULL ? VQKV_OK : rc;
}

/* The level the file and the flags ask for, or the table's default. */
static int vqkvd__file_log_level(const vqkvd_config_file_t *file)
{
    if (file->log_level != 0)
        return file->log_level;
    return vqkvd_log_parse_level(vqkvd_config_find("log_level")->def);
}

/* The default socket path into buf, its directory created 0750 when
 * missing (only the last level: the runtime directory itself must exist). */
static int vqkvd__default_socket(char *buf, size_t size)
{
    const char *base = getuid() == 0 ? "/run" : getenv("XDG_RUNTIME_DIR");
    if (base == NULL || base[0] == '\0') {
        vqkvd_log(VQKVD_LOG_ERROR, "XDG_RUNTIME_DIR is not set; give --socket PATH");
        return -1;
    }
    int n = snprintf(buf, size, "%s/vqkv", base);
    if (n < 0 || (size_t)n >= size)
        return -1;
    if (mkdir(buf, 0750) < 0 && errno != EEXIST) {
        vqkvd_log(VQKVD_LOG_ERROR, "creating %s: %s", buf, strerror(errno));
        return -1;
    }
    n = snprintf(buf, size, "%s/vqkv/vqkv.sock", base);
    return n < 0 || (size_t)n >= size ? -1 : 0;
}

/* mkdir -p: path and its missing parents, all with mode (they are ours,
 * like ~/.local/state, or already there, like /var/lib). An existing
 * directory keeps its mode: systemd creates StateDirectory= with its own.
 * path is written to and restored. Returns VQKV_OK, or VQKV_EIO with errno
 * saying why. */
static int vqkvd__make_dirs(char *path, mode_t mode)
{
    if (path[0] == '\0') {
        errno = ENOENT;
        return VQKV_EIO;
    }
    for (char *slash = strchr(path + 1, '/');; slash = strchr(slash + 1, '/')) {
        if (slash != NULL)
            *slash = '\0';
        int failed = mkdir(path, mode) < 0 && errno != EEXIST;
        int mkdir_errno = errno;
        if (slash != NULL)
            *slash = '/';
        if (failed) {
            errno = mkdir_errno;
            return VQKV_EIO;
        }
        if (slash == NULL)
            break;
    }
    struct stat st;
    if (stat(path, &st) < 0)
        return VQKV_EIO;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return VQKV_EIO;
    }
    return VQKV_OK;
}

/* The default state directory into buf: VQKV_OK; VQKV_EINVAL when the
 * environment names none (no $HOME); VQKV_ERANGE when it does not fit.
 * $STATE_DIRECTORY may list several directories separated by colons; the
 * first is ours. */
static int vqkvd__default_state_dir(char *buf, size_t size)
{
    const char *systemd = getenv("STATE_DIRECTORY");
    const char *xdg = getenv("XDG_STATE_HOME");
    const char *home = getenv("HOME");
    int n;
    if (systemd != NULL && systemd[0] != '\0')
        n = snprintf(buf, size, "%.*s", (int)strcspn(systemd, ":"), systemd);
    else if (getuid() == 0)
        n = snprintf(buf, size, "/var/lib/vqkv");
    else if (xdg != NULL && xdg[0] == '/') /* relative ones are invalid (XDG spec) */
        n = snprintf(buf, size, "%s/vqkv", xdg);
    else if (home != NULL && home[0] != '\0')
        n = snprintf(buf, size, "%s/.local/state/vqkv", home);
    else
        return VQKV_EINVAL;
    return n < 0 || (size_t)n >= size ? VQKV_ERANGE : VQKV_OK;
}

/* Points cfg->state_dir at the state directory (copied into buf), created
 * when missing, or at NULL with a warning when there is none: a daemon that
 * cannot keep its codebooks still serves, it only trains them again after a
 * restart, which beats not starting at all. */
static void vqkvd__open_state_dir(vqkvd_config_t *cfg, char *buf, size_t size)
{
    const char *given = cfg->state_dir;
    cfg->state_dir = NULL;
    int rc;
    if (given != NULL) {
        rc = (size_t)snprintf(buf, size, "%s", given) < size ? VQKV_OK : VQKV_ERANGE;
    } else if ((rc = vqkvd__default_state_dir(buf, size)) == VQKV_EINVAL) {
        vqkvd_log(VQKVD_LOG_WARN, "no state directory ($HOME is not set; give --state-dir DIR): "
                                  "trained codebooks will not be kept");
        return;
    }
    if (rc == VQKV_OK)
        rc = vqkvd__make_dirs(buf, 0700);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_WARN, "state directory %s: %s; trained codebooks will not be kept",
                  given != NULL ? given : buf, rc == VQKV_EIO ? strerror(errno) : "path too long");
        return;
    }
    cfg->state_dir = buf;
    vqkvd_log(VQKVD_LOG_INFO, "state directory %s", buf);
}

/* ---- signals ---------------------------------------------------------------- */

static void vqkvd__on_stop(vqkvd_main_t *m, int signum)
{
    if (m->stopping)
        return; /* a repeated stop signal: the stop under way is the answer */
    vqkvd_log(VQKVD_LOG_INFO, "%s: stopping", strsignal(signum));
    m->stopping = 1;
    vqkvd_notify_stop(&m->notify);
    vqkvd_server_stop(&m->server);
    uv_close((uv_handle_t *)&m->signal_poll, NULL);
}

typedef struct {
    unsigned applied, restart;
} vqkvd_reload_counts_t;

static void vqkvd__reload_log_change(const vqkvd_config_change_t *ch, void *user)
{
    vqkvd_reload_counts_t *counts = user;
    if (ch->live) {
        vqkvd_log(VQKVD_LOG_INFO, "reload: %s: %s -> %s", ch->key, ch->was, ch->now);
        counts->applied++;
        return;
    }
    vqkvd_log(VQKVD_LOG_WARN, "reload: %s: %s -> %s needs a restart; running with %s until then",
              ch->key, ch->was, ch->now, ch->was);
    counts->restart++;
}

/* The file is read (m->next): the flags over it as at start, then every
 * change logged and what can change live applied. The running config the
 * changes are measured against is the start's with the live settings as
 * they are now, so a key that needs a restart is reported on every reload
 * until there is one. */
static void vqkvd__reload_apply(vqkvd_main_t *m)
{
    const char *path = m->config_path != NULL ? m->config_path : vqkvd__default_config();
    if (m->next_rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "reload refused: %s; the running configuration stays",
                  m->next_err);
        return;
    }
    if (vqkvd__apply_flags(m->argc, m->argv, &m->next, &m->next_file) < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "reload refused: the command line does not apply; "
                                   "the running configuration stays");
        return;
    }
    int level = vqkvd__file_log_level(&m->next_file);
    /* The reload's lines show at the more verbose of the old and the new
     * level, so turning debug on or off is logged either way. */
    int old_level = vqkvd_log_level;
    if (level > vqkvd_log_level)
        vqkvd_log_level = level;
    vqkvd_config_t running = *m->boot;
    vqkvd_config_take_live(&running, &m->server.cfg);
    vqkvd_reload_counts_t counts = {0, 0};
    vqkvd_config_diff(&running, &m->next, vqkvd__reload_log_change, &counts);
    if (level != old_level) {
        vqkvd_log(VQKVD_LOG_INFO, "reload: log_level: %s -> %s", vqkvd_log_level_name(old_level),
                  vqkvd_log_level_name(level));
        counts.applied++;
    }
    uint32_t closed = vqkvd_server_reconfigure(&m->server, &m->next);
    char peers[64] = "";
    if (closed > 0)
        snprintf(peers, sizeof peers, "; %u client%s no longer allowed, closed", (unsigned)closed,
                 closed == 1 ? "" : "s");
    if (counts.applied == 0 && counts.restart == 0)
        vqkvd_log(VQKVD_LOG_INFO, "reloaded %s: nothing changed%s", path, peers);
    else
        vqkvd_log(VQKVD_LOG_INFO, "reloaded %s: %u change%s applied, %u need%s a restart%s", path,
                  counts.applied, counts.applied == 1 ? "" : "s", counts.restart,
                  counts.restart == 1 ? "s" : "", peers);
    vqkvd_log_level = level;
}

static void vqkvd__reload_read(uv_work_t *work)
{
    vqkvd_main_t *m = work->data;
    memset(&m->next_file, 0, sizeof m->next_file);
    m->next_rc =
        vqkvd__read_file(m->config_path, &m->next, &m->next_file, m->next_err, sizeof m->next_err);
}

static void vqkvd__reload_begin(vqkvd_main_t *m);

static void vqkvd__reload_done(uv_work_t *work, int status)
{
    vqkvd_main_t *m = work->data;
    m->reloading = 0;
    if (!m->stopping && status == 0)
        vqkvd__reload_apply(m);
    vqkvd_config_file_free(&m->next_file); /* nothing running points into it */
    if (m->stopping)
        return;
    vqkvd_notify_ready(&m->notify);
    if (m->reload_again) {
        m->reload_again = 0;
        vqkvd__reload_begin(m);
    }
}

static void vqkvd__reload_begin(vqkvd_main_t *m)
{
    vqkvd_notify_reloading(&m->notify);
    m->reloading = 1;
    m->reload.data = m;
    int rc = uv_queue_work(m->server.loop, &m->reload, vqkvd__reload_read, vqkvd__reload_done);
    if (rc < 0) {
        m->reloading = 0;
        vqkvd_log(VQKVD_LOG_ERROR, "reload refused: %s", uv_strerror(rc));
        vqkvd_notify_ready(&m->notify);
    }
}

/* A SIGHUP during a reload is not lost: the file may have changed again
 * after the read began, so one more reload follows. */
static void vqkvd__on_reload(vqkvd_main_t *m, int signum)
{
    if (m->stopping)
        return;
    vqkvd_log(VQKVD_LOG_INFO, "%s: reloading the configuration", strsignal(signum));
    if (m->reloading)
        m->reload_again = 1;
    else
        vqkvd__reload_begin(m);
}

static void vqkvd__on_signal(uv_poll_t *poll, int status, int events)
{
    vqkvd_main_t *m = poll->data;
    struct signalfd_siginfo si;
    (void)status;
    (void)events;
    while (!m->stopping && read(m->signal_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGHUP)
            vqkvd__on_reload(m, SIGHUP);
        else
            vqkvd__on_stop(m, (int)si.ssi_signo);
    }
}

/* SIGINT, SIGTERM (stop) and SIGHUP (reload) are blocked in every thread
 * (this runs before any is created, and threads inherit the mask) and read
 * from a signalfd on the loop. So no signal ever meets its default action:
 * not one sent before the socket listens, nor one sent again while a clean
 * stop is under way (it stays pending, unread, until exit), which libuv's
 * handlers would leave to the default action once closed. Blocked signals
 * are also inherited by exec'd children; vqkvd starts none. Returns VQKV_OK,
 * or VQKV_EIO with what failed logged. */
static int vqkvd__signals_start(vqkvd_main_t *m, uv_loop_t *loop)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    int rc = pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (rc != 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "blocking signals: %s", strerror(rc));
        return VQKV_EIO;
    }
    m->signal_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (m->signal_fd < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "signalfd: %s", strerror(errno));
        return VQKV_EIO;
    }
    rc = uv_poll_init(loop, &m->signal_poll, m->signal_fd);
    if (rc == 0) {
        m->signal_poll.data = m;
        rc = uv_poll_start(&m->signal_poll, UV_READABLE, vqkvd__on_signal);
        if (rc < 0)
            uv_close((uv_handle_t *)&m->signal_poll, NULL);
    }
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "watching the signalfd: %s", uv_strerror(rc));
        close(m->signal_fd);
        m->signal_fd = -1;
        return VQKV_EIO;
    }
    return VQKV_OK;
}

/* ---- start --------------------------------------------------------------------- */

/* The socket the service manager passed (socket activation) into
 * cfg->listen_fd, or -1 when it passed none. sd_listen_fds checks
 * LISTEN_PID against this process and unsets the variables. Anything but
 * exactly one listening Unix stream socket is a unit that does not match
 * this daemon: refused (-1, logged) rather than guessed at. */
static int vqkvd__inherited_socket(vqkvd_config_t *cfg)
{
    cfg->listen_fd = -1;
    int n = sd_listen_fds(1);
    if (n < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "socket activation: LISTEN_FDS: %s", strerror(-n));
        return -1;
    }
    if (n == 0)
        return 0;
    if (n > 1) {
        vqkvd_log(VQKVD_LOG_ERROR,
                  "socket activation passed %d sockets; vqkvd serves exactly one listening "
                  "Unix stream socket (one ListenStream= with a path)",
                  n);
        return -1;
    }
    int rc = sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0);
    if (rc <= 0) {
        vqkvd_log(VQKVD_LOG_ERROR,
                  "socket activation: fd %d is not a listening Unix stream socket%s%s "
                  "(vqkvd needs ListenStream= with a path)",
                  SD_LISTEN_FDS_START, rc < 0 ? ": " : "", rc < 0 ? strerror(-rc) : "");
        return -1;
    }
    cfg->listen_fd = SD_LISTEN_FDS_START;
    return 0;
}

/* Starts the server with cfg (the socket and state directory defaults
 * filled in here) and runs the loop until a signal stops it. Returns the
 * exit status. */
static int vqkvd__run(vqkvd_main_t *m, vqkvd_config_t *cfg)
{
    char socket_buf[PATH_MAX], state_buf[PATH_MAX];
    if (cfg->socket_path == NULL && cfg->listen_fd < 0) {
        if (vqkvd__default_socket(socket_buf, sizeof socket_buf) < 0)
            return 1;
        cfg->socket_path = socket_buf;
    }
    vqkvd__open_state_dir(cfg, state_buf, sizeof state_buf);
    /* Replies are sent with MSG_NOSIGNAL; this covers anything else that
     * writes to a socket whose peer left. */
    signal(SIGPIPE, SIG_IGN);

    uv_loop_t loop;
    int status = 1;
    int rc = uv_loop_init(&loop);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "event loop: %s", uv_strerror(rc));
        return 1;
    }
    rc = vqkvd__signals_start(m, &loop);
    if (rc != VQKV_OK)
        goto out;
    rc = vqkvd_server_start(&m->server, &loop, cfg);
    if (rc != VQKV_OK) {
        /* vqkvd_server_start has said what failed. */
        vqkvd_log(VQKVD_LOG_ERROR, "not started");
        uv_close((uv_handle_t *)&m->signal_poll, NULL);
        goto out;
    }
    if (vqkvd_metrics_start(&m->metrics, &m->server) != VQKV_OK) {
        vqkvd_server_stop(&m->server);
        uv_close((uv_handle_t *)&m->signal_poll, NULL);
        goto out;
    }
    vqkvd_notify_start(&m->notify, &loop, &m->server);
    status = 0;

out:
    /* Runs until the signal handler has closed every handle, or finishes
     * the closes a failed start left. */
    uv_run(&loop, UV_RUN_DEFAULT);
    if (m->signal_fd >= 0)
        close(m->signal_fd); /* its poll is closed: uv_run has returned */
    vqkvd_metrics_stop(m->metrics);
    m->metrics = NULL;
    vqkvd_server_destroy(&m->server);
    rc = uv_loop_close(&loop);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "event loop still busy at exit: %s", uv_strerror(rc));
        status = 1;
    }
    return status;
}

int main(int argc, char **argv)
{
    vqkvd_main_t m;
    vqkvd_config_t cfg;
    vqkvd_config_file_t file = {0};
    int check_only = 0;
    char err[512];
    int status = 2;

    memset(&m, 0, sizeof m);
    m.signal_fd = -1;
    vqkvd__build_options();
    switch (vqkvd__first_pass(argc, argv, &m.config_path, &check_only)) {
    case 'h': vqkvd__help(); return 0;
    case 'V': printf("vqkvd %s\n", VQKVD_VERSION); return 0;
    case 'P': vqkvd_config_write_default(stdout); return 0;
    }
    if (vqkvd__read_file(m.config_path, &cfg, &file, err, sizeof err) < 0) {
        fprintf(stderr, "vqkvd: %s\n", err);
        goto out;
    }
    if (vqkvd__apply_flags(argc, argv, &cfg, &file) < 0)
        goto out;
    vqkvd_log_level = vqkvd__file_log_level(&file);
    if (cfg.pool_bytes < VQKVD_POOL_MIN_BYTES) {
        fprintf(stderr,
                "vqkvd: pool_bytes %llu is below the minimum of %llu (64K): no block of a real "
                "model would fit\n",
                (unsigned long long)cfg.pool_bytes, (unsigned long long)VQKVD_POOL_MIN_BYTES);
        goto out;
    }
    char why[160];
    if (vqkvd_backend_check(cfg.device, why, sizeof why) != VQKV_OK) {
        fprintf(stderr, "vqkvd: %s\n", why);
        goto out;
    }
    if (check_only) {
        printf("ok\n");
        status = 0;
        goto out;
    }
    if (vqkvd__inherited_socket(&cfg) < 0)
        goto out;
    const vqkvd_config_t boot = cfg;
    m.argc = argc;
    m.argv = argv;
    m.boot = &boot;
    status = vqkvd__run(&m, &cfg);

out:
    vqkvd_config_file_free(&file);
    return status;
}
