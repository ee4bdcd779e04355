/* test_redis.c -- the remote tier's Redis client (daemon/redis.h) in-process
 * on a libuv loop, against redis-server processes the test starts, each
 * in a fresh temporary directory and killed at the end (also when a test
 * fails; they die with the test process too):
 *
 * - specs, good and refused, and the cluster slot hash, with no server;
 * - standalone over TCP through a host name, with a user, a password from
 *   the override and db 3: a 1 MiB binary value round trip, the key found
 *   in db 3 by redis-cli, and close with commands in flight;
 * - a unix socket and a wrong password: DOWN at once, connect failures
 *   counted, one warning logged;
 * - a server killed with commands queued (CLOSED), commands while it is
 *   gone (DOWN), and the same address started again (reconnected within
 *   the backoff);
 * - a stopped server (SIGSTOP): TIMEOUT at the deadline, late replies
 *   dropped after SIGCONT; stopped longer, the stalled connection dropped
 *   and a new one made after SIGCONT;
 * - a three-node Redis Cluster made by redis-cli: 1000 keys spread over
 *   the nodes, then 2000 slots resharded by redis-cli while the client
 *   writes and reads on, every answer checked, redirections followed.
 *
 * Conditions are waited for with generous bounds on the loop; no sleep is
 * an assertion. Exits 77 (after the spec test) when redis-server or
 * redis-cli is missing.
 */
#include "test_util.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "redis.h"

#define SERVERS_MAX 3
#define MIB (1u << 20)

typedef struct {
    char dir[256];
    pid_t pid[SERVERS_MAX];
    char *argv[SERVERS_MAX][32]; /* how each was started, to start it again */
    int port[SERVERS_MAX];
    char sock[300];
    uv_loop_t loop;
    vqkvd_redis_t *r;
    bool passed; /* the loop is consistent: teardown may run it */
} fx_t;

/* What one command's callback saw. */
typedef struct {
    int calls;
    vqkvd_redis_status_t status;
    int type;
    long long integer;
    char *str; /* a copy of the reply's string, error or status */
    size_t len;
} res_t;

static bool in_command; /* inside vqkvd_redis_command or vqkvd_redis_close */
static int reentered;   /* callbacks run inside one of them */
static bool done_called;

/* ---- servers -------------------------------------------------------------------- */

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static bool on_path(const char *prog)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", prog);
    return system(cmd) == 0;
}

/* A TCP port nothing listens on now (and, for a cluster node, its bus port
 * too: port + 10000). */
static int free_port(bool with_bus)
{
    for (int tries = 0; tries < 200; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
        close(fd);
        int port = ntohs(a.sin_port);
        if (!with_bus)
            return port;
        if (port + 10000 > 65535)
            continue;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        a.sin_port = htons((uint16_t)(port + 10000));
        int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (ok)
            return port;
    }
    fail_msg("no free port pair");
    return -1;
}

static pid_t spawn(char *const argv[], const char *log)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Dies with the test, so a failed or crashed test leaves no server. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(125);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

/* Starts server i with the arguments after the common ones (NULL-terminated,
 * copied) in its own directory DIR/sI. */
static void server_start(fx_t *fx, int i, const char *const *extra)
{
    char dir[300], log[320];
    snprintf(dir, sizeof dir, "%s/s%d", fx->dir, i);
    snprintf(log, sizeof log, "%s/s%d.log", fx->dir, i);
    if (fx->argv[i][0] == NULL) {
        assert_true(mkdir(dir, 0700) == 0 || errno == EEXIST);
        const char *common[] = {"redis-server", "--save", "", "--appendonly", "no", "--dir", dir};
        size_t n = 0;
        for (size_t k = 0; k < sizeof common / sizeof common[0]; k++)
            fx->argv[i][n++] = strdup(common[k]);
        for (size_t k = 0; extra[k] != NULL; k++) {
            assert_true(n < 31);
            fx->argv[i][n++] = strdup(extra[k]);
        }
        fx->argv[i][n] = NULL;
    }
    fx->pid[i] = spawn(fx->argv[i], log);
}

static void server_kill(fx_t *fx, int i)
{
    if (fx->pid[i] <= 0)
        return;
    kill(fx->pid[i], SIGKILL);
    waitpid(fx->pid[i], NULL, 0);
    fx->pid[i] = 0;
}

/* Waits until the server at path (or 127.0.0.1:port) answers a PING, even
 * with NOAUTH. */
static void server_wait(const char *path, int port)
{
    long deadline = now_ms() + 10000;
    struct timeval tv = {1, 0};
    while (now_ms() < deadline) {
        redisContext *c = path != NULL ? redisConnectUnixWithTimeout(path, tv)
                                       : redisConnectWithTimeout("127.0.0.1", port, tv);
        redisReply *reply = c != NULL && c->err == 0 ? redisCommand(c, "PING") : NULL;
        bool ok = reply != NULL;
        freeReplyObject(reply);
        redisFree(c);
        if (ok)
            return;
        sleep_ms(20);
    }
    fail_msg("redis-server at %s:%d did not start", path != NULL ? path : "127.0.0.1", port);
}

/* Runs redis-cli with args (a shell fragment); its output, trailing
 * whitespace cut, in out. Returns its exit status. The shell execs
 * redis-cli, so it dies with the test too, and after 60 s at most
 * (SIGALRM survives exec): a cluster command waiting on servers that are
 * gone never outlives the test. */
