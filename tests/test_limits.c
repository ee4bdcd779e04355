/* test_limits.c -- vqkvd's limits, each reached through the daemon binary
 * and each answered with a clear error while the daemon goes on serving
 * everyone else: the frame size (max_frame: a frame of exactly the limit
 * is read, one byte more gets VQKV_ETOOBIG naming the limit and the
 * connection is closed; libvqkv refuses to send one), regions per
 * connection (max_regions), requests in flight per connection
 * (max_inflight: a client that pipelines without reading gets one reply
 * per request, VQKV_ELIMIT for the excess, and is never dropped), clients
 * (max_clients) and the allow list (a peer whose uid and gid are not on
 * it is refused; its gid alone lets it in). Limits are set in the config
 * file the test writes. The allow-list test runs its peers as other uids,
 * so it needs root and is skipped, loudly, otherwise.
 *
 * test_daemon.c covers the default limits on the wire (a length field far
 * over max_frame, 1000 requests in one write); this file covers
 * configured limits and what a client sees at each.
 */
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "libvqkv_harness.h"

#define TIMEOUT_MS 5000
#define MODEL "test/limits@main"

static const vqkv_layout_t layout = {1, 1, 64, 16, VQKV_DTYPE_F16};

/* Starts d with a config file holding text (the keys of daemon/vqkvd.conf). */
static void start_with_config(daemon_t *d, const char *text)
{
    daemon_prepare(d);
    FILE *f = fopen(d->config, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    d->pid = daemon_spawn(d, NULL);
    daemon_wait_listening(d);
}

static void stop_and_clean(daemon_t *d)
{
    daemon_stop(d);
    daemon_cleanup(d);
}

/* Hello on a raw connection; returns the Welcome envelope. */
static Vqkv__Envelope *raw_hello(client_t *c)
{
    Vqkv__Hello hello = VQKV__HELLO__INIT;
    hello.protocol_version = VQKV_PROTO_VERSION;
    hello.client_name = "test_limits";
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    uint64_t id = send_env(c, &env);
    Vqkv__Envelope *w = recv_env(c);
    assert_int_equal(w->request_id, id);
    assert_int_equal(w->body_case, VQKV__ENVELOPE__BODY_WELCOME);
    return w;
}

/* The next frame on c is the daemon's Error `code` for the whole
 * connection (request_id 0) with a message holding `says`; then the
 * daemon closes (EOF, or a reset when it left bytes of ours unread). */
static void expect_refused(client_t *c, int code, const char *says)
{
    Vqkv__Envelope *env = recv_env(c);
    assert_int_equal(env->body_case, VQKV__ENVELOPE__BODY_ERROR);
    assert_int_equal(env->request_id, 0);
    assert_prc(env->error->code, code);
    if (strstr(env->error->message, says) == NULL)
        fail_msg("the error says \"%s\", not \"%s\"", env->error->message, says);
    vqkv_frame_envelope_free(env);
    vqkv_frame_t frame;
    int rc = vqkv_frame_recv(c->fd, &c->reader, &frame);
    if (rc != VQKV_ECLOSED && rc != VQKV_EIO)
        fail_msg("the connection is still open after the refusal (%s)", vqkv_proto_strerror(rc));
}

/* A worker's connection with the test model; *m is its model. */
static vqkv_client_t *open_client(const daemon_t *d, vqkv_model_t **m)
{
    vqkv_client_t *c = NULL;
    assert_vqkv(vqkv_connect(d->path, "test_limits", TIMEOUT_MS, &c), VQKV_OK);
    if (m != NULL)
        assert_vqkv(vqkv_register_model(c, MODEL, &layout, "fp16", m), VQKV_OK);
    return c;
}

static uint32_t daemon_clients(vqkv_client_t *c)
{
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    return st.clients;
}

/* ---- max_frame --------------------------------------------------------------- */

/* A FindModel frame (length prefix included) whose packed Envelope is
 * exactly `bytes` long, padded by its model_id. */
static uint8_t *find_model_frame(uint64_t id, uint32_t bytes, size_t *len)
{
    Vqkv__FindModel fm = VQKV__FIND_MODEL__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_FIND_MODEL;
    env.find_model = &fm;
    char *name = malloc(bytes + 1);
    assert_non_null(name);
    size_t n = bytes / 2;
    for (int tries = 0;; tries++) {
        assert_true(tries < 8);
        memset(name, 'a', n);
        name[n] = '\0';
        fm.model_id = name;
        size_t packed = vqkv__envelope__get_packed_size(&env);
        if (packed == bytes)
            break;
        n = n + bytes - packed;
    }
    uint8_t *buf;
    assert_prc(vqkv_frame_encode(&env, VQKV_FRAME_LIMIT, &buf, len), VQKV_OK);
    assert_int_equal(*len, VQKV_FRAME_HEADER_BYTES + bytes);
    free(name);
    return buf;
}

/* Sends what the socket takes of buf: the daemon may close the
 * connection before a refused frame is all sent. */
static void send_some(int fd, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        buf += n;
        len -= (size_t)n;
    }
}

