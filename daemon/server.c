/* server.c -- vqkvd's listening socket, clients and request dispatch.
 *
 * libuv's pipe API reads through its own buffers and cannot hand over the
 * SCM_RIGHTS fds a RegisterRegion carries (proto/README.md), so sockets are
 * plain non-blocking fds watched by uv_poll_t: readable means "call
 * vqkv_frame_reader_recv once", writable means "the reply queue may move".
 * epoll is level-triggered here, so reading once per wakeup and coming back
 * later loses nothing and keeps one busy client from starving the others.
 *
 * A client's life: accepted, checked with SO_PEERCRED (refused peers get an
 * Error VQKV_EPERM and are closed), Hello, then requests. Every request gets
 * exactly one reply, queued and written as the socket takes it. Requests
 * count as in flight until their reply has left for the kernel; past
 * max_inflight a request is refused with VQKV_ELIMIT, and when the queue
 * itself reaches twice that the client is not read at all until it drains,
 * so a peer that never reads its replies costs a bounded amount of memory.
 *
 * Errors come in two kinds. A frame that does not unpack or a request that
 * is not valid gets an Error and the connection goes on: the stream is
 * still in step. A reader error (a length over max_frame, misplaced fds)
 * means the stream cannot be trusted: the client gets an Error with
 * request_id 0 and is closed once it has been written ("closing"). A socket
 * error or EOF closes at once.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "config.h"
#include "frame.h"
#include "log.h"
#include "metrics.h"
#include "request.h"
#include "session.h"
#include "vqkv_proto.h"

#ifndef VQKVD_VERSION
#define VQKVD_VERSION "0.0.0"
#endif

/* Connections accepted per wakeup of the listening socket, so a connection
 * storm cannot hold the loop away from the clients already in. */
#define VQKVD_ACCEPT_BATCH 64
/* How long accepting pauses when the process runs out of fds: the pending
 * connection keeps the socket readable, so retrying at once would spin. */
#define VQKVD_ACCEPT_BACKOFF_MS 100

/* ---- configuration ----------------------------------------------------- */

static int vqkvd__peer_allowed(const vqkvd_config_t *cfg, uid_t uid, gid_t gid)
{
    for (size_t i = 0; i < cfg->n_allow_uids; i++)
        if (cfg->allow_uids[i] == uid)
            return 1;
    for (size_t i = 0; i < cfg->n_allow_gids; i++)
        if (cfg->allow_gids[i] == gid)
            return 1;
    return 0;
}

/* ---- clients: closing and writing -------------------------------------- */

/* Jobs on the thread pool hold references too: the struct outlives the
 * connection until the last of them has looked at c->closed. */
void vqkvd_client_unref(vqkvd_client_t *c)
{
    if (--c->refs > 0)
        return;
    free(c);
}

static void vqkvd__client_on_close(uv_handle_t *handle)
{
    vqkvd_client_t *c = handle->data;
    close(c->fd);
    c->fd = -1;
    vqkv_frame_reader_free(&c->reader);
    while (c->out_head != NULL) {
        vqkvd_out_t *o = c->out_head;
        c->out_head = o->next;
        free(o->buf);
        free(o);
    }
    c->out_tail = NULL;
    vqkvd_client_unref(c);
}

/* Unlinks c at once (so Stats no longer counts it) and frees it when libuv
 * has let go of the poll handle, on the next loop iteration. */
static void vqkvd__client_close(vqkvd_client_t *c)
{
    if (c->closed)
        return;
    c->closed = 1;
    vqkvd_server_t *s = c->server;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        s->clients = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    s->n_clients--;
    vqkvd_session_client_gone(c);
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: closed (pid %d uid %u)", (unsigned long long)c->id,
              (int)c->pid, (unsigned)c->uid);
    uv_close((uv_handle_t *)&c->poll, vqkvd__client_on_close);
}

