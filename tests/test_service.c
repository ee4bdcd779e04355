/* test_service.c -- vqkvd as a systemd service, through the binary:
 *
 *   - sd_notify: on a NOTIFY_SOCKET the test owns, READY=1 only once the
 *     socket accepts, STATUS= lines (refreshed when a client connects),
 *     WATCHDOG=1 pings at half of WATCHDOG_USEC, RELOADING=1 and READY=1
 *     around a SIGHUP, STOPPING=1 on SIGTERM, then exit status 0;
 *   - which keys a reload applies live (config.c's table), in-process;
 *   - SIGHUP reloads: a raised quota lets a Put through that was over it,
 *     a changed pool_bytes is logged as needing a restart, log_level takes
 *     effect, a broken file is refused with its file:line and the old
 *     config keeps serving, peers no longer allowed are closed, and flags
 *     still override the file;
 *   - socket activation through the real systemd-socket-activate: run as
 *     "test_service activation", a ctest entry of its own that skips
 *     (status 77, with a message) when the tool is not installed.
 *
 * Each test runs its daemon in a fresh temporary directory
 * (daemon_harness.h) with its output in a log file the test reads back.
 */
#include <sys/mman.h>

#include "config.h"
#include "libvqkv_harness.h"
#include "vqkv.h"

#define TIMEOUT_MS 5000
#define ACTIVATOR "systemd-socket-activate"

typedef struct {
    daemon_t d;
    char log[96];    /* the daemon's stdout and stderr */
    char notify[96]; /* the test's NOTIFY_SOCKET */
    char other[96];  /* a second socket path */
} service_t;

static int setup_service(void **state)
{
    service_t *sv = calloc(1, sizeof *sv);
    assert_non_null(sv);
    daemon_prepare(&sv->d);
    snprintf(sv->log, sizeof sv->log, "%s/out.log", sv->d.dir);
    snprintf(sv->notify, sizeof sv->notify, "%s/notify.sock", sv->d.dir);
    snprintf(sv->other, sizeof sv->other, "%s/other.sock", sv->d.dir);
    *state = sv;
    return 0;
}

static int teardown_service(void **state)
{
    service_t *sv = *state;
    if (sv->d.pid > 0) {
        kill(sv->d.pid, SIGKILL);
        waitpid(sv->d.pid, NULL, 0);
    }
    unlink(sv->log);
    unlink(sv->notify);
    unlink(sv->other);
    daemon_cleanup(&sv->d);
    free(sv);
    return 0;
}

/* ---- the daemon's log ---------------------------------------------------------- */

static void read_log(const service_t *sv, char *buf, size_t size)
{
    buf[0] = '\0';
    FILE *f = fopen(sv->log, "r");
    if (f == NULL)
        return;
    size_t n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
}

static size_t count_text(const char *text, const char *want)
{
    size_t n = 0;
    for (const char *p = strstr(text, want); p != NULL; p = strstr(p + 1, want))
        n++;
    return n;
}

static void expect_log(const service_t *sv, const char *want)
{
    static char out[65536];
    read_log(sv, out, sizeof out);
    if (strstr(out, want) == NULL)
        fail_msg("\"%s\" is not in vqkvd's log:\n%s", want, out);
}

static void expect_not_in_log(const service_t *sv, const char *unwanted)
{
    static char out[65536];
    read_log(sv, out, sizeof out);
    if (strstr(out, unwanted) != NULL)
        fail_msg("\"%s\" should not be in vqkvd's log:\n%s", unwanted, out);
}

/* Waits until want is in the log n times; fails when the daemon exits or
 * the deadline passes first. */
static void wait_log(service_t *sv, const char *want, size_t n)
{
    static char out[65536];
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    for (;;) {
        read_log(sv, out, sizeof out);
        if (count_text(out, want) >= n)
            return;
        int status;
        if (waitpid(sv->d.pid, &status, WNOHANG) == sv->d.pid) {
            sv->d.pid = -1;
            fail_msg("vqkvd exited (status %#x) before logging \"%s\":\n%s", status, want, out);
        }
        if (now_ms() > deadline)
            fail_msg("\"%s\" did not appear %zu times in vqkvd's log:\n%s", want, n, out);
        sleep_ms(5);
    }
}

/* ---- starting and reloading ---------------------------------------------------- */