__attribute__((format(printf, 3, 4))) static int cli(char *out, size_t cap, const char *fmt, ...)
{
    char args[1024], cmd[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "exec redis-cli %s", args);
    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    pid_t parent = getpid();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(125);
        alarm(60);
        dup2(fds[1], STDOUT_FILENO);
        dup2(fds[1], STDERR_FILENO);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    /* Read to the end, what does not fit dropped, so that redis-cli never
     * blocks on a full pipe. */
    size_t n = 0;
    char rest[512];
    ssize_t got;
    while ((got = n + 1 < cap ? read(fds[0], out + n, cap - 1 - n)
                              : read(fds[0], rest, sizeof rest)) > 0 ||
           (got < 0 && errno == EINTR))
        if (got > 0 && n + 1 < cap)
            n += (size_t)got;
    close(fds[0]);
    out[n] = '\0';
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r' || out[n - 1] == ' '))
        out[--n] = '\0';
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ---- the loop ------------------------------------------------------------------- */

typedef bool (*cond_fn)(void *ctx);

typedef struct {
    cond_fn cond;
    void *ctx;
    uint64_t deadline;
    bool met;
} wait_t;

static void wait_tick(uv_timer_t *t)
{
    wait_t *w = t->data;
    if (w->cond != NULL && w->cond(w->ctx)) {
        w->met = true;
        uv_stop(t->loop);
    } else if (uv_now(t->loop) >= w->deadline) {
        uv_stop(t->loop);
    }
}

/* Runs the loop until cond(ctx) holds (checked every 2 ms) or max_ms
 * pass; whether it held. cond NULL: runs max_ms. */
static bool run_until(uv_loop_t *loop, cond_fn cond, void *ctx, uint64_t max_ms)
{
    uv_update_time(loop);
    wait_t w = {cond, ctx, uv_now(loop) + max_ms, false};
    uv_timer_t t;
    uv_timer_init(loop, &t);
    t.data = &w;
    uv_timer_start(&t, wait_tick, 0, 2);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return w.met;
}

static bool cond_up(void *ctx)
{
    return vqkvd_redis_up(ctx);
}

static bool cond_idle(void *ctx)
{
    vqkvd_redis_stats_t st;
    vqkvd_redis_stats(ctx, &st);
    return st.pending == 0;
}

static bool cond_no_bytes(void *ctx)
{
    vqkvd_redis_stats_t st;
    vqkvd_redis_stats(ctx, &st);
    return st.pending_bytes == 0;
}

static bool cond_done(void *ctx)
{
    (void)ctx;
    return done_called;
}

static vqkvd_redis_stats_t stats_of(vqkvd_redis_t *r)
{
    vqkvd_redis_stats_t st;
    vqkvd_redis_stats(r, &st);
    return st;
}

/* ---- commands ------------------------------------------------------------------- */

static void res_clear(res_t *res)
{
    free(res->str);
    memset(res, 0, sizeof *res);
}

static void on_res(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    res_t *res = arg;
    if (in_command)
        reentered++;
    res->calls++;
    res->status = status;
    assert_true((reply != NULL) == (status == VQKVD_REDIS_REPLY));
    if (reply == NULL)
        return;
    res->type = reply->type;
    res->integer = reply->integer;
    if (reply->str != NULL) {
        free(res->str);
        res->str = malloc(reply->len + 1);
        assert_non_null(res->str);
        memcpy(res->str, reply->str, reply->len);
        res->str[reply->len] = '\0';
        res->len = reply->len;
    }
}

/* Issues argv (argc words; lens NULL: C strings) keyed by argv[1]. */
static void issue(vqkvd_redis_t *r, res_t *res, uint32_t deadline_ms, int argc, const char **argv,
                  const size_t *lens)
{
    res_clear(res);
    in_command = true;
    int rc = vqkvd_redis_command(r, argc > 1 ? argv[1] : NULL,
                                 argc > 1 ? (lens != NULL ? lens[1] : strlen(argv[1])) : 0, argc,
                                 argv, lens, deadline_ms, on_res, res);
    in_command = false;
    assert_ok(rc);
    assert_int_equal(res->calls, 0);
}

static void issue_get(vqkvd_redis_t *r, res_t *res, uint32_t deadline_ms, const char *key)
{
    const char *argv[] = {"GET", key};
    issue(r, res, deadline_ms, 2, argv, NULL);
}

static void issue_set(vqkvd_redis_t *r, res_t *res, uint32_t deadline_ms, const char *key,
                      const char *value)
{
    const char *argv[] = {"SET", key, value};
    issue(r, res, deadline_ms, 3, argv, NULL);
}

/* A reply whose string a callback took (vqkvd_redis_reply_take_str). */
typedef struct {
    char *str;
    size_t len;
    bool reply_left_none; /* the reply's str was NULL after the take */
    bool done;
} taken_t;

static void on_take(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    taken_t *t = arg;
    t->done = true;
    if (status != VQKVD_REDIS_REPLY)
        return;
    t->len = reply->len;
    t->str = vqkvd_redis_reply_take_str(reply);
    t->reply_left_none = reply->str == NULL;
}

static bool cond_taken(void *ctx)
{
    return ((taken_t *)ctx)->done;
}

static bool cond_answered(void *ctx)
{
    return ((res_t *)ctx)->calls > 0;
}

/* Runs one command to its answer (5 s at most) and checks it was one. */
static void wait_one(fx_t *fx, res_t *res)
{
    assert_true(run_until(&fx->loop, cond_answered, res, 5000));
    assert_int_equal(res->calls, 1);
}

static void assert_reply_str(const res_t *res, int type, const char *str)
{
    assert_int_equal(res->status, VQKVD_REDIS_REPLY);
    assert_int_equal(res->type, type);
    assert_non_null(res->str);
    assert_string_equal(res->str, str);
}

static void on_done(void *arg)
{
    (void)arg;
    if (in_command)
        reentered++;
    done_called = true;
}

/* Closes fx->r and runs the loop until done has run; the loop must then
 * hold no handle of the client's. */
static void close_client(fx_t *fx)
{
    done_called = false;
    in_command = true;
    vqkvd_redis_close(fx->r, on_done, NULL);
    in_command = false;
    fx->r = NULL;
    assert_true(run_until(&fx->loop, cond_done, NULL, 5000));
    assert_int_equal(reentered, 0);
}

static void create(fx_t *fx, const char *spec, const char *password, uint32_t timeout_ms)
{
    char why[256] = "";
    int rc = vqkvd_redis_create(&fx->loop, spec, password, timeout_ms, &fx->r, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("create %s: %d %s", spec, rc, why);
}

/* create, and connected within up_ms. */
static void create_up(fx_t *fx, const char *spec, const char *password, uint32_t timeout_ms,
                      uint64_t up_ms)
{
    create(fx, spec, password, timeout_ms);
    assert_true(run_until(&fx->loop, cond_up, fx->r, up_ms));
}

/* A SET of key that must be answered OK. */
static void set_ok(fx_t *fx, const char *key, const char *value)
{
    res_t res = {0};
    issue_set(fx->r, &res, 2000, key, value);
    wait_one(fx, &res);
    assert_reply_str(&res, REDIS_REPLY_STATUS, "OK");
    res_clear(&res);
}

/* ---- fixtures ------------------------------------------------------------------- */

static int fx_setup(void **state)
{
    fx_t *fx = calloc(1, sizeof *fx);
    if (fx == NULL || test_make_dir(fx->dir, sizeof fx->dir, "vqkv-redis") != 0 ||
        uv_loop_init(&fx->loop) != 0) {
        free(fx);
        return -1;
    }
    reentered = 0;
    *state = fx;
    return 0;
}

/* Kills the servers and removes the directory whatever happened; the loop
 * is closed (and must close) only after a test that passed, since a
 * failed assertion can leave it mid-callback. */
static int fx_teardown(void **state)
{
    fx_t *fx = *state;
    for (int i = 0; i < SERVERS_MAX; i++) {
        if (fx->pid[i] > 0)
            kill(fx->pid[i], SIGCONT);
        server_kill(fx, i);
        for (int k = 0; fx->argv[i][k] != NULL; k++)
            free(fx->argv[i][k]);
    }
    int rc = 0;
    if (fx->passed)
        rc = uv_loop_close(&fx->loop) == 0 ? 0 : -1;
    test_remove_tree(fx->dir);
    free(fx);
    return rc;
}

/* ---- 1. specs ------------------------------------------------------------------- */

static void expect_bad(const char *spec, const char *password, const char *needle)
{
    vqkvd_redis_spec_t s;
    char why[256] = "";
    int rc = vqkvd_redis_parse(spec, password, &s, why, sizeof why);
    if (rc != VQKV_EINVAL)
        fail_msg("spec \"%s\" was taken (%d)", spec != NULL ? spec : "(null)", rc);
    if (strstr(why, needle) == NULL)
        fail_msg("spec \"%s\": message \"%s\" lacks \"%s\"", spec != NULL ? spec : "(null)", why,
                 needle);
    assert_null(strstr(why, "hunter2"));
}

static vqkvd_redis_spec_t expect_good(const char *spec, const char *password)
{
    vqkvd_redis_spec_t s;
    char why[256] = "";
    int rc = vqkvd_redis_parse(spec, password, &s, why, sizeof why);
    if (rc != VQKV_OK)
        fail_msg("spec \"%s\" refused: %s", spec, why);
    return s;
}

static void test_specs(void **state)
{
    (void)state;
    vqkvd_redis_spec_t s = expect_good("redis://127.0.0.1:6379", NULL);
    assert_false(s.cluster);
    assert_int_equal(s.n_addrs, 1);
    assert_string_equal(s.addrs[0].host, "127.0.0.1");
    assert_int_equal(s.addrs[0].port, 6379);
    assert_int_equal(s.db, 0);
    assert_string_equal(s.user, "");
    assert_string_equal(s.password, "");
    assert_string_equal(s.path, "");

    s = expect_good("redis://u%40x:p%3Aw%25@cache.example:1/15", NULL);
    assert_false(s.cluster);
    assert_string_equal(s.addrs[0].host, "cache.example");
    assert_int_equal(s.addrs[0].port, 1);
    assert_int_equal(s.db, 15);
    assert_string_equal(s.user, "u@x");
    assert_string_equal(s.password, "p:w%");

    s = expect_good("redis://:secret@[::1]:65535", NULL);
    assert_string_equal(s.addrs[0].host, "::1");
    assert_int_equal(s.addrs[0].port, 65535);
    assert_string_equal(s.user, "");
    assert_string_equal(s.password, "secret");

    s = expect_good("unix:///run/redis/redis.sock?db=4", NULL);
    assert_false(s.cluster);
    assert_string_equal(s.path, "/run/redis/redis.sock");
    assert_int_equal(s.n_addrs, 0);
    assert_int_equal(s.db, 4);
    s = expect_good("unix:///tmp/r.sock", "pw");
    assert_int_equal(s.db, 0);
    assert_string_equal(s.password, "pw");

    /* The cluster rule: cluster://, or more than one address. */
    s = expect_good("cluster://10.0.0.1:7000", NULL);
    assert_true(s.cluster);
    assert_int_equal(s.n_addrs, 1);
    s = expect_good("redis://a:1,redis://b:2,c:3", NULL);
    assert_true(s.cluster);
    assert_int_equal(s.n_addrs, 3);
    assert_string_equal(s.addrs[1].host, "b");
    assert_int_equal(s.addrs[2].port, 3);
    s = expect_good("cluster://bob:pw@a:1,bob:pw@b:2/0", NULL);
    assert_true(s.cluster);
    assert_string_equal(s.user, "bob");
    assert_string_equal(s.password, "pw");

    /* The override replaces the password, never the user. */
    s = expect_good("redis://:urlpw@h:1", "filepw");
    assert_string_equal(s.password, "filepw");
    s = expect_good("redis://bob:urlpw@h:1", "filepw");
    assert_string_equal(s.user, "bob");
    assert_string_equal(s.password, "filepw");
    s = expect_good("redis://bob@h:1", "filepw");
    assert_string_equal(s.password, "filepw");
    s = expect_good("redis://:urlpw@h:1", "");
    assert_string_equal(s.password, "");

    expect_bad(NULL, NULL, "empty");
    expect_bad("", NULL, "empty");
    expect_bad("localhost:6379", NULL, "no scheme");
    expect_bad("http://h:1", NULL, "unknown scheme \"http\"");
    expect_bad("rediss://h:1", NULL, "TLS");
    expect_bad("redis://h", NULL, "no port");
    expect_bad("redis://h:", NULL, "bad port");
    expect_bad("redis://h:0", NULL, "bad port");
    expect_bad("redis://h:70000", NULL, "bad port");
    expect_bad("redis://h:65536", NULL, "bad port");
    expect_bad("redis://h:12a", NULL, "bad port");
    expect_bad("redis://h:-1", NULL, "bad port");
    expect_bad("redis://:1", NULL, "no host");
    expect_bad("redis://h:1/x", NULL, "bad db");
    expect_bad("redis://h:1/-1", NULL, "bad db");
    expect_bad("redis://h:1/", NULL, "bad db");
    expect_bad("redis://h:1/99999999999", NULL, "bad db");
    expect_bad("redis://h:1/2147483648", NULL, "bad db");
    expect_bad("redis://::1:6379", NULL, "brackets");
    expect_bad("redis://[::1:6379", NULL, "']'");
    expect_bad("redis://[::1]", NULL, "no port");
    expect_bad("unix://relative.sock", NULL, "absolute path");
    expect_bad("unix://", NULL, "absolute path");
    expect_bad("unix:///p.sock?db=x", NULL, "bad query");
    expect_bad("unix:///p.sock?password=x", NULL, "bad query");
    expect_bad("cluster://h:1/2", NULL, "only db 0");
    expect_bad("redis://a:1,b:2/3", NULL, "only db 0");
    expect_bad("redis://a:1,", NULL, "empty address");
    expect_bad("cluster://", NULL, "empty address");
    expect_bad("redis://bob@h:1", NULL, "without a password");
    expect_bad("redis://bob:hunter2@h:1", "", "without a password");
    expect_bad("redis://x:hunter2@a:1,y:other@b:2", NULL, "different credentials");
    expect_bad("redis://u:%zz@h:1", NULL, "bad user or password");
    expect_bad("redis://u:%00@h:1", NULL, "bad user or password");
    expect_bad("redis://u:hunter2%4@h:1", NULL, "bad user or password");
    char long_text[2100];
    memset(long_text, 'p', sizeof long_text - 1);
    long_text[sizeof long_text - 1] = '\0';
    expect_bad("redis://h:1", long_text, "password longer");
    char spec[2200];
    snprintf(spec, sizeof spec, "unix:///%.200s", long_text);
    expect_bad(spec, NULL, "path longer");
    snprintf(spec, sizeof spec, "redis://%.300s:1", long_text);
    expect_bad(spec, NULL, "host name longer");
    size_t n = (size_t)snprintf(spec, sizeof spec, "cluster://h:1");
    for (int i = 0; i < VQKVD_REDIS_SEEDS_MAX; i++)
        n += (size_t)snprintf(spec + n, sizeof spec - n, ",h:%d", i + 2);
    expect_bad(spec, NULL, "more than 16 addresses");

    /* create refuses what parse refuses, and leaves *out alone. */
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    vqkvd_redis_t *r = (vqkvd_redis_t *)&loop;
    char why[256] = "";
    assert_rc(vqkvd_redis_create(&loop, "redis://h", NULL, 100, &r, why, sizeof why), VQKV_EINVAL);
    assert_ptr_equal(r, (vqkvd_redis_t *)&loop);
    assert_non_null(strstr(why, "no port"));
    assert_rc(vqkvd_redis_create(&loop, "redis://h:1", NULL, 0, &r, why, sizeof why), VQKV_EINVAL);
    assert_non_null(strstr(why, "connect timeout"));
    assert_int_equal(uv_loop_close(&loop), 0);

    /* The slot hash: CRC16/XMODEM's check value, and hash tags. */
    assert_int_equal(vqkvd_redis_slot("123456789", 9), 0x31c3);
    assert_int_equal(vqkvd_redis_slot("{user1000}.following", 21), vqkvd_redis_slot("user1000", 8));
    assert_int_equal(vqkvd_redis_slot("a{}b", 4), vqkvd_redis_slot("a{}b", 4));
    assert_int_not_equal(vqkvd_redis_slot("a{}b", 4), vqkvd_redis_slot("", 0));
    assert_int_equal(vqkvd_redis_slot("x{{y}}", 6), vqkvd_redis_slot("{y", 2));
    assert_int_equal(vqkvd_redis_slot("", 0), 0);
}

/* Nothing listening: commands get DOWN on the next iteration, never
 * inside the call, and close ends it all. */
static void test_nothing_listening(void **state)
{
    fx_t *fx = *state;
    create(fx, "redis://127.0.0.1:1", NULL, 200);
    res_t res[3] = {{0}};
    for (int i = 0; i < 3; i++)
        issue_get(fx->r, &res[i], 0, "k");
    assert_true(run_until(&fx->loop, cond_idle, fx->r, 2000));
    for (int i = 0; i < 3; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].status, VQKVD_REDIS_DOWN);
        res_clear(&res[i]);
    }
    /* Commands that change the connection's mode are refused. */
    const char *sub[] = {"subscribe", "ch"};
    assert_rc(vqkvd_redis_command(fx->r, "ch", 2, 2, sub, NULL, 0, on_res, &res[0]), VQKV_EINVAL);
    const char *sel[] = {"SELECT", "1"};
    assert_rc(vqkvd_redis_command(fx->r, NULL, 0, 2, sel, NULL, 0, on_res, &res[0]), VQKV_EINVAL);
    assert_rc(vqkvd_redis_command(fx->r, NULL, 0, 0, sel, NULL, 0, on_res, &res[0]), VQKV_EINVAL);
    run_until(&fx->loop, NULL, NULL, 350);
    vqkvd_redis_stats_t st = stats_of(fx->r);
    assert_true(st.connect_failures >= 2); /* at 0, 100 and 300 ms */
    assert_int_equal(st.connects, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.nodes, 1);
    assert_int_equal(st.nodes_up, 0);
    assert_false(vqkvd_redis_up(fx->r));
    assert_int_equal(res[0].calls, 0);
    close_client(fx);
    assert_int_equal(reentered, 0);
    fx->passed = true;
}

