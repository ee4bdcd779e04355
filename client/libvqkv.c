/* libvqkv.c -- the worker library (vqkv.h): synchronous request/reply over
 * the blocking frame helpers of proto/frame.h.
 *
 * A client outlives its connection. When the socket fails (the daemon
 * exited, crashed or was restarted), the call in progress fails with
 * VQKV_ECLOSED and the socket is dropped; the next call connects again to
 * the same path, says Hello, and registers again every model and region
 * the client holds before it sends its own request. For that the client
 * keeps what it registered: each model's request, and a dup of each
 * region's memfd (one fd a region, held until vqkv_close) and of a codebook
 * file sent with a model. The caller's handles never change: a
 * vqkv_model_t keeps the daemon's current model handle, a region handle is
 * the client's own number mapped to the daemon's, and a lease handle
 * carries the number of the connection that took it in its top 16 bits, so
 * a lease from a connection that is gone is refused here (VQKV_ELEASE)
 * instead of naming some new lease of the restarted daemon.
 */
/* vqkv_proto.h first: vqkv.h then leaves out its copy of the codes. */
#include "frame.h"
#include "vqkv_proto.h"

#include "block_keys.h"
#include "cuda_driver.h"
#include "vqkv.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define VQKV__ERR_LEN 512
_Static_assert(VQKV_KEY_BYTES == VQKV_PROTO_KEY_BYTES, "key size");
#define VQKV__NAME_MAX 64
/* Wire bytes per block of a Put (key and parent with their tags, a packed
 * slot) and per key of a Pin, Unpin or Evict, rounded up; and what the
 * rest of a request takes, generously. They cut large calls into parts. */
#define VQKV__PUT_WIRE_BYTES 80
#define VQKV__KEY_WIRE_BYTES 40
#define VQKV__FRAME_SLACK 1024
/* A lease handle: the connection's generation above, the daemon's id below. */
#define VQKV__LEASE_GEN_SHIFT 48
#define VQKV__LEASE_ID_MASK ((UINT64_C(1) << VQKV__LEASE_GEN_SHIFT) - 1)

/* A tenant salt from a Welcome. A restarted daemon draws new salts, so a
 * reconnect may bring one; the old ones are freed only by vqkv_close
 * because vqkv_model_block_keys on another thread may still be reading one
 * (32 bytes kept per restart). */
typedef struct vqkv__salt {
    struct vqkv__salt *next;
    uint8_t bytes[VQKV_BLOCK_KEY_SALT_LEN];
} vqkv__salt_t;

struct vqkv_model {
    struct vqkv_model *next;
    uint64_t handle; /* the daemon's, on the current connection */
    char *model_id;
    char *codec; /* canonical spec */
    uint32_t block_bytes;
    vqkv_layout_t layout;
    uint32_t kv_head_first, kv_head_count; /* the range FindModel names */
    int registered;                        /* by RegisterModel (else found by FindModel) */
    int codebook_fd;                       /* the file it was registered with, or -1 */
    vqkv_rope_t rope;                      /* named at registration; theta 0: none */
    int codebooks_ready;                   /* as of the last RegisterModel or FindModel */
    _Atomic(const vqkv__salt_t *) salt;    /* swapped by a reconnect */
};

/* A registered region, kept to register it again after a reconnect: a
 * memfd, a CUDA allocation's IPC handle, or the fds of the CUDA VMM
 * allocations it spans. */
typedef struct vqkv__region {
    struct vqkv__region *next;
    vqkv_region_t handle;   /* the caller's */
    uint64_t daemon_handle; /* the daemon's, on the current connection */
    const vqkv_model_t *model;
    Vqkv__RegionKind kind;
    /* A dup of the caller's memfd, or the exported VMM pieces' fds (with
     * piece_bytes, each's size); none for CUDA IPC. */
    int *fds;
    uint64_t *piece_bytes;
    size_t n_fds;
    uint8_t ipc_handle[VQKV__CUDA_IPC_HANDLE_BYTES]; /* CUDA IPC */
    uint8_t gpu_uuid[VQKV__GPU_UUID_BYTES];          /* the CUDA kinds */
    uint64_t bytes, offset;
    vqkv_kv_view_t view;     /* its layer_offsets point into layer_offsets */
    uint64_t *layer_offsets; /* the caller's, copied; NULL for a strided view */
} vqkv__region_t;

static void vqkv__region_free(vqkv__region_t *r)
{
    for (size_t i = 0; i < r->n_fds; i++)
        close(r->fds[i]);
    free(r->fds);
    free(r->piece_bytes);
    free(r->layer_offsets);
    free(r);
}

/* One wire request of an asynchronous call (vqkv_put_start,
 * vqkv_get_start) awaiting its reply. */
typedef struct {
    uint64_t wire_id; /* the Envelope's request_id */
    vqkv_request_t request;
    vqkv_put_status_t *statuses; /* a put part's, or NULL */
    size_t n;                    /* blocks of a put part */
    bool is_get;
} vqkv__part_t;

/* An asynchronous call: done once it is sealed (every part sent) and every
 * part has its reply. */
typedef struct {
    vqkv_request_t request;
    uint32_t parts_left;
    bool sealed;
    int result; /* blocks stored or written so far, or the first error */
} vqkv__async_t;

struct vqkv_client {
    int fd; /* -1 between a lost connection and the next call */
    vqkv_frame_reader_t reader;
    uint64_t next_id;
    uint32_t max_frame; /* the daemon's, from Welcome */
    int timeout_ms;
    uint16_t gen; /* connections made; goes into lease handles */
    struct sockaddr_un addr;
    char name[VQKV__NAME_MAX + 1];
    vqkv__salt_t *salts; /* the current one first */
    char *tenant;
    char *backend;
    char *server_version;
    vqkv_model_t *models;
    vqkv__region_t *regions;
    vqkv_region_t next_region;
    uint32_t max_inflight; /* the daemon's, from Welcome */
    /* Asynchronous calls: parts awaiting replies, calls in progress, and
     * completions not yet taken by vqkv_complete. O(in flight) lookups:
     * at most VQKV_ASYNC_MAX, not needed faster so far. */
    vqkv__part_t parts[VQKV_ASYNC_MAX];
    size_t n_parts;
    vqkv__async_t asyncs[VQKV_ASYNC_MAX];
    size_t n_asyncs;
    vqkv_completion_t done[VQKV_ASYNC_MAX];
    size_t n_done;
    vqkv_request_t next_request;
    char err[VQKV__ERR_LEN];
};

/* ---- helpers ---------------------------------------------------------------- */

static int vqkv__ready(vqkv_client_t *c);

