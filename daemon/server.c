/* server.c -- vqkvd's listening socket, accepting clients, and what a
 * request goes through before its handler: unpacking, the fd rule, the
 * in-flight limit, Hello first, then request.c's table.
 *
 * libuv's pipe API reads through its own buffers and cannot hand over the
 * SCM_RIGHTS fds a RegisterRegion carries (proto/README.md), so sockets are
 * plain non-blocking fds watched by uv_poll_t; conn.c reads and writes
 * them and hands each whole frame back here.
 *
 * A client's life: accepted, checked with SO_PEERCRED (refused peers get an
 * Error VQKV_EPERM and are closed), Hello, then requests. Past max_inflight
 * a request is refused with VQKV_ELIMIT.
 *
 * Errors come in two kinds. A frame that does not unpack or a request that
 * is not valid gets an Error and the connection goes on: the stream is
 * still in step. A reader error means the stream cannot be trusted, and
 * conn.c closes the connection once the Error is written.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "config.h"
#include "conn.h"
#include "counters.h"
#include "frame.h"
#include "log.h"
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

/* ---- requests ------------------------------------------------------------ */

void vqkvd_client_hello(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    const Vqkv__Hello *hello = req->hello;
    if (c->hello_done) {
        vqkvd_client_error(c, req->request_id, VQKV_EPROTO, "Hello was already received");
        return;
    }
    if (hello->protocol_version != VQKV_PROTO_VERSION) {
        vqkvd_client_error(c, req->request_id, VQKV_EVERSION,
                           "protocol version %u is not spoken; this daemon speaks %d",
                           (unsigned)hello->protocol_version, VQKV_PROTO_VERSION);
        return;
    }
    if (strlen(hello->client_name) > VQKVD_NAME_MAX) {
        vqkvd_client_error(c, req->request_id, VQKV_EINVAL, "client_name is longer than %d bytes",
                           VQKVD_NAME_MAX);
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
    const vqkvd_backend_t *be = c->server->backend;
    Vqkv__Device device[VQKVD_MAX_GPUS], *devices[VQKVD_MAX_GPUS];
    w.n_devices = be->n_devices < VQKVD_MAX_GPUS ? be->n_devices : VQKVD_MAX_GPUS;
    for (uint32_t i = 0; i < w.n_devices; i++) {
        const vqkvd_device_t *dev = &be->devices[i];
        vqkv__device__init(&device[i]);
        device[i].name = (char *)dev->name;
        device[i].uuid = (ProtobufCBinaryData){sizeof dev->uuid, (uint8_t *)dev->uuid};
        device[i].pool_bytes = dev->pool_bytes;
        devices[i] = &device[i];
    }
    w.devices = devices;
    w.tenant = c->tenant;
    w.tenant_salt.data = c->salt;
    w.tenant_salt.len = sizeof c->salt;
    w.server_version = VQKVD_VERSION;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = req->request_id;
    env.body_case = VQKV__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    vqkvd_client_reply(c, &env);
}

void vqkvd_client_stats(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    Vqkv__StatsReply st = VQKV__STATS_REPLY__INIT;
    if (vqkvd_session_stats(c, &st) != VQKV_OK) {
        vqkvd_client_error(c, req->request_id, VQKV_ENOMEM, "out of memory");
        return;
    }
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = req->request_id;
    env.body_case = VQKV__ENVELOPE__BODY_STATS_REPLY;
    env.stats_reply = &st;
    vqkvd_client_reply(c, &env);
    free(st.tenants);
}

static void vqkvd__dispatch(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    vqkvd_counters_request(&c->server->counters, req->body_case);
    if (req->request_id == 0) {
        vqkvd_client_error(c, 0, VQKV_EPROTO, "request_id 0 is reserved for the daemon");
        return;
    }
    if (c->inflight + c->pending >= c->server->cfg.max_inflight) {
        vqkvd_client_refuse(c, req->request_id, VQKV_ELIMIT, "more than %u requests in flight",
                            (unsigned)c->server->cfg.max_inflight);
        return;
    }
    const vqkvd_request_t *r = vqkvd_request_of(req->body_case);
    if (r->handle == NULL) {
        vqkvd_client_error(c, req->request_id, VQKV_EPROTO, "%s is a reply, not a request",
                           r->name);
        return;
    }
    if (!c->hello_done && !r->before_hello) {
        vqkvd_client_error(c, req->request_id, VQKV_EPROTO, "%s before Hello", r->name);
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
        vqkvd_client_error(c, 0, rc, "frame of %zu bytes does not unpack", frame->len);
        goto out;
    }
    rc = vqkv_frame_check(req);
    if (rc != VQKV_OK) {
        vqkvd_client_error(c, req->request_id, rc,
                           "unknown field, enum value or message type, or no body");
        goto out;
    }
    /* Only requests the table allows take fds (RegisterRegion, and
     * RegisterModel for a codebook file), and check their count themselves;
     * clearing the frame closes any other, so a stray fd never stays open
     * in the daemon. */
    const vqkvd_request_t *r = vqkvd_request_of(req->body_case);
    if (frame->n_fds > 0 && !r->takes_fds) {
        vqkvd_client_error(c, req->request_id, VQKV_EFDS, "%s takes no file descriptors", r->name);
        goto out;
    }
    vqkvd__dispatch(c, req, frame);
out:
    vqkv_frame_envelope_free(req);
    vqkv_frame_clear(frame);
}

/* The connection's ops (conn.h): c is unlinked at once, so Stats no longer
 * counts it, and its session state is undone. */
static void vqkvd__client_gone(vqkvd_client_t *c)
{
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
}

static const vqkvd_conn_ops_t vqkvd__client_ops = {
    .frame = vqkvd__handle_frame,
    .gone = vqkvd__client_gone,
};

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

static int vqkvd__sys_failed(vqkvd_server_t *s, int err);

/* The tenant salts' secret from path, which must be a regular file of
 * exactly its size that only this user can read. VQKV_OK, VQKV_ENOENT
 * when there is none, or VQKV_EIO / VQKV_EPERM logged. */
static int vqkvd__salt_secret_read(vqkvd_server_t *s, const char *path)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        return VQKV_ENOENT;
    struct stat st;
    ssize_t got = -1;
    int rc = VQKV_EIO;
    if (fd >= 0 && fstat(fd, &st) == 0) {
        if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
            vqkvd_log(VQKVD_LOG_ERROR,
                      "%s must be a file of this user that no one else can read (chmod 600)", path);
            close(fd);
            return VQKV_EPERM;
        }
        got = read(fd, s->salt_secret, sizeof s->salt_secret);
        rc = got == (ssize_t)sizeof s->salt_secret && st.st_size == (off_t)got ? VQKV_OK : VQKV_EIO;
    }
    if (rc != VQKV_OK)
        vqkvd_log(VQKVD_LOG_ERROR, "cannot read the tenant salts' secret %s: %s", path,
                  got >= 0 ? "not 32 bytes" : strerror(errno));
    if (fd >= 0)
        close(fd);
    return rc;
}

