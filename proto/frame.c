/* frame.c -- length-prefixed Envelope frames with fds over SCM_RIGHTS: the
 * incremental reader, the encoder, blocking send and receive for the
 * client, and unpacking with an allocation cap (frame.h has the format and
 * the rules).
 *
 * The reader is a small state machine over one frame at a time: first the
 * four length bytes (collected in hdr, since a read may end inside them),
 * then the payload, copied into a buffer of exactly the announced length.
 * That buffer is allocated when the length is known and checked, so a peer
 * can make the reader hold at most max_frame bytes, however it slices the
 * stream. Fed bytes are borrowed and consumed frame by frame, never queued,
 * so many frames in one read cost no extra memory.
 */
#include "frame.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define VQKV__HDR VQKV_FRAME_HEADER_BYTES

/* Room for VQKV_FRAME_MAX_FDS fds in one SCM_RIGHTS message. On receive the
 * kernel installs no more than fit and drops the rest, setting MSG_CTRUNC;
 * so an oversupply costs no fd table entries here and is still detected. */
typedef union {
    char buf[CMSG_SPACE(sizeof(int) * VQKV_FRAME_MAX_FDS)];
    struct cmsghdr align;
} vqkv__cmsg_buf_t;

static uint32_t vqkv__load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void vqkv__store_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Closes fds[0..n) that are not -1 and marks them -1. close() is not
 * retried on EINTR: on Linux the fd is gone either way. */
static void vqkv__close_fds(int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (fds[i] >= 0)
            close(fds[i]);
        fds[i] = -1;
    }
}

static void vqkv__clear_slots(int *fds)
{
    for (size_t i = 0; i < VQKV_FRAME_MAX_FDS; i++)
        fds[i] = -1;
}

void vqkv_frame_clear(vqkv_frame_t *frame)
{
    if (frame == NULL)
        return;
    free(frame->data);
    vqkv__close_fds(frame->fds,
                    frame->n_fds < VQKV_FRAME_MAX_FDS ? frame->n_fds : VQKV_FRAME_MAX_FDS);
    frame->data = NULL;
    frame->len = 0;
    vqkv__clear_slots(frame->fds);
    frame->n_fds = 0;
}

/* ---- the reader ------------------------------------------------------------ */

/* Drops everything in flight, closes every fd not yet yielded and makes err
 * the sticky error. Returns err. */
static int vqkv__reader_fail(vqkv_frame_reader_t *r, int err)
{
    vqkv__close_fds(r->fds, r->n_fds);
    vqkv__close_fds(r->chunk_fds, r->chunk_n_fds);
    r->n_fds = 0;
    r->chunk_n_fds = 0;
    free(r->buf);
    r->buf = NULL;
    r->hdr_got = 0;
    r->len = r->got = 0;
    r->started_in_chunk = 0;
    r->chunk = NULL;
    r->chunk_len = r->chunk_pos = 0;
    r->error = err;
    return err;
}

/* Gives the chunk's unclaimed fds to the frame in progress. */
static int vqkv__reader_claim_fds(vqkv_frame_reader_t *r)
{
    if (r->n_fds + r->chunk_n_fds > VQKV_FRAME_MAX_FDS)
        return vqkv__reader_fail(r, VQKV_EFDS);
    memcpy(r->fds + r->n_fds, r->chunk_fds, r->chunk_n_fds * sizeof(int));
    r->n_fds += r->chunk_n_fds;
    vqkv__clear_slots(r->chunk_fds);
    r->chunk_n_fds = 0;
    return VQKV_OK;
}

int vqkv_frame_reader_init(vqkv_frame_reader_t *r, uint32_t max_frame)
{
    if (r == NULL || max_frame == 0 || max_frame > VQKV_FRAME_LIMIT)
        return VQKV_EINVAL;
    memset(r, 0, sizeof *r);
    r->max_frame = max_frame;
    vqkv__clear_slots(r->fds);
    vqkv__clear_slots(r->chunk_fds);
    return VQKV_OK;
}

void vqkv_frame_reader_free(vqkv_frame_reader_t *r)
{
    if (r == NULL)
        return;
    vqkv__reader_fail(r, VQKV_EINVAL);
    free(r->staging);
    r->staging = NULL;
}

