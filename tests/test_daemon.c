/* test_daemon.c -- vqkvd as a process: each test starts the daemon binary
 * on a socket in a fresh temporary directory, talks to it with the blocking
 * client helpers of proto/frame.h, and stops it with SIGTERM, requiring
 * exit status 0 and the socket file gone (so under ASan a leak in the
 * daemon, which makes it exit non-zero, fails the test that caused it).
 *
 * Client sockets have 5 s receive and send timeouts, so a daemon that
 * hangs fails a test instead of blocking the suite.
 */
#include "daemon_harness.h"

static int setup_refusing(void **state)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    char uid[16];
    snprintf(uid, sizeof uid, "%u", (unsigned)getuid() + 1);
    const char *const extra[] = {"--allow-uid", uid, NULL};
    daemon_start(d, extra);
    return 0;
}

static void send_raw(client_t *c, const void *bytes, size_t len)
{
    assert_int_equal(send(c->fd, bytes, len, MSG_NOSIGNAL), (ssize_t)len);
}

static void expect_closed(client_t *c)
{
    vqkv_frame_t frame;
    assert_prc(vqkv_frame_recv(c->fd, &c->reader, &frame), VQKV_ECLOSED);
}

static uint64_t send_stats(client_t *c)
{
    Vqkv__Stats stats = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &stats;
    return send_env(c, &env);
}

/* Hello and its Welcome, checked; returns the Welcome envelope. */
static Vqkv__Envelope *hello_ok(client_t *c)
{
    uint64_t id = send_hello(c, VQKV_PROTO_VERSION, "test_daemon");
    Vqkv__Envelope *env = recv_env(c);
    assert_int_equal(env->request_id, id);
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_WELCOME);
    return env;
}

