/* conn.c -- a client connection's bytes: frames read from its socket and
 * handed up, replies framed, queued and written as the socket takes them,
 * and the connection's end (conn.h).
 *
 * Sockets are plain non-blocking fds watched by uv_poll_t (server.c says
 * why not libuv's pipes): readable means "call vqkv_frame_reader_recv
 * once", writable means "the reply queue may move". epoll is
 * level-triggered here, so reading once per wakeup and coming back later
 * loses nothing and keeps one busy client from starving the others.
 *
 * Every request gets exactly one reply. Requests count as in flight until
 * their reply has left for the kernel; when the queue reaches twice
 * max_inflight the client is not read at all until it drains, so a peer
 * that never reads its replies costs a bounded amount of memory. A reader
 * error (a length over max_frame, misplaced fds) means the stream cannot
 * be trusted: the client gets an Error with request_id 0 and is closed
 * once it has been written ("closing"). A socket error or EOF closes at
 * once.
 *
 * This file calls nothing above it: what a frame means and what a closed
 * connection leaves behind are the ops the server gave the client.
 */
#include "conn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "counters.h"
#include "log.h"
#include "vqkv_proto.h"

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

void vqkvd_client_close(vqkvd_client_t *c)
{
    if (c->closed)
        return;
    c->closed = 1;
    c->ops->gone(c);
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

/* An Error reply, logged at debug and counted by code; counted says
 * whether it answers a request counted in inflight. */
static void vqkvd__reply_error(vqkvd_client_t *c, uint64_t request_id, int counted, int code,
                               const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

static void vqkvd__reply_error(vqkvd_client_t *c, uint64_t request_id, int counted, int code,
                               const char *fmt, va_list ap)
{
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    vqkvd_log(VQKVD_LOG_DEBUG, "client %llu: request %llu: %s: %s", (unsigned long long)c->id,
              (unsigned long long)request_id, vqkv_proto_strerror(code), msg);
    vqkvd_counters_error(&c->server->counters, code);

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
    va_list ap;
    va_start(ap, fmt);
    vqkvd__reply_error(c, request_id, 1, code, fmt, ap);
    va_end(ap);
}

void vqkvd_client_refuse(vqkvd_client_t *c, uint64_t request_id, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vqkvd__reply_error(c, request_id, 0, code, fmt, ap);
    va_end(ap);
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
        vqkvd_client_close(c);
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
        vqkvd_client_close(c);
        return;
    }
    c->events = want;
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
        vqkvd_client_refuse(c, 0, rc, "a frame is longer than max_frame, %u bytes; closing",
                            (unsigned)c->server->cfg.max_frame);
    else
        vqkvd_client_refuse(c, 0, rc, "the stream cannot be trusted any more; closing");
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
            c->ops->frame(c, &frame);
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
        vqkvd_client_close(c);
        return;
    }
    if (events & UV_WRITABLE)
        vqkvd__flush(c);
    /* Also without UV_READABLE: frames left over from a full queue are
     * taken now that it drained. */
    vqkvd__client_read(c, events & UV_READABLE);
    vqkvd_client_settle(c);
}
