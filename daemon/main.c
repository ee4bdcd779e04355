/* main.c -- vqkvd: parses the command line, picks the socket path, runs the
 * server on libuv's loop until SIGINT or SIGTERM, then stops cleanly
 * (socket file removed, every client closed, exit status 0).
 *
 *   vqkvd [--socket PATH] [--log-level debug|info|warn|error]
 *         [--allow-uid N ...] [--allow-gid N ...] [--pool-bytes N[K|M|G]]
 *
 * The default socket is $XDG_RUNTIME_DIR/vqkv/vqkv.sock, or
 * /run/vqkv/vqkv.sock as root; its directory is created 0750 when missing.
 * --allow-uid and --allow-gid replace the default allow list (the daemon's
 * own uid and root) with the ids they name. --pool-bytes sizes the block
 * pool (default 1G; K, M and G are powers of 1024).
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "log.h"
#include "server.h"

typedef struct {
    vqkvd_server_t server;
    uv_signal_t sigint, sigterm;
} vqkvd_main_t;

static void vqkvd__usage(FILE *f)
{
    fprintf(f, "usage: vqkvd [--socket PATH] [--log-level debug|info|warn|error]\n"
               "             [--allow-uid N ...] [--allow-gid N ...] [--pool-bytes N[K|M|G]]\n");
}

static int vqkvd__parse_id(const char *text, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-' || v >= UINT_MAX)
        return -1;
    *out = (unsigned)v;
    return 0;
}

/* "N", "NK", "NM" or "NG" (also lower case) into *out; -1 for anything
 * else, zero, or a size that overflows. */
static int vqkvd__parse_bytes(const char *text, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || text[0] == '-' || text[0] == '+')
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k':
    case 'K': shift = 10; break;
    case 'm':
    case 'M': shift = 20; break;
    case 'g':
    case 'G': shift = 30; break;
    default: return -1;
    }
    if (*end != '\0' && end[1] != '\0')
        return -1;
    if (v == 0 || v > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
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

static void vqkvd__on_signal(uv_signal_t *sig, int signum)
{
    vqkvd_main_t *m = sig->data;
    vqkvd_log(VQKVD_LOG_INFO, "%s: stopping", strsignal(signum));
    vqkvd_server_stop(&m->server);
    uv_close((uv_handle_t *)&m->sigint, NULL);
    uv_close((uv_handle_t *)&m->sigterm, NULL);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"socket", required_argument, NULL, 's'},
        {"log-level", required_argument, NULL, 'l'},
        {"allow-uid", required_argument, NULL, 'u'},
        {"allow-gid", required_argument, NULL, 'g'},
        {"pool-bytes", required_argument, NULL, 'p'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    vqkvd_config_t cfg;
    vqkvd_config_defaults(&cfg);
    int own_allow_list = 0; /* the first --allow-* drops the defaults */
    char default_path[PATH_MAX];
    int opt;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        unsigned id;
        switch (opt) {
        case 's': cfg.socket_path = optarg; break;
        case 'l':
            vqkvd_log_level = vqkvd_log_parse_level(optarg);
            if (vqkvd_log_level < 0) {
                fprintf(stderr, "vqkvd: unknown log level \"%s\"\n", optarg);
                return 2;
            }
            break;
        case 'u':
        case 'g':
            if (vqkvd__parse_id(optarg, &id) < 0) {
                fprintf(stderr, "vqkvd: bad id \"%s\"\n", optarg);
                return 2;
            }
            if (!own_allow_list)
                cfg.n_allow_uids = cfg.n_allow_gids = 0;
            own_allow_list = 1;
            if ((opt == 'u' ? cfg.n_allow_uids : cfg.n_allow_gids) >= VQKVD_MAX_ALLOWED) {
                fprintf(stderr, "vqkvd: at most %d uids and %d gids\n", VQKVD_MAX_ALLOWED,
                        VQKVD_MAX_ALLOWED);
                return 2;
            }
            if (opt == 'u')
                cfg.allow_uids[cfg.n_allow_uids++] = (uid_t)id;
            else
                cfg.allow_gids[cfg.n_allow_gids++] = (gid_t)id;
            break;
        case 'p':
            if (vqkvd__parse_bytes(optarg, &cfg.pool_bytes) < 0) {
                fprintf(stderr,
                        "vqkvd: bad --pool-bytes \"%s\" (a positive size such as 512M or 4G)\n",
                        optarg);
                return 2;
            }
            break;
        case 'h': vqkvd__usage(stdout); return 0;
        default: vqkvd__usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        vqkvd__usage(stderr);
        return 2;
    }
    if (cfg.socket_path == NULL) {
        if (vqkvd__default_socket(default_path, sizeof default_path) < 0)
            return 1;
        cfg.socket_path = default_path;
    }
    /* Replies are sent with MSG_NOSIGNAL; this covers anything else that
     * writes to a socket whose peer left. */
    signal(SIGPIPE, SIG_IGN);

    uv_loop_t loop;
    vqkvd_main_t m;
    int status = 1;
    int rc = uv_loop_init(&loop);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "event loop: %s", uv_strerror(rc));
        return 1;
    }
    rc = vqkvd_server_start(&m.server, &loop, &cfg);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot listen on %s: %s", cfg.socket_path, strerror(-rc));
        goto out;
    }
    uv_signal_init(&loop, &m.sigint);
    uv_signal_init(&loop, &m.sigterm);
    m.sigint.data = m.sigterm.data = &m;
    uv_signal_start(&m.sigint, vqkvd__on_signal, SIGINT);
    uv_signal_start(&m.sigterm, vqkvd__on_signal, SIGTERM);
    status = 0;

out:
    /* Runs until the signal handler has closed every handle, or finishes
     * the closes a failed start left. */
    uv_run(&loop, UV_RUN_DEFAULT);
    vqkvd_server_destroy(&m.server);
    rc = uv_loop_close(&loop);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "event loop still busy at exit: %s", uv_strerror(rc));
        status = 1;
    }
    return status;
}