static int vqkv__fail(vqkv_client_t *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

static char *vqkv__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

static void vqkv__async_part_done(vqkv_client_t *c, size_t part, int result);

/* Drops the connection; the next call makes a new one. Asynchronous calls
 * waiting for replies on it complete with VQKV_ECLOSED. */
static void vqkv__disconnect(vqkv_client_t *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    vqkv_frame_reader_free(&c->reader);
    while (c->n_parts > 0)
        vqkv__async_part_done(c, c->n_parts - 1, VQKV_ECLOSED);
}

/* ---- asynchronous calls: bookkeeping -------------------------------------------- */

static vqkv__async_t *vqkv__async_find(vqkv_client_t *c, vqkv_request_t request)
{
    for (size_t i = 0; i < c->n_asyncs; i++)
        if (c->asyncs[i].request == request)
            return &c->asyncs[i];
    return NULL;
}

/* Moves a call whose every part has replied to the completions. */
static void vqkv__async_finish(vqkv_client_t *c, vqkv__async_t *a)
{
    if (!a->sealed || a->parts_left > 0)
        return;
    c->done[c->n_done++] = (vqkv_completion_t){a->request, a->result};
    *a = c->asyncs[--c->n_asyncs];
}

/* Part `part` has its result: blocks (>= 0) or an error code. */
static void vqkv__async_part_done(vqkv_client_t *c, size_t part, int result)
{
    vqkv__async_t *a = vqkv__async_find(c, c->parts[part].request);
    c->parts[part] = c->parts[--c->n_parts];
    if (a == NULL)
        return;
    if (result < 0 && a->result >= 0)
        a->result = result;
    else if (result >= 0 && a->result >= 0)
        a->result += result;
    a->parts_left--;
    vqkv__async_finish(c, a);
}

/* Takes r when it is the reply to a part of an asynchronous call (true,
 * r freed), else leaves it (false). */
static bool vqkv__async_reply(vqkv_client_t *c, Vqkv__Envelope *r)
{
    size_t i = 0;
    while (i < c->n_parts && c->parts[i].wire_id != r->request_id)
        i++;
    if (i == c->n_parts || r->request_id == 0)
        return false;
    const vqkv__part_t *p = &c->parts[i];
    int result;
    if (r->body_case == VQKV__ENVELOPE__BODY_ERROR) {
        result = r->error->code < 0 ? r->error->code : VQKV_EPROTO;
        vqkv__fail(c, result, "%s", r->error->message);
    } else if (r->body_case == VQKV__ENVELOPE__BODY_PUT_DONE && !p->is_get &&
               p->n == r->put_done->n_status) {
        for (size_t k = 0; p->statuses != NULL && k < p->n; k++)
            p->statuses[k] = (vqkv_put_status_t)r->put_done->status[k];
        result = (int)r->put_done->stored;
    } else if (r->body_case == VQKV__ENVELOPE__BODY_GET_DONE && p->is_get) {
        result = (int)r->get_done->written;
    } else {
        result = vqkv__fail(c, VQKV_EPROTO, "unexpected reply type %d", (int)r->body_case);
    }
    vqkv_frame_envelope_free(r);
    vqkv__async_part_done(c, i, result);
    return true;
}

/* The socket failed under a request: its bytes may be half sent or half
 * read, so nothing more can go over it. */
static int vqkv__lost(vqkv_client_t *c, int e)
{
    vqkv__disconnect(c);
    return vqkv__fail(c, VQKV_ECLOSED, "vqkvd closed the connection (%s); the next call reconnects",
                      e != 0 ? strerror(e) : "end of stream");
}

/* The Envelope in frame (which it empties), checked; VQKV_OK with *r the
 * caller's to free, or the error with nothing to free. */
static int vqkv__unpack_reply(vqkv_frame_t *frame, Vqkv__Envelope **r)
{
    int rc = vqkv_frame_unpack(frame->data, frame->len, r);
    vqkv_frame_clear(frame);
    if (rc == VQKV_OK)
        rc = vqkv_frame_check(*r);
    if (rc != VQKV_OK) {
        vqkv_frame_envelope_free(*r);
        *r = NULL;
    }
    return rc;
}

/* Sends env (request_id assigned here) with fds, then waits for the reply
 * carrying its id; replies to earlier requests that timed out are skipped.
 * *reply is the reply (an Error becomes its code, the message kept). A
 * failed socket drops the connection: VQKV_ECLOSED. */
static int vqkv__call(vqkv_client_t *c, Vqkv__Envelope *env, const int *fds, size_t n_fds,
                      Vqkv__Envelope__BodyCase want, Vqkv__Envelope **reply)
{
    *reply = NULL;
    env->request_id = c->next_id++;
    int rc = vqkv_frame_send(c->fd, env, fds, n_fds, c->max_frame);
    if (rc == VQKV_ETOOBIG)
        return vqkv__fail(c, rc, "request exceeds the daemon's frame limit of %u bytes",
                          c->max_frame);
    /* A daemon that refuses a peer (not allowed, too many clients) sends an
     * Error and closes at once, so the request can meet a broken pipe: the
     * Error is still queued here and says more than EPIPE does. */
    int send_errno = 0;
    if (rc == VQKV_EIO) {
        send_errno = errno;
        if (send_errno != EPIPE && send_errno != ECONNRESET)
            return vqkv__lost(c, send_errno);
    } else if (rc != VQKV_OK) {
        return vqkv__fail(c, rc, "sending request: %s", vqkv_proto_strerror(rc));
    }
    for (;;) {
        vqkv_frame_t frame;
        errno = 0;
        rc = vqkv_frame_recv(c->fd, &c->reader, &frame);
        if (rc == VQKV_EAGAIN && send_errno == 0)
            return vqkv__fail(c, rc, "no reply from vqkvd within %d ms", c->timeout_ms);
        if (rc == VQKV_EIO || rc == VQKV_ECLOSED || rc == VQKV_ETRUNC || rc == VQKV_EAGAIN)
            return vqkv__lost(c, send_errno != 0 ? send_errno : rc == VQKV_EIO ? errno : 0);
        if (rc != VQKV_OK) {
            /* The stream is out of step: no later request can be read. */
            vqkv__disconnect(c);
            return vqkv__fail(c, rc, "receiving reply: %s; the next call reconnects",
                              vqkv_proto_strerror(rc));
        }
        Vqkv__Envelope *r = NULL;
        rc = vqkv__unpack_reply(&frame, &r);
        if (rc != VQKV_OK)
            return vqkv__fail(c, rc, "reply not understood: %s", vqkv_proto_strerror(rc));
        if (vqkv__async_reply(c, r))
            continue; /* an asynchronous call's, kept for vqkv_complete */
        if (r->request_id != env->request_id && r->request_id != 0) {
            vqkv_frame_envelope_free(r); /* a late reply to an abandoned request */
            continue;
        }
        if (r->body_case == VQKV__ENVELOPE__BODY_ERROR) {
            int code = r->error->code < 0 ? r->error->code : VQKV_EPROTO;
            if (send_errno != 0)
                vqkv__disconnect(c); /* the daemon's last words: it has closed */
            vqkv__fail(c, code, "%s", r->error->message);
            vqkv_frame_envelope_free(r);
            return code;
        }
        if (send_errno != 0) {
            vqkv_frame_envelope_free(r);
            return vqkv__lost(c, send_errno);
        }
        if (r->body_case != want) {
            vqkv_frame_envelope_free(r);
            return vqkv__fail(c, VQKV_EPROTO, "unexpected reply type %d", (int)r->body_case);
        }
        *reply = r;
        return VQKV_OK;
    }
}

/* ---- connections -------------------------------------------------------------- */

int vqkv_default_socket(char *buf, size_t size)
{
    static const char system_socket[] = "/run/vqkv/vqkv.sock";
    if (buf == NULL)
        return VQKV_EINVAL;
    const char *env = getenv("VQKV_SOCKET");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n = -1;
    if (env != NULL && env[0] != '\0') {
        n = snprintf(buf, size, "%s", env);
    } else if (getuid() != 0 && xdg != NULL && xdg[0] != '\0') {
        struct stat st;
        n = snprintf(buf, size, "%s/vqkv/vqkv.sock", xdg);
        if (n >= 0 && (size_t)n < size && (stat(buf, &st) != 0 || !S_ISSOCK(st.st_mode)))
            n = -1; /* no daemon of the user's own: the system one */
    }
    if (n < 0)
        n = snprintf(buf, size, "%s", system_socket);
    return n < 0 || (size_t)n >= size ? VQKV_EINVAL : VQKV_OK;
}

const char *vqkv_client_strerror(int err)
{
    return vqkv_proto_strerror(err);
}

const char *vqkv_last_error(const vqkv_client_t *client)
{
    return client == NULL ? "" : client->err;
}

const char *vqkv_client_tenant(const vqkv_client_t *client)
{
    return client->tenant;
}

const char *vqkv_client_backend(const vqkv_client_t *client)
{
    return client->backend;
}

const char *vqkv_client_server_version(const vqkv_client_t *client)
{
    return client->server_version;
}

static void vqkv__model_free(vqkv_model_t *m)
{
    if (m->codebook_fd >= 0)
        close(m->codebook_fd);
    free(m->model_id);
    free(m->codec);
    free(m);
}

void vqkv_close(vqkv_client_t *client)
{
    if (client == NULL)
        return;
    vqkv__disconnect(client);
    while (client->models != NULL) {
        vqkv_model_t *m = client->models;
        client->models = m->next;
        vqkv__model_free(m);
    }
    while (client->regions != NULL) {
        vqkv__region_t *r = client->regions;
        client->regions = r->next;
        vqkv__region_free(r);
    }
    while (client->salts != NULL) {
        vqkv__salt_t *t = client->salts;
        client->salts = t->next;
        free(t);
    }
    free(client->tenant);
    free(client->backend);
    free(client->server_version);
    free(client);
}

/* *field = value, keeping the old string (and pointers to it) when equal. */
static int vqkv__keep_string(char **field, const char *value)
{
    if (*field != NULL && strcmp(*field, value) == 0)
        return VQKV_OK;
    char *d = vqkv__strdup(value);
    if (d == NULL)
        return VQKV_ENOMEM;
    free(*field);
    *field = d;
    return VQKV_OK;
}

/* Keeps what Welcome says: limits, names and the tenant salt (a new salt
 * node when it changed, which the models then point to). */
static int vqkv__welcome(vqkv_client_t *c, const Vqkv__Welcome *w)
{
    if (w->tenant_salt.len != VQKV_BLOCK_KEY_SALT_LEN || w->max_frame_bytes == 0)
        return vqkv__fail(c, VQKV_EPROTO, "vqkvd sent a Welcome without a salt or a frame limit");
    c->max_frame = w->max_frame_bytes < VQKV_FRAME_LIMIT ? w->max_frame_bytes : VQKV_FRAME_LIMIT;
    c->max_inflight = w->max_inflight;
    if (vqkv__keep_string(&c->tenant, w->tenant) != VQKV_OK ||
        vqkv__keep_string(&c->backend, w->backend) != VQKV_OK ||
        vqkv__keep_string(&c->server_version, w->server_version) != VQKV_OK)
        return vqkv__fail(c, VQKV_ENOMEM, "out of memory");
    if (c->salts != NULL &&
        memcmp(c->salts->bytes, w->tenant_salt.data, VQKV_BLOCK_KEY_SALT_LEN) == 0)
        return VQKV_OK;
    vqkv__salt_t *t = malloc(sizeof *t);
    if (t == NULL)
        return vqkv__fail(c, VQKV_ENOMEM, "out of memory");
    memcpy(t->bytes, w->tenant_salt.data, VQKV_BLOCK_KEY_SALT_LEN);
    t->next = c->salts;
    c->salts = t;
    for (vqkv_model_t *m = c->models; m != NULL; m = m->next)
        atomic_store_explicit(&m->salt, t, memory_order_release);
    return VQKV_OK;
}

/* Connects to c->addr and opens the session (Hello, Welcome). On failure
 * the client is left disconnected with the reason in c->err. */
static int vqkv__open(vqkv_client_t *c)
{
    int rc = vqkv_frame_reader_init(&c->reader, VQKV_FRAME_DEFAULT_MAX);
    if (rc != VQKV_OK)
        return vqkv__fail(c, rc, "frame reader: %s", vqkv_proto_strerror(rc));
    c->max_frame = VQKV_FRAME_DEFAULT_MAX;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&c->addr, sizeof c->addr) < 0) {
        int e = errno;
        vqkv__disconnect(c);
        errno = e;
        return vqkv__fail(c, VQKV_EIO, "cannot reach vqkvd at %s: %s", c->addr.sun_path,
                          strerror(e));
    }
    struct timeval tv = {c->timeout_ms / 1000, (c->timeout_ms % 1000) * 1000};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    Vqkv__Hello h = VQKV__HELLO__INIT;
    h.protocol_version = VQKV_PROTO_VERSION;
    h.client_name = c->name;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    Vqkv__Envelope *r;
    rc = vqkv__call(c, &env, NULL, 0, VQKV__ENVELOPE__BODY_WELCOME, &r);
    if (rc == VQKV_OK) {
        rc = vqkv__welcome(c, r->welcome);
        vqkv_frame_envelope_free(r);
    }
    if (rc != VQKV_OK) {
        vqkv__disconnect(c);
        return rc;
    }
    c->gen++;
    return VQKV_OK;
}