int vqkv_frame_reader_error(const vqkv_frame_reader_t *r)
{
    return r == NULL ? VQKV_EINVAL : r->error;
}

/* The chunk is used up. Fds no frame claimed belong to a frame that began
 * in it and whose length is still incomplete; anything else means they came
 * with bytes in the middle of a frame. */
static int vqkv__reader_chunk_done(vqkv_frame_reader_t *r)
{
    if (r->chunk_n_fds > 0) {
        if (!r->started_in_chunk || r->hdr_got == VQKV__HDR)
            return vqkv__reader_fail(r, VQKV_EFDS);
        int rc = vqkv__reader_claim_fds(r);
        if (rc < 0)
            return rc;
    }
    r->chunk = NULL;
    r->chunk_len = r->chunk_pos = 0;
    return 0;
}

/* Before new bytes: a chunk read to its end (its last frame yielded, no
 * next() since) is finished here; one with bytes left is a caller error. */
static int vqkv__reader_retire_chunk(vqkv_frame_reader_t *r)
{
    if (r->chunk == NULL)
        return VQKV_OK;
    if (r->chunk_pos < r->chunk_len)
        return vqkv__reader_fail(r, VQKV_EINVAL);
    return vqkv__reader_chunk_done(r);
}

int vqkv_frame_reader_feed(vqkv_frame_reader_t *r, const void *data, size_t len, const int *fds,
                           size_t n_fds)
{
    int err = VQKV_OK;
    if (fds == NULL)
        n_fds = 0;
    if (r == NULL)
        err = VQKV_EINVAL;
    else if (r->error != VQKV_OK)
        err = r->error;
    else if (n_fds > VQKV_FRAME_MAX_FDS || (len == 0 && n_fds > 0)) /* fds need a byte */
        err = VQKV_EFDS;
    else if ((data == NULL && len > 0) || vqkv__reader_retire_chunk(r) < 0)
        err = r->error != VQKV_OK ? r->error : VQKV_EINVAL;
    if (err != VQKV_OK) {
        /* The fds are ours whatever happens, so a refusal closes them. */
        for (size_t i = 0; i < n_fds; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        if (r == NULL || r->error != VQKV_OK)
            return err;
        return vqkv__reader_fail(r, err);
    }
    if (len == 0)
        return VQKV_OK;
    if (n_fds > 0)
        memcpy(r->chunk_fds, fds, n_fds * sizeof(int));
    r->chunk_n_fds = n_fds;
    r->chunk = data;
    r->chunk_len = len;
    r->chunk_pos = 0;
    r->started_in_chunk = 0;
    return VQKV_OK;
}

/* The length is complete: check it, allocate the payload, and claim the
 * chunk's fds when this frame is the last to start in the chunk (it reaches
 * the chunk's end). */
static int vqkv__reader_begin_payload(vqkv_frame_reader_t *r)
{
    uint32_t len = vqkv__load_le32(r->hdr);
    if (len > r->max_frame)
        return vqkv__reader_fail(r, VQKV_ETOOBIG);
    if (len > 0) {
        r->buf = malloc(len);
        if (r->buf == NULL)
            return vqkv__reader_fail(r, VQKV_ENOMEM);
    }
    r->len = len;
    r->got = 0;
    if (r->started_in_chunk && r->chunk_n_fds > 0 && len >= r->chunk_len - r->chunk_pos)
        return vqkv__reader_claim_fds(r);
    return VQKV_OK;
}

int vqkv_frame_reader_next(vqkv_frame_reader_t *r, vqkv_frame_t *out)
{
    if (r == NULL || out == NULL)
        return VQKV_EINVAL;
    if (r->error != VQKV_OK)
        return r->error;

    for (;;) {
        size_t avail = r->chunk_len - r->chunk_pos;
        if (r->hdr_got < VQKV__HDR) {
            if (avail == 0)
                return vqkv__reader_chunk_done(r);
            if (r->hdr_got == 0)
                r->started_in_chunk = 1;
            size_t n = VQKV__HDR - r->hdr_got < avail ? VQKV__HDR - r->hdr_got : avail;
            memcpy(r->hdr + r->hdr_got, r->chunk + r->chunk_pos, n);
            r->hdr_got += (uint32_t)n;
            r->chunk_pos += n;
            if (r->hdr_got < VQKV__HDR)
                continue;
            int rc = vqkv__reader_begin_payload(r);
            if (rc < 0)
                return rc;
            avail = r->chunk_len - r->chunk_pos;
        }
        size_t n = r->len - r->got < avail ? r->len - r->got : avail;
        if (n > 0) {
            memcpy(r->buf + r->got, r->chunk + r->chunk_pos, n);
            r->got += (uint32_t)n;
            r->chunk_pos += n;
        }
        if (r->got < r->len)
            return vqkv__reader_chunk_done(r);

        out->data = r->buf;
        out->len = r->len;
        memcpy(out->fds, r->fds, sizeof out->fds);
        out->n_fds = r->n_fds;
        r->buf = NULL;
        r->len = r->got = 0;
        r->hdr_got = 0;
        vqkv__clear_slots(r->fds);
        r->n_fds = 0;
        r->started_in_chunk = 0;
        return 1;
    }
}

int vqkv_frame_reader_eof(vqkv_frame_reader_t *r)
{
    if (r == NULL)
        return VQKV_EINVAL;
    if (r->error != VQKV_OK)
        return r->error;
    int between = r->hdr_got == 0 && r->chunk_pos == r->chunk_len && r->chunk_n_fds == 0;
    return vqkv__reader_fail(r, between ? VQKV_ECLOSED : VQKV_ETRUNC);
}

/* Copies the fds of every SCM_RIGHTS message into fds[VQKV_FRAME_MAX_FDS]
 * and returns how many; any beyond that (only possible with a larger
 * control buffer) are closed. Other control messages are ignored. */
static size_t vqkv__collect_fds(struct msghdr *msg, int *fds)
{
    size_t n = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof fd);
            if (n < VQKV_FRAME_MAX_FDS)
                fds[n++] = fd;
            else
                close(fd);
        }
    }
    return n;
}

