/* fuzz_session.c -- vqkvd's request handling, in-process: a real server
 * (daemon/server.c, session.c, calib.c and the CPU backend, started with
 * vqkvd_server_start on a socket in a private temporary directory) with a
 * small pool, driven by one client connection whose frames go through the
 * same reader, unpacking, checks and dispatch as any client's. Put and Get
 * run on libuv's thread pool against a real memfd region. No network, no
 * fork: one process, the server's loop run by this file between sends.
 *
 * Input (fuzz.h): a setup byte, then records. Unless the setup byte says
 * otherwise, a prelude (fuzz_prelude: Hello, RegisterModel, RegisterRegion)
 * runs first, so model handle 1 and region handle 1 are ready and Put and
 * Get reach the region's memory. A record is an Envelope sent as one frame,
 * optionally with the region memfd, a codebook file or a stray fd, or a
 * write into the region's memory (worker KV data, NaNs included). The
 * server is started afresh for every input (a few hundred microseconds), so
 * state stays bounded and every crash input replays alone.
 *
 * Invariants: every reply unpacks, passes vqkv_frame_check and is a reply,
 * never a request; an Error carries a negative code; every frame gets
 * exactly one reply carrying its request_id (0 for a frame that does not
 * unpack), so the multiset of reply ids equals that of request ids; the
 * server never closes the connection except after a frame over max_frame
 * (then after an Error with id 0); after the server is stopped and
 * destroyed, the loop has no handle left and no fd stays open (regions and
 * codebook files sent over SCM_RIGHTS included).
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "frame.h"
#include "fuzz.h"
#include "log.h"
#include "server.h"
#include "session.h"

/* Small limits, so that they are reached. */
#define FUZZ_MAX_FRAME 16384
#define FUZZ_POOL_BYTES (1u << 20)
/* Pumps of the loop with nothing to show before a missing reply counts as
 * lost (each one a non-blocking loop iteration and a read). */
#define FUZZ_IDLE_LIMIT 2000

static struct {
    int ready;
    char dir[64];
    char sock[128];
    int devnull;
    uint8_t *books[FUZZ_N_CODECS]; /* a codebook file per VQ codec, else NULL */
    size_t books_len[FUZZ_N_CODECS];
    uint8_t *region_init; /* FUZZ_REGION_MEMFD_BYTES of fp16 KV values */
} fuzz__g;

typedef struct {
    uv_loop_t loop;
    vqkvd_server_t server;
    int sock; /* the client's end */
    int region_fd;
    int books_codec; /* fuzz_codecs index of FUZZ_OP_FRAME_BOOKS files */
    vqkv_frame_reader_t reader;
    uint64_t *want, *got; /* request ids sent, reply ids received */
    size_t n_want, n_got, cap_want, cap_got;
    int may_close; /* a frame over max_frame went out */
    int closed;    /* the server closed the connection */
} fuzz__session_t;

static void fuzz__init(void)
{
    fuzz__g.devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    FUZZ_CHECK(fuzz__g.devnull >= 0, "cannot open /dev/null");
    for (int i = 0; i < FUZZ_N_CODECS; i++)
        if (fuzz_codec_needs_books(fuzz_codecs[i]))
            FUZZ_CHECK(fuzz_codebook_make(fuzz_codecs[i], &fuzz_layout, &fuzz__g.books[i],
                                          &fuzz__g.books_len[i]) == VQKV_OK,
                       "codebooks for %s", fuzz_codecs[i]);
    size_t n = FUZZ_REGION_MEMFD_BYTES / 2;
    float *x = malloc(n * sizeof *x);
    fuzz__g.region_init = malloc(FUZZ_REGION_MEMFD_BYTES);
    FUZZ_CHECK(x != NULL && fuzz__g.region_init != NULL, "out of memory");
    fuzz_kv_values(3, x, n);
    vqkv_dtype_from_f32(VQKV_DTYPE_F16, x, n, fuzz__g.region_init);
    free(x);
    /* Quiet unless asked: a line per request would dominate the run. */
    vqkvd_log_level = getenv("VQKV_FUZZ_LOG") != NULL ? VQKVD_LOG_DEBUG : 0;
    /* libuv opens fds of its own once per process (a pipe for signals) at
     * the first loop: opened now, before any input counts fds. */
    uv_loop_t loop;
    FUZZ_CHECK(uv_loop_init(&loop) == 0 && uv_loop_close(&loop) == 0, "a libuv loop");
    fuzz__g.ready = 1;
}