/* ---- 2. standalone over TCP: user, password, db ----------------------------------- */

static void on_closed_reissue(void *arg, vqkvd_redis_status_t status, const redisReply *reply);

typedef struct {
    vqkvd_redis_t *r;
    res_t first, second;
} reissue_t;

/* A callback of a closing client that issues another command: it gets
 * CLOSED as well. */
static void on_closed_reissue(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    reissue_t *ri = arg;
    on_res(&ri->first, status, reply);
    const char *argv[] = {"GET", "k"};
    assert_ok(vqkvd_redis_command(ri->r, "k", 1, 2, argv, NULL, 0, on_res, &ri->second));
}

static void test_tcp_auth_db(void **state)
{
    fx_t *fx = *state;
    fx->port[0] = free_port(false);
    char port[16], spec[128];
    snprintf(port, sizeof port, "%d", fx->port[0]);
    const char *extra[] = {"--port",  port, "--bind", "127.0.0.1", "--user",        "vqkv",  "on",
                           ">s3cret", "~*", "&*",     "+@all",     "--requirepass", "other", NULL};
    server_start(fx, 0, extra);
    server_wait(NULL, fx->port[0]);
    /* A host name, resolved first; the URL's password is replaced. */
    snprintf(spec, sizeof spec, "redis://vqkv:wrong@localhost:%d/3", fx->port[0]);
    create_up(fx, spec, "s3cret", 2000, 5000);

    uint8_t *value = malloc(MIB);
    assert_non_null(value);
    test_rng_t rng = {42};
    for (size_t i = 0; i < MIB; i++)
        value[i] = (uint8_t)test_rng_next(&rng);
    for (size_t i = 0; i < MIB; i += 4096)
        value[i] = 0;
    const char *set[] = {"SET", "blob", (const char *)value};
    size_t set_lens[] = {3, 4, MIB};
    res_t res = {0};
    issue(fx->r, &res, 5000, 3, set, set_lens);
    wait_one(fx, &res);
    assert_reply_str(&res, REDIS_REPLY_STATUS, "OK");
    issue_get(fx->r, &res, 5000, "blob");
    wait_one(fx, &res);
    assert_int_equal(res.status, VQKVD_REDIS_REPLY);
    assert_int_equal(res.type, REDIS_REPLY_STRING);
    assert_int_equal(res.len, MIB);
    assert_memory_equal(res.str, value, MIB);
    /* The same value taken over from the reply instead of copied. */
    taken_t taken = {0};
    const char *get[] = {"GET", "blob"};
    assert_ok(vqkvd_redis_command(fx->r, "blob", 4, 2, get, NULL, 5000, on_take, &taken));
    assert_true(run_until(&fx->loop, cond_taken, &taken, 5000));
    assert_int_equal(taken.len, MIB);
    assert_true(taken.reply_left_none);
    assert_memory_equal(taken.str, value, MIB);
    assert_int_equal(taken.str[MIB], '\0');
    free(taken.str);
    free(value);
    /* nil, and an error reply, are replies. */
    issue_get(fx->r, &res, 5000, "missing");
    wait_one(fx, &res);
    assert_int_equal(res.status, VQKVD_REDIS_REPLY);
    assert_int_equal(res.type, REDIS_REPLY_NIL);
    const char *incr[] = {"INCR", "blob"};
    issue(fx->r, &res, 5000, 2, incr, NULL);
    wait_one(fx, &res);
    assert_int_equal(res.status, VQKVD_REDIS_REPLY);
    assert_int_equal(res.type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(res.str, "not an integer"));

    /* The key is in db 3, not in db 0. */
    char out[256];
    assert_int_equal(cli(out, sizeof out,
                         "-p %d --user vqkv --pass s3cret --no-auth-warning -n 3 "
                         "STRLEN blob",
                         fx->port[0]),
                     0);
    assert_string_equal(out, "1048576");
    assert_int_equal(cli(out, sizeof out,
                         "-p %d --user vqkv --pass s3cret --no-auth-warning -n 0 "
                         "EXISTS blob",
                         fx->port[0]),
                     0);
    assert_string_equal(out, "0");

    vqkvd_redis_stats_t st = stats_of(fx->r);
    assert_int_equal(st.connects, 1);
    assert_int_equal(st.disconnects, 0);
    assert_int_equal(st.connect_failures, 0);
    assert_int_equal(st.timeouts, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.moved + st.ask + st.slot_refreshes, 0);
    assert_int_equal(st.nodes, 1);
    assert_int_equal(st.nodes_up, 1);

    /* Closed with commands in flight: each gets CLOSED after close
     * returns, and so does one a CLOSED callback issues. */
    reissue_t ri = {.r = fx->r};
    res_t more[3] = {{0}};
    for (int i = 0; i < 3; i++)
        issue_get(fx->r, &more[i], 0, "blob");
    in_command = true;
    assert_ok(vqkvd_redis_command(fx->r, "k", 1, 2, (const char *[]){"GET", "k"}, NULL, 0,
                                  on_closed_reissue, &ri));
    in_command = false;
    close_client(fx);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(more[i].calls, 1);
        assert_int_equal(more[i].status, VQKVD_REDIS_CLOSED);
        res_clear(&more[i]);
    }
    assert_int_equal(ri.first.calls, 1);
    assert_int_equal(ri.first.status, VQKVD_REDIS_CLOSED);
    assert_int_equal(ri.second.calls, 1);
    assert_int_equal(ri.second.status, VQKVD_REDIS_CLOSED);
    res_clear(&res);
    fx->passed = true;
}