static void write_conf(const service_t *sv, const char *text)
{
    FILE *f = fopen(sv->d.config, "w");
    assert_non_null(f);
    assert_true(fputs(text, f) >= 0);
    assert_int_equal(fclose(f), 0);
}

/* Starts vqkvd on sv's socket, config and state dir, its output in
 * sv->log, with extra arguments and env (both NULL-terminated, may be
 * NULL). No --log-level: the file's log_level is what the reload tests
 * change. Waits for it to listen unless the caller does (wait 0). */
static void start_service(service_t *sv, const char *const *extra, const char *const *env, int wait)
{
    const char *argv[24] = {VQKVD_PATH,   "--socket",    sv->d.path, "--config",
                            sv->d.config, "--state-dir", sv->d.state};
    size_t n = 7;
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 23; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    sv->d.pid = spawn_process(argv, sv->log, env);
    if (wait)
        daemon_wait_listening(&sv->d);
}

/* SIGHUP, then waits for the reload's summary line (the nth reload's),
 * "reloaded ..." or "reload refused ...". */
static void reload(service_t *sv, const char *summary, size_t nth)
{
    assert_int_equal(kill(sv->d.pid, SIGHUP), 0);
    wait_log(sv, summary, nth);
}

/* Waits for the daemon (signalled already) to exit; its exit status. A
 * second SIGTERM, as daemon_stop sends, could find the default action
 * back in place once the daemon has closed its signal handles. */
static int exit_status(service_t *sv)
{
    int status = wait_exit(sv->d.pid);
    sv->d.pid = -1;
    assert_true(status != -1);
    if (!WIFEXITED(status))
        fail_msg("vqkvd ended with wait status %#x", status);
    return WEXITSTATUS(status);
}

/* ---- a worker ------------------------------------------------------------------- */

static const vqkv_layout_t layout = {2, 2, 64, 16, VQKV_DTYPE_F16};

/* A connection with an fp16 model and a one-slot region. */
typedef struct {
    vqkv_client_t *c;
    vqkv_model_t *m;
    int fd;
    vqkv_region_t region;
} worker_t;

static void worker_open(worker_t *w, const daemon_t *d)
{
    vqkv_kv_view_t view;
    assert_vqkv(vqkv_connect(d->path, "test_service", TIMEOUT_MS, &w->c), VQKV_OK);
    assert_vqkv(vqkv_register_model(w->c, "test/service@main", &layout, "fp16", &w->m), VQKV_OK);
    vqkv_kv_view_vllm(&view, &layout, 1);
    assert_vqkv(vqkv_memfd_create("test_service", view.region_bytes, &w->fd), VQKV_OK);
    assert_vqkv(
        vqkv_register_memfd_region(w->c, w->m, w->fd, view.region_bytes, 0, &view, &w->region),
        VQKV_OK);
}

static void worker_close(worker_t *w)
{
    vqkv_close(w->c);
    close(w->fd);
}

/* Puts one block, the first of a sequence of tokens from base, and pins it
 * until the connection closes when it was stored; returns its status. */
static vqkv_put_status_t put_pinned(worker_t *w, uint32_t base)
{
    uint32_t tokens[16];
    uint8_t key[1][VQKV_KEY_BYTES];
    uint32_t slot = 0;
    size_t n = 0;
    for (uint32_t i = 0; i < 16; i++)
        tokens[i] = base + i;
    assert_vqkv(vqkv_model_block_keys(w->m, NULL, tokens, 16, NULL, 0, key, 1, &n), VQKV_OK);
    vqkv_put_status_t status;
    assert_true(vqkv_put(w->c, w->m, w->region, (const uint8_t(*)[VQKV_KEY_BYTES])key, NULL, &slot,
                         1, &status) >= 0);
    if (status == VQKV_PUT_STORED)
        assert_vqkv(vqkv_pin(w->c, w->m, (const uint8_t(*)[VQKV_KEY_BYTES])key, 1, 0, &n), VQKV_OK);
    return status;
}

static vqkv_tenant_stats_t own_stats(worker_t *w, vqkv_stats_t *st)
{
    assert_vqkv(vqkv_stats(w->c, st), VQKV_OK);
    assert_true(st->n_tenants >= 1);
    return st->tenants[0];
}

/* ---- sd_notify ------------------------------------------------------------------ */

typedef struct {
    int fd;
    unsigned watchdogs; /* WATCHDOG=1 lines seen */
    char status[256];   /* the last STATUS= value */
} notify_t;