int vqkv_connect(const char *socket_path, const char *client_name, int timeout_ms,
                 vqkv_client_t **client)
{
    if (client == NULL)
        return VQKV_EINVAL;
    *client = NULL;
    char path_buf[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (socket_path == NULL) {
        if (vqkv_default_socket(path_buf, sizeof path_buf) != VQKV_OK)
            return VQKV_EINVAL;
        socket_path = path_buf;
    }
    if (client_name == NULL)
        client_name = "libvqkv";
    vqkv_client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return VQKV_ENOMEM;
    if (timeout_ms <= 0 || strlen(socket_path) >= sizeof c->addr.sun_path ||
        strlen(client_name) > VQKV__NAME_MAX) {
        free(c);
        return VQKV_EINVAL;
    }
    c->fd = -1;
    c->next_id = 1;
    c->timeout_ms = timeout_ms;
    c->addr.sun_family = AF_UNIX;
    memcpy(c->addr.sun_path, socket_path, strlen(socket_path) + 1);
    memcpy(c->name, client_name, strlen(client_name) + 1);
    int rc = vqkv__open(c);
    if (rc != VQKV_OK) {
        int e = errno;
        vqkv_close(c);
        errno = e;
        return rc;
    }
    *client = c;
    return VQKV_OK;
}

/* ---- models ------------------------------------------------------------------- */

/* A model request: RegisterModel of layout and codec (with the codebook
 * file on fd when >= 0) when layout is not NULL, else FindModel of the
 * head range [first, first + count). */
typedef struct {
    const char *model_id;
    const vqkv_layout_t *layout;
    const char *codec;
    int fd;
    uint32_t first, count;
    const vqkv_rope_t *rope; /* NULL: none named */
} vqkv__model_req_t;

/* Sends req; *reply is its ModelRegistered, with a layout. */
static int vqkv__model_send(vqkv_client_t *c, const vqkv__model_req_t *req, Vqkv__Envelope **reply)
{
    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    Vqkv__RegisterModel rm = VQKV__REGISTER_MODEL__INIT;
    Vqkv__FindModel fm = VQKV__FIND_MODEL__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    if (req->layout != NULL) {
        wl.num_layers = req->layout->num_layers;
        wl.num_kv_heads = req->layout->num_kv_heads;
        wl.head_dim = req->layout->head_dim;
        wl.block_tokens = req->layout->block_tokens;
        wl.dtype = (Vqkv__DType)req->layout->dtype;
        rm.model_id = (char *)req->model_id;
        rm.layout = &wl;
        rm.kv_head_first = 0;
        rm.kv_head_count = req->layout->num_kv_heads;
        rm.codec = (char *)req->codec;
        rm.num_fds = req->fd >= 0;
        if (req->rope != NULL) {
            rm.rope_theta = req->rope->theta;
            rm.rope_style = (Vqkv__RopeStyle)(req->rope->style + 1);
        }
        env.body_case = VQKV__ENVELOPE__BODY_REGISTER_MODEL;
        env.register_model = &rm;
    } else {
        fm.model_id = (char *)req->model_id;
        fm.kv_head_first = req->first;
        fm.kv_head_count = req->count;
        env.body_case = VQKV__ENVELOPE__BODY_FIND_MODEL;
        env.find_model = &fm;
    }
    int rc =
        vqkv__call(c, &env, &req->fd, req->fd >= 0, VQKV__ENVELOPE__BODY_MODEL_REGISTERED, reply);
    if (rc == VQKV_OK && (*reply)->model_registered->layout == NULL) {
        vqkv_frame_envelope_free(*reply);
        *reply = NULL;
        return vqkv__fail(c, VQKV_EPROTO, "the daemon sent no layout for \"%s\"", req->model_id);
    }
    return rc;
}

/* Sends req and keeps the model its reply names. A handle the client has
 * already is the same model, its codebooks_ready brought up to date. */
static int vqkv__model_call(vqkv_client_t *c, const vqkv__model_req_t *req, vqkv_model_t **model)
{
    *model = NULL;
    Vqkv__Envelope *r;
    int rc = vqkv__model_send(c, req, &r);
    if (rc != VQKV_OK)
        return rc;
    const Vqkv__ModelRegistered *mr = r->model_registered;
    vqkv_model_t *m;
    for (m = c->models; m != NULL; m = m->next)
        if (m->handle == mr->model_handle)
            break;
    if (m == NULL) {
        m = calloc(1, sizeof *m);
        if (m == NULL || (m->model_id = vqkv__strdup(req->model_id)) == NULL ||
            (m->codec = vqkv__strdup(mr->codec)) == NULL) {
            if (m != NULL) {
                m->codebook_fd = -1;
                vqkv__model_free(m);
            }
            rc = vqkv__fail(c, VQKV_ENOMEM, "model \"%s\": out of memory", req->model_id);
            goto cleanup;
        }
        m->handle = mr->model_handle;
        m->block_bytes = mr->block_bytes;
        const Vqkv__Layout *wl = mr->layout;
        m->layout = (vqkv_layout_t){wl->num_layers, wl->num_kv_heads, wl->head_dim,
                                    wl->block_tokens, (vqkv_dtype_t)wl->dtype};
        m->kv_head_first = mr->kv_head_first;
        m->kv_head_count = mr->kv_head_count;
        m->codebook_fd = -1;
        atomic_init(&m->salt, c->salts);
        m->next = c->models;
        c->models = m;
    }
    m->registered |= req->layout != NULL;
    if (req->rope != NULL && m->rope.theta == 0.0)
        m->rope = *req->rope;
    m->codebooks_ready = mr->codebooks_ready;
    *model = m;
cleanup:
    vqkv_frame_envelope_free(r);
    return rc;
}

/* Registers m again on a new connection: same id, layout, codec and
 * codebook file, or found again when the client only found it. */
static int vqkv__model_restore(vqkv_client_t *c, vqkv_model_t *m)
{
    vqkv__model_req_t req = {m->model_id,
                             m->registered ? &m->layout : NULL,
                             m->codec,
                             m->codebook_fd,
                             m->kv_head_first,
                             m->kv_head_count,
                             m->rope.theta != 0.0 ? &m->rope : NULL};
    Vqkv__Envelope *r;
    int rc = vqkv__model_send(c, &req, &r);
    if (rc != VQKV_OK)
        return rc;
    const Vqkv__ModelRegistered *mr = r->model_registered;
    if (strcmp(mr->codec, m->codec) != 0 || mr->block_bytes != m->block_bytes)
        rc = vqkv__fail(c, VQKV_EMISMATCH, "model \"%s\" is now %s, not %s", m->model_id, mr->codec,
                        m->codec);
    m->handle = mr->model_handle;
    m->codebooks_ready = mr->codebooks_ready;
    vqkv_frame_envelope_free(r);
    return rc;
}

/* RegisterModel, with the codebook file at codebook_path (or NULL) and
 * the RoPE rope (or NULL), both checked first. */
static int vqkv__register_model(vqkv_client_t *client, const char *model_id,
                                const vqkv_layout_t *layout, const char *codec_spec,
                                const char *codebook_path, const vqkv_rope_t *rope,
                                vqkv_model_t **model)
{
    *model = NULL;
    if (rope != NULL && vqkv_rope_check(rope) != VQKV_OK)
        return vqkv__fail(client, VQKV_EINVAL,
                          "register_model: RoPE base %g, style %d: the base must be finite and "
                          "above 1, the style VQKV_ROPE_NEOX or VQKV_ROPE_INTERLEAVED",
                          rope->theta, (int)rope->style);
    int fd = -1;
    if (codebook_path != NULL && (fd = open(codebook_path, O_RDONLY | O_CLOEXEC)) < 0)
        return vqkv__fail(client, VQKV_EINVAL, "register_model_codebook: %s: %s", codebook_path,
                          strerror(errno));
    int rc = vqkv__ready(client);
    if (rc == VQKV_OK) {
        vqkv__model_req_t req = {model_id, layout, codec_spec, fd, 0, layout->num_kv_heads, rope};
        rc = vqkv__model_call(client, &req, model);
    }
    /* The model keeps the first file it was given, to send after a reconnect. */
    if (rc == VQKV_OK && fd >= 0 && (*model)->codebook_fd < 0) {
        (*model)->codebook_fd = fd;
        fd = -1;
    }
    if (fd >= 0)
        close(fd);
    return rc;
}

int vqkv_register_model(vqkv_client_t *client, const char *model_id, const vqkv_layout_t *layout,
                        const char *codec_spec, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || layout == NULL || codec_spec == NULL || model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "register_model: NULL argument");
    return vqkv__register_model(client, model_id, layout, codec_spec, NULL, NULL, model);
}