int vqkv_frame_reader_recv(vqkv_frame_reader_t *r, int sock, int flags)
{
    if (r == NULL || sock < 0)
        return VQKV_EINVAL;
    if (r->error != VQKV_OK)
        return r->error;
    int rc = vqkv__reader_retire_chunk(r);
    if (rc < 0)
        return rc;

    /* A long payload is read straight into the frame, bounded by what it
     * still lacks: one copy fewer, and such a read cannot start a frame. */
    uint8_t *dst;
    size_t cap;
    int direct = r->hdr_got == VQKV__HDR && r->len - r->got >= VQKV_FRAME_STAGING_BYTES;
    if (direct) {
        dst = r->buf + r->got;
        cap = r->len - r->got;
    } else {
        if (r->staging == NULL && (r->staging = malloc(VQKV_FRAME_STAGING_BYTES)) == NULL)
            return vqkv__reader_fail(r, VQKV_ENOMEM);
        dst = r->staging;
        cap = VQKV_FRAME_STAGING_BYTES;
    }

    vqkv__cmsg_buf_t ctl;
    struct iovec iov = {.iov_base = dst, .iov_len = cap};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    ssize_t n;
    do
        n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return VQKV_EAGAIN;
        int saved = errno;
        vqkv__reader_fail(r, VQKV_EIO);
        errno = saved;
        return VQKV_EIO;
    }

    int fds[VQKV_FRAME_MAX_FDS];
    size_t n_fds = vqkv__collect_fds(&msg, fds);
    if (msg.msg_flags & MSG_CTRUNC) { /* more fds than a frame may carry */
        vqkv__close_fds(fds, n_fds);
        return vqkv__reader_fail(r, VQKV_EFDS);
    }
    if (n == 0) {
        vqkv__close_fds(fds, n_fds);
        return vqkv_frame_reader_eof(r);
    }
    if (direct) {
        r->got += (uint32_t)n;
        if (n_fds > 0) {
            vqkv__close_fds(fds, n_fds);
            return vqkv__reader_fail(r, VQKV_EFDS);
        }
        return (int)n;
    }
    rc = vqkv_frame_reader_feed(r, dst, (size_t)n, fds, n_fds);
    return rc < 0 ? rc : (int)n;
}