/* A new secret into path, whole or not at all: written to a temporary
 * file (0600), synced, renamed over. VQKV_OK or VQKV_EIO logged. */
static int vqkvd__salt_secret_write(vqkvd_server_t *s, const char *path)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.new", path) >= (int)sizeof tmp)
        return VQKV_EIO;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    int ok = fd >= 0 &&
             write(fd, s->salt_secret, sizeof s->salt_secret) == (ssize_t)sizeof s->salt_secret &&
             fsync(fd) == 0;
    int err = errno;
    if (fd >= 0)
        close(fd);
    if (ok && rename(tmp, path) == 0)
        return VQKV_OK;
    err = ok ? errno : err;
    unlink(tmp);
    vqkvd_log(VQKVD_LOG_ERROR, "cannot save the tenant salts' secret %s: %s", path, strerror(err));
    return VQKV_EIO;
}

/* The secret behind the tenant salts: salt_secret_file when set (the
 * same on every node, so a tenant's keys are too), else kept in the state
 * directory, so that block keys (and with them every block a disk tier
 * holds) stay the same across restarts; drawn at start when there is no
 * state directory.
 * A secret file that is unreadable, the wrong size or readable by others
 * stops the start: a new secret would silently orphan every stored block,
 * a readable one would let another user compute a tenant's keys. */
static int vqkvd__salt_secret(vqkvd_server_t *s)
{
    char path[PATH_MAX];
    const char *dir = s->cfg.state_dir;
    if (s->cfg.salt_secret_file != NULL) {
        /* Shared by the nodes of a deployment: never made up here, where
         * a node's own secret would give its tenants keys no other node
         * has. */
        int rc = vqkvd__salt_secret_read(s, s->cfg.salt_secret_file);
        if (rc == VQKV_ENOENT)
            vqkvd_log(VQKVD_LOG_ERROR, "salt_secret_file %s does not exist",
                      s->cfg.salt_secret_file);
        return rc == VQKV_ENOENT ? VQKV_EIO : rc;
    }
    if (dir != NULL) {
        if (snprintf(path, sizeof path, "%s/salt-secret", dir) >= (int)sizeof path)
            return VQKV_EINVAL;
        int rc = vqkvd__salt_secret_read(s, path);
        if (rc != VQKV_ENOENT)
            return rc;
    }
    if (getrandom(s->salt_secret, sizeof s->salt_secret, 0) != (ssize_t)sizeof s->salt_secret) {
        vqkvd_log(VQKVD_LOG_ERROR, "no random bytes for the tenant salts: %s", strerror(errno));
        return vqkvd__sys_failed(s, errno);
    }
    if (dir == NULL) {
        vqkvd_log(VQKVD_LOG_INFO, "no state directory: tenant salts change with every start");
        return VQKV_OK;
    }
    return vqkvd__salt_secret_write(s, path);
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
    c->ops = &vqkvd__client_ops;
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
        vqkvd_client_refuse(c, 0, VQKV_EPERM, "uid %u gid %u may not use this daemon",
                            (unsigned)cred.uid, (unsigned)cred.gid);
        c->closing = 1;
    } else if (s->n_clients > s->cfg.max_clients) {
        vqkvd_log(VQKVD_LOG_WARN, "refused pid %d: %u clients already", (int)cred.pid,
                  (unsigned)s->cfg.max_clients);
        vqkvd_client_refuse(c, 0, VQKV_ELIMIT, "the daemon serves %u clients already",
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
    rc = vqkvd__salt_secret(s);
    if (rc != VQKV_OK)
        return rc;

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
        vqkvd_client_close(s->clients);
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
        vqkvd_client_refuse(c, 0, VQKV_EPERM, "uid %u gid %u may no longer use this daemon",
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