int vqkv_register_model_codebook(vqkv_client_t *client, const char *model_id,
                                 const vqkv_layout_t *layout, const char *codec_spec,
                                 const char *codebook_path, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || layout == NULL || codec_spec == NULL || codebook_path == NULL ||
        model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "register_model_codebook: NULL argument");
    return vqkv__register_model(client, model_id, layout, codec_spec, codebook_path, NULL, model);
}

int vqkv_register_model_rope(vqkv_client_t *client, const char *model_id,
                             const vqkv_layout_t *layout, const char *codec_spec,
                             const char *codebook_path, const vqkv_rope_t *rope,
                             vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || layout == NULL || codec_spec == NULL || model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "register_model_rope: NULL argument");
    return vqkv__register_model(client, model_id, layout, codec_spec, codebook_path, rope, model);
}

int vqkv_model_codebooks_ready(const vqkv_model_t *model)
{
    return model != NULL && model->codebooks_ready;
}

int vqkv_model_find(vqkv_client_t *client, const char *model_id, uint32_t kv_head_first,
                    uint32_t kv_head_count, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "model_find: NULL argument");
    *model = NULL;
    int rc = vqkv__ready(client);
    if (rc != VQKV_OK)
        return rc;
    vqkv__model_req_t req = {model_id, NULL, NULL, -1, kv_head_first, kv_head_count, NULL};
    return vqkv__model_call(client, &req, model);
}

void vqkv_model_layout(const vqkv_model_t *model, vqkv_layout_t *layout)
{
    *layout = model->layout;
}

const char *vqkv_model_codec(const vqkv_model_t *model)
{
    return model->codec;
}

uint32_t vqkv_model_block_bytes(const vqkv_model_t *model)
{
    return model->block_bytes;
}

int vqkv_model_block_keys(const vqkv_model_t *model, const uint8_t *parent, const uint32_t *tokens,
                          size_t n_tokens, const uint8_t *extra, size_t extra_len,
                          uint8_t (*keys)[VQKV_KEY_BYTES], size_t max_keys, size_t *n_keys)
{
    if (model == NULL)
        return VQKV_EINVAL;
    vqkv_block_key_ctx_t ctx;
    const vqkv__salt_t *salt = atomic_load_explicit(&model->salt, memory_order_acquire);
    memcpy(ctx.tenant_salt, salt->bytes, sizeof ctx.tenant_salt);
    ctx.model_id = model->model_id;
    ctx.codec_id = model->codec;
    return vqkv_block_keys_continue(&ctx, parent, tokens, n_tokens, model->layout.block_tokens,
                                    extra, extra_len, keys, max_keys, n_keys);
}

/* ---- regions ------------------------------------------------------------------- */

int vqkv_memfd_create(const char *name, uint64_t bytes, int *fd)
{
    if (name == NULL || fd == NULL || bytes == 0 || bytes > (uint64_t)INT64_MAX)
        return VQKV_EINVAL;
    int f = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (f < 0)
        return VQKV_EIO;
    if (ftruncate(f, (off_t)bytes) < 0) {
        int e = errno;
        close(f);
        errno = e;
        return VQKV_EIO;
    }
    *fd = f;
    return VQKV_OK;
}

/* Sends n fds in RegionPieces, VQKV_FRAME_MAX_FDS a frame, each
 * acknowledged before the next: one round trip per 4 pieces (512 for a
 * 40 GiB cache of 20 MiB pieces), once per registration and reconnect. */
static int vqkv__region_pieces_send(vqkv_client_t *c, const int *fds, size_t n)
{
    for (size_t at = 0; at < n; at += VQKV_FRAME_MAX_FDS) {
        Vqkv__RegionPieces rp = VQKV__REGION_PIECES__INIT;
        rp.num_fds = n - at < VQKV_FRAME_MAX_FDS ? n - at : VQKV_FRAME_MAX_FDS;
        Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
        env.body_case = VQKV__ENVELOPE__BODY_REGION_PIECES;
        env.region_pieces = &rp;
        Vqkv__Envelope *reply;
        int rc = vqkv__call(c, &env, fds + at, rp.num_fds, VQKV__ENVELOPE__BODY_ACK, &reply);
        if (rc != VQKV_OK)
            return rc;
        vqkv_frame_envelope_free(reply);
    }
    return VQKV_OK;
}

/* Registers r on the current connection (its fds sent, if it has any) and
 * keeps the daemon's handle for it. */
static int vqkv__region_send(vqkv_client_t *c, vqkv__region_t *r)
{
    Vqkv__RegisterRegion rr = VQKV__REGISTER_REGION__INIT;
    rr.model_handle = r->model->handle;
    rr.kind = r->kind;
    rr.region_bytes = r->bytes;
    rr.offset = r->offset;
    rr.layer_stride = r->view.layer_stride;
    rr.kv_stride = r->view.kv_stride;
    rr.slot_stride = r->view.slot_stride;
    rr.token_stride = r->view.token_stride;
    rr.head_stride = r->view.head_stride;
    rr.num_slots = r->view.num_slots;
    rr.n_layer_offsets = r->layer_offsets != NULL ? r->model->layout.num_layers : 0;
    rr.layer_offsets = r->layer_offsets;
    if (r->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD) {
        rr.n_piece_bytes = r->n_fds;
        rr.piece_bytes = r->piece_bytes;
    }
    /* The last pieces come with the frame, 1 to VQKV_FRAME_MAX_FDS of
     * them; those before in RegionPieces, which the daemon holds for it. */
    size_t first = r->n_fds > 0 ? (r->n_fds - 1) / VQKV_FRAME_MAX_FDS * VQKV_FRAME_MAX_FDS : 0;
    int rc = vqkv__region_pieces_send(c, r->fds, first);
    if (rc != VQKV_OK)
        return rc;
    rr.num_fds = r->n_fds - first;
    if (r->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_IPC)
        rr.cuda_ipc_handle = (ProtobufCBinaryData){sizeof r->ipc_handle, r->ipc_handle};
    if (r->kind != VQKV__REGION_KIND__REGION_KIND_MEMFD)
        rr.gpu_uuid = (ProtobufCBinaryData){sizeof r->gpu_uuid, r->gpu_uuid};
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    Vqkv__Envelope *reply;
    rc = vqkv__call(c, &env, r->fds + first, rr.num_fds, VQKV__ENVELOPE__BODY_REGION_REGISTERED,
                    &reply);
    if (rc != VQKV_OK)
        return rc;
    r->daemon_handle = reply->region_registered->region_handle;
    vqkv_frame_envelope_free(reply);
    return VQKV_OK;
}

/* The daemon's handle of the client's region; VQKV_EHANDLE when the client
 * has none of that number. */
