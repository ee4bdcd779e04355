/* daemon_harness.h -- what the tests that run vqkvd as a process share:
 * starting the binary (VQKVD_PATH) on a socket in a fresh temporary
 * directory, stopping it with SIGTERM and requiring exit status 0 and the
 * socket file gone (under ASan a leak makes the daemon exit non-zero),
 * running it with its output in a file and an environment of its own
 * (spawn_process), and a blocking client over proto/frame.h with 5 s
 * socket timeouts, so a hung daemon fails a test instead of blocking the
 * suite. Test-only: static
 * inline functions, so a test that uses only some of them compiles clean.
 *
 * $VQKV_DAEMON_WRAPPER, when set, is a command (words split at spaces, no
 * quoting) the daemon runs under, e.g. "valgrind --error-exitcode=99"
 * (tools/valgrind.sh); the deadlines and client timeouts below are then ten
 * times longer, since such a daemon starts, answers and exits slowly.
 */
#ifndef VQKV_DAEMON_HARNESS_H
#define VQKV_DAEMON_HARNESS_H

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "frame.h"
#include "test_assert.h" /* assert_prc */
#include "vqkv_codec.h"

/* 10 when the daemon runs under $VQKV_DAEMON_WRAPPER, else 1. */
static inline int daemon_slowdown(void)
{
    const char *w = getenv("VQKV_DAEMON_WRAPPER");
    return w != NULL && w[0] != '\0' ? 10 : 1;
}

#define CLIENT_TIMEOUT_S (5 * daemon_slowdown())
/* ASan makes the daemon slow to start and to stop. */
#define DAEMON_DEADLINE_MS (20000L * daemon_slowdown())

typedef struct {
    char dir[64];
    char path[96];
    char config[96]; /* an empty file: no installed vqkvd.conf applies */
    char state[96];  /* the state dir, so no test writes outside dir */
    pid_t pid;
} daemon_t;

typedef struct {
    int fd;
    vqkv_frame_reader_t reader;
    uint64_t next_id;
} client_t;

static inline long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* A seeded generator for the tests that make random choices about a
 * daemon (when to kill it, what to put): xorshift64*, small, seedable and
 * the same on every platform. One per test program. */
static uint64_t rng_state = 1;

static inline uint64_t rng_next(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(2685821657736338717);
}

static inline uint32_t rng_below(uint32_t n)
{
    return (uint32_t)(rng_next() % n);
}

/* The seed in environment variable env, else one from the time and pid;
 * never 0, printed with how to repeat it. */