static void test_frame_limit(void **state)
{
    daemon_t *d = *state;
    vqkv_model_t *m;
    vqkv_client_t *good = open_client(d, &m);
    client_t bad;
    client_open(&bad, d);
    Vqkv__Envelope *w = raw_hello(&bad);
    uint32_t max_frame = w->welcome->max_frame_bytes;
    vqkv_frame_envelope_free(w);
    assert_true(max_frame > 1024 && max_frame < VQKV_FRAME_LIMIT);

    /* Exactly max_frame bytes: read and answered (the id is too long to
     * be a model's), and the connection goes on. */
    size_t len;
    uint8_t *frame = find_model_frame(bad.next_id, max_frame, &len);
    send_some(bad.fd, frame, len);
    free(frame);
    expect_error(recv_env(&bad), bad.next_id++, VQKV_EINVAL);

    /* One byte more: VQKV_ETOOBIG naming the limit, then closed. */
    char limit[16];
    snprintf(limit, sizeof limit, "%u", max_frame);
    frame = find_model_frame(bad.next_id++, max_frame + 1, &len);
    send_some(bad.fd, frame, len);
    free(frame);
    expect_refused(&bad, VQKV_ETOOBIG, limit);
    client_close(&bad);

    /* libvqkv does not send a request over the limit: a lookup of more
     * keys than fit is refused before it leaves, and the connection is
     * still good. */
    size_t n_keys = max_frame / VQKV_KEY_BYTES + 1, found = 0;
    uint8_t(*keys)[VQKV_KEY_BYTES] = calloc(n_keys, VQKV_KEY_BYTES);
    assert_non_null(keys);
    vqkv_lease_t lease = 0;
    assert_vqkv(
        vqkv_lookup(good, m, (const uint8_t(*)[VQKV_KEY_BYTES])keys, n_keys, &found, &lease),
        VQKV_ETOOBIG);
    assert_non_null(strstr(vqkv_last_error(good), limit));
    free(keys);

    /* The other client was never touched; the refused one is gone. */
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (daemon_clients(good) != 1)
        assert_true(now_ms() < deadline);
    vqkv_close(good);
}

/* ---- max_regions ------------------------------------------------------------- */

/* Registers a fresh memfd of SLOTS slots on c; returns the library's code. */
static int register_region(vqkv_client_t *c, const vqkv_model_t *m, int *fd, vqkv_region_t *r)
{
    vqkv_kv_view_t view;
    vqkv_kv_view_vllm(&view, &layout, 2);
    assert_vqkv(vqkv_memfd_create("test_limits", view.region_bytes, fd), VQKV_OK);
    return vqkv_register_memfd_region(c, m, *fd, view.region_bytes, 0, &view, r);
}

static void test_region_limit(void **state)
{
    (void)state;
    daemon_t d;
    start_with_config(&d, "[vqkvd]\nmax_regions = 2\n");
    vqkv_model_t *m, *m2;
    vqkv_client_t *c = open_client(&d, &m);
    int fds[4];
    vqkv_region_t r[4];
    assert_vqkv(register_region(c, m, &fds[0], &r[0]), VQKV_OK);
    assert_vqkv(register_region(c, m, &fds[1], &r[1]), VQKV_OK);
    assert_vqkv(register_region(c, m, &fds[2], &r[2]), VQKV_ELIMIT);
    if (strstr(vqkv_last_error(c), "2 regions") == NULL)
        fail_msg("the error says \"%s\", not the limit of 2 regions", vqkv_last_error(c));

    /* The connection and its regions still work... */
    uint8_t key[1][VQKV_KEY_BYTES];
    uint32_t tokens[16] = {1}, slot = 1;
    size_t n = 0;
    vqkv_put_status_t st;
    assert_vqkv(vqkv_model_block_keys(m, NULL, tokens, 16, NULL, 0, key, 1, &n), VQKV_OK);
    assert_int_equal(
        vqkv_put(c, m, r[1], (const uint8_t(*)[VQKV_KEY_BYTES])key, NULL, &slot, 1, &st), 1);
    /* ...and the limit is per connection. */
    vqkv_client_t *c2 = open_client(&d, &m2);
    assert_vqkv(register_region(c2, m2, &fds[3], &r[3]), VQKV_OK);

    vqkv_close(c2);
    vqkv_close(c);
    for (int i = 0; i < 4; i++)
        close(fds[i]);
    stop_and_clean(&d);
}