static int vqkv__region_handle(vqkv_client_t *c, vqkv_region_t region, uint64_t *handle)
{
    for (const vqkv__region_t *r = c->regions; r != NULL; r = r->next) {
        if (r->handle == region) {
            *handle = r->daemon_handle;
            return VQKV_OK;
        }
    }
    return vqkv__fail(c, VQKV_EHANDLE, "region %llu was not registered on this client",
                      (unsigned long long)region);
}

/* A region of model with strides, its fd -1 and layer offsets copied; NULL
 * (the client's error set) when out of memory. */
static vqkv__region_t *vqkv__region_new(vqkv_client_t *c, const vqkv_model_t *model,
                                        const vqkv_kv_view_t *strides)
{
    vqkv__region_t *r = calloc(1, sizeof *r);
    size_t offsets_bytes = model->layout.num_layers * sizeof *r->layer_offsets;
    if (r != NULL && strides->layer_offsets != NULL &&
        (r->layer_offsets = malloc(offsets_bytes)) == NULL) {
        free(r);
        r = NULL;
    }
    if (r == NULL) {
        vqkv__fail(c, VQKV_ENOMEM, "register region: out of memory");
        return NULL;
    }
    if (strides->layer_offsets != NULL)
        memcpy(r->layer_offsets, strides->layer_offsets, offsets_bytes);
    r->model = model;
    r->view = *strides;
    r->view.layer_offsets = r->layer_offsets;
    return r;
}

/* Sends r and, once the daemon took it, gives it the client's next handle;
 * frees r when it did not. */
static int vqkv__region_add(vqkv_client_t *c, vqkv__region_t *r, vqkv_region_t *region)
{
    int rc = vqkv__region_send(c, r);
    if (rc != VQKV_OK) {
        vqkv__region_free(r);
        return rc;
    }
    r->handle = ++c->next_region;
    r->next = c->regions;
    c->regions = r;
    *region = r->handle;
    return VQKV_OK;
}

int vqkv_register_memfd_region(vqkv_client_t *client, const vqkv_model_t *model, int memfd,
                               uint64_t bytes, uint64_t offset, const vqkv_kv_view_t *strides,
                               vqkv_region_t *region)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || strides == NULL || region == NULL || memfd < 0)
        return vqkv__fail(client, VQKV_EINVAL, "register_memfd_region: bad argument");
    int rc = vqkv__ready(client);
    if (rc != VQKV_OK)
        return rc;
    vqkv__region_t *r = vqkv__region_new(client, model, strides);
    if (r == NULL)
        return VQKV_ENOMEM;
    /* Our own copy of the fd, to send again after a reconnect. */
    r->fds = malloc(sizeof *r->fds);
    int fd = r->fds != NULL ? fcntl(memfd, F_DUPFD_CLOEXEC, 0) : -1;
    if (fd < 0) {
        int e = r->fds != NULL ? errno : ENOMEM;
        vqkv__region_free(r);
        return vqkv__fail(client,
                          e == EBADF    ? VQKV_EINVAL
                          : e == ENOMEM ? VQKV_ENOMEM
                                        : VQKV_EIO,
                          "register_memfd_region: %s", strerror(e));
    }
    r->fds[0] = fd;
    r->n_fds = 1;
    r->kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    r->bytes = bytes;
    r->offset = offset;
    return vqkv__region_add(client, r, region);
}

int vqkv_register_cuda_region(vqkv_client_t *client, const vqkv_model_t *model, uint64_t devptr,
                              uint64_t bytes, const vqkv_kv_view_t *strides, vqkv_region_t *region)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || strides == NULL || region == NULL || devptr == 0 || bytes == 0 ||
        strides->num_slots == 0)
        return vqkv__fail(client, VQKV_EINVAL, "register_cuda_region: bad argument");
    /* The daemon checks the view against the whole allocation; here it is
     * held to the caller's bytes, so it never reaches a neighbouring tensor. */
    vqkv_kv_view_t within = *strides;
    within.region_bytes = bytes;
    within.offset = 0;
    int rc = vqkv_kv_view_check(&model->layout, &within, strides->num_slots - 1);
    if (rc != VQKV_OK)
        return vqkv__fail(client, rc,
                          "register_cuda_region: the view reaches past the %llu "
                          "bytes at 0x%llx",
                          (unsigned long long)bytes, (unsigned long long)devptr);
    vqkv__cuda_mem_t mem;
    char why[VQKV__ERR_LEN];
    rc = vqkv__cuda_describe(devptr, bytes, &mem, why, sizeof why);
    if (rc != VQKV_OK)
        return vqkv__fail(client, rc, "register_cuda_region: %s", why);
    rc = vqkv__ready(client);
    vqkv__region_t *r = rc == VQKV_OK ? vqkv__region_new(client, model, strides) : NULL;
    if (r == NULL) {
        vqkv__cuda_mem_free(&mem);
        return rc != VQKV_OK ? rc : VQKV_ENOMEM;
    }
    r->kind = mem.vmm ? VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD
                      : VQKV__REGION_KIND__REGION_KIND_CUDA_IPC;
    /* The region takes the pieces' fds and sizes. */
    r->fds = mem.fds;
    r->piece_bytes = mem.piece_bytes;
    r->n_fds = mem.n_pieces;
    r->bytes = mem.alloc_bytes;
    r->offset = mem.offset;
    memcpy(r->ipc_handle, mem.ipc_handle, sizeof r->ipc_handle);
    memcpy(r->gpu_uuid, mem.gpu_uuid, sizeof r->gpu_uuid);
    return vqkv__region_add(client, r, region);
}

/* ---- reconnecting ---------------------------------------------------------------- */

/* Registers every model, then every region, on a fresh connection. */
static int vqkv__restore(vqkv_client_t *c)
{
    for (vqkv_model_t *m = c->models; m != NULL; m = m->next) {
        int rc = vqkv__model_restore(c, m);
        if (rc != VQKV_OK)
            return rc;
    }
    for (vqkv__region_t *r = c->regions; r != NULL; r = r->next) {
        int rc = vqkv__region_send(c, r);
        if (rc != VQKV_OK)
            return rc;
    }
    return VQKV_OK;
}

/* Every call starts here: clears the last error and, when the connection
 * was lost, connects again and restores the client's models and regions.
 * A failure leaves the client disconnected, for the next call to retry. */
static int vqkv__ready(vqkv_client_t *c)
{
    c->err[0] = '\0';
    if (c->fd >= 0)
        return VQKV_OK;
    int rc = vqkv__open(c);
    if (rc == VQKV_OK)
        rc = vqkv__restore(c);
    if (rc == VQKV_OK || rc == VQKV_ECLOSED)
        return rc; /* connected, or lost again, saying so */
    int e = errno;
    char why[VQKV__ERR_LEN];
    memcpy(why, c->err, sizeof why);
    vqkv__disconnect(c);
    vqkv__fail(c, rc, "reconnecting to vqkvd: %s; the next call tries again", why);
    errno = e;
    return rc;
}

/* ---- blocks ------------------------------------------------------------------- */

static bool vqkv__zero_key(const uint8_t *key)
{
    for (size_t i = 0; i < VQKV_KEY_BYTES; i++)
        if (key[i] != 0)
            return false;
    return true;
}

/* The wire form of n keys: entries pointing into keys (borrowed, not
 * copied); NULL when out of memory. The caller frees the array. */