/* A server on fx->sock (in fx->dir) with password, answering. */
static void unix_server_start(fx_t *fx, const char *password)
{
    snprintf(fx->sock, sizeof fx->sock, "%s/redis.sock", fx->dir);
    const char *extra[] = {
        "--port", "0", "--unixsocket", fx->sock, "--unixsocketperm", "700", "--requirepass",
        password, NULL};
    server_start(fx, 0, extra);
    server_wait(fx->sock, 0);
}

/* ---- 3. unix socket, wrong password ---------------------------------------------- */

static void test_unix_wrong_password(void **state)
{
    fx_t *fx = *state;
    unix_server_start(fx, "right");

    /* The log goes to a file for a while, to be counted. */
    char log[320], spec[400];
    snprintf(log, sizeof log, "%s/client.log", fx->dir);
    fflush(stderr);
    int saved = dup(STDERR_FILENO), fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(saved >= 0 && fd >= 0);
    dup2(fd, STDERR_FILENO);
    close(fd);

    snprintf(spec, sizeof spec, "unix://%s", fx->sock);
    create(fx, spec, "hunter2", 500);
    res_t res[10] = {{0}};
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < 2; i++)
            issue_get(fx->r, &res[2 * round + i], 1000, "k");
        run_until(&fx->loop, NULL, NULL, 300);
    }
    assert_true(run_until(&fx->loop, cond_idle, fx->r, 1000));
    vqkvd_redis_stats_t st = stats_of(fx->r);
    dup2(saved, STDERR_FILENO);
    close(saved);

    for (int i = 0; i < 10; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].status, VQKVD_REDIS_DOWN);
        res_clear(&res[i]);
    }
    /* 1.5 s: tries at 0, 100, 300, 700 ms (and 1.5 s). */
    assert_true(st.connect_failures >= 4);
    assert_int_equal(st.connects, 0);
    assert_int_equal(st.disconnects, 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_false(vqkvd_redis_up(fx->r));

    /* One warning, whatever the number of tries; the password never. */
    FILE *f = fopen(log, "r");
    assert_non_null(f);
    char line[1024];
    int warnings = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        assert_null(strstr(line, "hunter2"));
        if (strstr(line, "warn") != NULL && strstr(line, "AUTH refused") != NULL)
            warnings++;
    }
    fclose(f);
    assert_int_equal(warnings, 1);
    close_client(fx);
    fx->passed = true;
}