/* Queues an encoded frame; takes buf. */
static void vqkvd__queue(vqkvd_client_t *c, uint8_t *buf, size_t len, int counted)
{
    vqkvd_out_t *o = malloc(sizeof *o);
    if (o == NULL) {
        free(buf);
        c->dead = 1; /* a lost reply would leave the client waiting forever */
        return;
    }
    *o = (vqkvd_out_t){.buf = buf, .len = len, .counted = counted};
    if (c->out_tail != NULL)
        c->out_tail->next = o;
    else
        c->out_head = o;
    c->out_tail = o;
    c->out_count++;
    if (counted)
        c->inflight++;
}

static void vqkvd__reply(vqkvd_client_t *c, Vqkv__Envelope *env, int counted)
{
    if (c->closed)
        return; /* a job finished after its client left: nobody to tell */
    uint8_t *buf;
    size_t len;
    int rc = vqkv_frame_encode(env, VQKV_FRAME_LIMIT, &buf, &len);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "client %llu: cannot encode a reply: %s",
                  (unsigned long long)c->id, vqkv_proto_strerror(rc));
        c->dead = 1;
        return;
    }
    vqkvd__queue(c, buf, len, counted);
}

static void vqkvd__reply_error(vqkvd_client_t *c, uint64_t request_id, int counted, int code,
                               const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void vqkvd__reply_error(vqkvd_client_t *c, uint64_t request_id, int counted, int code,
                               const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: request %llu: %s: %s", (unsigned long long)c->id,
              (unsigned long long)request_id, vqkv_proto_strerror(code), msg);
    vqkvd_metrics_count_error(&c->server->counters, code);

    Vqkv__Error err = VQKV__ERROR__INIT;
    err.code = code;
    err.message = msg;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = request_id;
    env.body_case = VQKV__ENVELOPE__BODY_ERROR;
    env.error = &err;
    vqkvd__reply(c, &env, counted);
}

void vqkvd_client_reply(vqkvd_client_t *c, Vqkv__Envelope *env)
{
    vqkvd__reply(c, env, 1);
}

void vqkvd_client_error(vqkvd_client_t *c, uint64_t request_id, int code, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    vqkvd__reply_error(c, request_id, 1, code, "%s", msg);
}

/* Writes queued replies until the queue is empty or the socket is full,
 * up to VQKVD_FLUSH_IOV of them per sendmsg: small replies sent one by one
 * would each cost a socket buffer of their own in the kernel (several
 * hundred bytes for a 20-byte StatsReply) and fill the peer's queue early. */
#define VQKVD_FLUSH_IOV 64

static void vqkvd__flush(vqkvd_client_t *c)
{
    while (c->out_head != NULL && !c->dead) {
        struct iovec iov[VQKVD_FLUSH_IOV];
        int n_iov = 0;
        for (vqkvd_out_t *o = c->out_head; o != NULL && n_iov < VQKVD_FLUSH_IOV; o = o->next) {
            iov[n_iov].iov_base = o->buf + o->off;
            iov[n_iov].iov_len = o->len - o->off;
            n_iov++;
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n_iov};
        ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                c->dead = 1; /* EPIPE, ECONNRESET: the peer is gone */
            return;
        }
        size_t left = (size_t)n;
        while (left > 0) {
            vqkvd_out_t *o = c->out_head;
            size_t take = o->len - o->off < left ? o->len - o->off : left;
            o->off += take;
            left -= take;
            if (o->off < o->len)
                break;
            c->out_head = o->next;
            if (c->out_head == NULL)
                c->out_tail = NULL;
            c->out_count--;
            if (o->counted)
                c->inflight--;
            free(o->buf);
            free(o);
        }
    }
}

/* The queue is so long that reading more would only grow it. */
static int vqkvd__client_full(const vqkvd_client_t *c)
{
    return c->out_count >= 2 * c->server->cfg.max_inflight;
}

static void vqkvd__client_on_poll(uv_poll_t *handle, int status, int events);