static ProtobufCBinaryData *vqkv__wire_keys(const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n)
{
    ProtobufCBinaryData *k = calloc(n ? n : 1, sizeof *k);
    if (k == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        k[i] = (ProtobufCBinaryData){VQKV_KEY_BYTES, (uint8_t *)keys[i]};
    return k;
}

/* The daemon's id of a lease handle; VQKV_ELEASE when the connection that
 * took it is gone (its daemon-side lease went with it). Generations wrap
 * after 65536 connections, which no worker makes in a lease's lifetime. */
static int vqkv__lease_id(vqkv_client_t *c, vqkv_lease_t lease, uint64_t *id)
{
    if (lease != 0 && lease >> VQKV__LEASE_GEN_SHIFT != c->gen)
        return vqkv__fail(c, VQKV_ELEASE,
                          "lease %llu was taken on an earlier connection to vqkvd; look the "
                          "blocks up again",
                          (unsigned long long)lease);
    *id = lease & VQKV__LEASE_ID_MASK;
    return VQKV_OK;
}

/* Whether a request that failed with rc is sent once more: only after its
 * connection was lost (VQKV_ECLOSED: the next call reconnects), only once,
 * and only for requests that may run twice (put, lookup, pin, unpin,
 * evict, stats); a get or release names a lease the old connection took
 * with it, so they are never retried. */
static bool vqkv__again(int rc, int attempt)
{
    return rc == VQKV_ECLOSED && attempt == 0;
}

/* How many items one request may carry: what fits a frame at wire_bytes
 * an item, and for a Put what the daemon stages, VQKV_PUT_STAGING_MAX, at
 * staged_bytes an item. At least 1. */
static size_t vqkv__per_request(const vqkv_client_t *c, size_t wire_bytes, uint64_t staged_bytes)
{
    size_t n = (c->max_frame - VQKV__FRAME_SLACK) / wire_bytes;
    if (staged_bytes > 0 && VQKV_PUT_STAGING_MAX / staged_bytes < n)
        n = (size_t)(VQKV_PUT_STAGING_MAX / staged_bytes);
    return n > 0 ? n : 1;
}

/* Bytes the daemon stages per block of model: its stored size, or fp16's
 * while it calibrates, whichever is larger. */
static uint64_t vqkv__staged_bytes(const vqkv_model_t *m)
{
    const vqkv_layout_t *l = &m->layout;
    uint64_t fp16 =
        (uint64_t)l->num_layers * 2 * l->block_tokens * l->num_kv_heads * l->head_dim * 2;
    return fp16 > m->block_bytes ? fp16 : m->block_bytes;
}

/* A put's keys and parents as the wire has them (pointing into the
 * caller's arrays). Parents are spelled out for every block, so the parts a
 * large put is cut into chain on across their boundaries. */
static int vqkv__put_wire(const uint8_t (*keys)[VQKV_KEY_BYTES],
                          const uint8_t (*parents)[VQKV_KEY_BYTES], size_t n,
                          ProtobufCBinaryData **k_out, ProtobufCBinaryData **p_out)
{
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    ProtobufCBinaryData *p = calloc(n ? n : 1, sizeof *p);
    if (k == NULL || p == NULL) {
        free(k);
        free(p);
        return VQKV_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        const uint8_t *parent = NULL;
        if (parents != NULL)
            parent = vqkv__zero_key(parents[i]) ? NULL : parents[i];
        else if (i > 0)
            parent = keys[i - 1];
        p[i] = parent == NULL ? (ProtobufCBinaryData){0, NULL}
                              : (ProtobufCBinaryData){VQKV_KEY_BYTES, (uint8_t *)parent};
    }
    *k_out = k;
    *p_out = p;
    return VQKV_OK;
}

/* The Put of blocks keys[0..n) from slots of daemon region `region`. */
static void vqkv__put_env(const vqkv_model_t *model, uint64_t region, ProtobufCBinaryData *keys,
                          ProtobufCBinaryData *parents, const uint32_t *slots, size_t n,
                          Vqkv__Put *put, Vqkv__Envelope *env)
{
    vqkv__put__init(put);
    put->model_handle = model->handle;
    put->region_handle = region;
    put->n_keys = put->n_parent_keys = put->n_slots = n;
    put->keys = keys;
    put->parent_keys = parents;
    put->slots = (uint32_t *)slots;
    vqkv__envelope__init(env);
    env->body_case = VQKV__ENVELOPE__BODY_PUT;
    env->put = put;
}

/* One Put of as many of the n blocks as one request may carry (*sent of
 * them), sent again once if the connection is lost under it. The number
 * stored, or a negative code. */
static int vqkv__put_part(vqkv_client_t *c, const vqkv_model_t *model, vqkv_region_t region,
                          ProtobufCBinaryData *keys, ProtobufCBinaryData *parents,
                          const uint32_t *slots, size_t n, vqkv_put_status_t *statuses,
                          const vqkv_cuda_event_t *event, size_t *sent)
{
    int rc;
    for (int attempt = 0;; attempt++) {
        uint64_t daemon_region = 0;
        rc = vqkv__ready(c);
        if (rc == VQKV_OK)
            rc = vqkv__region_handle(c, region, &daemon_region);
        if (rc != VQKV_OK)
            return rc;
        size_t part = vqkv__per_request(c, VQKV__PUT_WIRE_BYTES, vqkv__staged_bytes(model));
        *sent = n < part ? n : part;
        Vqkv__Put put;
        Vqkv__Envelope env;
        vqkv__put_env(model, daemon_region, keys, parents, slots, *sent, &put, &env);
        if (event != NULL)
            put.cuda_event = (ProtobufCBinaryData){sizeof event->bytes, (uint8_t *)event->bytes};
        Vqkv__Envelope *r;
        rc = vqkv__call(c, &env, NULL, 0, VQKV__ENVELOPE__BODY_PUT_DONE, &r);
        if (vqkv__again(rc, attempt))
            continue;
        if (rc != VQKV_OK)
            return rc;
        Vqkv__PutDone *pd = r->put_done;
        if (pd->n_status != *sent) {
            vqkv_frame_envelope_free(r);
            return vqkv__fail(c, VQKV_EPROTO, "put: %zu statuses for %zu blocks", pd->n_status,
                              *sent);
        }
        if (statuses != NULL)
            for (size_t i = 0; i < *sent; i++)
                statuses[i] = (vqkv_put_status_t)pd->status[i];
        rc = (int)pd->stored;
        vqkv_frame_envelope_free(r);
        return rc;
    }
}

/* vqkv_put and vqkv_put_after_event: every part of the put carries the
 * event, which waiting on again costs nothing. */
static int vqkv__put(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
                     const uint8_t (*keys)[VQKV_KEY_BYTES],
                     const uint8_t (*parents)[VQKV_KEY_BYTES], const uint32_t *slots, size_t n,
                     vqkv_put_status_t *statuses, const vqkv_cuda_event_t *event)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && (keys == NULL || slots == NULL)) || n > INT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "put: bad argument");
    ProtobufCBinaryData *k, *p;
    if (vqkv__put_wire(keys, parents, n, &k, &p) != VQKV_OK)
        return vqkv__fail(client, VQKV_ENOMEM, "put: out of memory");
    int stored = 0, rc = VQKV_OK;
    size_t done = 0;
    do {
        size_t sent = 0;
        rc = vqkv__put_part(client, model, region, k + done, p + done, n > 0 ? slots + done : slots,
                            n - done, statuses != NULL ? statuses + done : NULL, event, &sent);
        if (rc < 0)
            break;
        stored += rc;
        done += sent;
    } while (done < n);
    free(k);
    free(p);
    return rc < 0 ? rc : stored;
}

int vqkv_put(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
             const uint8_t (*keys)[VQKV_KEY_BYTES], const uint8_t (*parents)[VQKV_KEY_BYTES],
             const uint32_t *slots, size_t n, vqkv_put_status_t *statuses)
{
    return vqkv__put(client, model, region, keys, parents, slots, n, statuses, NULL);
}

int vqkv_put_after_event(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
                         const uint8_t (*keys)[VQKV_KEY_BYTES],
                         const uint8_t (*parents)[VQKV_KEY_BYTES], const uint32_t *slots, size_t n,
                         vqkv_put_status_t *statuses, const vqkv_cuda_event_t *event)
{
    if (client != NULL && event == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "put_after_event: no event");
    return vqkv__put(client, model, region, keys, parents, slots, n, statuses, event);
}

int vqkv_lookup(vqkv_client_t *client, const vqkv_model_t *model,
                const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *found, vqkv_lease_t *lease)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || found == NULL || lease == NULL || (n > 0 && keys == NULL))
        return vqkv__fail(client, VQKV_EINVAL, "lookup: bad argument");
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    if (k == NULL)
        return vqkv__fail(client, VQKV_ENOMEM, "lookup: out of memory");
    Vqkv__Envelope *r = NULL;
    int rc;
    for (int attempt = 0;; attempt++) {
        rc = vqkv__ready(client);
        if (rc != VQKV_OK)
            break;
        Vqkv__Lookup lk = VQKV__LOOKUP__INIT;
        lk.model_handle = model->handle;
        lk.n_keys = n;
        lk.keys = k;
        Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
        env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
        env.lookup = &lk;
        rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_LOOKUP_RESULT, &r);
        if (!vqkv__again(rc, attempt))
            break;
    }
    free(k);
    if (rc != VQKV_OK)
        return rc;
    uint64_t id = r->lookup_result->lease_id;
    *found = r->lookup_result->present;
    vqkv_frame_envelope_free(r);
    /* Never seen: 2^48 leases would take years; that one expires unused. */
    if (id > VQKV__LEASE_ID_MASK)
        return vqkv__fail(client, VQKV_EPROTO, "lookup: lease id %llu is out of range",
                          (unsigned long long)id);
    *lease = id == 0 ? 0 : (uint64_t)client->gen << VQKV__LEASE_GEN_SHIFT | id;
    return VQKV_OK;
}

/* vqkv_get and vqkv_get_with_event: one request, so the event's last
 * record is after every block's write. */