/* Stats and its reply; returns StatsReply.clients. */
static uint32_t stats_clients(client_t *c)
{
    uint64_t id = send_stats(c);
    Vqkv__Envelope *env = recv_env(c);
    assert_int_equal(env->request_id, id);
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
    const Vqkv__StatsReply *st = env->stats_reply;
    assert_int_equal(st->hits + st->misses + st->blocks + st->bytes_stored + st->evictions, 0);
    uint32_t clients = st->clients;
    vqkv_frame_envelope_free(env);
    return clients;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_hello_welcome(void **state)
{
    client_t a, b;
    client_open(&a, *state);
    client_open(&b, *state);
    Vqkv__Envelope *wa = hello_ok(&a);
    const Vqkv__Welcome *w = wa->welcome;
    assert_int_equal(w->protocol_version, VQKV_PROTO_VERSION);
    assert_int_equal(w->max_frame_bytes, VQKV_FRAME_DEFAULT_MAX);
    assert_true(w->max_inflight > 0);
    assert_true(w->max_regions > 0);
    assert_string_equal(w->backend, "cpu");
    assert_int_equal(w->n_devices, 0);
    char uid[16];
    snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
    assert_string_equal(w->tenant, uid);
    assert_int_equal(w->tenant_salt.len, 32);
    assert_true(strlen(w->server_version) > 0);

    /* Same tenant, same salt. */
    Vqkv__Envelope *wb = hello_ok(&b);
    assert_int_equal(wb->welcome->tenant_salt.len, 32);
    assert_memory_equal(wb->welcome->tenant_salt.data, w->tenant_salt.data, 32);
    vqkv_frame_envelope_free(wa);
    vqkv_frame_envelope_free(wb);

    /* A second Hello is refused; the connection goes on. */
    uint64_t id = send_hello(&a, VQKV_PROTO_VERSION, "test_daemon");
    expect_error(recv_env(&a), id, VQKV_EPROTO);
    assert_int_equal(stats_clients(&a), 2);
    client_close(&a);
    client_close(&b);
}

/* A Welcome's salt, copied. */
static void welcome_salt(const daemon_t *d, uint8_t salt[32])
{
    client_t c;
    client_open(&c, d);
    Vqkv__Envelope *w = hello_ok(&c);
    assert_int_equal(w->welcome->tenant_salt.len, 32);
    memcpy(salt, w->welcome->tenant_salt.data, 32);
    vqkv_frame_envelope_free(w);
    client_close(&c);
}

/* The tenant salts (and so every block key) survive a restart: their
 * secret is kept in the state directory, 0600; a secret others could read
 * stops the start rather than be used or replaced. */
static void test_salt_survives_restart(void **state)
{
    daemon_t *d = *state;
    uint8_t before[32], after[32];
    welcome_salt(d, before);
    daemon_stop(d);
    char secret[sizeof d->state + 16];
    snprintf(secret, sizeof secret, "%s/salt-secret", d->state);
    struct stat st;
    assert_int_equal(stat(secret, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(st.st_size, 32);

    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    welcome_salt(d, after);
    assert_memory_equal(before, after, 32);
    daemon_stop(d);

    assert_int_equal(chmod(secret, 0644), 0);
    int status = wait_exit(daemon_spawn(d, NULL));
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) != 0);
    assert_int_equal(chmod(secret, 0600), 0);
    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
    welcome_salt(d, after);
    assert_memory_equal(before, after, 32);
}

static void test_wrong_version(void **state)
{
    client_t c;
    client_open(&c, *state);
    uint64_t id = send_hello(&c, VQKV_PROTO_VERSION + 1, "test_daemon");
    expect_error(recv_env(&c), id, VQKV_EVERSION);
    /* No session yet, but the connection still works. */
    id = send_stats(&c);
    expect_error(recv_env(&c), id, VQKV_EPROTO);
    vqkv_frame_envelope_free(hello_ok(&c));
    client_close(&c);
}

static void test_stats_before_hello(void **state)
{
    client_t c;
    client_open(&c, *state);
    uint64_t id = send_stats(&c);
    expect_error(recv_env(&c), id, VQKV_EPROTO);
    vqkv_frame_envelope_free(hello_ok(&c));
    assert_int_equal(stats_clients(&c), 1);
    client_close(&c);
}

static void test_refused_requests(void **state)
{
    client_t c;
    client_open(&c, *state);
    vqkv_frame_envelope_free(hello_ok(&c));
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;

    /* Lookup is served, but names a model this connection never registered. */
    Vqkv__Lookup lookup = VQKV__LOOKUP__INIT;
    lookup.model_handle = 1;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
    env.lookup = &lookup;
    uint64_t id = send_env(&c, &env);
    expect_error(recv_env(&c), id, VQKV_EHANDLE);

    /* A reply type sent as a request. */
    Vqkv__Ack ack = VQKV__ACK__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_ACK;
    env.ack = &ack;
    id = send_env(&c, &env);
    expect_error(recv_env(&c), id, VQKV_EPROTO);
    assert_int_equal(stats_clients(&c), 1);
    client_close(&c);
}

static void test_garbage_frame(void **state)
{
    client_t c;
    client_open(&c, *state);
    vqkv_frame_envelope_free(hello_ok(&c));
    /* Five bytes that are no Envelope (field 31, wire type 7). */
    static const uint8_t garbage[] = {5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff};
    send_raw(&c, garbage, sizeof garbage);
    expect_error(recv_env(&c), 0, VQKV_EMALFORMED);
    /* An empty frame: an Envelope with no body. */
    static const uint8_t empty[] = {0, 0, 0, 0};
    send_raw(&c, empty, sizeof empty);
    expect_error(recv_env(&c), 0, VQKV_EUNKNOWN);
    assert_int_equal(stats_clients(&c), 1);
    client_close(&c);
}

static void test_oversized_frame(void **state)
{
    client_t good, bad;
    client_open(&good, *state);
    client_open(&bad, *state);
    vqkv_frame_envelope_free(hello_ok(&good));
    vqkv_frame_envelope_free(hello_ok(&bad));
    static const uint8_t huge[] = {0xff, 0xff, 0xff, 0x7f};
    send_raw(&bad, huge, sizeof huge);
    expect_error(recv_env(&bad), 0, VQKV_ETOOBIG);
    expect_closed(&bad);
    client_close(&bad);
    /* The other client is untouched; the closed one is gone from Stats
     * (its close may be seen a moment after this Stats, hence the loop). */
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (stats_clients(&good) != 1)
        assert_true(now_ms() < deadline);
    client_close(&good);
}

#define MANY 16

static void test_many_clients(void **state)
{
    client_t c[MANY];
    uint64_t ids[MANY];
    for (int i = 0; i < MANY; i++)
        client_open(&c[i], *state);
    /* Every Hello goes out before any Welcome is read. */
    for (int i = 0; i < MANY; i++)
        ids[i] = send_hello(&c[i], VQKV_PROTO_VERSION, "test_daemon");
    for (int i = 0; i < MANY; i++) {
        Vqkv__Envelope *env = recv_env(&c[i]);
        assert_int_equal(env->request_id, ids[i]);
        assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_WELCOME);
        vqkv_frame_envelope_free(env);
    }
    assert_int_equal(stats_clients(&c[0]), MANY);
    for (int i = MANY / 2; i < MANY; i++)
        client_close(&c[i]);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (stats_clients(&c[0]) != MANY / 2)
        assert_true(now_ms() < deadline);
    for (int i = 0; i < MANY / 2; i++)
        client_close(&c[i]);
}