static void fuzz__push(uint64_t **ids, size_t *n, size_t *cap, uint64_t id)
{
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 64;
        *ids = realloc(*ids, *cap * sizeof **ids);
        FUZZ_CHECK(*ids != NULL, "out of memory");
    }
    (*ids)[(*n)++] = id;
}

static int fuzz__is_reply(Vqkv__Envelope__BodyCase body)
{
    switch (body) {
    case VQKV__ENVELOPE__BODY_ERROR:
    case VQKV__ENVELOPE__BODY_WELCOME:
    case VQKV__ENVELOPE__BODY_MODEL_REGISTERED:
    case VQKV__ENVELOPE__BODY_REGION_REGISTERED:
    case VQKV__ENVELOPE__BODY_PUT_DONE:
    case VQKV__ENVELOPE__BODY_LOOKUP_RESULT:
    case VQKV__ENVELOPE__BODY_GET_DONE:
    case VQKV__ENVELOPE__BODY_ACK:
    case VQKV__ENVELOPE__BODY_STATS_REPLY: return 1;
    default: return 0;
    }
}

/* Reads every reply the socket holds now; returns how many. */
static size_t fuzz__drain(fuzz__session_t *S)
{
    size_t n = 0;
    while (!S->closed) {
        vqkv_frame_t f;
        int rc = vqkv_frame_reader_next(&S->reader, &f);
        if (rc == 1) {
            Vqkv__Envelope *env = NULL;
            rc = vqkv_frame_unpack(f.data, f.len, &env);
            FUZZ_CHECK(rc == VQKV_OK, "a reply does not unpack: %d", rc);
            FUZZ_CHECK(vqkv_frame_check(env) == VQKV_OK, "a reply fails the strictness check");
            FUZZ_CHECK(fuzz__is_reply(env->body_case), "the server sent body %d",
                       (int)env->body_case);
            FUZZ_CHECK(env->body_case != VQKV__ENVELOPE__BODY_ERROR || env->error->code < 0,
                       "an Error with code %d", (int)env->error->code);
            FUZZ_CHECK(f.n_fds == 0, "a reply came with fds");
            fuzz__push(&S->got, &S->n_got, &S->cap_got, env->request_id);
            vqkv_frame_envelope_free(env);
            vqkv_frame_clear(&f);
            n++;
            continue;
        }
        FUZZ_CHECK(rc == 0, "reading replies: %d", rc);
        rc = vqkv_frame_reader_recv(&S->reader, S->sock, MSG_DONTWAIT);
        if (rc == VQKV_EAGAIN)
            break;
        if (rc == VQKV_ECLOSED) {
            S->closed = 1;
            break;
        }
        FUZZ_CHECK(rc > 0, "reading replies: %d (a reply cut short?)", rc);
    }
    return n;
}

/* One turn of the server's loop, then the replies it wrote. */
static size_t fuzz__pump(fuzz__session_t *S, uv_run_mode mode)
{
    uv_run(&S->loop, mode);
    return fuzz__drain(S);
}

/* Sends one frame with its fds as a client must (the fds on a sendmsg of
 * their own that starts at the frame's first byte), turning the server's
 * loop whenever the socket is full. A payload over max_frame is announced
 * and not sent: the server refuses it at its length and stops reading. */