static int vqkv__get(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region,
                     const uint32_t *slots, size_t n, const vqkv_cuda_event_t *event)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if ((n > 0 && slots == NULL) || n > UINT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "get: bad argument");
    uint64_t id = 0, daemon_region = 0;
    int rc = vqkv__ready(client);
    if (rc == VQKV_OK)
        rc = vqkv__lease_id(client, lease, &id);
    if (rc == VQKV_OK)
        rc = vqkv__region_handle(client, region, &daemon_region);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__Get g = VQKV__GET__INIT;
    g.lease_id = id;
    g.region_handle = daemon_region;
    g.n_slots = n;
    g.slots = (uint32_t *)slots;
    if (event != NULL)
        g.cuda_event = (ProtobufCBinaryData){sizeof event->bytes, (uint8_t *)event->bytes};
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_GET;
    env.get = &g;
    Vqkv__Envelope *r;
    rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_GET_DONE, &r);
    if (rc != VQKV_OK)
        return rc;
    int written = (int)r->get_done->written;
    vqkv_frame_envelope_free(r);
    return written;
}

int vqkv_get(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region, const uint32_t *slots,
             size_t n)
{
    return vqkv__get(client, lease, region, slots, n, NULL);
}

int vqkv_get_with_event(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region,
                        const uint32_t *slots, size_t n, const vqkv_cuda_event_t *event)
{
    if (client != NULL && event == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "get_with_event: no event");
    return vqkv__get(client, lease, region, slots, n, event);
}

/* A request answered with an Ack: its count into *count (may be NULL). */
static int vqkv__ack_call(vqkv_client_t *c, Vqkv__Envelope *env, uint32_t *count)
{
    Vqkv__Envelope *r;
    int rc = vqkv__call(c, env, NULL, 0, VQKV__ENVELOPE__BODY_ACK, &r);
    if (rc != VQKV_OK)
        return rc;
    if (count != NULL)
        *count = r->ack->count;
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}

int vqkv_release(vqkv_client_t *client, vqkv_lease_t lease)
{
    if (client == NULL)
        return VQKV_EINVAL;
    client->err[0] = '\0';
    if (lease == 0)
        return VQKV_OK;
    uint64_t id = 0;
    int rc = vqkv__ready(client);
    if (rc == VQKV_OK)
        rc = vqkv__lease_id(client, lease, &id);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__Release rel = VQKV__RELEASE__INIT;
    rel.lease_id = id;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_RELEASE;
    env.release = &rel;
    return vqkv__ack_call(client, &env, NULL);
}

int vqkv_flush(vqkv_client_t *client, size_t *written)
{
    if (client == NULL)
        return VQKV_EINVAL;
    int rc = vqkv__ready(client);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__Flush flush = VQKV__FLUSH__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_FLUSH;
    env.flush = &flush;
    uint32_t count = 0;
    rc = vqkv__ack_call(client, &env, &count);
    if (rc == VQKV_OK && written != NULL)
        *written = count;
    return rc;
}

/* ---- asynchronous calls ------------------------------------------------------- */

/* Room for a call of `parts` wire requests: within VQKV_ASYNC_MAX calls and
 * completions, and leaving one of the daemon's max_inflight requests for
 * synchronous calls. */
static int vqkv__async_room(vqkv_client_t *c, size_t parts)
{
    size_t inflight = c->max_inflight > 1 ? c->max_inflight - 1 : 1;
    size_t limit = inflight < VQKV_ASYNC_MAX ? inflight : VQKV_ASYNC_MAX;
    if (c->n_parts + parts > limit || c->n_asyncs + c->n_done >= VQKV_ASYNC_MAX)
        return vqkv__fail(c, VQKV_ELIMIT,
                          "%zu requests in flight and %zu completions not taken: take them "
                          "(vqkv_complete) before starting more",
                          c->n_parts, c->n_done);
    return VQKV_OK;
}

/* Opens a call; its parts are sent by vqkv__async_send, then it is sealed. */
static vqkv_request_t vqkv__async_open(vqkv_client_t *c)
{
    vqkv_request_t request = ++c->next_request;
    c->asyncs[c->n_asyncs++] = (vqkv__async_t){request, 0, false, 0};
    return request;
}

/* Sends env as a part of call `request`. */
static int vqkv__async_send(vqkv_client_t *c, Vqkv__Envelope *env, vqkv_request_t request,
                            vqkv_put_status_t *statuses, size_t n, bool is_get)
{
    env->request_id = c->next_id++;
    int rc = vqkv_frame_send(c->fd, env, NULL, 0, c->max_frame);
    if (rc == VQKV_ETOOBIG)
        return vqkv__fail(c, rc, "request exceeds the daemon's frame limit of %u bytes",
                          c->max_frame);
    if (rc == VQKV_EIO)
        return vqkv__lost(c, errno);
    if (rc != VQKV_OK)
        return vqkv__fail(c, rc, "sending request: %s", vqkv_proto_strerror(rc));
    c->parts[c->n_parts++] = (vqkv__part_t){env->request_id, request, statuses, n, is_get};
    vqkv__async_find(c, request)->parts_left++;
    return VQKV_OK;
}

/* Ends the sending of call `request`: on success it completes when its
 * replies are in (perhaps already); on failure it is dropped, with no
 * completion, and rc returned. */
static int vqkv__async_seal(vqkv_client_t *c, vqkv_request_t request, int rc)
{
    vqkv__async_t *a = vqkv__async_find(c, request);
    if (rc != VQKV_OK) {
        /* Its parts' replies, should any still come, find no call. */
        for (size_t i = c->n_parts; i-- > 0;)
            if (c->parts[i].request == request)
                c->parts[i] = c->parts[--c->n_parts];
        if (a != NULL)
            *a = c->asyncs[--c->n_asyncs];
        return rc;
    }
    a->sealed = true;
    vqkv__async_finish(c, a);
    return VQKV_OK;
}

int vqkv_put_start(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
                   const uint8_t (*keys)[VQKV_KEY_BYTES], const uint8_t (*parents)[VQKV_KEY_BYTES],
                   const uint32_t *slots, size_t n, vqkv_put_status_t *statuses,
                   vqkv_request_t *request)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || request == NULL || (n > 0 && (keys == NULL || slots == NULL)) ||
        n > INT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "put_start: bad argument");
    uint64_t daemon_region = 0;
    int rc = vqkv__ready(client);
    if (rc == VQKV_OK)
        rc = vqkv__region_handle(client, region, &daemon_region);
    if (rc != VQKV_OK)
        return rc;
    size_t per = vqkv__per_request(client, VQKV__PUT_WIRE_BYTES, vqkv__staged_bytes(model));
    rc = vqkv__async_room(client, n > 0 ? (n + per - 1) / per : 1);
    if (rc != VQKV_OK)
        return rc;
    ProtobufCBinaryData *k, *p;
    if (vqkv__put_wire(keys, parents, n, &k, &p) != VQKV_OK)
        return vqkv__fail(client, VQKV_ENOMEM, "put_start: out of memory");
    vqkv_request_t id = vqkv__async_open(client);
    size_t done = 0;
    do {
        size_t part = n - done < per ? n - done : per;
        Vqkv__Put put;
        Vqkv__Envelope env;
        vqkv__put_env(model, daemon_region, k + done, p + done, n > 0 ? slots + done : slots, part,
                      &put, &env);
        rc = vqkv__async_send(client, &env, id, statuses != NULL ? statuses + done : NULL, part,
                              false);
        done += part;
    } while (rc == VQKV_OK && done < n);
    free(k);
    free(p);
    rc = vqkv__async_seal(client, id, rc);
    if (rc == VQKV_OK)
        *request = id;
    return rc;
}

int vqkv_get_start(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region,
                   const uint32_t *slots, size_t n, vqkv_request_t *request)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (request == NULL || (n > 0 && slots == NULL) || n > INT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "get_start: bad argument");
    uint64_t id = 0, daemon_region = 0;
    int rc = vqkv__ready(client);
    if (rc == VQKV_OK)
        rc = vqkv__lease_id(client, lease, &id);
    if (rc == VQKV_OK)
        rc = vqkv__region_handle(client, region, &daemon_region);
    if (rc == VQKV_OK)
        rc = vqkv__async_room(client, 1);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__Get g = VQKV__GET__INIT;
    g.lease_id = id;
    g.region_handle = daemon_region;
    g.n_slots = n;
    g.slots = (uint32_t *)slots;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_GET;
    env.get = &g;
    vqkv_request_t call = vqkv__async_open(client);
    rc = vqkv__async_seal(client, call, vqkv__async_send(client, &env, call, NULL, 0, true));
    if (rc == VQKV_OK)
        *request = call;
    return rc;
}

int vqkv_client_fd(const vqkv_client_t *client)
{
    return client != NULL ? client->fd : -1;
}

size_t vqkv_async_pending(const vqkv_client_t *client)
{
    return client != NULL ? client->n_asyncs + client->n_done : 0;
}