static inline uint64_t rng_seed_from(const char *env, const char *program)
{
    const char *text = getenv(env);
    uint64_t seed =
        text != NULL ? strtoull(text, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    seed = seed != 0 ? seed : 1;
    printf("%s: seed %llu (%s=%llu repeats it)\n", program, (unsigned long long)seed, env,
           (unsigned long long)seed);
    return seed;
}

static inline int try_connect(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {CLIENT_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* In a child between fork and exec: the child gets SIGTERM when the test
 * process dies, so a test that fails (cmocka longjmps past its stop) never
 * leaves a daemon behind holding ctest's output pipe open. */
static inline void harness_die_with_parent(pid_t parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != parent)
        _exit(125);
}

/* Runs the daemon with extra arguments (NULL-terminated) on path, under
 * $VQKV_DAEMON_WRAPPER when set; returns its pid. Does not wait for it to
 * listen. */
static inline pid_t spawn_daemon(const char *path, const char *const *extra)
{
    char wrapper[1024];
    snprintf(wrapper, sizeof wrapper, "%s",
             daemon_slowdown() > 1 ? getenv("VQKV_DAEMON_WRAPPER") : "");
    const char *argv[48];
    size_t n = 0;
    for (char *save = NULL, *w = strtok_r(wrapper, " ", &save); w != NULL && n < 16;
         w = strtok_r(NULL, " ", &save))
        argv[n++] = w;
    const char *own[] = {VQKVD_PATH, "--socket", path, "--log-level", "debug"};
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
        argv[n++] = own[i];
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 47; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t parent = getpid(), pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        harness_die_with_parent(parent);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

/* Waits for pid to exit, sending it signum again at every poll when
 * signum is not 0; its wait status, or -1 after the deadline (then it is
 * killed). */
static inline int wait_exit_signalling(pid_t pid, int signum)
{
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    int status;
    while (now_ms() < deadline) {
        pid_t got = waitpid(pid, &status, WNOHANG);
        if (got == pid)
            return status;
        if (signum != 0)
            kill(pid, signum);
        sleep_ms(signum != 0 ? 1 : 5);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

static inline int wait_exit(pid_t pid)
{
    return wait_exit_signalling(pid, 0);
}

/* spawn_daemon on d's socket with d's empty config file and state dir
 * (made by daemon_start), so that no installed vqkvd.conf applies and
 * nothing is written outside d->dir; extra comes later, so it wins. */
static inline pid_t daemon_spawn(const daemon_t *d, const char *const *extra)
{
    const char *args[20] = {"--config", d->config, "--state-dir", d->state};
    size_t n = 4;
    for (size_t i = 0; extra != NULL && extra[i] != NULL && n < 19; i++)
        args[n++] = extra[i];
    args[n] = NULL;
    return spawn_daemon(d->path, args);
}

/* Waits until the daemon d->pid accepts on d->path; fails the test when it
 * exits first or does not listen before the deadline. */
static inline void daemon_wait_listening(daemon_t *d)
{
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    for (;;) {
        int fd = try_connect(d->path);
        if (fd >= 0) {
            close(fd);
            return;
        }
        int status;
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            d->pid = -1;
            fail_msg("vqkvd exited at start (status %#x)", status);
        }
        if (now_ms() > deadline)
            fail_msg("vqkvd did not listen on %s in time", d->path);
        sleep_ms(5);
    }
}

/* Makes d's temporary directory and empty config file and names its
 * socket and state dir; starts nothing (d->pid -1). */
static inline void daemon_prepare(daemon_t *d)
{
    snprintf(d->dir, sizeof d->dir, "/tmp/vqkvd-test.XXXXXX");
    assert_non_null(mkdtemp(d->dir));
    snprintf(d->path, sizeof d->path, "%s/vqkv.sock", d->dir);
    snprintf(d->config, sizeof d->config, "%s/vqkvd.conf", d->dir);
    snprintf(d->state, sizeof d->state, "%s/state", d->dir);
    FILE *f = fopen(d->config, "w");
    assert_non_null(f);
    fclose(f);
    d->pid = -1;
}

static inline void daemon_start(daemon_t *d, const char *const *extra)
{
    daemon_prepare(d);
    d->pid = daemon_spawn(d, extra);
    daemon_wait_listening(d);
}

/* Runs argv (argv[0] a path, NULL-terminated) with its stdout and stderr
 * appended to log (unless NULL) and env ("NAME=value" strings,
 * NULL-terminated, may be NULL) added to its environment; returns its pid.
 * For a daemon run under a wrapper, or with an environment of its own. */
static inline pid_t spawn_process(const char *const *argv, const char *log, const char *const *env)
{
    pid_t parent = getpid(), pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        harness_die_with_parent(parent);
        if (log != NULL) {
            int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
            if (fd < 0 || dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0)
                _exit(126);
        }
        for (size_t i = 0; env != NULL && env[i] != NULL; i++)
            putenv((char *)env[i]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

/* SIGTERM (with repeat, sent again every millisecond until the daemon
 * exits); requires exit status 0 and the socket file gone. */
static inline void daemon_stop_repeating(daemon_t *d, int repeat)
{
    if (d->pid <= 0)
        return;
    assert_int_equal(kill(d->pid, SIGTERM), 0);
    int status = wait_exit_signalling(d->pid, repeat ? SIGTERM : 0);
    d->pid = -1;
    assert_true(status != -1);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("vqkvd ended with wait status %#x, not exit 0", status);
    struct stat st;
    assert_int_equal(lstat(d->path, &st), -1);
    assert_int_equal(errno, ENOENT);
}

static inline void daemon_stop(daemon_t *d)
{
    daemon_stop_repeating(d, 0);
}

static inline int setup(void **state)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    daemon_start(d, NULL);
    return 0;
}

/* Removes what daemon_start made in d->dir (the daemon made the state
 * dir; a test that filled it empties it). */
static inline void daemon_cleanup(daemon_t *d)
{
    char secret[sizeof d->state + 16];
    snprintf(secret, sizeof secret, "%s/salt-secret", d->state);
    unlink(secret);
    unlink(d->path);
    unlink(d->config);
    rmdir(d->state);
    rmdir(d->dir);
}

static inline int teardown(void **state)
{
    daemon_t *d = *state;
    daemon_stop(d);
    daemon_cleanup(d);
    free(d);
    return 0;
}

/* ---- client helpers -------------------------------------------------------- */

static inline void client_open(client_t *c, const daemon_t *d)
{
    c->fd = try_connect(d->path);
    assert_true(c->fd >= 0);
    assert_prc(vqkv_frame_reader_init(&c->reader, VQKV_FRAME_DEFAULT_MAX), VQKV_OK);
    c->next_id = 1;
}

static inline void client_close(client_t *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    vqkv_frame_reader_free(&c->reader);
}

static inline uint64_t send_env(client_t *c, Vqkv__Envelope *env)
{
    env->request_id = c->next_id++;
    assert_prc(vqkv_frame_send(c->fd, env, NULL, 0, VQKV_FRAME_DEFAULT_MAX), VQKV_OK);
    return env->request_id;
}

static inline Vqkv__Envelope *recv_env(client_t *c)
{
    vqkv_frame_t frame;
    assert_prc(vqkv_frame_recv(c->fd, &c->reader, &frame), VQKV_OK);
    Vqkv__Envelope *env = NULL;
    assert_prc(vqkv_frame_unpack(frame.data, frame.len, &env), VQKV_OK);
    vqkv_frame_clear(&frame);
    assert_prc(vqkv_frame_check(env), VQKV_OK);
    return env;
}

/* A request (with fds) and its reply, checked to be for it; the caller
 * frees the reply. */
static inline Vqkv__Envelope *call(client_t *c, Vqkv__Envelope *env, const int *fds, size_t n_fds)
{
    env->request_id = c->next_id++;
    assert_prc(vqkv_frame_send(c->fd, env, fds, n_fds, VQKV_FRAME_DEFAULT_MAX), VQKV_OK);
    Vqkv__Envelope *reply = recv_env(c);
    assert_int_equal(reply->request_id, env->request_id);
    return reply;
}

/* A Hello of protocol version from a client called name; its id. */
static inline uint64_t send_hello(client_t *c, uint32_t version, const char *name)
{
    Vqkv__Hello h = VQKV__HELLO__INIT;
    h.protocol_version = version;
    h.client_name = (char *)name;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    return send_env(c, &env);
}

/* Hello, answered by a Welcome. */
static inline void hello(client_t *c, const char *name)
{
    uint64_t id = send_hello(c, VQKV_PROTO_VERSION, name);
    Vqkv__Envelope *r = recv_env(c);
    assert_int_equal(r->request_id, id);
    assert_int_equal(r->body_case, VQKV__ENVELOPE__BODY_WELCOME);
    vqkv_frame_envelope_free(r);
}

/* RegisterModel of model_id with every head of l, codec and the RoPE
 * fields as given (rope_style on the wire: 0 none); the reply. */
static inline Vqkv__Envelope *register_model_rope(client_t *c, const vqkv_layout_t *l,
                                                  const char *model_id, const char *codec,
                                                  double rope_theta, int rope_style)
{
    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = l->num_layers;
    wl.num_kv_heads = l->num_kv_heads;
    wl.head_dim = l->head_dim;
    wl.block_tokens = l->block_tokens;
    wl.dtype = (Vqkv__DType)l->dtype;
    Vqkv__RegisterModel rm = VQKV__REGISTER_MODEL__INIT;
    rm.model_id = (char *)model_id;
    rm.layout = &wl;
    rm.kv_head_count = l->num_kv_heads;
    rm.codec = (char *)codec;
    rm.rope_theta = rope_theta;
    rm.rope_style = (Vqkv__RopeStyle)rope_style;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_MODEL;
    env.register_model = &rm;
    return call(c, &env, NULL, 0);
}

/* RegisterModel of model_id with every head of l and codec; the reply. */
static inline Vqkv__Envelope *register_model(client_t *c, const vqkv_layout_t *l,
                                             const char *model_id, const char *codec)
{
    return register_model_rope(c, l, model_id, codec, 0.0, 0);
}

static inline void expect_error(Vqkv__Envelope *env, uint64_t id, int code)
{
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_ERROR);
    assert_int_equal(env->request_id, id);
    assert_prc(env->error->code, code);
    assert_true(strlen(env->error->message) > 0);
    vqkv_frame_envelope_free(env);
}

#endif