/* After any work on c: write what can be written, then close c or watch
 * for what it needs next (readable unless closing or full, writable while
 * replies wait). */
void vqkvd_client_settle(vqkvd_client_t *c)
{
    if (c->closed)
        return;
    vqkvd__flush(c);
    if (c->dead || (c->closing && c->out_head == NULL)) {
        vqkvd__client_close(c);
        return;
    }
    int want = 0;
    if (!c->closing && !vqkvd__client_full(c))
        want |= UV_READABLE;
    if (c->out_head != NULL)
        want |= UV_WRITABLE;
    if (want == c->events)
        return;
    int rc =
        want == 0 ? uv_poll_stop(&c->poll) : uv_poll_start(&c->poll, want, vqkvd__client_on_poll);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "client %llu: poll: %s", (unsigned long long)c->id,
                  uv_strerror(rc));
        vqkvd__client_close(c);
        return;
    }
    c->events = want;
}

/* ---- requests ------------------------------------------------------------ */

void vqkvd_client_hello(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    const Vqkv__Hello *hello = req->hello;
    if (c->hello_done) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EPROTO, "Hello was already received");
        return;
    }
    if (hello->protocol_version != VQKV_PROTO_VERSION) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EVERSION,
                           "protocol version %u is not spoken; this daemon speaks %d",
                           (unsigned)hello->protocol_version, VQKV_PROTO_VERSION);
        return;
    }
    if (strlen(hello->client_name) > VQKVD_NAME_MAX) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EINVAL,
                           "client_name is longer than %d bytes", VQKVD_NAME_MAX);
        return;
    }
    memcpy(c->name, hello->client_name, strlen(hello->client_name) + 1);
    c->hello_done = 1;
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: hello from \"%s\" (pid %d, tenant %s)",
              (unsigned long long)c->id, c->name, (int)c->pid, c->tenant);

    const vqkvd_config_t *cfg = &c->server->cfg;
    Vqkv__Welcome w = VQKV__WELCOME__INIT;
    w.protocol_version = VQKV_PROTO_VERSION;
    w.max_frame_bytes = cfg->max_frame;
    w.max_inflight = cfg->max_inflight;
    w.max_regions = cfg->max_regions;
    w.backend = (char *)c->server->backend->ops->name;
    w.tenant = c->tenant;
    w.tenant_salt.data = c->salt;
    w.tenant_salt.len = sizeof c->salt;
    w.server_version = VQKVD_VERSION;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = req->request_id;
    env.body_case = VQKV__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    vqkvd__reply(c, &env, 1);
}

void vqkvd_client_stats(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    Vqkv__StatsReply st = VQKV__STATS_REPLY__INIT;
    if (vqkvd_session_stats(c, &st) != VQKV_OK) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_ENOMEM, "out of memory");
        return;
    }
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = req->request_id;
    env.body_case = VQKV__ENVELOPE__BODY_STATS_REPLY;
    env.stats_reply = &st;
    vqkvd__reply(c, &env, 1);
    free(st.tenants);
}

static void vqkvd__dispatch(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    vqkvd_metrics_count_request(&c->server->counters, req->body_case);
    if (req->request_id == 0) {
        vqkvd__reply_error(c, 0, 1, VQKV_EPROTO, "request_id 0 is reserved for the daemon");
        return;
    }
    if (c->inflight + c->pending >= c->server->cfg.max_inflight) {
        vqkvd__reply_error(c, req->request_id, 0, VQKV_ELIMIT, "more than %u requests in flight",
                           (unsigned)c->server->cfg.max_inflight);
        return;
    }
    const vqkvd_request_t *r = vqkvd_request_of(req->body_case);
    if (r->handle == NULL) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EPROTO, "%s is a reply, not a request",
                           r->name);
        return;
    }
    if (!c->hello_done && !r->before_hello) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EPROTO, "%s before Hello", r->name);
        return;
    }
    r->handle(c, req, frame);
}