/* ---- 4. a server killed and started again ----------------------------------------- */

static void test_killed_restarted(void **state)
{
    fx_t *fx = *state;
    unix_server_start(fx, "pw4");
    char spec[400];
    snprintf(spec, sizeof spec, "unix://%s?db=2", fx->sock);
    create_up(fx, spec, "pw4", 1000, 5000);
    set_ok(fx, "before", "1");
    res_t res = {0};

    /* Killed with 50 commands queued and not yet written: all CLOSED. */
    enum { QUEUED = 50, WHILE_DOWN = 10 };
    res_t queued[QUEUED] = {{0}}, down[WHILE_DOWN] = {{0}};
    char key[32];
    for (int i = 0; i < QUEUED; i++) {
        snprintf(key, sizeof key, "k%d", i);
        issue_set(fx->r, &queued[i], 0, key, "v");
    }
    server_kill(fx, 0);
    assert_true(run_until(&fx->loop, cond_idle, fx->r, 5000));
    for (int i = 0; i < QUEUED; i++) {
        assert_int_equal(queued[i].calls, 1);
        assert_int_equal(queued[i].status, VQKVD_REDIS_CLOSED);
        res_clear(&queued[i]);
    }
    vqkvd_redis_stats_t st = stats_of(fx->r);
    assert_int_equal(st.disconnects, 1);
    assert_int_equal(st.pending_bytes, 0);
    assert_false(vqkvd_redis_up(fx->r));
    /* Gone: DOWN at once. */
    for (int i = 0; i < WHILE_DOWN; i++)
        issue_get(fx->r, &down[i], 0, "before");
    assert_true(run_until(&fx->loop, cond_idle, fx->r, 1000));
    for (int i = 0; i < WHILE_DOWN; i++) {
        assert_int_equal(down[i].calls, 1);
        assert_int_equal(down[i].status, VQKVD_REDIS_DOWN);
        res_clear(&down[i]);
    }
    run_until(&fx->loop, NULL, NULL, 400);

    /* The same address again: up within the backoff (at most 5 s). */
    server_start(fx, 0, NULL);
    server_wait(fx->sock, 0);
    uv_update_time(&fx->loop);
    uint64_t t0 = uv_now(&fx->loop);
    assert_true(run_until(&fx->loop, cond_up, fx->r, 7000));
    uint64_t took = uv_now(&fx->loop) - t0;
    print_message("reconnected %llu ms after the restart\n", (unsigned long long)took);
    assert_true(took <= 5500);
    issue_get(fx->r, &res, 2000, "before"); /* a new server: nothing kept */
    wait_one(fx, &res);
    assert_int_equal(res.status, VQKVD_REDIS_REPLY);
    assert_int_equal(res.type, REDIS_REPLY_NIL);
    set_ok(fx, "after", "2");
    char out[64];
    assert_int_equal(
        cli(out, sizeof out, "-s %s -a pw4 --no-auth-warning -n 2 GET after", fx->sock), 0);
    assert_string_equal(out, "2");

    st = stats_of(fx->r);
    assert_int_equal(st.connects, 2);
    assert_int_equal(st.disconnects, 1);
    assert_true(st.connect_failures >= 1);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    res_clear(&res);
    close_client(fx);
    fx->passed = true;
}