int vqkv_frame_recv(int sock, vqkv_frame_reader_t *r, vqkv_frame_t *out)
{
    if (r == NULL || out == NULL || sock < 0)
        return VQKV_EINVAL;
    for (;;) {
        int rc = vqkv_frame_reader_next(r, out);
        if (rc > 0)
            return VQKV_OK;
        if (rc < 0)
            return rc;
        rc = vqkv_frame_reader_recv(r, sock, 0);
        if (rc < 0)
            return rc;
    }
}

/* ---- encoding and sending ------------------------------------------------ */

int vqkv_frame_encode(const Vqkv__Envelope *env, uint32_t max_frame, uint8_t **out, size_t *out_len)
{
    if (env == NULL || env->base.descriptor != &vqkv__envelope__descriptor || out == NULL ||
        out_len == NULL || max_frame == 0 || max_frame > VQKV_FRAME_LIMIT)
        return VQKV_EINVAL;
    /* Sizing walks the message once more than packing alone would; it is
     * what lets an oversized message be refused without allocating it. */
    size_t len = vqkv__envelope__get_packed_size(env);
    if (len > max_frame)
        return VQKV_ETOOBIG;
    uint8_t *buf = malloc(VQKV__HDR + len);
    if (buf == NULL)
        return VQKV_ENOMEM;
    vqkv__store_le32(buf, (uint32_t)len);
    if (vqkv__envelope__pack(env, buf + VQKV__HDR) != len) {
        free(buf);
        return VQKV_EINVAL;
    }
    *out = buf;
    *out_len = VQKV__HDR + len;
    return VQKV_OK;
}

/* Waits until sock can take more bytes; for sockets that are non-blocking
 * or have a send timeout. */
static int vqkv__wait_writable(int sock)
{
    struct pollfd p = {.fd = sock, .events = POLLOUT};
    int rc;
    do
        rc = poll(&p, 1, -1);
    while (rc < 0 && errno == EINTR);
    return rc < 0 ? VQKV_EIO : VQKV_OK;
}