/* ---- max_inflight ------------------------------------------------------------ */

#define PIPELINED 20000

typedef struct {
    int fd;
    uint8_t *buf;
    size_t len;
    size_t sent; /* len when all of it went */
} writer_t;

/* Writes all of w->buf, waiting out the socket's send timeout as often as
 * it takes: the daemon stops reading a client whose replies pile up, and
 * the reader side of the test lets them pile up on purpose. */
static void *writer_main(void *arg)
{
    writer_t *w = arg;
    while (w->sent < w->len) {
        ssize_t n = send(w->fd, w->buf + w->sent, w->len - w->sent, MSG_NOSIGNAL);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (n <= 0)
            break;
        w->sent += (size_t)n;
    }
    return NULL;
}

/* n Stats requests from id first on, encoded back to back. */
static uint8_t *stats_batch(uint64_t first, uint32_t n, size_t *len)
{
    Vqkv__Stats stats = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &stats;
    size_t cap = (size_t)n * 16, used = 0;
    uint8_t *all = malloc(cap);
    assert_non_null(all);
    for (uint32_t i = 0; i < n; i++) {
        env.request_id = first + i;
        uint8_t *buf;
        size_t blen;
        assert_prc(vqkv_frame_encode(&env, VQKV_FRAME_DEFAULT_MAX, &buf, &blen), VQKV_OK);
        assert_true(used + blen <= cap);
        memcpy(all + used, buf, blen);
        used += blen;
        free(buf);
    }
    *len = used;
    return all;
}

/* Bytes waiting in fd's receive queue. */
static int unread_bytes(int fd)
{
    int n = 0;
    assert_int_equal(ioctl(fd, FIONREAD, &n), 0);
    return n;
}

static void test_inflight_limit(void **state)
{
    (void)state;
    daemon_t d;
    start_with_config(&d, "[vqkvd]\nmax_inflight = 4\n");
    client_t a;
    client_open(&a, &d);
    Vqkv__Envelope *welcome = raw_hello(&a);
    uint32_t limit = welcome->welcome->max_inflight;
    vqkv_frame_envelope_free(welcome);
    assert_int_equal(limit, 4);
    vqkv_client_t *b = open_client(&d, NULL);

    /* a pipelines far more requests than its replies' socket buffer
     * holds and reads none until the daemon has stopped writing to it:
     * the daemon refuses the excess and then stops reading a. */
    writer_t w = {.fd = a.fd};
    uint64_t first = a.next_id;
    w.buf = stats_batch(first, PIPELINED, &w.len);
    a.next_id += PIPELINED;
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, writer_main, &w), 0);
    long deadline = now_ms() + DAEMON_DEADLINE_MS, still_since = now_ms();
    int last = -1;
    while (now_ms() - still_since < 300) {
        assert_true(now_ms() < deadline);
        int now = unread_bytes(a.fd);
        if (now != last || now == 0)
            still_since = now_ms();
        last = now;
        sleep_ms(10);
    }
    /* Meanwhile everyone else is served. */
    assert_int_equal(daemon_clients(b), 2);

    /* Every request gets exactly one reply, in order: a StatsReply, or
     * VQKV_ELIMIT naming the limit. The first `limit` are never refused. */
    uint32_t refused = 0;
    for (uint32_t i = 0; i < PIPELINED; i++) {
        Vqkv__Envelope *reply = recv_env(&a);
        assert_int_equal(reply->request_id, first + i);
        if (reply->body_case == VQKV__ENVELOPE__BODY_ERROR) {
            assert_true(i >= limit);
            assert_prc(reply->error->code, VQKV_ELIMIT);
            assert_non_null(strstr(reply->error->message, "4 requests in flight"));
            refused++;
        } else {
            assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
        }
        vqkv_frame_envelope_free(reply);
    }
    assert_int_equal(pthread_join(thread, NULL), 0);
    assert_int_equal(w.sent, w.len);
    free(w.buf);
    print_message("%u of %d pipelined requests refused with VQKV_ELIMIT\n", refused, PIPELINED);
    assert_true(refused > 0);

    /* a is still served, one request at a time. */
    w.buf = stats_batch(a.next_id, 1, &w.len);
    send_some(a.fd, w.buf, w.len);
    free(w.buf);
    Vqkv__Envelope *reply = recv_env(&a);
    assert_int_equal(reply->request_id, a.next_id);
    assert_int_equal(reply->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
    vqkv_frame_envelope_free(reply);
    client_close(&a);
    vqkv_close(b);
    stop_and_clean(&d);
}

/* ---- max_clients ------------------------------------------------------------- */