/* ---- 5. a stopped server ---------------------------------------------------------- */

static uint64_t get_bytes(const char *key)
{
    char *buf;
    int n = redisFormatCommand(&buf, "GET %s", key);
    assert_true(n > 0);
    redisFreeCommand(buf);
    return (uint64_t)n;
}

static bool cond_disconnected(void *ctx)
{
    return stats_of(ctx).disconnects > 0;
}

static bool cond_connect_failed(void *ctx)
{
    return stats_of(ctx).connect_failures > 0;
}

static void test_stopped(void **state)
{
    fx_t *fx = *state;
    fx->port[0] = free_port(false);
    char port[16], spec[128];
    snprintf(port, sizeof port, "%d", fx->port[0]);
    const char *extra[] = {"--port", port, "--bind", "127.0.0.1", NULL};
    server_start(fx, 0, extra);
    server_wait(NULL, fx->port[0]);
    snprintf(spec, sizeof spec, "redis://127.0.0.1:%d", fx->port[0]);
    create_up(fx, spec, NULL, 500, 5000);
    set_ok(fx, "k", "v");
    res_t res = {0};

    /* Stopped briefly: TIMEOUT at 200 ms; after SIGCONT the late replies
     * come and are dropped (pending_bytes falls to 0, no callback runs
     * again), and the connection stays. */
    enum { A = 10, B = 5 };
    res_t a[A] = {{0}}, b[B] = {{0}};
    assert_int_equal(kill(fx->pid[0], SIGSTOP), 0);
    uv_update_time(&fx->loop);
    uint64_t t0 = uv_now(&fx->loop);
    for (int i = 0; i < A; i++)
        issue_get(fx->r, &a[i], 200, "k");
    assert_true(run_until(&fx->loop, cond_idle, fx->r, 3000));
    uint64_t took = uv_now(&fx->loop) - t0;
    vqkvd_redis_stats_t st = stats_of(fx->r);
    assert_int_equal(kill(fx->pid[0], SIGCONT), 0);
    assert_true(took >= 200 && took < 1000);
    for (int i = 0; i < A; i++) {
        assert_int_equal(a[i].calls, 1);
        assert_int_equal(a[i].status, VQKVD_REDIS_TIMEOUT);
    }
    assert_int_equal(st.timeouts, A);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, A * get_bytes("k"));
    assert_true(run_until(&fx->loop, cond_no_bytes, fx->r, 3000));
    for (int i = 0; i < A; i++)
        assert_int_equal(a[i].calls, 1);
    st = stats_of(fx->r);
    assert_int_equal(st.disconnects, 0);
    assert_int_equal(st.connects, 1);
    issue_get(fx->r, &res, 2000, "k");
    wait_one(fx, &res);
    assert_reply_str(&res, REDIS_REPLY_STRING, "v");

    /* Stopped for longer: after a timeout and twice the deadline without
     * a reply the connection is dropped; the new one's handshake gets no
     * answer either (the kernel accepts, the server does not reply), so
     * it fails at the connect timeout; after SIGCONT it comes up. */
    assert_int_equal(kill(fx->pid[0], SIGSTOP), 0);
    for (int i = 0; i < B; i++)
        issue_get(fx->r, &b[i], 200, "k");
    assert_true(run_until(&fx->loop, cond_disconnected, fx->r, 3000));
    for (int i = 0; i < B; i++) {
        assert_int_equal(b[i].calls, 1);
        assert_int_equal(b[i].status, VQKVD_REDIS_TIMEOUT);
    }
    st = stats_of(fx->r);
    assert_int_equal(st.pending_bytes, 0); /* the late replies went with the connection */
    assert_true(run_until(&fx->loop, cond_connect_failed, fx->r, 3000));
    assert_int_equal(kill(fx->pid[0], SIGCONT), 0);
    assert_true(run_until(&fx->loop, cond_up, fx->r, 7000));
    issue_get(fx->r, &res, 2000, "k");
    wait_one(fx, &res);
    assert_reply_str(&res, REDIS_REPLY_STRING, "v");
    for (int i = 0; i < A; i++)
        res_clear(&a[i]);
    for (int i = 0; i < B; i++) {
        assert_int_equal(b[i].calls, 1);
        res_clear(&b[i]);
    }
    st = stats_of(fx->r);
    assert_int_equal(st.timeouts, A + B);
    assert_int_equal(st.connects, 2);
    assert_int_equal(st.disconnects, 1);
    assert_true(st.connect_failures >= 1);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    res_clear(&res);
    close_client(fx);
    fx->passed = true;
}