int vqkv_frame_send_buf(int sock, const uint8_t *buf, size_t len, const int *fds, size_t n_fds)
{
    if (sock < 0 || buf == NULL || len < VQKV__HDR || n_fds > VQKV_FRAME_MAX_FDS ||
        (n_fds > 0 && fds == NULL))
        return VQKV_EINVAL;
    if ((uint64_t)vqkv__load_le32(buf) + VQKV__HDR != len)
        return VQKV_EINVAL;

    vqkv__cmsg_buf_t ctl;
    memset(&ctl, 0, sizeof ctl);
    size_t sent = 0;
    while (sent < len) {
        struct iovec iov = {.iov_base = (void *)(buf + sent), .iov_len = len - sent};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        /* The fds ride on the first sendmsg only, which starts at the
         * frame's first byte; a retry after EINTR or EAGAIN sent nothing,
         * so it carries them again. */
        if (sent == 0 && n_fds > 0) {
            msg.msg_control = ctl.buf;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
            memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
        }
        ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n >= 0) {
            sent += (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if ((errno == EAGAIN || errno == EWOULDBLOCK) && vqkv__wait_writable(sock) == VQKV_OK)
            continue;
        return VQKV_EIO;
    }
    return VQKV_OK;
}

int vqkv_frame_send(int sock, const Vqkv__Envelope *env, const int *fds, size_t n_fds,
                    uint32_t max_frame)
{
    if (sock < 0 || n_fds > VQKV_FRAME_MAX_FDS || (n_fds > 0 && fds == NULL))
        return VQKV_EINVAL;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = vqkv_frame_encode(env, max_frame, &buf, &len);
    if (rc < 0)
        return rc;
    rc = vqkv_frame_send_buf(sock, buf, len, fds, n_fds);
    int saved = errno;
    free(buf);
    errno = saved;
    return rc;
}

/* ---- unpacking ------------------------------------------------------------- */

/* protobuf-c allocates through a caller-supplied allocator; this one counts
 * bytes against a budget so a hostile frame cannot turn a small packed size
 * into a large unpacked one (an empty repeated message costs 2 bytes on the
 * wire and over 100 unpacked). Each block carries its size in a header so
 * frees can be counted too; protobuf-c frees its scratch space and, on
 * failure, everything, through the same allocator. After unpacking, the
 * budget is not needed: vqkv__free_allocator frees through the header alone. */
typedef union {
    size_t size;
    max_align_t align; /* keeps the block after it aligned as malloc's */
} vqkv__alloc_hdr_t;

typedef struct {
    size_t used, budget;
    int over, oom;
} vqkv__budget_t;

static void *vqkv__budget_alloc(void *data, size_t size)
{
    vqkv__budget_t *b = data;
    if (size > b->budget || size + sizeof(vqkv__alloc_hdr_t) > b->budget - b->used) {
        b->over = 1;
        return NULL;
    }
    size_t cost = size + sizeof(vqkv__alloc_hdr_t);
    vqkv__alloc_hdr_t *h = malloc(cost);
    if (h == NULL) {
        b->oom = 1;
        return NULL;
    }
    h->size = cost;
    b->used += cost;
    return h + 1;
}

static void vqkv__budget_free(void *data, void *ptr)
{
    if (ptr == NULL)
        return;
    vqkv__alloc_hdr_t *h = (vqkv__alloc_hdr_t *)ptr - 1;
    if (data != NULL)
        ((vqkv__budget_t *)data)->used -= h->size;
    free(h);
}

static void *vqkv__refuse_alloc(void *data, size_t size)
{
    (void)data;
    (void)size;
    return NULL;
}

static ProtobufCAllocator vqkv__free_allocator = {vqkv__refuse_alloc, vqkv__budget_free, NULL};

int vqkv_frame_unpack(const uint8_t *data, size_t len, Vqkv__Envelope **out)
{
    if (out == NULL || (data == NULL && len > 0))
        return VQKV_EINVAL;
    if (len > VQKV_FRAME_LIMIT)
        return VQKV_ETOOBIG;
    vqkv__budget_t budget = {
        .budget = (size_t)VQKV_FRAME_UNPACK_FACTOR * len + VQKV_FRAME_UNPACK_SLACK,
    };
    ProtobufCAllocator alloc = {vqkv__budget_alloc, vqkv__budget_free, &budget};
    Vqkv__Envelope *env = vqkv__envelope__unpack(&alloc, len, data);
    if (env == NULL)
        return budget.over ? VQKV_ETOOBIG : budget.oom ? VQKV_ENOMEM : VQKV_EMALFORMED;
    *out = env;
    return VQKV_OK;
}

void vqkv_frame_envelope_free(Vqkv__Envelope *env)
{
    if (env != NULL)
        protobuf_c_message_free_unpacked(&env->base, &vqkv__free_allocator);
}

/* ---- strictness -------------------------------------------------------------- */

/* Walks msg by its descriptor: unknown fields anywhere, or an enum value
 * the enum does not name, give VQKV_EUNKNOWN. The schema has no recursive
 * messages, so the depth is bounded by it, not by the input. */
static int vqkv__check_message(const ProtobufCMessage *msg)
{
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    const char *base = (const char *)msg;
    if (msg->n_unknown_fields > 0)
        return VQKV_EUNKNOWN;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_ENUM)
            continue;
        size_t count = 1;
        const char *elems = base + f->offset; /* the member itself, or its array */
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            memcpy(&count, base + f->quantifier_offset, sizeof count);
            memcpy(&elems, base + f->offset, sizeof elems);
        } else if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            uint32_t which;
            memcpy(&which, base + f->quantifier_offset, sizeof which);
            if (which != f->id)
                continue;
        }
        for (size_t j = 0; j < count; j++) {
            if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                const ProtobufCMessage *sub;
                memcpy(&sub, elems + j * sizeof sub, sizeof sub);
                int rc = sub != NULL ? vqkv__check_message(sub) : VQKV_OK;
                if (rc < 0)
                    return rc;
            } else {
                int value;
                memcpy(&value, elems + j * sizeof value, sizeof value);
                if (protobuf_c_enum_descriptor_get_value(f->descriptor, value) == NULL)
                    return VQKV_EUNKNOWN;
            }
        }
    }
    return VQKV_OK;
}

int vqkv_frame_check(const Vqkv__Envelope *env)
{
    if (env == NULL || env->base.descriptor != &vqkv__envelope__descriptor)
        return VQKV_EINVAL;
    if (env->body_case == VQKV__ENVELOPE__BODY__NOT_SET)
        return VQKV_EUNKNOWN;
    return vqkv__check_message(&env->base);
}