static void test_client_limit(void **state)
{
    (void)state;
    daemon_t d;
    start_with_config(&d, "[vqkvd]\nmax_clients = 3\n");
    vqkv_client_t *c[3];
    for (int i = 0; i < 3; i++)
        c[i] = open_client(&d, NULL);

    /* A fourth is told why, closed, and counted nowhere. */
    client_t extra;
    client_open(&extra, &d);
    expect_refused(&extra, VQKV_ELIMIT, "3 clients");
    client_close(&extra);
    vqkv_client_t *refused = NULL;
    assert_vqkv(vqkv_connect(d.path, "test_limits", TIMEOUT_MS, &refused), VQKV_ELIMIT);
    assert_null(refused);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (daemon_clients(c[0]) != 3)
        assert_true(now_ms() < deadline);

    /* When one leaves, the next gets in (once the daemon has seen it go). */
    vqkv_close(c[2]);
    deadline = now_ms() + DAEMON_DEADLINE_MS;
    int rc;
    while ((rc = vqkv_connect(d.path, "test_limits", TIMEOUT_MS, &c[2])) == VQKV_ELIMIT)
        assert_true(now_ms() < deadline);
    assert_vqkv(rc, VQKV_OK);
    assert_int_equal(daemon_clients(c[1]), 3);
    for (int i = 0; i < 3; i++)
        vqkv_close(c[i]);
    stop_and_clean(&d);
}

/* ---- the allow list ---------------------------------------------------------- */

#define REFUSED_ID 65533
#define GROUP_ONLY_UID 65532
#define ALLOWED_GID 65534

/* As a uid and gid off the allow list: an Error VQKV_EPERM for the whole
 * connection that names the uid, then EOF. Exit status: the failed check. */
static int refused_uid(const void *arg)
{
    const daemon_t *d = arg;
    vqkv_frame_reader_t reader;
    vqkv_frame_t frame;
    Vqkv__Envelope *env = NULL;
    int fd = try_connect(d->path);
    if (fd < 0 || vqkv_frame_reader_init(&reader, VQKV_FRAME_DEFAULT_MAX) != VQKV_OK)
        return 1;
    if (vqkv_frame_recv(fd, &reader, &frame) != VQKV_OK)
        return 2;
    int rc = vqkv_frame_unpack(frame.data, frame.len, &env);
    vqkv_frame_clear(&frame);
    if (rc != VQKV_OK || env->body_case != VQKV__ENVELOPE__BODY_ERROR || env->request_id != 0 ||
        env->error->code != VQKV_EPERM)
        return 3;
    char uid[32];
    snprintf(uid, sizeof uid, "uid %d", REFUSED_ID);
    if (strstr(env->error->message, uid) == NULL)
        return 4;
    vqkv_frame_envelope_free(env);
    if (vqkv_frame_recv(fd, &reader, &frame) != VQKV_ECLOSED)
        return 5;
    vqkv_frame_reader_free(&reader);
    close(fd);
    return 0;
}

/* As a uid off the list whose gid is on it: served. */
static int allowed_by_gid(const void *arg)
{
    const daemon_t *d = arg;
    vqkv_client_t *c = NULL;
    vqkv_stats_t st;
    if (vqkv_connect(d->path, "test_limits-gid", TIMEOUT_MS, &c) != VQKV_OK)
        return 1;
    int rc = vqkv_stats(c, &st);
    vqkv_close(c);
    return rc == VQKV_OK && st.clients == 2 ? 0 : 2;
}

static void test_allow_list(void **state)
{
    (void)state;
    if (geteuid() != 0) {
        fprintf(stderr, "test_allow_list: SKIPPED: needs root to run peers as uids %d and %d\n",
                REFUSED_ID, GROUP_ONLY_UID);
        skip();
    }
    char uid[16], gid[16];
    snprintf(uid, sizeof uid, "%u", (unsigned)getuid());
    snprintf(gid, sizeof gid, "%d", ALLOWED_GID);
    const char *const extra[] = {"--allow-uid", uid, "--allow-gid", gid, NULL};
    daemon_t d;
    daemon_start(&d, extra);
    daemon_open_to_all(&d);
    vqkv_client_t *c = open_client(&d, NULL);
    assert_int_equal(run_as(REFUSED_ID, REFUSED_ID, refused_uid, &d), 0);
    assert_int_equal(run_as(GROUP_ONLY_UID, ALLOWED_GID, allowed_by_gid, &d), 0);
    /* The allowed client saw none of it. */
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (daemon_clients(c) != 1)
        assert_true(now_ms() < deadline);
    vqkv_close(c);
    stop_and_clean(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_frame_limit, setup, teardown),
        cmocka_unit_test(test_region_limit),
        cmocka_unit_test(test_inflight_limit),
        cmocka_unit_test(test_client_limit),
        cmocka_unit_test(test_allow_list),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