/* ---- 6. Redis Cluster, resharded under traffic ------------------------------------- */

#define KEYS 1000
#define WINDOW 32

typedef struct {
    vqkvd_redis_t *r;
    uint32_t gen[KEYS]; /* the value last written: "v<key>-<gen>" */
    bool busy[KEYS];    /* a command on the key is in flight */
    uint32_t next;      /* the key to look at next */
    uint32_t in_flight;
    uint64_t sets, gets, bad; /* answers: right, and wrong (any) */
    char first_bad[256];
    pid_t child; /* the resharding redis-cli, until it exits */
    int child_status;
    uv_timer_t tick;
} traffic_t;

typedef struct {
    traffic_t *t;
    uint32_t key;
    uint32_t gen; /* written by a SET, expected by a GET */
    bool set;
} op_t;

static void key_name(char *out, size_t cap, uint32_t i)
{
    snprintf(out, cap, "key:%u", i);
}

static void value_of(char *out, size_t cap, uint32_t key, uint32_t gen)
{
    snprintf(out, cap, "v%u-%u", key, gen);
}

static void traffic_bad(traffic_t *t, const char *fmt, ...)
{
    if (t->bad++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t->first_bad, sizeof t->first_bad, fmt, ap);
        va_end(ap);
    }
}

static void traffic_issue(traffic_t *t);

static void on_op(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    op_t *op = arg;
    traffic_t *t = op->t;
    char want[64];
    value_of(want, sizeof want, op->key, op->gen);
    if (status != VQKVD_REDIS_REPLY)
        traffic_bad(t, "key %u: status %d", op->key, status);
    else if (reply->type == REDIS_REPLY_ERROR)
        traffic_bad(t, "key %u: %s", op->key, reply->str);
    else if (op->set && !(reply->type == REDIS_REPLY_STATUS && strcmp(reply->str, "OK") == 0))
        traffic_bad(t, "key %u: SET answered type %d", op->key, reply->type);
    else if (!op->set && !(reply->type == REDIS_REPLY_STRING && strcmp(reply->str, want) == 0))
        traffic_bad(t, "key %u: GET gave %s, not %s", op->key,
                    reply->type == REDIS_REPLY_STRING ? reply->str : "no string", want);
    else if (op->set)
        t->sets++;
    else
        t->gets++;
    if (status == VQKVD_REDIS_REPLY && op->set && reply->type == REDIS_REPLY_STATUS)
        t->gen[op->key] = op->gen;
    t->busy[op->key] = false;
    t->in_flight--;
    free(op);
}

/* Tops the commands in flight up to WINDOW, one per key at most, so that
 * every GET knows the value to expect: a SET of the next generation, or a
 * GET. Every millisecond, not on each answer, so that the loop leaves the
 * servers and the resharding some of the machine's CPU. */
static void traffic_issue(traffic_t *t)
{
    while (t->in_flight < WINDOW) {
        uint32_t k = t->next;
        t->next = (t->next + 7) % KEYS;
        if (t->busy[k])
            continue;
        op_t *op = malloc(sizeof *op);
        assert_non_null(op);
        op->t = t;
        op->key = k;
        op->set = (t->sets + t->gets) % 2 == 0;
        op->gen = op->set ? t->gen[k] + 1 : t->gen[k];
        char key[32], value[64];
        key_name(key, sizeof key, k);
        value_of(value, sizeof value, k, op->gen);
        const char *argv[] = {op->set ? "SET" : "GET", key, value};
        t->busy[k] = true;
        t->in_flight++;
        assert_ok(vqkvd_redis_command(t->r, key, strlen(key), op->set ? 3 : 2, argv, NULL, 5000,
                                      on_op, op));
    }
}

static void traffic_tick(uv_timer_t *h)
{
    traffic_t *t = h->data;
    if (t->child > 0 && waitpid(t->child, &t->child_status, WNOHANG) == t->child)
        t->child = 0;
    traffic_issue(t);
}

static bool cond_resharded(void *ctx)
{
    traffic_t *t = ctx;
    return t->child == 0;
}

static bool cond_quiet(void *ctx)
{
    traffic_t *t = ctx;
    return t->in_flight == 0;
}

/* Writes (set) or reads back every key through the client, one generation
 * each, and checks every answer. */
static void all_keys(fx_t *fx, traffic_t *t, bool set)
{
    uint64_t before = t->sets + t->gets;
    for (uint32_t k = 0; k < KEYS; k++) {
        op_t *op = malloc(sizeof *op);
        assert_non_null(op);
        *op = (op_t){.t = t, .key = k, .set = set, .gen = set ? t->gen[k] + 1 : t->gen[k]};
        char key[32], value[64];
        key_name(key, sizeof key, k);
        value_of(value, sizeof value, k, op->gen);
        const char *argv[] = {set ? "SET" : "GET", key, value};
        t->busy[k] = true;
        t->in_flight++;
        assert_ok(
            vqkvd_redis_command(fx->r, key, strlen(key), set ? 3 : 2, argv, NULL, 5000, on_op, op));
    }
    assert_true(run_until(&fx->loop, cond_quiet, t, 20000));
    if (t->bad != 0)
        fail_msg("%llu wrong answers; the first: %s", (unsigned long long)t->bad, t->first_bad);
    assert_int_equal(t->sets + t->gets - before, KEYS);
}

static long dbsize(int port)
{
    char out[64];
    assert_int_equal(cli(out, sizeof out, "-p %d DBSIZE", port), 0);
    return strtol(out, NULL, 10);
}