/* Milliseconds left until deadline_ms (CLOCK_MONOTONIC), -1 for none. */
static int vqkv__ms_left(int64_t deadline_ms)
{
    if (deadline_ms < 0)
        return -1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t left = deadline_ms - ((int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    return left > 0 ? (int)(left < INT32_MAX ? left : INT32_MAX) : 0;
}

/* wait_ms of vqkv__async_read: route frames already read, never read. */
#define VQKV__BUFFERED_ONLY (-2)

/* Takes one step towards the next reply: a whole frame already read is
 * routed, else the socket is read once, waiting up to wait_ms for it to
 * be readable (-1: no limit; VQKV__BUFFERED_ONLY: not at all). False when
 * nothing came (time is up, or a signal). A lost connection fails the
 * calls. */
static bool vqkv__async_read(vqkv_client_t *c, int wait_ms)
{
    vqkv_frame_t frame;
    int rc = vqkv_frame_reader_next(&c->reader, &frame);
    if (rc == 0 && wait_ms == VQKV__BUFFERED_ONLY)
        return false;
    if (rc == 0) {
        struct pollfd pfd = {c->fd, POLLIN, 0};
        if (poll(&pfd, 1, wait_ms) <= 0)
            return false;
        rc = vqkv_frame_reader_recv(&c->reader, c->fd, MSG_DONTWAIT);
        if (rc == VQKV_EAGAIN)
            return false;
        if (rc > 0)
            return true;
    }
    if (rc < 0) {
        vqkv__lost(c, rc == VQKV_EIO ? errno : 0);
        return true;
    }
    Vqkv__Envelope *r = NULL;
    rc = vqkv__unpack_reply(&frame, &r);
    if (rc != VQKV_OK) {
        /* The stream is in step but the reply is lost to us: so is its call. */
        vqkv__disconnect(c);
        vqkv__fail(c, rc, "reply not understood: %s; the next call reconnects",
                   vqkv_proto_strerror(rc));
        return true;
    }
    if (!vqkv__async_reply(c, r))
        vqkv_frame_envelope_free(r); /* a late reply to an abandoned request */
    return true;
}

int vqkv_complete(vqkv_client_t *client, int timeout_ms, vqkv_completion_t *done, size_t max)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (done == NULL || max == 0)
        return vqkv__fail(client, VQKV_EINVAL, "complete: no room for completions");
    int64_t deadline = -1;
    if (timeout_ms >= 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        deadline = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 + timeout_ms;
    }
    for (;;) {
        /* Replies already read off the socket first: the socket will not
         * say they are there, so none may stay behind when this returns. */
        while (client->n_parts > 0 && vqkv__async_read(client, VQKV__BUFFERED_ONLY))
            ;
        if (client->n_done > 0) {
            size_t k = client->n_done < max ? client->n_done : max;
            memcpy(done, client->done, k * sizeof *done);
            client->n_done -= k;
            memmove(client->done, client->done + k, client->n_done * sizeof *done);
            return (int)k;
        }
        if (client->n_parts == 0)
            return 0;
        int left = vqkv__ms_left(deadline);
        if (!vqkv__async_read(client, left) && left == 0)
            return 0;
    }
}

/* What a Pin, Unpin or Evict names besides its keys. */
typedef struct {
    Vqkv__Envelope__BodyCase body;
    uint32_t ttl_ms; /* Pin */
    bool all;        /* Evict */
} vqkv__keys_req_t;

/* Sends one request of kind q for keys[0..n), in as many parts as the
 * frame needs, each sent once more if the connection is lost under it; the
 * Acks' counts summed into *count (may be NULL). On an error, the parts
 * before have taken effect. */
static int vqkv__keys_call(vqkv_client_t *c, const vqkv_model_t *model,
                           const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n,
                           const vqkv__keys_req_t *q, size_t *count)
{
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    if (k == NULL)
        return vqkv__fail(c, VQKV_ENOMEM, "out of memory");
    size_t done = 0, total = 0;
    int rc = VQKV_OK;
    do {
        size_t part = 0;
        Vqkv__Envelope *r = NULL;
        for (int attempt = 0;; attempt++) {
            rc = vqkv__ready(c);
            if (rc != VQKV_OK)
                break;
            part = vqkv__per_request(c, VQKV__KEY_WIRE_BYTES, 0);
            part = n - done < part ? n - done : part;
            Vqkv__Pin pin = VQKV__PIN__INIT;
            Vqkv__Unpin unpin = VQKV__UNPIN__INIT;
            Vqkv__Evict evict = VQKV__EVICT__INIT;
            Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
            env.body_case = q->body;
            if (q->body == VQKV__ENVELOPE__BODY_PIN) {
                pin.model_handle = model->handle;
                pin.n_keys = part;
                pin.keys = k + done;
                pin.ttl_ms = q->ttl_ms;
                env.pin = &pin;
            } else if (q->body == VQKV__ENVELOPE__BODY_UNPIN) {
                unpin.model_handle = model->handle;
                unpin.n_keys = part;
                unpin.keys = k + done;
                env.unpin = &unpin;
            } else {
                evict.model_handle = model->handle;
                evict.n_keys = part;
                evict.keys = k + done;
                evict.all = q->all;
                env.evict = &evict;
            }
            rc = vqkv__call(c, &env, NULL, 0, VQKV__ENVELOPE__BODY_ACK, &r);
            if (!vqkv__again(rc, attempt))
                break;
        }
        if (rc != VQKV_OK)
            break;
        total += r->ack->count;
        vqkv_frame_envelope_free(r);
        done += part;
    } while (done < n);
    free(k);
    if (rc == VQKV_OK && count != NULL)
        *count = total;
    return rc;
}

int vqkv_pin(vqkv_client_t *client, const vqkv_model_t *model,
             const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, uint32_t ttl_ms, size_t *count)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && keys == NULL) || n > VQKV_KEYS_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "pin: bad argument");
    vqkv__keys_req_t q = {VQKV__ENVELOPE__BODY_PIN, ttl_ms, false};
    return vqkv__keys_call(client, model, keys, n, &q, count);
}

int vqkv_unpin(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *count)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && keys == NULL) || n > VQKV_KEYS_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "unpin: bad argument");
    vqkv__keys_req_t q = {VQKV__ENVELOPE__BODY_UNPIN, 0, false};
    return vqkv__keys_call(client, model, keys, n, &q, count);
}

int vqkv_evict(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, int all, size_t *count)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && keys == NULL) || (all && n > 0) || n > VQKV_KEYS_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "evict: bad argument");
    vqkv__keys_req_t q = {VQKV__ENVELOPE__BODY_EVICT, 0, all != 0};
    return vqkv__keys_call(client, model, keys, n, &q, count);
}

static void vqkv__tenant_stats(vqkv_tenant_stats_t *out, const Vqkv__TenantStats *t)
{
    snprintf(out->tenant, sizeof out->tenant, "%s", t->tenant);
    out->hits = t->hits;
    out->misses = t->misses;
    out->blocks = t->blocks;
    out->bytes_stored = t->bytes_stored;
    out->bytes_logical = t->bytes_logical;
    out->evictions = t->evictions;
    out->quota_bytes = t->quota_bytes;
}

int vqkv_stats(vqkv_client_t *client, vqkv_stats_t *stats)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (stats == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "stats: NULL argument");
    Vqkv__Envelope *r = NULL;
    int rc;
    for (int attempt = 0;; attempt++) {
        rc = vqkv__ready(client);
        if (rc != VQKV_OK)
            return rc;
        Vqkv__Stats st = VQKV__STATS__INIT;
        Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
        env.body_case = VQKV__ENVELOPE__BODY_STATS;
        env.stats = &st;
        rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_STATS_REPLY, &r);
        if (!vqkv__again(rc, attempt))
            break;
    }
    if (rc != VQKV_OK)
        return rc;
    const Vqkv__StatsReply *s = r->stats_reply;
    *stats = (vqkv_stats_t){
        .hits = s->hits,
        .misses = s->misses,
        .blocks = s->blocks,
        .bytes_stored = s->bytes_stored,
        .bytes_logical = s->bytes_logical,
        .evictions = s->evictions,
        .clients = s->clients,
        .pool_bytes = s->pool_bytes,
        .leases = s->leases,
        .regions = s->regions,
        .pool_slots_used = s->pool_slots_used,
        .pool_bytes_used = s->pool_bytes_used,
        .staging_bytes = s->staging_bytes,
        .encode_backlog = s->encode_backlog,
        .puts_staged = s->puts_staged,
        .puts_staging_full = s->puts_staging_full,
        .disk_blocks = s->disk_blocks,
        .disk_bytes = s->disk_bytes,
        .disk_limit_bytes = s->disk_limit_bytes,
        .disk_writes = s->disk_writes,
        .disk_reads = s->disk_reads,
        .disk_bad_records = s->disk_bad_records,
        .disk_write_errors = s->disk_write_errors,
        .disk_dropped = s->disk_dropped,
        .n_tenants_total = s->n_tenants > UINT32_MAX ? UINT32_MAX : (uint32_t)s->n_tenants,
    };
    for (size_t i = 0; i < s->n_tenants && i < VQKV_STATS_MAX_TENANTS; i++)
        vqkv__tenant_stats(&stats->tenants[stats->n_tenants++], s->tenants[i]);
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}