static void notify_open(notify_t *n, const char *path)
{
    memset(n, 0, sizeof *n);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(n->fd >= 0);
    assert_int_equal(bind(n->fd, (struct sockaddr *)&addr, sizeof addr), 0);
    struct timeval tv = {0, 100 * 1000};
    setsockopt(n->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Reads datagrams until one holds a line starting with want; counts the
 * watchdog pings and keeps the last status on the way. The daemon sends
 * on a blocking socket, so the test keeps reading while it waits. */
static void notify_wait(notify_t *n, const char *want)
{
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    char msg[4096];
    for (;;) {
        if (now_ms() > deadline)
            fail_msg("no \"%s\" on NOTIFY_SOCKET in time", want);
        ssize_t len = recv(n->fd, msg, sizeof msg - 1, 0);
        if (len < 0)
            continue; /* the timeout: look at the clock again */
        msg[len] = '\0';
        int found = 0;
        for (char *line = strtok(msg, "\n"); line != NULL; line = strtok(NULL, "\n")) {
            if (strcmp(line, "WATCHDOG=1") == 0)
                n->watchdogs++;
            if (strncmp(line, "STATUS=", 7) == 0)
                snprintf(n->status, sizeof n->status, "%s", line + 7);
            if (strncmp(line, want, strlen(want)) == 0)
                found = 1;
        }
        if (found)
            return;
    }
}

/* The whole protocol on one run: READY=1 once the socket accepts, a
 * status, watchdog pings, a status that follows a connected client,
 * RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 on SIGTERM. */
static void test_notify(void **state)
{
    service_t *sv = *state;
    notify_t n;
    notify_open(&n, sv->notify);
    char notify_env[160];
    snprintf(notify_env, sizeof notify_env, "NOTIFY_SOCKET=%s", sv->notify);
    /* 200 ms: a ping every 100 ms. WATCHDOG_PID stays unset, which means
     * "this process" (the test's own environment must not name another). */
    unsetenv("WATCHDOG_PID");
    const char *const env[] = {notify_env, "WATCHDOG_USEC=200000", NULL};
    start_service(sv, NULL, env, 0);

    notify_wait(&n, "READY=1");
    int fd = try_connect(sv->d.path);
    if (fd < 0)
        fail_msg("READY=1 came before %s accepted connections", sv->d.path);
    close(fd);
    assert_non_null(strstr(n.status, "no lookups yet, pool "));
    while (n.watchdogs < 2)
        notify_wait(&n, "WATCHDOG=1");

    /* One client held open: the next status refresh counts it. */
    worker_t w;
    worker_open(&w, &sv->d);
    while (strstr(n.status, ", 1 client") == NULL)
        notify_wait(&n, "STATUS=");

    assert_int_equal(kill(sv->d.pid, SIGHUP), 0);
    notify_wait(&n, "RELOADING=1");
    notify_wait(&n, "READY=1");
    unsigned pings = n.watchdogs;
    while (n.watchdogs < pings + 2)
        notify_wait(&n, "WATCHDOG=1"); /* still pinging after the reload */
    worker_close(&w);

    assert_int_equal(kill(sv->d.pid, SIGTERM), 0);
    notify_wait(&n, "STOPPING=1");
    assert_int_equal(exit_status(sv), 0);
    struct stat st;
    assert_int_equal(lstat(sv->d.path, &st), -1); /* bound by vqkvd: removed */
    close(n.fd);
}

/* ---- SIGHUP --------------------------------------------------------------------- */

/* A quota raised by a reload lets in the Put it refused before; a changed
 * pool_bytes is reported as needing a restart and the pool keeps its size. */
static void test_reload_quota(void **state)
{
    service_t *sv = *state;
    char conf[256];
    write_conf(sv, "[vqkvd]\npool_bytes = 16M\n");
    start_service(sv, NULL, NULL, 1);
    worker_t w;
    worker_open(&w, &sv->d);
    uint64_t block = vqkv_model_block_bytes(w.m);

    snprintf(conf, sizeof conf, "[vqkvd]\npool_bytes = 16M\n[quota]\ndefault = %llu\n",
             (unsigned long long)(2 * block));
    write_conf(sv, conf);
    reload(sv, "reloaded ", 1);
    expect_log(sv, "reload: [quota] default: unlimited -> ");
    /* The tenant was known before the reload: its quota changed too. */
    vqkv_stats_t st;
    assert_int_equal(own_stats(&w, &st).quota_bytes, 2 * block);
    assert_int_equal(put_pinned(&w, 0), VQKV_PUT_STORED);
    assert_int_equal(put_pinned(&w, 100), VQKV_PUT_STORED);
    assert_int_equal(put_pinned(&w, 200), VQKV_PUT_OVER_QUOTA);

    snprintf(conf, sizeof conf, "[vqkvd]\npool_bytes = 32M\n[quota]\ndefault = %llu\n",
             (unsigned long long)(3 * block));
    write_conf(sv, conf);
    reload(sv, "reloaded ", 2);
    assert_int_equal(put_pinned(&w, 200), VQKV_PUT_STORED);
    vqkv_tenant_stats_t t = own_stats(&w, &st);
    assert_int_equal(t.quota_bytes, 3 * block);
    assert_int_equal(t.bytes_stored, 3 * block);
    expect_log(sv, "reload: pool_bytes: 16M -> 32M needs a restart");
    assert_true(st.pool_bytes <= 16u << 20);
    worker_close(&w);
    daemon_stop(&sv->d);
}

/* log_level = warn hides the per-connection debug lines; a reload to debug
 * shows them, and the change itself is logged. */
static void test_reload_log_level(void **state)
{
    service_t *sv = *state;
    write_conf(sv, "[vqkvd]\nlog_level = warn\n");
    start_service(sv, NULL, NULL, 1);
    expect_not_in_log(sv, "connected (pid");
    expect_not_in_log(sv, "listening on"); /* info is off too */

    write_conf(sv, "[vqkvd]\nlog_level = debug\n");
    reload(sv, "reloaded ", 1);
    expect_log(sv, "reload: log_level: warn -> debug");
    client_t c;
    client_open(&c, &sv->d);
    wait_log(sv, "connected (pid", 1);
    client_close(&c);
    daemon_stop(&sv->d);
}

/* A file that does not load changes nothing: the error names file:line,
 * and the quota and the allow list in force stay in force. */
static void test_reload_bad_file(void **state)
{
    service_t *sv = *state;
    char conf[256], want[256];
    write_conf(sv, "[quota]\ndefault = 1M\n");
    start_service(sv, NULL, NULL, 1);

    write_conf(sv, "[quota]\ndefault = 2M\n[vqkvd]\npool_bytes = lots\n");
    reload(sv, "reload refused: ", 1);
    snprintf(want, sizeof want, "reload refused: %s:4: bad pool_bytes \"lots\"", sv->d.config);
    expect_log(sv, want);
    expect_not_in_log(sv, "reload: [quota]");
    worker_t w;
    worker_open(&w, &sv->d); /* still serving */
    vqkv_stats_t st;
    assert_int_equal(own_stats(&w, &st).quota_bytes, 1u << 20);
    worker_close(&w);

    /* Fixed, it is taken. */
    snprintf(conf, sizeof conf, "[quota]\ndefault = 2M\n");
    write_conf(sv, conf);
    reload(sv, "reloaded ", 1);
    worker_open(&w, &sv->d);
    assert_int_equal(own_stats(&w, &st).quota_bytes, 2u << 20);
    worker_close(&w);
    daemon_stop(&sv->d);
}

/* allow_uids without the test's uid: the connected client gets an Error
 * VQKV_EPERM and is closed, and new connections are refused. */
static void test_reload_closes_disallowed(void **state)
{
    service_t *sv = *state;
    char conf[128];
    start_service(sv, NULL, NULL, 1);
    client_t c;
    client_open(&c, &sv->d);
    worker_t w;
    worker_open(&w, &sv->d);

    snprintf(conf, sizeof conf, "[vqkvd]\nallow_uids = %u\n", (unsigned)getuid() + 1);
    write_conf(sv, conf);
    reload(sv, "reloaded ", 1);
    expect_log(sv, "no longer allowed; closing");
    expect_log(sv, "2 clients no longer allowed");
    expect_error(recv_env(&c), 0, VQKV_EPERM);
    vqkv_frame_t frame;
    assert_prc(vqkv_frame_recv(c.fd, &c.reader, &frame), VQKV_ECLOSED);
    client_close(&c);

    /* libvqkv's next call meets the closed socket (a broken pipe once the
     * daemon has closed) and still reports why: the Error queued before
     * the close. Its reconnect is refused the same way. */
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(w.c, &st), VQKV_EPERM);
    assert_vqkv(vqkv_stats(w.c, &st), VQKV_EPERM);
    assert_non_null(strstr(vqkv_last_error(w.c), "may not use this daemon"));
    worker_close(&w);

    client_open(&c, &sv->d);
    expect_error(recv_env(&c), 0, VQKV_EPERM);
    client_close(&c);
    daemon_stop(&sv->d);
}

/* --allow-uid and --lease-ms given at start still beat the file after a
 * reload: the client stays, nothing about them is logged as changed. */
static void test_reload_keeps_flags(void **state)
{
    service_t *sv = *state;
    char conf[128], uid[16];
    snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
    const char *const extra[] = {"--allow-uid", uid, "--lease-ms", "1234", NULL};
    snprintf(conf, sizeof conf, "[vqkvd]\nallow_uids = %u\nlease_ms = 5000\n",
             (unsigned)getuid() + 1);
    write_conf(sv, conf);
    start_service(sv, extra, NULL, 1);
    worker_t w;
    worker_open(&w, &sv->d);

    snprintf(conf, sizeof conf, "[vqkvd]\nallow_uids = %u\nlease_ms = 6000\nmax_clients = 7\n",
             (unsigned)getuid() + 2);
    write_conf(sv, conf);
    reload(sv, "reloaded ", 1);
    expect_log(sv, "reload: max_clients: 1024 -> 7");
    expect_not_in_log(sv, "reload: allow_uids");
    expect_not_in_log(sv, "reload: lease_ms");
    vqkv_stats_t st;
    own_stats(&w, &st); /* still served */
    worker_close(&w);
    daemon_stop(&sv->d);
}

/* ---- which keys reload live, in-process ----------------------------------------- */

static void collect_change(const vqkvd_config_change_t *ch, void *user)
{
    char *out = user;
    size_t len = strlen(out);
    snprintf(out + len, 1024 - len, "%s: %s -> %s%s\n", ch->key, ch->was, ch->now,
             ch->live ? "" : " (restart)");
}

/* vqkvd_config_diff names each changed key once, in the file's words,
 * with id lists compared as sets; vqkvd_config_take_live takes the live
 * ones only, after which only the restart keys still differ. */
static void test_config_diff(void **state)
{
    (void)state;
    vqkvd_config_t running, next;
    char out[1024] = "";
    memset(&running, 0, sizeof running);
    running.pool_bytes = 1ull << 30;
    running.lease_ms = 30000;
    running.n_allow_uids = 2;
    running.allow_uids[0] = 1;
    running.allow_uids[1] = 2;
    next = running;
    next.allow_uids[0] = 2;
    next.allow_uids[1] = 1;
    vqkvd_config_diff(&running, &next, collect_change, out);
    assert_string_equal(out, "");

    next.pool_bytes = 2ull << 30;
    next.lease_ms = 5;
    next.allow_uids[next.n_allow_uids++] = 3;
    next.quota_uids[0] = 7;
    next.quota_bytes[0] = 1u << 20;
    next.n_quotas = 1;
    vqkvd_config_diff(&running, &next, collect_change, out);
    assert_string_equal(out, "pool_bytes: 1G -> 2G (restart)\n"
                             "allow_uids: 1, 2 -> 2, 1, 3\n"
                             "lease_ms: 30000 -> 5\n"
                             "[quota] uid.7: (not set) -> 1M\n");

    vqkvd_config_take_live(&running, &next);
    out[0] = '\0';
    vqkvd_config_diff(&running, &next, collect_change, out);
    assert_string_equal(out, "pool_bytes: 1G -> 2G (restart)\n");
    assert_int_equal(running.lease_ms, 5);
    assert_int_equal(running.n_quotas, 1);
}

/* ---- socket activation ---------------------------------------------------------- */

static char activator[PATH_MAX];

/* systemd-socket-activate on PATH into activator; 0 when it is missing. */
static int find_activator(void)
{
    const char *path = getenv("PATH");
    char dirs[4096];
    snprintf(dirs, sizeof dirs, "%s", path != NULL ? path : "/usr/bin:/bin");
    for (char *dir = strtok(dirs, ":"); dir != NULL; dir = strtok(NULL, ":")) {
        snprintf(activator, sizeof activator, "%s/%s", dir, ACTIVATOR);
        if (access(activator, X_OK) == 0)
            return 1;
    }
    return 0;
}

/* Runs vqkvd under the activator with its options (NULL-terminated)
 * before the command; the activator passes on only the environment it is
 * told to, so the sanitizers' options go through -E. */
static void start_activated(service_t *sv, const char *const *options)
{
    const char *argv[32] = {activator};
    size_t n = 1;
    for (size_t i = 0; options[i] != NULL; i++)
        argv[n++] = options[i];
    const char *const rest[] = {"-E",        "ASAN_OPTIONS", "-E",         "UBSAN_OPTIONS",
                                VQKVD_PATH,  "--config",     sv->d.config, "--state-dir",
                                sv->d.state, "--log-level",  "debug",      NULL};
    for (size_t i = 0; rest[i] != NULL; i++)
        argv[n++] = rest[i];
    argv[n] = NULL;
    sv->d.pid = spawn_process(argv, sv->log, NULL);
}

/* vqkvd serves on the socket it is handed, without --socket (nor
 * XDG_RUNTIME_DIR, which the activator does not pass), and leaves the
 * socket file to its owner when it stops. */
static void test_activation_serves(void **state)
{
    service_t *sv = *state;
    const char *const options[] = {"-l", sv->d.path, NULL};
    start_activated(sv, options);
    daemon_wait_listening(&sv->d); /* the activator's socket; this connection starts vqkvd */
    char out[512];
    const char *const args[] = {"--socket", sv->d.path, "health", NULL};
    assert_int_equal(run_ctl(args, out, sizeof out), 0);
    wait_log(sv, "(socket activation, fd 3", 1);

    assert_int_equal(kill(sv->d.pid, SIGTERM), 0);
    assert_int_equal(exit_status(sv), 0);
    struct stat st;
    assert_int_equal(lstat(sv->d.path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    expect_not_in_log(sv, "removing");
}

/* Two sockets: refused with exit status 2 and a message. */
static void test_activation_refuses_two_sockets(void **state)
{
    service_t *sv = *state;
    const char *const options[] = {"-l", sv->d.path, "-l", sv->other, NULL};
    start_activated(sv, options);
    daemon_wait_listening(&sv->d); /* starts vqkvd */
    assert_int_equal(exit_status(sv), 2);
    expect_log(sv, "socket activation passed 2 sockets");
}

/* A datagram socket: refused with exit status 2 and a message. */
static void test_activation_refuses_datagram(void **state)
{
    service_t *sv = *state;
    const char *const options[] = {"-d", "-l", sv->d.path, NULL};
    start_activated(sv, options);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sv->d.path);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    /* The first datagram that arrives starts vqkvd. */
    while (sendto(fd, "x", 1, 0, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (now_ms() > deadline)
            fail_msg("%s did not bind %s in time", ACTIVATOR, sv->d.path);
        sleep_ms(5);
    }
    close(fd);
    assert_int_equal(exit_status(sv), 2);
    expect_log(sv, "fd 3 is not a listening Unix stream socket");
}

int main(int argc, char **argv)
{
    const struct CMUnitTest service[] = {
        cmocka_unit_test(test_config_diff),
        cmocka_unit_test_setup_teardown(test_notify, setup_service, teardown_service),
        cmocka_unit_test_setup_teardown(test_reload_quota, setup_service, teardown_service),
        cmocka_unit_test_setup_teardown(test_reload_log_level, setup_service, teardown_service),
        cmocka_unit_test_setup_teardown(test_reload_bad_file, setup_service, teardown_service),
        cmocka_unit_test_setup_teardown(test_reload_closes_disallowed, setup_service,
                                        teardown_service),
        cmocka_unit_test_setup_teardown(test_reload_keeps_flags, setup_service, teardown_service),
    };
    const struct CMUnitTest activation[] = {
        cmocka_unit_test_setup_teardown(test_activation_serves, setup_service, teardown_service),
        cmocka_unit_test_setup_teardown(test_activation_refuses_two_sockets, setup_service,
                                        teardown_service),
        cmocka_unit_test_setup_teardown(test_activation_refuses_datagram, setup_service,
                                        teardown_service),
    };
    if (argc > 1 && strcmp(argv[1], "activation") == 0) {
        if (!find_activator()) {
            fprintf(stderr,
                    "SKIP: %s is not installed (Debian package systemd); "
                    "socket activation is not tested\n",
                    ACTIVATOR);
            return 77;
        }
        return cmocka_run_group_tests_name("socket activation", activation, NULL, NULL);
    }
    return cmocka_run_group_tests_name("notify and reload", service, NULL, NULL);
}