/* One whole frame from the reader; takes it. */
static void vqkvd__handle_frame(vqkvd_client_t *c, vqkv_frame_t *frame)
{
    Vqkv__Envelope *req = NULL;
    int rc = vqkv_frame_unpack(frame->data, frame->len, &req);
    if (rc != VQKV_OK) {
        /* Which request it was is unknown, hence id 0; the stream itself
         * is still in step, so the connection goes on. */
        vqkvd__reply_error(c, 0, 1, rc, "frame of %zu bytes does not unpack", frame->len);
        goto out;
    }
    rc = vqkv_frame_check(req);
    if (rc != VQKV_OK) {
        vqkvd__reply_error(c, req->request_id, 1, rc,
                           "unknown field, enum value or message type, or no body");
        goto out;
    }
    /* Only requests the table allows take fds (RegisterRegion, and
     * RegisterModel for a codebook file), and check their count themselves;
     * clearing the frame closes any other, so a stray fd never stays open
     * in the daemon. */
    const vqkvd_request_t *r = vqkvd_request_of(req->body_case);
    if (frame->n_fds > 0 && !r->takes_fds) {
        vqkvd__reply_error(c, req->request_id, 1, VQKV_EFDS, "%s takes no file descriptors",
                           r->name);
        goto out;
    }
    vqkvd__dispatch(c, req, frame);
out:
    vqkv_frame_envelope_free(req);
    vqkv_frame_clear(frame);
}

/* The stream is over or cannot be trusted: EOF and socket errors close at
 * once, anything else gets an Error with request_id 0 first. */
static void vqkvd__reader_failed(vqkvd_client_t *c, int rc)
{
    if (rc == VQKV_ECLOSED || rc == VQKV_ETRUNC || rc == VQKV_EIO) {
        if (rc != VQKV_ECLOSED)
            vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: %s", (unsigned long long)c->id,
                      vqkv_proto_strerror(rc));
        c->dead = 1;
        return;
    }
    if (rc == VQKV_ETOOBIG)
        vqkvd__reply_error(c, 0, 0, rc, "a frame is longer than max_frame, %u bytes; closing",
                           (unsigned)c->server->cfg.max_frame);
    else
        vqkvd__reply_error(c, 0, 0, rc, "the stream cannot be trusted any more; closing");
    c->closing = 1;
}

/* Takes every frame already read, then reads the socket once (when it is
 * readable) and takes what that brought. Stops early when c must stop
 * reading: the frames left stay in the reader for the next call. */
static void vqkvd__client_read(vqkvd_client_t *c, int may_recv)
{
    for (;;) {
        /* At the limit, hand the queue to the kernel before judging: a
         * client within max_inflight must never see VQKV_ELIMIT just
         * because its requests came in one read. Costs one sendmsg per
         * request while a client pipelines past the limit. */
        if (c->inflight >= c->server->cfg.max_inflight || vqkvd__client_full(c))
            vqkvd__flush(c);
        if (c->dead || c->closing || vqkvd__client_full(c))
            return;
        vqkv_frame_t frame;
        int rc = vqkv_frame_reader_next(&c->reader, &frame);
        if (rc == 1) {
            vqkvd__handle_frame(c, &frame);
            continue;
        }
        if (rc < 0) {
            vqkvd__reader_failed(c, rc);
            return;
        }
        if (!may_recv)
            return;
        may_recv = 0;
        rc = vqkv_frame_reader_recv(&c->reader, c->fd, MSG_DONTWAIT);
        if (rc == VQKV_EAGAIN)
            return;
        if (rc < 0) {
            vqkvd__reader_failed(c, rc);
            return;
        }
    }
}