static void fuzz__send(fuzz__session_t *S, const uint8_t *payload, size_t len, const int *fds,
                       size_t n_fds)
{
    if (S->closed || S->may_close)
        return;
    Vqkv__Envelope *env = NULL;
    uint64_t id = vqkv_frame_unpack(payload, len, &env) == VQKV_OK ? env->request_id : 0;
    vqkv_frame_envelope_free(env);
    int too_big = len > FUZZ_MAX_FRAME;
    fuzz__push(&S->want, &S->n_want, &S->cap_want, too_big ? 0 : id);
    if (too_big)
        S->may_close = 1;
    size_t total = VQKV_FRAME_HEADER_BYTES + (too_big ? 0 : len);
    uint8_t *buf = malloc(VQKV_FRAME_HEADER_BYTES + len);
    FUZZ_CHECK(buf != NULL, "out of memory");
    for (int i = 0; i < 4; i++)
        buf[i] = (uint8_t)(len >> (8 * i));
    if (len > 0)
        memcpy(buf + VQKV_FRAME_HEADER_BYTES, payload, len);

    union {
        char buf[CMSG_SPACE(sizeof(int) * VQKV_FRAME_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    size_t off = 0, idle = 0;
    while (off < total && !S->closed) {
        struct iovec iov = {.iov_base = buf + off, .iov_len = total - off};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (off == 0 && n_fds > 0) {
            memset(&ctl, 0, sizeof ctl);
            msg.msg_control = ctl.buf;
            msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
            memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
        }
        ssize_t n = sendmsg(S->sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            off += (size_t)n;
            idle = 0;
            continue;
        }
        FUZZ_CHECK(n < 0 && (errno == EAGAIN || errno == EPIPE || errno == ECONNRESET),
                   "sendmsg: %s", strerror(errno));
        if (errno != EAGAIN) {
            fuzz__drain(S);
            FUZZ_CHECK(S->closed, "the connection broke without an end of stream");
            break;
        }
        if (fuzz__pump(S, UV_RUN_NOWAIT) == 0)
            FUZZ_CHECK(++idle < FUZZ_IDLE_LIMIT, "the server stopped reading");
    }
    free(buf);
}

/* A memfd holding the codebook file of the session's VQ codec. */
static int fuzz__books_fd(const fuzz__session_t *S)
{
    return fuzz_memfd("codebooks", fuzz__g.books[S->books_codec],
                      fuzz__g.books_len[S->books_codec]);
}

static void fuzz__settle(fuzz__session_t *S);

static void fuzz__run_record(fuzz__session_t *S, int op, const uint8_t *p, size_t len)
{
    if (op & FUZZ_OP_SYNC)
        fuzz__settle(S);
    if ((op & 3) == FUZZ_OP_POKE) {
        uint32_t at = 0;
        for (size_t i = 0; i < 4 && i < len; i++)
            at |= (uint32_t)p[i] << (8 * i);
        at %= FUZZ_REGION_MEMFD_BYTES;
        size_t n = len > 4 ? len - 4 : 0;
        if (n > FUZZ_REGION_MEMFD_BYTES - at)
            n = FUZZ_REGION_MEMFD_BYTES - at;
        FUZZ_CHECK(n == 0 || pwrite(S->region_fd, p + 4, n, at) == (ssize_t)n, "poke");
        return;
    }
    int fds[2];
    size_t n_fds = 0;
    int books = -1;
    if ((op & 3) == FUZZ_OP_FRAME_REGION)
        fds[n_fds++] = S->region_fd;
    else if ((op & 3) == FUZZ_OP_FRAME_BOOKS)
        fds[n_fds++] = books = fuzz__books_fd(S);
    if (op & FUZZ_OP_STRAY_FD)
        fds[n_fds++] = fuzz__g.devnull;
    fuzz__send(S, p, len, fds, n_fds);
    if (books >= 0)
        close(books); /* the server holds its own copy */
}

/* Runs the records of buf[0, len); a record cut short ends the input. */
static void fuzz__run_records(fuzz__session_t *S, const uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off + 3 <= len) {
        int op = buf[off];
        size_t n = (size_t)buf[off + 1] | (size_t)buf[off + 2] << 8;
        if (n > len - off - 3)
            n = len - off - 3;
        fuzz__run_record(S, op, buf + off + 3, n);
        off += 3 + n;
    }
}

/* Turns the loop until every frame has its reply, or, after a frame over
 * max_frame, until the server has closed the connection. */
static void fuzz__settle(fuzz__session_t *S)
{
    size_t idle = 0;
    while (!S->closed && (S->may_close || S->n_got < S->n_want)) {
        const vqkvd_client_t *c = S->server.clients;
        int busy = c != NULL && c->pending > 0;
        size_t got = fuzz__pump(S, busy ? UV_RUN_ONCE : UV_RUN_NOWAIT);
        if (got > 0 || busy)
            idle = 0;
        else
            FUZZ_CHECK(++idle < FUZZ_IDLE_LIMIT, "%zu replies for %zu frames; the rest are lost",
                       S->n_got, S->n_want);
    }
}

static int fuzz__id_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void fuzz__check_replies(fuzz__session_t *S)
{
    if (S->n_want > 0)
        qsort(S->want, S->n_want, sizeof *S->want, fuzz__id_cmp);
    if (S->n_got > 0)
        qsort(S->got, S->n_got, sizeof *S->got, fuzz__id_cmp);
    if (!S->may_close) {
        FUZZ_CHECK(!S->closed, "the server closed the connection");
        FUZZ_CHECK(S->n_got == S->n_want, "%zu replies for %zu frames", S->n_got, S->n_want);
        for (size_t i = 0; i < S->n_want; i++)
            FUZZ_CHECK(S->want[i] == S->got[i], "reply ids differ from request ids");
        return;
    }
    /* Replies of jobs still running at the close are dropped: a subset. */
    size_t j = 0;
    for (size_t i = 0; i < S->n_got; i++) {
        while (j < S->n_want && S->want[j] < S->got[i])
            j++;
        FUZZ_CHECK(j < S->n_want && S->want[j] == S->got[i], "a reply to no request (id %llu)",
                   (unsigned long long)S->got[i]);
        j++;
    }
}

static void fuzz__start(fuzz__session_t *S, int setup)
{
    /* A directory per input, removed when the server has stopped (and
     * unlinked its socket): libFuzzer may leave without running atexit. */
    snprintf(fuzz__g.dir, sizeof fuzz__g.dir, "/tmp/vqkv-fuzz-XXXXXX");
    FUZZ_CHECK(mkdtemp(fuzz__g.dir) != NULL, "mkdtemp: %s", strerror(errno));
    snprintf(fuzz__g.sock, sizeof fuzz__g.sock, "%s/vqkvd.sock", fuzz__g.dir);
    FUZZ_CHECK(uv_loop_init(&S->loop) == 0, "uv_loop_init");
    vqkvd_config_t cfg;
    vqkvd_config_defaults(&cfg);
    cfg.socket_path = fuzz__g.sock;
    cfg.max_frame = FUZZ_MAX_FRAME;
    cfg.max_inflight = 16;
    cfg.max_regions = 4;
    cfg.max_clients = 4;
    cfg.pool_bytes = FUZZ_POOL_BYTES;
    /* Two blocks of fuzz_layout: the second Put of a VQ model trains. */
    cfg.calib_tokens = 2 * fuzz_layout.block_tokens;
    int rc = vqkvd_server_start(&S->server, &S->loop, &cfg);
    FUZZ_CHECK(rc == VQKV_OK, "vqkvd_server_start: %s (%s)", vqkv_strerror(rc),
               strerror(S->server.sys_errno));

    S->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, fuzz__g.sock, strlen(fuzz__g.sock) + 1);
    FUZZ_CHECK(S->sock >= 0 && connect(S->sock, (struct sockaddr *)&addr, sizeof addr) == 0,
               "connect: %s", strerror(errno));
    S->region_fd = fuzz_memfd("region", fuzz__g.region_init, FUZZ_REGION_MEMFD_BYTES);
    vqkv_frame_reader_init(&S->reader, VQKV_FRAME_LIMIT);
    int codec = (setup >> FUZZ_SETUP_CODEC_SHIFT) % FUZZ_N_CODECS;
    S->books_codec = fuzz__g.books[codec] != NULL ? codec : 4; /* fuzz_codecs[4] is VQ */
    FUZZ_CHECK(fuzz__g.books[S->books_codec] != NULL, "fuzz_codecs[4] takes no codebooks");
}

static void fuzz__stop(fuzz__session_t *S)
{
    close(S->sock);
    vqkvd_server_stop(&S->server);
    uv_run(&S->loop, UV_RUN_DEFAULT); /* until the jobs and the handles are done */
    vqkvd_server_destroy(&S->server);
    FUZZ_CHECK(rmdir(fuzz__g.dir) == 0, "the socket file was left behind: %s", strerror(errno));
    FUZZ_CHECK(uv_loop_close(&S->loop) == 0, "the server left a handle open");
    close(S->region_fd);
    vqkv_frame_reader_free(&S->reader);
    free(S->want);
    free(S->got);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fuzz__g.ready)
        fuzz__init();
    if (size < 1)
        return 0;
    int fds_before = fuzz_fd_count();
    fuzz__session_t S = {0};
    fuzz__start(&S, data[0]);
    if (!(data[0] & FUZZ_SETUP_NO_PRELUDE)) {
        uint8_t *prelude = NULL;
        size_t prelude_len = 0;
        fuzz_prelude(&prelude, &prelude_len, data[0]);
        fuzz__run_records(&S, prelude, prelude_len);
        free(prelude);
    }
    fuzz__run_records(&S, data + 1, size - 1);
    fuzz__settle(&S);
    fuzz__check_replies(&S);
    fuzz__stop(&S);
    int fds_after = fuzz_fd_count();
    FUZZ_CHECK(fds_after == fds_before, "%d fds open before the session, %d after", fds_before,
               fds_after);
    return 0;
}