/* Sends n Stats in one write; returns the first request id. */
static uint64_t send_stats_batch(client_t *c, uint32_t n)
{
    Vqkv__Stats stats = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &stats;
    uint8_t *all = NULL;
    size_t all_len = 0;
    uint64_t first = c->next_id;
    for (uint32_t i = 0; i < n; i++) {
        env.request_id = c->next_id++;
        uint8_t *buf;
        size_t len;
        assert_prc(vqkv_frame_encode(&env, VQKV_FRAME_DEFAULT_MAX, &buf, &len), VQKV_OK);
        all = realloc(all, all_len + len);
        assert_non_null(all);
        memcpy(all + all_len, buf, len);
        all_len += len;
        free(buf);
    }
    send_raw(c, all, all_len);
    free(all);
    return first;
}

/* max_inflight requests in one write are all answered; far more each get
 * exactly one reply, in order: a StatsReply, or VQKV_ELIMIT once the
 * daemon holds max_inflight unwritten replies. The first max_inflight are
 * never refused, and the connection stays usable. */
#define PIPELINED 1000

static void test_pipelined_requests(void **state)
{
    client_t c;
    client_open(&c, *state);
    Vqkv__Envelope *welcome = hello_ok(&c);
    uint32_t limit = welcome->welcome->max_inflight;
    assert_true(limit > 0 && limit < PIPELINED);
    vqkv_frame_envelope_free(welcome);

    uint64_t first = send_stats_batch(&c, limit);
    for (uint32_t i = 0; i < limit; i++) {
        Vqkv__Envelope *reply = recv_env(&c);
        assert_int_equal(reply->request_id, first + i);
        assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
        vqkv_frame_envelope_free(reply);
    }

    first = send_stats_batch(&c, PIPELINED);
    uint32_t refused = 0;
    for (uint32_t i = 0; i < PIPELINED; i++) {
        Vqkv__Envelope *reply = recv_env(&c);
        assert_int_equal(reply->request_id, first + i);
        if (reply->body_case == VQKV__ENVELOPE__BODY_ERROR) {
            assert_true(i >= limit);
            assert_prc(reply->error->code, VQKV_ELIMIT);
            refused++;
        } else {
            assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
        }
        vqkv_frame_envelope_free(reply);
    }
    print_message("%u of %d pipelined requests refused with VQKV_ELIMIT\n", refused, PIPELINED);
    assert_int_equal(stats_clients(&c), 1);
    client_close(&c);
}

static void test_refused_peer(void **state)
{
    client_t c;
    client_open(&c, *state);
    expect_error(recv_env(&c), 0, VQKV_EPERM);
    expect_closed(&c);
    client_close(&c);
}

static void test_sigterm_with_client(void **state)
{
    daemon_t *d = *state;
    client_t c;
    client_open(&c, d);
    vqkv_frame_envelope_free(hello_ok(&c));
    daemon_stop(d);
    expect_closed(&c);
    client_close(&c);
}

static void test_stale_socket(void **state)
{
    daemon_t *d = *state;
    /* A second daemon on the live socket refuses to start and leaves the
     * first one's socket alone. */
    pid_t second = daemon_spawn(d, NULL);
    int status = wait_exit(second);
    assert_true(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) != 0);
    client_t c;
    client_open(&c, d);
    vqkv_frame_envelope_free(hello_ok(&c));
    client_close(&c);
    daemon_stop(d);

    /* A socket file nobody listens on (a daemon that died) is replaced. */
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", d->path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof addr), 0);
    close(fd);
    d->pid = daemon_spawn(d, NULL);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while ((fd = try_connect(d->path)) < 0)
        assert_true(now_ms() < deadline);
    close(fd);
    struct stat st;
    assert_int_equal(stat(d->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0660);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hello_welcome, setup, teardown),
        cmocka_unit_test_setup_teardown(test_salt_survives_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_version, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stats_before_hello, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_oversized_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_clients, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined_requests, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_peer, setup_refusing, teardown),
        cmocka_unit_test_setup_teardown(test_sigterm_with_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stale_socket, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