static void vqkvd__client_on_poll(uv_poll_t *handle, int status, int events)
{
    vqkvd_client_t *c = handle->data;
    if (status < 0) {
        vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: poll: %s", (unsigned long long)c->id,
                  uv_strerror(status));
        vqkvd__client_close(c);
        return;
    }
    if (events & UV_WRITABLE)
        vqkvd__flush(c);
    /* Also without UV_READABLE: frames left over from a full queue are
     * taken now that it drained. */
    vqkvd__client_read(c, events & UV_READABLE);
    vqkvd_client_settle(c);
}

/* ---- accepting ----------------------------------------------------------- */

static void vqkvd__tenant_salt(const vqkvd_server_t *s, const char *tenant,
                               uint8_t out[VQKVD_SALT_BYTES])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned int len = VQKVD_SALT_BYTES;
    int ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
             EVP_DigestUpdate(md, s->salt_secret, sizeof s->salt_secret) == 1 &&
             EVP_DigestUpdate(md, tenant, strlen(tenant)) == 1 &&
             EVP_DigestFinal_ex(md, out, &len) == 1;
    EVP_MD_CTX_free(md);
    if (ok)
        return;
    /* Never seen in practice; a zero salt would merge tenants, so say so. */
    vqkvd_log(VQKVD_LOG_ERROR, "SHA-256 failed; tenant %s gets a zero salt", tenant);
    memset(out, 0, VQKVD_SALT_BYTES);
}

static void vqkvd__client_new(vqkvd_server_t *s, int fd)
{
    struct ucred cred;
    socklen_t cred_len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) < 0) {
        vqkvd_log(VQKVD_LOG_WARN, "SO_PEERCRED: %s; connection dropped", strerror(errno));
        close(fd);
        return;
    }
    vqkvd_client_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        vqkvd_log(VQKVD_LOG_ERROR, "out of memory; connection dropped");
        close(fd);
        return;
    }
    c->server = s;
    c->refs = 1; /* the connection's, dropped once the poll handle is closed */
    c->id = ++s->next_client_id;
    c->fd = fd;
    c->pid = cred.pid;
    c->uid = cred.uid;
    c->gid = cred.gid;
    snprintf(c->tenant, sizeof c->tenant, "%u", (unsigned)cred.uid);
    vqkvd__tenant_salt(s, c->tenant, c->salt);
    vqkv_frame_reader_init(&c->reader, s->cfg.max_frame); /* max_frame checked at start */
    int rc = uv_poll_init(s->loop, &c->poll, fd);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "poll: %s; connection dropped", uv_strerror(rc));
        close(fd);
        free(c);
        return;
    }
    c->poll.data = c;
    c->next = s->clients;
    if (s->clients != NULL)
        s->clients->prev = c;
    s->clients = c;
    s->n_clients++;
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: connected (pid %d uid %u gid %u)",
              (unsigned long long)c->id, (int)c->pid, (unsigned)c->uid, (unsigned)c->gid);

    if (!vqkvd__peer_allowed(&s->cfg, cred.uid, cred.gid)) {
        vqkvd_log(VQKVD_LOG_WARN, "refused pid %d uid %u gid %u: not allowed", (int)cred.pid,
                  (unsigned)cred.uid, (unsigned)cred.gid);
        vqkvd__reply_error(c, 0, 0, VQKV_EPERM, "uid %u gid %u may not use this daemon",
                           (unsigned)cred.uid, (unsigned)cred.gid);
        c->closing = 1;
    } else if (s->n_clients > s->cfg.max_clients) {
        vqkvd_log(VQKVD_LOG_WARN, "refused pid %d: %u clients already", (int)cred.pid,
                  (unsigned)s->cfg.max_clients);
        vqkvd__reply_error(c, 0, 0, VQKV_ELIMIT, "the daemon serves %u clients already",
                           (unsigned)s->cfg.max_clients);
        c->closing = 1;
    }
    vqkvd_client_settle(c);
}

static void vqkvd__on_listen(uv_poll_t *handle, int status, int events);