static void test_cluster_reshard(void **state)
{
    fx_t *fx = *state;
    char ports[SERVERS_MAX][16], out[4096], ids[SERVERS_MAX][64];
    for (int i = 0; i < SERVERS_MAX; i++) {
        /* No node's port or bus port (+10000) may be another's. */
        bool clash;
        do {
            fx->port[i] = free_port(true);
            clash = false;
            for (int k = 0; k < i; k++)
                clash |= abs(fx->port[i] - fx->port[k]) % 10000 == 0;
        } while (clash);
        snprintf(ports[i], sizeof ports[i], "%d", fx->port[i]);
        const char *extra[] = {"--port",
                               ports[i],
                               "--bind",
                               "127.0.0.1",
                               "--cluster-enabled",
                               "yes",
                               "--cluster-config-file",
                               "nodes.conf",
                               "--cluster-node-timeout",
                               "2000",
                               NULL};
        server_start(fx, i, extra);
    }
    for (int i = 0; i < SERVERS_MAX; i++)
        server_wait(NULL, fx->port[i]);
    if (cli(out, sizeof out,
            "--cluster create 127.0.0.1:%d 127.0.0.1:%d 127.0.0.1:%d --cluster-replicas 0 "
            "--cluster-yes",
            fx->port[0], fx->port[1], fx->port[2]) != 0)
        fail_msg("redis-cli --cluster create failed: %s", out);
    long deadline = now_ms() + 20000;
    for (int i = 0; i < SERVERS_MAX; i++) {
        while (cli(out, sizeof out, "-p %d CLUSTER INFO", fx->port[i]) != 0 ||
               strstr(out, "cluster_state:ok") == NULL) {
            if (now_ms() > deadline)
                fail_msg("the cluster is not ok: %s", out);
            sleep_ms(50);
        }
        assert_int_equal(cli(ids[i], sizeof ids[i], "-p %d CLUSTER MYID", fx->port[i]), 0);
    }

    /* Two seeds, the second as a redis:// URL of its own. */
    char spec[128];
    snprintf(spec, sizeof spec, "cluster://127.0.0.1:%d,redis://127.0.0.1:%d", fx->port[0],
             fx->port[1]);
    create_up(fx, spec, NULL, 2000, 10000);
    vqkvd_redis_stats_t st = stats_of(fx->r);
    assert_int_equal(st.nodes, 3);
    assert_int_equal(st.nodes_up, 3);
    assert_true(st.slot_refreshes >= 1);

    /* The slot hash is Redis's. */
    const char *samples[] = {"foo", "key:17", "{user1000}.following", "a{}b", "x{{y}}z"};
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
        assert_int_equal(
            cli(out, sizeof out, "-p %d CLUSTER KEYSLOT '%s'", fx->port[0], samples[i]), 0);
        assert_int_equal(strtol(out, NULL, 10), vqkvd_redis_slot(samples[i], strlen(samples[i])));
    }

    traffic_t *t = calloc(1, sizeof *t);
    assert_non_null(t);
    t->r = fx->r;
    all_keys(fx, t, true);
    all_keys(fx, t, false);
    long before[SERVERS_MAX], after[SERVERS_MAX];
    for (int i = 0; i < SERVERS_MAX; i++) {
        before[i] = dbsize(fx->port[i]);
        assert_true(before[i] > 0);
    }
    assert_int_equal(before[0] + before[1] + before[2], KEYS);
    st = stats_of(fx->r);
    assert_int_equal(st.moved + st.ask, 0);
    uint64_t refreshes = st.slot_refreshes;

    /* 2000 slots from the first node to the second, by redis-cli in a
     * child, while the loop keeps WINDOW commands in flight. */
    char from[128], to[128], node[32], log[320];
    snprintf(from, sizeof from, "%s", ids[0]);
    snprintf(to, sizeof to, "%s", ids[1]);
    snprintf(node, sizeof node, "127.0.0.1:%d", fx->port[0]);
    snprintf(log, sizeof log, "%s/reshard.log", fx->dir);
    char *argv[] = {"redis-cli",    "--cluster", "reshard",         node,   "--cluster-from", from,
                    "--cluster-to", to,          "--cluster-slots", "2000", "--cluster-yes",  NULL};
    uint64_t ops_before = t->sets + t->gets;
    t->child = spawn(argv, log);
    uv_timer_init(&fx->loop, &t->tick);
    t->tick.data = t;
    uv_timer_start(&t->tick, traffic_tick, 0, 1);
    bool finished = run_until(&fx->loop, cond_resharded, t, 40000);
    uv_close((uv_handle_t *)&t->tick, NULL);
    assert_true(run_until(&fx->loop, cond_quiet, t, 20000));
    if (!finished) {
        kill(t->child, SIGKILL);
        waitpid(t->child, NULL, 0);
        fail_msg("resharding did not end within 40 s");
    }
    assert_true(WIFEXITED(t->child_status) && WEXITSTATUS(t->child_status) == 0);
    if (t->bad != 0)
        fail_msg("%llu wrong answers during resharding; the first: %s", (unsigned long long)t->bad,
                 t->first_bad);
    st = stats_of(fx->r);
    print_message("during resharding: %llu commands, %llu MOVED, %llu ASK, %llu reloads\n",
                  (unsigned long long)(t->sets + t->gets - ops_before),
                  (unsigned long long)st.moved, (unsigned long long)st.ask,
                  (unsigned long long)(st.slot_refreshes - refreshes));
    assert_true(t->sets + t->gets - ops_before > 0);
    assert_true(st.moved + st.ask > 0);
    assert_true(st.slot_refreshes > refreshes);

    /* Every key reads back with its last value, wherever it is now. */
    all_keys(fx, t, false);
    for (int i = 0; i < SERVERS_MAX; i++)
        after[i] = dbsize(fx->port[i]);
    assert_int_equal(after[0] + after[1] + after[2], KEYS);
    assert_true(after[0] < before[0]);
    assert_int_equal(after[1] - before[1], before[0] - after[0]);
    assert_int_equal(after[2], before[2]);
    st = stats_of(fx->r);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.timeouts, 0);
    assert_int_equal(st.disconnects, 0);
    assert_true(vqkvd_redis_up(fx->r));
    free(t);
    close_client(fx);
    fx->passed = true;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* hiredis writes to servers the test kills */
    const struct CMUnitTest specs[] = {
        cmocka_unit_test(test_specs),
    };
    const struct CMUnitTest servers[] = {
        cmocka_unit_test_setup_teardown(test_nothing_listening, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_tcp_auth_db, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unix_wrong_password, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_killed_restarted, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_stopped, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_cluster_reshard, fx_setup, fx_teardown),
    };
    int failed = cmocka_run_group_tests_name("specs", specs, NULL, NULL);
    if (failed != 0)
        return failed;
    if (!on_path("redis-server") || !on_path("redis-cli")) {
        fprintf(stderr, "\n*** test_redis: SKIPPED the server tests: redis-server or redis-cli "
                        "is not on PATH (Debian: redis-server, redis-tools) ***\n\n");
        return 77;
    }
    return cmocka_run_group_tests_name("servers", servers, NULL, NULL);
}