static void vqkvd__on_backoff(uv_timer_t *timer)
{
    vqkvd_server_t *s = timer->data;
    if (s->listen_fd >= 0)
        uv_poll_start(&s->listen_poll, UV_READABLE, vqkvd__on_listen);
}

static void vqkvd__on_listen(uv_poll_t *handle, int status, int events)
{
    vqkvd_server_t *s = handle->data;
    (void)events;
    if (status < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "listening socket: %s", uv_strerror(status));
        return;
    }
    for (int i = 0; i < VQKVD_ACCEPT_BATCH; i++) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            vqkvd__client_new(s, fd);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        vqkvd_log(VQKVD_LOG_WARN, "accept: %s; pausing %d ms", strerror(errno),
                  VQKVD_ACCEPT_BACKOFF_MS);
        uv_poll_stop(&s->listen_poll);
        uv_timer_start(&s->accept_backoff, vqkvd__on_backoff, VQKVD_ACCEPT_BACKOFF_MS, 0);
        return;
    }
}

/* ---- start and stop ------------------------------------------------------ */

/* A socket file at path: replaced when nothing listens on it (a daemon that
 * died), kept when something does. The probe and the unlink race with a
 * daemon starting at the same moment; systemd socket activation avoids
 * that, and two daemons started by hand at once are not worth a lock. */
/* Keeps err beside the code a failed system call turns into. */
static int vqkvd__sys_failed(vqkvd_server_t *s, int err)
{
    s->sys_errno = err;
    return VQKV_EIO;
}

static int vqkvd__clear_stale(vqkvd_server_t *s, const struct sockaddr_un *addr)
{
    struct stat st;
    if (lstat(addr->sun_path, &st) < 0)
        return errno == ENOENT ? VQKV_OK : vqkvd__sys_failed(s, errno);
    if (!S_ISSOCK(st.st_mode))
        return vqkvd__sys_failed(s, EEXIST);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return vqkvd__sys_failed(s, errno);
    int rc = connect(fd, (const struct sockaddr *)addr, sizeof *addr);
    int err = errno;
    close(fd);
    if (rc == 0)
        return vqkvd__sys_failed(s, EADDRINUSE);
    if (err != ECONNREFUSED)
        return vqkvd__sys_failed(s, err);
    vqkvd_log(VQKVD_LOG_INFO, "removing stale socket %s", addr->sun_path);
    return unlink(addr->sun_path) < 0 && errno != ENOENT ? vqkvd__sys_failed(s, errno) : VQKV_OK;
}

/* Binds and listens on addr (mode 0660) into s->listen_fd. */
static int vqkvd__listen_path(vqkvd_server_t *s, const struct sockaddr_un *addr)
{
    int rc = vqkvd__clear_stale(s, addr);
    if (rc != VQKV_OK)
        return rc;
    s->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->listen_fd < 0)
        return vqkvd__sys_failed(s, errno);
    /* The umask makes bind create the file 0660 already, so there is no
     * moment when a wider mode lets someone connect. Single-threaded here. */
    mode_t old_mask = umask(0117);
    rc = bind(s->listen_fd, (const struct sockaddr *)addr, sizeof *addr);
    int bind_errno = errno;
    umask(old_mask);
    if (rc < 0)
        return vqkvd__sys_failed(s, bind_errno);
    s->socket_created = 1;
    if (chmod(addr->sun_path, 0660) < 0 || listen(s->listen_fd, SOMAXCONN) < 0)
        return vqkvd__sys_failed(s, errno);
    vqkvd_log(VQKVD_LOG_INFO, "listening on %s (backend %s, protocol %d)", addr->sun_path,
              s->backend->ops->name, VQKV_PROTO_VERSION);
    return VQKV_OK;
}

/* Takes the socket the service manager bound and listens on (its file,
 * mode and owner are the socket unit's) into s->listen_fd, non-blocking:
 * the accept loop relies on EAGAIN. The flag is on the open file
 * description, which the manager shares; it only polls the socket. */
static int vqkvd__listen_inherited(vqkvd_server_t *s, int fd)
{
    s->listen_fd = fd;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return vqkvd__sys_failed(s, errno);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    socklen_t len = sizeof addr - 1; /* room for the NUL a full sun_path lacks */
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        return vqkvd__sys_failed(s, errno);
    if (addr.sun_path[0] == '\0' && len > offsetof(struct sockaddr_un, sun_path))
        addr.sun_path[0] = '@'; /* abstract, written the way systemd writes it */
    vqkvd_log(VQKVD_LOG_INFO,
              "listening on %s (socket activation, fd %d; the socket setting is not used; "
              "backend %s, protocol %d)",
              addr.sun_path[0] != '\0' ? addr.sun_path : "an unnamed socket", fd,
              s->backend->ops->name, VQKV_PROTO_VERSION);
    return VQKV_OK;
}

/* The tenants' quotas from s->cfg: the default for tenants first seen
 * from now on, and for every tenant the store knows already its uid.N
 * quota or else the default, so that a reload reaches them too. */
static int vqkvd__apply_quotas(vqkvd_server_t *s)
{
    const vqkvd_config_t *cfg = &s->cfg;
    vqkvd_store_set_default_quota(&s->store, cfg->default_quota_bytes);
    for (uint32_t i = 0; i < vqkvd_store_tenant_count(&s->store); i++) {
        uint32_t tenant = vqkvd_store_tenant_at(&s->store, i)->tenant;
        uint64_t quota = cfg->default_quota_bytes;
        for (size_t j = 0; j < cfg->n_quotas; j++)
            if ((uint32_t)cfg->quota_uids[j] == tenant)
                quota = cfg->quota_bytes[j];
        if (vqkvd_store_set_quota(&s->store, tenant, quota) != VQKV_OK)
            return VQKV_ENOMEM;
    }
    /* Tenants not seen yet get an entry now, holding their own quota. */
    for (size_t j = 0; j < cfg->n_quotas; j++)
        if (vqkvd_store_set_quota(&s->store, (uint32_t)cfg->quota_uids[j], cfg->quota_bytes[j]) !=
            VQKV_OK)
            return VQKV_ENOMEM;
    return VQKV_OK;
}

int vqkvd_server_start(vqkvd_server_t *s, uv_loop_t *loop, const vqkvd_config_t *cfg)
{
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->cfg = *cfg;
    s->listen_fd = -1;
    int rc = 0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if ((cfg->socket_path == NULL && cfg->listen_fd < 0) || cfg->max_frame == 0 ||
        cfg->max_frame > VQKV_FRAME_LIMIT || cfg->max_inflight == 0)
        return VQKV_EINVAL;
    if (cfg->listen_fd < 0) {
        if (strlen(cfg->socket_path) >= sizeof addr.sun_path) {
            vqkvd_log(VQKVD_LOG_ERROR, "socket path %s is longer than %zu bytes", cfg->socket_path,
                      sizeof addr.sun_path - 1);
            return VQKV_EINVAL;
        }
        memcpy(addr.sun_path, cfg->socket_path, strlen(cfg->socket_path) + 1);
    }
    if (getrandom(s->salt_secret, sizeof s->salt_secret, 0) != (ssize_t)sizeof s->salt_secret) {
        vqkvd_log(VQKVD_LOG_ERROR, "no random bytes for the tenant salts: %s", strerror(errno));
        return vqkvd__sys_failed(s, errno);
    }

    rc = vqkvd_session_start(s);
    if (rc != VQKV_OK)
        return rc;
    rc = vqkvd__apply_quotas(s);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "no memory for the tenants' quotas");
        goto fail;
    }
    rc = cfg->listen_fd >= 0 ? vqkvd__listen_inherited(s, cfg->listen_fd)
                             : vqkvd__listen_path(s, &addr);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot listen on %s: %s",
                  cfg->listen_fd >= 0 ? "the socket from socket activation" : cfg->socket_path,
                  strerror(s->sys_errno));
        goto fail;
    }
    rc = uv_poll_init(loop, &s->listen_poll, s->listen_fd);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot poll the listening socket: %s", uv_strerror(rc));
        rc = vqkvd__sys_failed(s, -rc); /* libuv's codes are negative errnos on Unix */
        goto fail;
    }
    s->listen_poll.data = s;
    uv_timer_init(loop, &s->accept_backoff); /* cannot fail */
    s->accept_backoff.data = s;
    rc = uv_poll_start(&s->listen_poll, UV_READABLE, vqkvd__on_listen);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "cannot poll the listening socket: %s", uv_strerror(rc));
        rc = vqkvd__sys_failed(s, -rc);
        s->stopping = 1;
        uv_close((uv_handle_t *)&s->listen_poll, NULL);
        uv_close((uv_handle_t *)&s->accept_backoff, NULL);
        goto fail;
    }
    return VQKV_OK;

fail:
    vqkvd_session_stop(s);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    s->listen_fd = -1;
    if (s->socket_created)
        unlink(addr.sun_path);
    s->socket_created = 0;
    return rc;
}

void vqkvd_server_stop(vqkvd_server_t *s)
{
    if (s->stopping)
        return;
    s->stopping = 1;
    uv_close((uv_handle_t *)&s->listen_poll, NULL);
    uv_close((uv_handle_t *)&s->accept_backoff, NULL);
    close(s->listen_fd); /* uv_close stopped the poll, so libuv no longer watches it */
    s->listen_fd = -1;
    if (s->socket_created && unlink(s->cfg.socket_path) < 0)
        vqkvd_log(VQKVD_LOG_WARN, "removing %s: %s", s->cfg.socket_path, strerror(errno));
    s->socket_created = 0;
    while (s->clients != NULL)
        vqkvd__client_close(s->clients);
    vqkvd_session_stop(s);
    vqkvd_log(VQKVD_LOG_INFO, "stopped");
}

uint32_t vqkvd_server_reconfigure(vqkvd_server_t *s, const vqkvd_config_t *next)
{
    vqkvd_config_take_live(&s->cfg, next);
    if (vqkvd__apply_quotas(s) < 0)
        vqkvd_log(VQKVD_LOG_ERROR, "out of memory setting quotas; some keep their old value");
    uint32_t closed = 0;
    vqkvd_client_t *next_c;
    for (vqkvd_client_t *c = s->clients; c != NULL; c = next_c) {
        next_c = c->next; /* settling may close c */
        if (c->closing || vqkvd__peer_allowed(&s->cfg, c->uid, c->gid))
            continue;
        vqkvd_log(VQKVD_LOG_WARN, "client %llu (pid %d uid %u gid %u): no longer allowed; closing",
                  (unsigned long long)c->id, (int)c->pid, (unsigned)c->uid, (unsigned)c->gid);
        vqkvd__reply_error(c, 0, 0, VQKV_EPERM, "uid %u gid %u may no longer use this daemon",
                           (unsigned)c->uid, (unsigned)c->gid);
        c->closing = 1;
        vqkvd_client_settle(c);
        closed++;
    }
    return closed;
}

void vqkvd_server_status(const vqkvd_server_t *s, vqkvd_server_status_t *st)
{
    vqkvd_store_stats_t ss;
    vqkvd_pool_stats_t ps;
    vqkvd_store_stats(&s->store, &ss);
    vqkvd_pool_stats(&s->pool, &ps);
    *st = (vqkvd_server_status_t){
        .hits = ss.hits,
        .misses = ss.misses,
        .bytes_stored = ss.bytes_stored,
        .pool_bytes = ps.usable_bytes,
        .clients = s->n_clients,
    };
}

void vqkvd_server_destroy(vqkvd_server_t *s)
{
    vqkvd_session_destroy(s);
}
