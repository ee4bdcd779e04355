/* redis.c -- the Redis and Redis Cluster client (redis.h): hiredis's async
 * API on the loop through an event adapter of this file's own, with the
 * connection states, deadlines and cluster routing hiredis 0.14 lacks.
 *
 * The adapter is ours rather than hiredis's adapters/libuv.h because that
 * one frees its uv_poll_t in a close callback this file cannot see, so
 * close could not tell when the last handle is gone (and it leaks its
 * state when uv_poll_init fails). Each connection is a struct of its own
 * (its poll handle closes after hiredis frees the context, while the node
 * may already be connecting again); a node holds two timers (connect
 * timeout or backoff, and deadlines) for its life, which ends at close.
 *
 * Costs. A command holds its formatted bytes (redisFormatCommandArgv):
 * for a cluster until it is answered, so that a redirection sends them
 * again as they are; hiredis copies them into its output buffer, so a
 * command briefly costs twice its size. A standalone command is never sent
 * twice, and its copy goes as soon as hiredis has it. Routing is a slot
 * hash (bitwise CRC16: keys are short) and one table read; the table is
 * 16384 pointers, 128 KiB, cluster only. Nodes are found by a linear
 * search on redirections and table reloads only: a cluster has few. A
 * node that owns no slot (it left the cluster) is not reconnected when
 * its connection ends, except a seed.
 *
 * A command is in one place at a time: held by a connection (hiredis
 * calls back for it exactly once, with a reply or with NULL when the
 * connection ends), in the queue of callbacks for the next loop iteration
 * (soon), or waiting to be sent again (retry). A command that timed out
 * stays with its connection, answered, until that reply comes.
 */
#include "redis.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <hiredis/async.h>

#include "log.h"
#include "vqkv_codec.h"

#define VQKVD__REDIS_SLOTS 16384
#define VQKVD__REDIS_BACKOFF_MIN_MS 100
#define VQKVD__REDIS_BACKOFF_MAX_MS 5000
/* Between the starts of two CLUSTER SLOTS, and after one that failed. */
#define VQKVD__REDIS_REFRESH_GAP_MS 100
#define VQKVD__REDIS_REFRESH_RETRY_MS 1000
/* The wait before a command that met TRYAGAIN or CLUSTERDOWN goes again. */
#define VQKVD__REDIS_RETRY_MS 20
/* Redirections and retries of one command before its error is delivered. */
#define VQKVD__REDIS_REDIRECTS_MAX 5

typedef enum {
    VQKVD__REDIS_IDLE,       /* not connected, not trying: owns no slot */
    VQKVD__REDIS_BACKOFF,    /* waiting to try again */
    VQKVD__REDIS_RESOLVING,  /* uv_getaddrinfo in flight */
    VQKVD__REDIS_CONNECTING, /* connect and handshake in flight */
    VQKVD__REDIS_UP,
} vqkvd__redis_state_t;

typedef enum {
    VQKVD__REDIS_KIND_USER,  /* a caller's */
    VQKVD__REDIS_KIND_SLOTS, /* CLUSTER SLOTS */
} vqkvd__redis_kind_t;

typedef struct vqkvd__redis_cmd vqkvd__redis_cmd_t;
typedef struct vqkvd__redis_conn vqkvd__redis_conn_t;
typedef struct vqkvd__redis_node vqkvd__redis_node_t;
typedef struct vqkvd__redis_resolve vqkvd__redis_resolve_t;

struct vqkvd__redis_cmd {
    vqkvd_redis_t *r;
    vqkvd__redis_kind_t kind;
    vqkvd__redis_cmd_t *next;          /* in the soon or the retry queue */
    vqkvd__redis_cmd_t *dprev, *dnext; /* in its connection's deadline order */
    bool in_deadlines;
    vqkvd__redis_conn_t *conn; /* the connection that owes a reply, or NULL */
    vqkvd__redis_node_t *node; /* where it was sent last */
    bool answered;             /* the callback ran (a timeout): the reply is dropped */
    bool asking;               /* send ASKING first */
    uint8_t redirects;
    vqkvd_redis_status_t status; /* what the soon queue delivers */
    uint16_t slot;
    uint32_t deadline_ms;
    uint64_t deadline; /* in uv_now() ms; 0: none */
    uint64_t retry_at;
    char *buf; /* the formatted command; NULL once a standalone one is sent */
    size_t len;
    vqkvd_redis_reply_fn fn;
    void *arg;
};

struct vqkvd__redis_conn {
    vqkvd_redis_t *r;
    vqkvd__redis_node_t *node; /* NULL once detached */
    redisAsyncContext *ac;     /* NULL once hiredis has freed it */
    uv_poll_t poll;
    int events;
    vqkvd__redis_cmd_t *dl_head, *dl_tail; /* commands with a deadline, earliest first */
    uint64_t stall_since; /* when a command timed out with no reply since; 0: none */
    uint64_t stall_ms;    /* how long after that the connection counts as stalled */
};

struct vqkvd__redis_node {
    vqkvd_redis_t *r;
    char host[VQKVD_REDIS_HOST_MAX + 1]; /* empty: the spec's unix socket */
    uint16_t port;
    char name[VQKVD_REDIS_HOST_MAX + 16]; /* for the log */
    vqkvd__redis_state_t state;
    bool seed;
    bool warned; /* a failure logged since it was last up */
    uint32_t owned;
    uint32_t backoff_ms;
    uint32_t handshake; /* handshake replies still awaited */
    uv_timer_t timer;   /* connect timeout, or backoff */
    uv_timer_t deadlines;
    vqkvd__redis_conn_t *conn;
    vqkvd__redis_resolve_t *resolve;
};

struct vqkvd__redis_resolve {
    uv_getaddrinfo_t req;
    vqkvd_redis_t *r;
    vqkvd__redis_node_t *node; /* NULL once given up */
};

struct vqkvd_redis {
    uv_loop_t *loop;
    vqkvd_redis_spec_t spec;
    uint32_t connect_timeout_ms;
    vqkvd__redis_node_t **nodes;
    uint32_t n_nodes, cap_nodes;
    vqkvd__redis_node_t **slots; /* cluster only; NULL: no node known */
    uint32_t slots_assigned;
    struct {
        bool wanted, in_flight, warned;
        uint64_t not_before;
        uint32_t next_node; /* where the round robin over nodes goes on */
        uv_timer_t timer;
    } refresh;
    vqkvd__redis_cmd_t *soon, *soon_tail;
    uv_idle_t soon_idle;
    vqkvd__redis_cmd_t *retry, *retry_tail;
    uv_timer_t retry_timer;
    vqkvd_redis_stats_t stats;
    bool closing, finishing;
    uint32_t conns, resolves; /* still to end before close can finish */
    uint32_t handles;         /* still to close once it finishes */
    void (*done)(void *arg);
    void *done_arg;
};

static void vqkvd__redis_node_connect(vqkvd__redis_node_t *node);
static void vqkvd__redis_refresh_schedule(vqkvd_redis_t *r);
static void vqkvd__redis_refresh_maybe_start(vqkvd_redis_t *r);
static void vqkvd__redis_maybe_finish(vqkvd_redis_t *r);

/* ---- slots ---------------------------------------------------------------------- */

static uint16_t vqkvd__redis_crc16(const uint8_t *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

char *vqkvd_redis_reply_take_str(const redisReply *reply)
{
    /* hiredis 0.14 allocates str with malloc and frees it with free(),
     * which takes NULL: the buffer can change hands. The callback's reply
     * is const only to keep callers from changing what others read. */
    redisReply *owned = (redisReply *)reply;
    char *str = owned->str;
    owned->str = NULL;
    return str;
}

uint16_t vqkvd_redis_slot(const void *key, size_t keylen)
{
    const uint8_t *k = key;
    const uint8_t *open = keylen > 0 ? memchr(k, '{', keylen) : NULL;
    if (open != NULL) {
        size_t from = (size_t)(open - k) + 1;
        const uint8_t *close = memchr(k + from, '}', keylen - from);
        if (close != NULL && close > k + from)
            return vqkvd__redis_crc16(k + from, (size_t)(close - (k + from))) % VQKVD__REDIS_SLOTS;
    }
    return vqkvd__redis_crc16(k, keylen) % VQKVD__REDIS_SLOTS;
}

/* ---- the spec ------------------------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static int vqkvd__redis_refuse(char *why, size_t why_len,
                                                                     const char *fmt, ...)
{
    if (why != NULL && why_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
    }
    return VQKV_EINVAL;
}

/* The decimal number in s[0, n) when it is digits only and at most max. */
static bool vqkvd__redis_number(const char *s, size_t n, uint32_t max, uint32_t *out)
{
    if (n == 0 || n > 10)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > max)
        return false;
    *out = (uint32_t)v;
    return true;
}

static int vqkvd__redis_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* s[0, n) percent-decoded into out (cap bytes with the NUL); false when it
 * does not fit, a % lacks two hex digits, or it would hold a NUL. */
static bool vqkvd__redis_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            int hi = i + 2 < n ? vqkvd__redis_hex(s[i + 1]) : -1;
            int lo = i + 2 < n ? vqkvd__redis_hex(s[i + 2]) : -1;
            if (hi < 0 || lo < 0 || hi * 16 + lo == 0)
                return false;
            c = hi * 16 + lo;
            i += 2;
        }
        if (o + 1 >= cap)
            return false;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return true;
}

/* What one address of a spec gave besides the address. */
typedef struct {
    bool has_cred, has_db;
    uint32_t db;
    char user[VQKVD_REDIS_USER_MAX + 1];
    char password[VQKVD_REDIS_PASSWORD_MAX + 1];
} vqkvd__redis_extra_t;

/* Parses [user[:password]@]host:port[/db] in s[0, n). Messages name the
 * host and port, never what stands before the '@'. */
static int vqkvd__redis_parse_server(const char *s, size_t n, vqkvd_redis_addr_t *addr,
                                     vqkvd__redis_extra_t *x, char *why, size_t why_len)
{
    memset(x, 0, sizeof *x);
    if (n == 0)
        return vqkvd__redis_refuse(why, why_len, "an empty address");
    const char *end = s + n, *p = s;
    const char *at = memrchr(s, '@', n);
    if (at != NULL) {
        const char *colon = memchr(s, ':', (size_t)(at - s));
        const char *user_end = colon != NULL ? colon : at;
        if (!vqkvd__redis_decode(s, (size_t)(user_end - s), x->user, sizeof x->user) ||
            (colon != NULL && !vqkvd__redis_decode(colon + 1, (size_t)(at - colon - 1), x->password,
                                                   sizeof x->password)))
            return vqkvd__redis_refuse(why, why_len,
                                       "bad user or password (too long, a bad %%-escape, or NUL)");
        x->has_cred = true;
        p = at + 1;
    }
    const char *slash = memchr(p, '/', (size_t)(end - p));
    const char *hp_end = slash != NULL ? slash : end;
    int hp_len = (int)(hp_end - p);
    if (slash != NULL) {
        if (!vqkvd__redis_number(slash + 1, (size_t)(end - slash - 1), INT32_MAX, &x->db))
            return vqkvd__redis_refuse(why, why_len, "bad db in \"%.*s\" (a number, 0 to %d)",
                                       (int)(end - p), p, INT32_MAX);
        x->has_db = true;
    }
    const char *host = p, *host_end, *port;
    if (*p == '[') {
        const char *close = memchr(p, ']', (size_t)(hp_end - p));
        if (close == NULL)
            return vqkvd__redis_refuse(why, why_len, "no ']' after '[' in \"%.*s\"", hp_len, p);
        host = p + 1;
        host_end = close;
        if (close + 1 == hp_end || close[1] != ':')
            return vqkvd__redis_refuse(why, why_len, "no port in \"%.*s\" (host:port)", hp_len, p);
        port = close + 2;
    } else {
        const char *colon = memrchr(p, ':', (size_t)(hp_end - p));
        if (colon == NULL)
            return vqkvd__redis_refuse(why, why_len, "no port in \"%.*s\" (host:port)", hp_len, p);
        if (memchr(p, ':', (size_t)(colon - p)) != NULL)
            return vqkvd__redis_refuse(why, why_len,
                                       "an IPv6 address goes in brackets: \"[%.*s]:port\"",
                                       (int)(colon - p), p);
        host_end = colon;
        port = colon + 1;
    }
    size_t host_len = (size_t)(host_end - host);
    if (host_len == 0)
        return vqkvd__redis_refuse(why, why_len, "no host in \"%.*s\"", hp_len, p);
    if (host_len > VQKVD_REDIS_HOST_MAX)
        return vqkvd__redis_refuse(why, why_len, "a host name longer than %d bytes",
                                   VQKVD_REDIS_HOST_MAX);
    uint32_t port_num;
    if (!vqkvd__redis_number(port, (size_t)(hp_end - port), 65535, &port_num) || port_num == 0)
        return vqkvd__redis_refuse(why, why_len, "bad port in \"%.*s\" (1 to 65535)", hp_len, p);
    memcpy(addr->host, host, host_len);
    addr->host[host_len] = '\0';
    addr->port = (uint16_t)port_num;
    return VQKV_OK;
}

/* unix:///path[?db=N], rest being what follows "unix://". */
static int vqkvd__redis_parse_unix(const char *rest, vqkvd_redis_spec_t *out, char *why,
                                   size_t why_len)
{
    const char *query = strchr(rest, '?');
    size_t n = query != NULL ? (size_t)(query - rest) : strlen(rest);
    if (n == 0 || rest[0] != '/')
        return vqkvd__redis_refuse(why, why_len, "unix:// needs an absolute path: unix:///path");
    if (n > VQKVD_REDIS_PATH_MAX)
        return vqkvd__redis_refuse(why, why_len, "a socket path longer than %d bytes",
                                   VQKVD_REDIS_PATH_MAX);
    memcpy(out->path, rest, n);
    out->path[n] = '\0';
    if (query != NULL && (strncmp(query, "?db=", 4) != 0 ||
                          !vqkvd__redis_number(query + 4, strlen(query + 4), INT32_MAX, &out->db)))
        return vqkvd__redis_refuse(why, why_len, "bad query \"%s\" (only ?db=N, N from 0 to %d)",
                                   query, INT32_MAX);
    return VQKV_OK;
}

/* One address after another, comma-separated; rest follows "redis://" or
 * "cluster://". */
static int vqkvd__redis_parse_list(const char *rest, vqkvd_redis_spec_t *out, char *why,
                                   size_t why_len)
{
    bool cred = false;
    for (const char *p = rest;; p++) {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        if (out->n_addrs > 0 && strncmp(p, "redis://", 8) == 0 && n >= 8) {
            p += 8;
            n -= 8;
        }
        if (out->n_addrs == VQKVD_REDIS_SEEDS_MAX)
            return vqkvd__redis_refuse(why, why_len, "more than %d addresses",
                                       VQKVD_REDIS_SEEDS_MAX);
        vqkvd__redis_extra_t x;
        int rc = vqkvd__redis_parse_server(p, n, &out->addrs[out->n_addrs], &x, why, why_len);
        if (rc != VQKV_OK)
            return rc;
        out->n_addrs++;
        if (x.has_cred && cred &&
            (strcmp(x.user, out->user) != 0 || strcmp(x.password, out->password) != 0))
            return vqkvd__redis_refuse(why, why_len, "the addresses give different credentials");
        if (x.has_cred && !cred) {
            memcpy(out->user, x.user, sizeof out->user);
            memcpy(out->password, x.password, sizeof out->password);
            cred = true;
        }
        if (x.has_db && x.db != 0)
            out->db = x.db;
        if (comma == NULL)
            break;
        p = comma;
    }
    return VQKV_OK;
}

int vqkvd_redis_parse(const char *spec, const char *password_override, vqkvd_redis_spec_t *out,
                      char *why, size_t why_len)
{
    if (out == NULL)
        return vqkvd__redis_refuse(why, why_len, "no spec to fill");
    memset(out, 0, sizeof *out);
    if (spec == NULL || spec[0] == '\0')
        return vqkvd__redis_refuse(why, why_len, "an empty spec");
    const char *sep = strstr(spec, "://");
    if (sep == NULL)
        return vqkvd__redis_refuse(why, why_len,
                                   "no scheme: redis://host:port, unix:///path or "
                                   "cluster://host:port,...");
    size_t scheme_len = (size_t)(sep - spec);
    const char *rest = sep + 3;
    int rc;
    if (scheme_len == 4 && strncmp(spec, "unix", 4) == 0) {
        rc = vqkvd__redis_parse_unix(rest, out, why, why_len);
    } else if (scheme_len == 5 && strncmp(spec, "redis", 5) == 0) {
        rc = vqkvd__redis_parse_list(rest, out, why, why_len);
        out->cluster = out->n_addrs > 1;
    } else if (scheme_len == 7 && strncmp(spec, "cluster", 7) == 0) {
        rc = vqkvd__redis_parse_list(rest, out, why, why_len);
        out->cluster = true;
    } else if (scheme_len == 6 && strncmp(spec, "rediss", 6) == 0) {
        return vqkvd__redis_refuse(why, why_len,
                                   "rediss:// (TLS) is not supported: hiredis "
                                   "0.14 has no TLS");
    } else {
        return vqkvd__redis_refuse(why, why_len,
                                   "unknown scheme \"%.*s\" (redis://, unix:// or cluster://)",
                                   (int)(scheme_len < 16 ? scheme_len : 16), spec);
    }
    if (rc != VQKV_OK)
        return rc;
    if (out->cluster && out->db != 0)
        return vqkvd__redis_refuse(why, why_len, "Redis Cluster has only db 0");
    if (password_override != NULL) {
        size_t n = strlen(password_override);
        if (n > VQKVD_REDIS_PASSWORD_MAX)
            return vqkvd__redis_refuse(why, why_len, "a password longer than %d bytes",
                                       VQKVD_REDIS_PASSWORD_MAX);
        memcpy(out->password, password_override, n + 1);
    }
    if (out->user[0] != '\0' && out->password[0] == '\0')
        return vqkvd__redis_refuse(why, why_len, "a user name without a password");
    return VQKV_OK;
}

/* ---- commands ------------------------------------------------------------------- */

static void vqkvd__redis_cmd_free(vqkvd__redis_cmd_t *cmd)
{
    free(cmd->buf);
    free(cmd);
}

static void vqkvd__redis_queue_push(vqkvd__redis_cmd_t **head, vqkvd__redis_cmd_t **tail,
                                    vqkvd__redis_cmd_t *cmd)
{
    cmd->next = NULL;
    if (*tail != NULL)
        (*tail)->next = cmd;
    else
        *head = cmd;
    *tail = cmd;
}

/* Runs the callback. The command is freed first unless a connection still
 * owes its reply: the callback may close the client, which ends every
 * connection and so frees such commands before it returns. */
static void vqkvd__redis_deliver(vqkvd__redis_cmd_t *cmd, vqkvd_redis_status_t status,
                                 const redisReply *reply)
{
    vqkvd_redis_t *r = cmd->r;
    vqkvd_redis_reply_fn fn = cmd->fn;
    void *arg = cmd->arg;
    cmd->answered = true;
    r->stats.pending--;
    if (cmd->conn == NULL)
        vqkvd__redis_cmd_free(cmd);
    fn(arg, status, reply);
}

static void vqkvd__redis_soon_cb(uv_idle_t *h)
{
    vqkvd_redis_t *r = h->data;
    vqkvd__redis_cmd_t *cmd = r->soon;
    r->soon = r->soon_tail = NULL;
    /* Only the commands queued so far: those their callbacks queue wait
     * for the next iteration, so a callback that retries at once cannot
     * hold the loop here. */
    while (cmd != NULL) {
        vqkvd__redis_cmd_t *next = cmd->next;
        vqkvd__redis_deliver(cmd, r->closing ? VQKVD_REDIS_CLOSED : cmd->status, NULL);
        cmd = next;
    }
    if (r->soon == NULL)
        uv_idle_stop(h);
    vqkvd__redis_maybe_finish(r);
}

/* Answers cmd with status on the next loop iteration. */
static void vqkvd__redis_soon(vqkvd__redis_cmd_t *cmd, vqkvd_redis_status_t status)
{
    vqkvd_redis_t *r = cmd->r;
    cmd->status = status;
    vqkvd__redis_queue_push(&r->soon, &r->soon_tail, cmd);
    uv_idle_start(&r->soon_idle, vqkvd__redis_soon_cb);
}

/* Answers cmd now, or on the next iteration once close was called (no
 * callback runs inside vqkvd_redis_close). */
static void vqkvd__redis_finish(vqkvd__redis_cmd_t *cmd, vqkvd_redis_status_t status,
                                const redisReply *reply)
{
    if (cmd->r->closing)
        vqkvd__redis_soon(cmd, VQKVD_REDIS_CLOSED);
    else
        vqkvd__redis_deliver(cmd, status, reply);
}

/* ---- deadlines ------------------------------------------------------------------ */

static void vqkvd__redis_deadline_cb(uv_timer_t *t);

static void vqkvd__redis_deadline_arm(vqkvd__redis_conn_t *c)
{
    uint64_t due = c->dl_head != NULL ? c->dl_head->deadline : UINT64_MAX;
    if (c->stall_since != 0 && c->stall_since + c->stall_ms < due)
        due = c->stall_since + c->stall_ms;
    if (due == UINT64_MAX) {
        uv_timer_stop(&c->node->deadlines);
        return;
    }
    uint64_t now = uv_now(c->r->loop);
    uv_timer_start(&c->node->deadlines, vqkvd__redis_deadline_cb, due > now ? due - now : 0, 0);
}

/* Inserted from the tail: O(1) when deadlines come in order. */
static void vqkvd__redis_deadline_insert(vqkvd__redis_conn_t *c, vqkvd__redis_cmd_t *cmd)
{
    vqkvd__redis_cmd_t *p = c->dl_tail;
    while (p != NULL && p->deadline > cmd->deadline)
        p = p->dprev;
    cmd->dprev = p;
    cmd->dnext = p != NULL ? p->dnext : c->dl_head;
    if (cmd->dnext != NULL)
        cmd->dnext->dprev = cmd;
    else
        c->dl_tail = cmd;
    if (p != NULL)
        p->dnext = cmd;
    else
        c->dl_head = cmd;
    cmd->in_deadlines = true;
    if (c->dl_head == cmd)
        vqkvd__redis_deadline_arm(c);
}

/* Unlinked only: the timer, if armed for cmd, finds nothing due and
 * re-arms. */
static void vqkvd__redis_deadline_unlink(vqkvd__redis_conn_t *c, vqkvd__redis_cmd_t *cmd)
{
    if (cmd->dprev != NULL)
        cmd->dprev->dnext = cmd->dnext;
    else
        c->dl_head = cmd->dnext;
    if (cmd->dnext != NULL)
        cmd->dnext->dprev = cmd->dprev;
    else
        c->dl_tail = cmd->dprev;
    cmd->dprev = cmd->dnext = NULL;
    cmd->in_deadlines = false;
}

/* ---- connections ---------------------------------------------------------------- */

static void vqkvd__redis_node_up(vqkvd__redis_node_t *node)
{
    vqkvd_redis_t *r = node->r;
    uv_timer_stop(&node->timer);
    node->state = VQKVD__REDIS_UP;
    node->backoff_ms = VQKVD__REDIS_BACKOFF_MIN_MS;
    node->warned = false;
    r->stats.connects++;
    r->stats.nodes_up++;
    vqkvd_log(VQKVD_LOG_INFO, "redis %s: connected", node->name);
    if (r->spec.cluster)
        vqkvd__redis_refresh_maybe_start(r);
}

/* Whether a node is worth connecting: in a cluster, while it owns slots
 * (or the table is not known yet), and a seed always. */
static bool vqkvd__redis_node_needed(const vqkvd__redis_node_t *node)
{
    const vqkvd_redis_t *r = node->r;
    return !r->spec.cluster || node->seed || node->owned > 0 || r->slots_assigned == 0;
}

static void vqkvd__redis_node_timer_cb(uv_timer_t *t);

/* The node's connection attempt failed, or its connection ended: counted,
 * logged once until it is up again, retried after its backoff. */
static void vqkvd__redis_node_failed(vqkvd__redis_node_t *node, const char *why)
{
    vqkvd_redis_t *r = node->r;
    bool was_up = node->state == VQKVD__REDIS_UP;
    if (was_up) {
        r->stats.disconnects++;
        r->stats.nodes_up--;
    } else {
        r->stats.connect_failures++;
    }
    node->state = VQKVD__REDIS_BACKOFF;
    if (r->closing) {
        node->state = VQKVD__REDIS_IDLE;
        return;
    }
    vqkvd_log(node->warned ? VQKVD_LOG_DEBUG : VQKVD_LOG_WARN, "redis %s: %s: %s; retrying",
              node->name, was_up ? "connection lost" : "cannot connect", why);
    node->warned = true;
    uv_timer_start(&node->timer, vqkvd__redis_node_timer_cb, node->backoff_ms, 0);
    node->backoff_ms = node->backoff_ms * 2 < VQKVD__REDIS_BACKOFF_MAX_MS
                           ? node->backoff_ms * 2
                           : VQKVD__REDIS_BACKOFF_MAX_MS;
    if (r->spec.cluster && was_up)
        vqkvd__redis_refresh_schedule(r);
}

/* Parts c from its node, which fails (once: later calls do nothing). */
static void vqkvd__redis_conn_detach(vqkvd__redis_conn_t *c, const char *why)
{
    vqkvd__redis_node_t *node = c->node;
    if (node == NULL)
        return;
    c->node = NULL;
    node->conn = NULL;
    uv_timer_stop(&node->deadlines);
    vqkvd__redis_node_failed(node, why);
}

/* Ends c from this side: its commands get NULL replies from hiredis, now,
 * or once the hiredis callback running returns. */
static void vqkvd__redis_conn_drop(vqkvd__redis_conn_t *c, const char *why)
{
    if (c->node == NULL)
        return;
    vqkvd__redis_conn_detach(c, why);
    if (c->ac != NULL)
        redisAsyncFree(c->ac);
}

/* Why hiredis ended ac. */
static const char *vqkvd__redis_ac_why(const redisAsyncContext *ac)
{
    return ac->err != 0 && ac->errstr != NULL && ac->errstr[0] != '\0' ? ac->errstr
                                                                       : "connection closed";
}

static void vqkvd__redis_conn_closed(uv_handle_t *h)
{
    vqkvd__redis_conn_t *c = h->data;
    vqkvd_redis_t *r = c->r;
    free(c);
    r->conns--;
    vqkvd__redis_maybe_finish(r);
}

/* The adapter: hiredis asks for read and write events on its socket and
 * calls cleanup as it frees the context, after the NULL replies. */

static void vqkvd__redis_poll_cb(uv_poll_t *h, int status, int events)
{
    vqkvd__redis_conn_t *c = h->data;
    /* An error on the socket: hiredis's read or write meets it and ends
     * the connection. */
    if (status < 0)
        events = UV_READABLE | UV_WRITABLE;
    if (c->ac != NULL && (events & UV_READABLE))
        redisAsyncHandleRead(c->ac);
    if (c->ac != NULL && (events & UV_WRITABLE))
        redisAsyncHandleWrite(c->ac);
}

static void vqkvd__redis_ev_set(vqkvd__redis_conn_t *c, int events)
{
    if (events == c->events)
        return;
    c->events = events;
    if (events != 0)
        uv_poll_start(&c->poll, events, vqkvd__redis_poll_cb);
    else
        uv_poll_stop(&c->poll);
}

static void vqkvd__redis_ev_add_read(void *p)
{
    vqkvd__redis_conn_t *c = p;
    vqkvd__redis_ev_set(c, c->events | UV_READABLE);
}

static void vqkvd__redis_ev_del_read(void *p)
{
    vqkvd__redis_conn_t *c = p;
    vqkvd__redis_ev_set(c, c->events & ~UV_READABLE);
}

static void vqkvd__redis_ev_add_write(void *p)
{
    vqkvd__redis_conn_t *c = p;
    vqkvd__redis_ev_set(c, c->events | UV_WRITABLE);
}

static void vqkvd__redis_ev_del_write(void *p)
{
    vqkvd__redis_conn_t *c = p;
    vqkvd__redis_ev_set(c, c->events & ~UV_WRITABLE);
}

static void vqkvd__redis_ev_cleanup(void *p)
{
    vqkvd__redis_conn_t *c = p;
    vqkvd__redis_conn_detach(c, vqkvd__redis_ac_why(c->ac));
    c->ac = NULL;
    uv_close((uv_handle_t *)&c->poll, vqkvd__redis_conn_closed);
}

static void vqkvd__redis_on_handshake(redisAsyncContext *ac, void *reply_, void *privdata)
{
    vqkvd__redis_conn_t *c = ac->data;
    const redisReply *reply = reply_;
    vqkvd__redis_node_t *node = c->node;
    if (node == NULL)
        return;
    if (reply == NULL) {
        vqkvd__redis_conn_detach(c, vqkvd__redis_ac_why(ac));
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[256];
        snprintf(why, sizeof why, "%s refused: %s", (const char *)privdata, reply->str);
        vqkvd__redis_conn_drop(c, why);
        return;
    }
    if (--node->handshake == 0)
        vqkvd__redis_node_up(node);
}

/* AUTH and SELECT as the spec asks, or a PING: the node is up once the
 * last is answered. privdata names the command for the log. */
static bool vqkvd__redis_handshake(vqkvd__redis_conn_t *c)
{
    const vqkvd_redis_spec_t *s = &c->r->spec;
    vqkvd__redis_node_t *node = c->node;
    node->handshake = 0;
    if (s->password[0] != '\0') {
        const char *argv[3] = {"AUTH", s->user, s->password};
        int argc = 3;
        if (s->user[0] == '\0') {
            argv[1] = s->password;
            argc = 2;
        }
        if (redisAsyncCommandArgv(c->ac, vqkvd__redis_on_handshake, "AUTH", argc, argv, NULL) !=
            REDIS_OK)
            return false;
        node->handshake++;
    }
    if (!s->cluster && s->db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%u", s->db);
        const char *argv[2] = {"SELECT", db};
        if (redisAsyncCommandArgv(c->ac, vqkvd__redis_on_handshake, "SELECT", 2, argv, NULL) !=
            REDIS_OK)
            return false;
        node->handshake++;
    }
    if (node->handshake == 0) {
        const char *argv[1] = {"PING"};
        if (redisAsyncCommandArgv(c->ac, vqkvd__redis_on_handshake, "PING", 1, argv, NULL) !=
            REDIS_OK)
            return false;
        node->handshake++;
    }
    return true;
}

/* Connects to ip (NULL: the spec's unix socket) without blocking: the
 * address is numeric, so hiredis's getaddrinfo does no lookup. */
static void vqkvd__redis_node_open(vqkvd__redis_node_t *node, const char *ip)
{
    vqkvd_redis_t *r = node->r;
    node->state = VQKVD__REDIS_CONNECTING;
    redisAsyncContext *ac =
        ip != NULL ? redisAsyncConnect(ip, node->port) : redisAsyncConnectUnix(r->spec.path);
    if (ac == NULL) {
        vqkvd__redis_node_failed(node, "out of memory");
        return;
    }
    if (ac->err != 0) {
        char why[128];
        snprintf(why, sizeof why, "%s", ac->errstr);
        redisAsyncFree(ac);
        vqkvd__redis_node_failed(node, why);
        return;
    }
    vqkvd__redis_conn_t *c = calloc(1, sizeof *c);
    const char *why = c == NULL                                        ? "out of memory"
                      : uv_poll_init(r->loop, &c->poll, ac->c.fd) != 0 ? "cannot poll the socket"
                                                                       : NULL;
    if (why != NULL) {
        free(c);
        redisAsyncFree(ac);
        vqkvd__redis_node_failed(node, why);
        return;
    }
    /* Not inherited by the programs the daemon starts (a child holding
     * the socket would keep a dropped connection open). Keepalive only
     * helps find a dead host sooner; deadlines find it anyway. */
    fcntl(ac->c.fd, F_SETFD, FD_CLOEXEC);
    if (ip != NULL)
        redisEnableKeepAlive(&ac->c);
    r->conns++;
    c->r = r;
    c->node = node;
    c->ac = ac;
    c->poll.data = c;
    ac->data = c;
    ac->ev.data = c;
    ac->ev.addRead = vqkvd__redis_ev_add_read;
    ac->ev.delRead = vqkvd__redis_ev_del_read;
    ac->ev.addWrite = vqkvd__redis_ev_add_write;
    ac->ev.delWrite = vqkvd__redis_ev_del_write;
    ac->ev.cleanup = vqkvd__redis_ev_cleanup;
    node->conn = c;
    if (!vqkvd__redis_handshake(c))
        vqkvd__redis_conn_drop(c, "out of memory");
}

static void vqkvd__redis_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    vqkvd__redis_resolve_t *rs = (vqkvd__redis_resolve_t *)req;
    vqkvd_redis_t *r = rs->r;
    vqkvd__redis_node_t *node = rs->node;
    r->resolves--;
    free(rs);
    /* The first IPv4 address, else the first IPv6 one, as hiredis would
     * choose. */
    char ip[INET6_ADDRSTRLEN] = "";
    for (const struct addrinfo *a = res; status == 0 && a != NULL && ip[0] == '\0'; a = a->ai_next)
        if (a->ai_family == AF_INET)
            uv_ip4_name((const struct sockaddr_in *)a->ai_addr, ip, sizeof ip);
    for (const struct addrinfo *a = res; status == 0 && a != NULL && ip[0] == '\0'; a = a->ai_next)
        if (a->ai_family == AF_INET6)
            uv_ip6_name((const struct sockaddr_in6 *)a->ai_addr, ip, sizeof ip);
    uv_freeaddrinfo(res);
    if (node == NULL) {
        vqkvd__redis_maybe_finish(r);
        return;
    }
    node->resolve = NULL;
    if (ip[0] == '\0') {
        char why[128];
        snprintf(why, sizeof why, "cannot resolve the name: %s",
                 status < 0 ? uv_strerror(status) : "no address");
        vqkvd__redis_node_failed(node, why);
        return;
    }
    vqkvd__redis_node_open(node, ip);
}

/* Starts an attempt, bounded by connect_timeout_ms from here: names are
 * resolved on libuv's thread pool first. */
static void vqkvd__redis_node_connect(vqkvd__redis_node_t *node)
{
    vqkvd_redis_t *r = node->r;
    uv_timer_start(&node->timer, vqkvd__redis_node_timer_cb, r->connect_timeout_ms, 0);
    unsigned char bin[sizeof(struct in6_addr)];
    if (node->host[0] == '\0') {
        vqkvd__redis_node_open(node, NULL);
        return;
    }
    if (inet_pton(AF_INET, node->host, bin) == 1 || inet_pton(AF_INET6, node->host, bin) == 1) {
        vqkvd__redis_node_open(node, node->host);
        return;
    }
    node->state = VQKVD__REDIS_RESOLVING;
    vqkvd__redis_resolve_t *rs = calloc(1, sizeof *rs);
    if (rs == NULL) {
        vqkvd__redis_node_failed(node, "out of memory");
        return;
    }
    rs->r = r;
    rs->node = node;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(r->loop, &rs->req, vqkvd__redis_resolved, node->host, NULL, &hints);
    if (rc < 0) {
        free(rs);
        vqkvd__redis_node_failed(node, uv_strerror(rc));
        return;
    }
    r->resolves++;
    node->resolve = rs;
}

/* A resolution given up: its callback frees it and finds no node. */
static void vqkvd__redis_node_unresolve(vqkvd__redis_node_t *node)
{
    vqkvd__redis_resolve_t *rs = node->resolve;
    if (rs == NULL)
        return;
    node->resolve = NULL;
    rs->node = NULL;
    uv_cancel((uv_req_t *)&rs->req);
}

static void vqkvd__redis_node_timer_cb(uv_timer_t *t)
{
    vqkvd__redis_node_t *node = t->data;
    char why[96];
    switch (node->state) {
    case VQKVD__REDIS_BACKOFF:
        if (vqkvd__redis_node_needed(node))
            vqkvd__redis_node_connect(node);
        else
            node->state = VQKVD__REDIS_IDLE;
        break;
    case VQKVD__REDIS_RESOLVING:
        vqkvd__redis_node_unresolve(node);
        snprintf(why, sizeof why, "no address within %u ms", node->r->connect_timeout_ms);
        vqkvd__redis_node_failed(node, why);
        break;
    case VQKVD__REDIS_CONNECTING:
        snprintf(why, sizeof why, "not connected within %u ms", node->r->connect_timeout_ms);
        vqkvd__redis_conn_drop(node->conn, why);
        break;
    case VQKVD__REDIS_IDLE:
    case VQKVD__REDIS_UP: break;
    }
}

/* A node of its own for host:port (empty host: the unix socket), without
 * its timers yet; NULL when out of memory. */
static vqkvd__redis_node_t *vqkvd__redis_node_alloc(vqkvd_redis_t *r, const char *host,
                                                    uint16_t port)
{
    if (r->n_nodes == r->cap_nodes) {
        uint32_t cap = r->cap_nodes != 0 ? 2 * r->cap_nodes : 4;
        vqkvd__redis_node_t **nodes = realloc(r->nodes, cap * sizeof *nodes);
        if (nodes == NULL)
            return NULL;
        r->nodes = nodes;
        r->cap_nodes = cap;
    }
    vqkvd__redis_node_t *node = calloc(1, sizeof *node);
    if (node == NULL)
        return NULL;
    node->r = r;
    snprintf(node->host, sizeof node->host, "%s", host);
    node->port = port;
    if (host[0] == '\0')
        snprintf(node->name, sizeof node->name, "%s", r->spec.path);
    else if (strchr(host, ':') != NULL)
        snprintf(node->name, sizeof node->name, "[%s]:%u", host, port);
    else
        snprintf(node->name, sizeof node->name, "%s:%u", host, port);
    node->state = VQKVD__REDIS_IDLE;
    node->backoff_ms = VQKVD__REDIS_BACKOFF_MIN_MS;
    r->nodes[r->n_nodes++] = node;
    return node;
}

static void vqkvd__redis_node_init(vqkvd__redis_node_t *node)
{
    uv_timer_init(node->r->loop, &node->timer);
    uv_timer_init(node->r->loop, &node->deadlines);
    node->timer.data = node->deadlines.data = node;
}

static vqkvd__redis_node_t *vqkvd__redis_node_find(const vqkvd_redis_t *r, const char *host,
                                                   uint16_t port)
{
    for (uint32_t i = 0; i < r->n_nodes; i++)
        if (r->nodes[i]->port == port && strcmp(r->nodes[i]->host, host) == 0)
            return r->nodes[i];
    return NULL;
}

/* The node at host:port, made (idle) if new; NULL when out of memory. */
static vqkvd__redis_node_t *vqkvd__redis_node_get(vqkvd_redis_t *r, const char *host, uint16_t port)
{
    vqkvd__redis_node_t *node = vqkvd__redis_node_find(r, host, port);
    if (node == NULL && (node = vqkvd__redis_node_alloc(r, host, port)) != NULL)
        vqkvd__redis_node_init(node);
    return node;
}

/* ---- sending -------------------------------------------------------------------- */

static void vqkvd__redis_on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Hands cmd to node's connection; false when the node is not up. */
static bool vqkvd__redis_send(vqkvd__redis_cmd_t *cmd, vqkvd__redis_node_t *node)
{
    vqkvd_redis_t *r = cmd->r;
    if (node == NULL || node->state != VQKVD__REDIS_UP)
        return false;
    vqkvd__redis_conn_t *c = node->conn;
    if (cmd->asking && redisAsyncCommand(c->ac, NULL, NULL, "ASKING") != REDIS_OK)
        return false;
    cmd->asking = false;
    if (redisAsyncFormattedCommand(c->ac, vqkvd__redis_on_reply, cmd, cmd->buf, cmd->len) !=
        REDIS_OK)
        return false;
    cmd->conn = c;
    cmd->node = node;
    if (cmd->kind == VQKVD__REDIS_KIND_USER)
        r->stats.pending_bytes += cmd->len;
    if (cmd->deadline != 0)
        vqkvd__redis_deadline_insert(c, cmd);
    if (!r->spec.cluster) {
        free(cmd->buf);
        cmd->buf = NULL;
    }
    return true;
}

static vqkvd__redis_node_t *vqkvd__redis_route(const vqkvd_redis_t *r,
                                               const vqkvd__redis_cmd_t *cmd)
{
    return r->spec.cluster ? r->slots[cmd->slot] : r->nodes[0];
}

/* Gives slot to node, which is connected if it was idle. */
static void vqkvd__redis_slot_set(vqkvd_redis_t *r, uint16_t slot, vqkvd__redis_node_t *node)
{
    vqkvd__redis_node_t *old = r->slots[slot];
    if (old == node)
        return;
    if (old != NULL)
        old->owned--;
    else
        r->slots_assigned++;
    r->slots[slot] = node;
    node->owned++;
    if (node->state == VQKVD__REDIS_IDLE)
        vqkvd__redis_node_connect(node);
}

static void vqkvd__redis_retry_cb(uv_timer_t *t)
{
    vqkvd_redis_t *r = t->data;
    uint64_t now = uv_now(r->loop);
    vqkvd__redis_cmd_t *cmd;
    while ((cmd = r->retry) != NULL && cmd->retry_at <= now) {
        r->retry = cmd->next;
        if (r->retry == NULL)
            r->retry_tail = NULL;
        if (!vqkvd__redis_send(cmd, vqkvd__redis_route(r, cmd)))
            vqkvd__redis_finish(cmd, VQKVD_REDIS_DOWN, NULL);
    }
    if (r->retry != NULL && !r->closing)
        uv_timer_start(&r->retry_timer, vqkvd__redis_retry_cb, r->retry->retry_at - now, 0);
}

/* Follows a cluster's redirection or retry answer to cmd; false when the
 * reply is to be delivered as it is. */
static bool vqkvd__redis_redirect(vqkvd__redis_cmd_t *cmd, const redisReply *reply)
{
    vqkvd_redis_t *r = cmd->r;
    const char *s = reply->str;
    bool moved = strncmp(s, "MOVED ", 6) == 0, ask = strncmp(s, "ASK ", 4) == 0;
    bool again = strncmp(s, "TRYAGAIN", 8) == 0 || strncmp(s, "CLUSTERDOWN", 11) == 0;
    if ((!moved && !ask && !again) || cmd->redirects >= VQKVD__REDIS_REDIRECTS_MAX)
        return false;
    if (again) {
        uint64_t at = uv_now(r->loop) + VQKVD__REDIS_RETRY_MS;
        if (cmd->deadline != 0 && at >= cmd->deadline)
            return false;
        cmd->redirects++;
        cmd->retry_at = at;
        bool first = r->retry == NULL;
        vqkvd__redis_queue_push(&r->retry, &r->retry_tail, cmd);
        if (first)
            uv_timer_start(&r->retry_timer, vqkvd__redis_retry_cb, VQKVD__REDIS_RETRY_MS, 0);
        return true;
    }
    /* "MOVED 3999 127.0.0.1:6381"; an empty host is the node that
     * answered; an IPv6 host comes without brackets. */
    const char *num = s + (moved ? 6 : 4);
    char *end;
    unsigned long slot = strtoul(num, &end, 10);
    const char *addr = end + 1, *colon = strrchr(s, ':');
    uint32_t port;
    if (end == num || *end != ' ' || slot >= VQKVD__REDIS_SLOTS || colon == NULL || colon < addr ||
        (size_t)(colon - addr) > VQKVD_REDIS_HOST_MAX ||
        !vqkvd__redis_number(colon + 1, strlen(colon + 1), 65535, &port) || port == 0)
        return false;
    char host[VQKVD_REDIS_HOST_MAX + 1];
    snprintf(host, sizeof host, "%.*s", (int)(colon - addr), addr);
    vqkvd__redis_node_t *node =
        vqkvd__redis_node_get(r, host[0] != '\0' ? host : cmd->node->host, (uint16_t)port);
    if (node == NULL)
        return false;
    cmd->redirects++;
    if (moved) {
        r->stats.moved++;
        vqkvd__redis_slot_set(r, (uint16_t)slot, node);
        vqkvd__redis_refresh_schedule(r);
    } else {
        r->stats.ask++;
        cmd->asking = true;
        if (node->state == VQKVD__REDIS_IDLE)
            vqkvd__redis_node_connect(node);
    }
    if (!vqkvd__redis_send(cmd, node))
        vqkvd__redis_finish(cmd, VQKVD_REDIS_DOWN, NULL);
    return true;
}

static void vqkvd__redis_refresh_reply(vqkvd__redis_cmd_t *cmd, const redisReply *reply);

static void vqkvd__redis_on_reply(redisAsyncContext *ac, void *reply_, void *privdata)
{
    vqkvd__redis_cmd_t *cmd = privdata;
    const redisReply *reply = reply_;
    vqkvd__redis_conn_t *c = cmd->conn;
    vqkvd_redis_t *r = cmd->r;
    if (cmd->in_deadlines)
        vqkvd__redis_deadline_unlink(c, cmd);
    cmd->conn = NULL;
    if (cmd->kind == VQKVD__REDIS_KIND_USER)
        r->stats.pending_bytes -= cmd->len;
    if (reply == NULL)
        vqkvd__redis_conn_detach(c, vqkvd__redis_ac_why(ac));
    else
        c->stall_since = 0;
    if (cmd->answered) {
        vqkvd__redis_cmd_free(cmd);
        return;
    }
    if (cmd->kind == VQKVD__REDIS_KIND_SLOTS) {
        vqkvd__redis_refresh_reply(cmd, reply);
        vqkvd__redis_cmd_free(cmd);
        return;
    }
    if (reply == NULL) {
        vqkvd__redis_finish(cmd, VQKVD_REDIS_CLOSED, NULL);
        return;
    }
    if (r->spec.cluster && reply->type == REDIS_REPLY_ERROR && vqkvd__redis_redirect(cmd, reply))
        return;
    vqkvd__redis_finish(cmd, VQKVD_REDIS_REPLY, reply);
}

static void vqkvd__redis_deadline_cb(uv_timer_t *t)
{
    vqkvd__redis_node_t *node = t->data;
    vqkvd_redis_t *r = node->r;
    vqkvd__redis_conn_t *c = node->conn;
    uint64_t now = uv_now(r->loop);
    vqkvd__redis_cmd_t *cmd;
    /* A callback may close the client, which parts c from the node. */
    while (c != NULL && c == node->conn && (cmd = c->dl_head) != NULL && cmd->deadline <= now) {
        vqkvd__redis_deadline_unlink(c, cmd);
        if (c->stall_since == 0) {
            c->stall_since = now;
            c->stall_ms = 2ull * cmd->deadline_ms;
        }
        if (cmd->kind == VQKVD__REDIS_KIND_SLOTS) {
            cmd->answered = true;
            vqkvd__redis_refresh_reply(cmd, NULL);
            continue;
        }
        r->stats.timeouts++;
        vqkvd__redis_deliver(cmd, VQKVD_REDIS_TIMEOUT, NULL);
    }
    if (c == NULL || c != node->conn)
        return;
    if (c->stall_since != 0 && now >= c->stall_since + c->stall_ms) {
        char why[96];
        snprintf(why, sizeof why, "no reply for %llu ms after a command timed out",
                 (unsigned long long)c->stall_ms);
        vqkvd__redis_conn_drop(c, why);
        return;
    }
    vqkvd__redis_deadline_arm(c);
}

/* ---- the cluster's slot table --------------------------------------------------- */

static void vqkvd__redis_refresh_timer_cb(uv_timer_t *t)
{
    vqkvd__redis_refresh_maybe_start(t->data);
}

static void vqkvd__redis_refresh_schedule(vqkvd_redis_t *r)
{
    r->refresh.wanted = true;
    vqkvd__redis_refresh_maybe_start(r);
}

/* Sends CLUSTER SLOTS to the next node up, unless one is in flight or the
 * last started less than VQKVD__REDIS_REFRESH_GAP_MS ago (then a timer
 * comes back); with no node up, the next to come up asks. */
static void vqkvd__redis_refresh_maybe_start(vqkvd_redis_t *r)
{
    if (r->closing || !r->refresh.wanted || r->refresh.in_flight)
        return;
    uint64_t now = uv_now(r->loop);
    if (now < r->refresh.not_before) {
        uv_timer_start(&r->refresh.timer, vqkvd__redis_refresh_timer_cb,
                       r->refresh.not_before - now, 0);
        return;
    }
    vqkvd__redis_node_t *node = NULL;
    for (uint32_t i = 0; i < r->n_nodes && node == NULL; i++) {
        vqkvd__redis_node_t *n = r->nodes[(r->refresh.next_node + i) % r->n_nodes];
        if (n->state == VQKVD__REDIS_UP)
            node = n;
    }
    if (node == NULL)
        return;
    r->refresh.next_node = (r->refresh.next_node + 1) % r->n_nodes;
    vqkvd__redis_cmd_t *cmd = calloc(1, sizeof *cmd);
    int len = cmd != NULL ? redisFormatCommand(&cmd->buf, "CLUSTER SLOTS") : -1;
    if (len < 0) {
        free(cmd);
        r->refresh.not_before = now + VQKVD__REDIS_REFRESH_RETRY_MS;
        uv_timer_start(&r->refresh.timer, vqkvd__redis_refresh_timer_cb,
                       VQKVD__REDIS_REFRESH_RETRY_MS, 0);
        return;
    }
    cmd->r = r;
    cmd->kind = VQKVD__REDIS_KIND_SLOTS;
    cmd->len = (size_t)len;
    cmd->deadline_ms = r->connect_timeout_ms;
    cmd->deadline = now + r->connect_timeout_ms;
    if (!vqkvd__redis_send(cmd, node)) {
        vqkvd__redis_cmd_free(cmd);
        return;
    }
    r->refresh.in_flight = true;
    r->refresh.wanted = false;
    r->refresh.not_before = now + VQKVD__REDIS_REFRESH_GAP_MS;
}

/* Whether e is a well-formed CLUSTER SLOTS entry: start, end, and a
 * master as [host, port, ...]. */
static bool vqkvd__redis_slots_entry_ok(const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3)
        return false;
    const redisReply *start = e->element[0], *end = e->element[1], *m = e->element[2];
    return start->type == REDIS_REPLY_INTEGER && end->type == REDIS_REPLY_INTEGER &&
           start->integer >= 0 && start->integer <= end->integer &&
           end->integer < VQKVD__REDIS_SLOTS && m->type == REDIS_REPLY_ARRAY && m->elements >= 2 &&
           m->element[0]->type == REDIS_REPLY_STRING &&
           m->element[0]->len <= VQKVD_REDIS_HOST_MAX &&
           m->element[1]->type == REDIS_REPLY_INTEGER && m->element[1]->integer > 0 &&
           m->element[1]->integer <= 65535;
}

/* Replaces the table with what reply (from node `from`) says; false, and
 * nothing changed, when it is not a CLUSTER SLOTS answer. A master at "?"
 * (endpoint unknown) leaves its slots without a node; an empty host is
 * `from`'s. Slots whose node cannot be allocated stay without one until
 * the next reload. */
static bool vqkvd__redis_slots_apply(vqkvd_redis_t *r, const vqkvd__redis_node_t *from,
                                     const redisReply *reply)
{
    if (reply->type != REDIS_REPLY_ARRAY)
        return false;
    for (size_t i = 0; i < reply->elements; i++)
        if (!vqkvd__redis_slots_entry_ok(reply->element[i]))
            return false;
    memset(r->slots, 0, VQKVD__REDIS_SLOTS * sizeof *r->slots);
    r->slots_assigned = 0;
    for (uint32_t i = 0; i < r->n_nodes; i++)
        r->nodes[i]->owned = 0;
    bool whole = true;
    for (size_t i = 0; i < reply->elements; i++) {
        const redisReply *e = reply->element[i], *m = e->element[2];
        const char *host = m->element[0]->str;
        if (strcmp(host, "?") == 0)
            continue;
        vqkvd__redis_node_t *node = vqkvd__redis_node_get(r, host[0] != '\0' ? host : from->host,
                                                          (uint16_t)m->element[1]->integer);
        if (node == NULL) {
            whole = false;
            continue;
        }
        for (long long s = e->element[0]->integer; s <= e->element[1]->integer; s++)
            if (r->slots[s] == NULL) {
                r->slots[s] = node;
                node->owned++;
                r->slots_assigned++;
            }
    }
    for (uint32_t i = 0; i < r->n_nodes; i++)
        if (r->nodes[i]->owned > 0 && r->nodes[i]->state == VQKVD__REDIS_IDLE)
            vqkvd__redis_node_connect(r->nodes[i]);
    return whole;
}

/* The end of a CLUSTER SLOTS: its reply, or NULL (connection ended, or
 * its deadline passed). A failure is tried again after
 * VQKVD__REDIS_REFRESH_RETRY_MS and logged once until one succeeds. */
static void vqkvd__redis_refresh_reply(vqkvd__redis_cmd_t *cmd, const redisReply *reply)
{
    vqkvd_redis_t *r = cmd->r;
    r->refresh.in_flight = false;
    if (reply != NULL && vqkvd__redis_slots_apply(r, cmd->node, reply)) {
        r->stats.slot_refreshes++;
        r->refresh.warned = false;
    } else {
        if (!r->closing)
            vqkvd_log(r->refresh.warned ? VQKVD_LOG_DEBUG : VQKVD_LOG_WARN,
                      "redis %s: CLUSTER SLOTS failed: %s", cmd->node->name,
                      reply == NULL                      ? "no answer"
                      : reply->type == REDIS_REPLY_ERROR ? reply->str
                                                         : "not a slot table");
        r->refresh.warned = true;
        r->refresh.wanted = true;
        r->refresh.not_before = uv_now(r->loop) + VQKVD__REDIS_REFRESH_RETRY_MS;
    }
    vqkvd__redis_refresh_maybe_start(r);
}

/* ---- the client ----------------------------------------------------------------- */

int vqkvd_redis_create(uv_loop_t *loop, const char *spec, const char *password_override,
                       uint32_t connect_timeout_ms, vqkvd_redis_t **out, char *why, size_t why_len)
{
    if (loop == NULL || out == NULL)
        return vqkvd__redis_refuse(why, why_len, "no loop or nowhere to put the client");
    if (connect_timeout_ms == 0)
        return vqkvd__redis_refuse(why, why_len, "a connect timeout of 0 ms");
    vqkvd_redis_t *r = calloc(1, sizeof *r);
    if (r == NULL) {
        vqkvd__redis_refuse(why, why_len, "out of memory");
        return VQKV_ENOMEM;
    }
    int rc = vqkvd_redis_parse(spec, password_override, &r->spec, why, why_len);
    if (rc != VQKV_OK)
        goto fail;
    r->loop = loop;
    r->connect_timeout_ms = connect_timeout_ms;
    /* Everything that can fail is allocated before the first uv handle is
     * made: a handle cannot be taken back without the loop. */
    rc = VQKV_ENOMEM;
    if (r->spec.cluster && (r->slots = calloc(VQKVD__REDIS_SLOTS, sizeof *r->slots)) == NULL)
        goto fail;
    for (uint32_t i = 0; i < (r->spec.n_addrs > 0 ? r->spec.n_addrs : 1); i++) {
        const char *host = r->spec.n_addrs > 0 ? r->spec.addrs[i].host : "";
        uint16_t port = r->spec.n_addrs > 0 ? r->spec.addrs[i].port : 0;
        vqkvd__redis_node_t *node = vqkvd__redis_node_find(r, host, port);
        if (node == NULL && (node = vqkvd__redis_node_alloc(r, host, port)) == NULL)
            goto fail;
        node->seed = true;
    }
    /* Nothing fails past here: a uv handle, once made, is only taken back
     * through the loop. */
    uv_idle_init(loop, &r->soon_idle);
    uv_timer_init(loop, &r->refresh.timer);
    uv_timer_init(loop, &r->retry_timer);
    r->soon_idle.data = r->refresh.timer.data = r->retry_timer.data = r;
    r->refresh.wanted = r->spec.cluster;
    /* Connect timeouts count from now, not from when the loop last woke:
     * a caller may have blocked since (starting up). */
    uv_update_time(loop);
    for (uint32_t i = 0; i < r->n_nodes; i++)
        vqkvd__redis_node_init(r->nodes[i]);
    for (uint32_t i = 0; i < r->n_nodes; i++)
        vqkvd__redis_node_connect(r->nodes[i]);
    *out = r;
    return VQKV_OK;
fail:
    if (rc == VQKV_ENOMEM)
        vqkvd__redis_refuse(why, why_len, "out of memory");
    for (uint32_t i = 0; i < r->n_nodes; i++)
        free(r->nodes[i]);
    free(r->nodes);
    free(r->slots);
    free(r);
    return rc;
}

/* Whether name (n bytes) is a command that would change what the
 * connection is, which a reconnect would not redo. */
static bool vqkvd__redis_mode_command(const char *name, size_t n)
{
    static const char *const refused[] = {
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
        "MONITOR",   "SELECT",     "AUTH",       "HELLO",       "RESET",
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++)
        if (strlen(refused[i]) == n && strncasecmp(name, refused[i], n) == 0)
            return true;
    return false;
}

int vqkvd_redis_command(vqkvd_redis_t *r, const void *key, size_t keylen, int argc,
                        const char **argv, const size_t *argvlen, uint32_t deadline_ms,
                        vqkvd_redis_reply_fn fn, void *arg)
{
    if (argc < 1 || argv == NULL || fn == NULL || (key == NULL && keylen > 0))
        return VQKV_EINVAL;
    /* Each argument counted with 32 bytes more for its framing, which
     * keeps the formatted length inside redisFormatCommandArgv's int. */
    size_t total = 0;
    for (int i = 0; i < argc; i++) {
        size_t n = argvlen != NULL ? argvlen[i] : strlen(argv[i]);
        if (n > VQKVD_REDIS_ARGS_MAX - total || 32 > VQKVD_REDIS_ARGS_MAX - total - n)
            return VQKV_EINVAL;
        total += n + 32;
    }
    if (vqkvd__redis_mode_command(argv[0], argvlen != NULL ? argvlen[0] : strlen(argv[0])))
        return VQKV_EINVAL;
    vqkvd__redis_cmd_t *cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL)
        return VQKV_ENOMEM;
    int len = redisFormatCommandArgv(&cmd->buf, argc, argv, argvlen);
    if (len < 0) {
        free(cmd);
        return VQKV_ENOMEM;
    }
    cmd->r = r;
    cmd->kind = VQKVD__REDIS_KIND_USER;
    cmd->len = (size_t)len;
    cmd->fn = fn;
    cmd->arg = arg;
    cmd->deadline_ms = deadline_ms;
    cmd->deadline = deadline_ms != 0 ? uv_now(r->loop) + deadline_ms : 0;
    if (r->spec.cluster)
        cmd->slot = vqkvd_redis_slot(key, keylen);
    r->stats.pending++;
    if (r->closing)
        vqkvd__redis_soon(cmd, VQKVD_REDIS_CLOSED);
    else if (!vqkvd__redis_send(cmd, vqkvd__redis_route(r, cmd)))
        vqkvd__redis_soon(cmd, VQKVD_REDIS_DOWN);
    return VQKV_OK;
}

bool vqkvd_redis_up(const vqkvd_redis_t *r)
{
    if (!r->spec.cluster)
        return r->nodes[0]->state == VQKVD__REDIS_UP;
    if (r->slots_assigned != VQKVD__REDIS_SLOTS)
        return false;
    for (uint32_t i = 0; i < r->n_nodes; i++)
        if (r->nodes[i]->owned > 0 && r->nodes[i]->state != VQKVD__REDIS_UP)
            return false;
    return true;
}

void vqkvd_redis_stats(const vqkvd_redis_t *r, vqkvd_redis_stats_t *st)
{
    *st = r->stats;
    st->nodes = r->n_nodes;
}

/* Frees everything once the last handle has closed, then tells the
 * caller. */
static void vqkvd__redis_handle_closed(vqkvd_redis_t *r)
{
    if (--r->handles > 0)
        return;
    void (*done)(void *) = r->done;
    void *done_arg = r->done_arg;
    for (uint32_t i = 0; i < r->n_nodes; i++)
        free(r->nodes[i]);
    free(r->nodes);
    free(r->slots);
    free(r);
    if (done != NULL)
        done(done_arg);
}

static void vqkvd__redis_node_handle_closed(uv_handle_t *h)
{
    vqkvd__redis_node_t *node = h->data;
    vqkvd__redis_handle_closed(node->r);
}

static void vqkvd__redis_client_handle_closed(uv_handle_t *h)
{
    vqkvd__redis_handle_closed(h->data);
}

/* Closes the handles once close has delivered every callback and every
 * connection and resolution has ended. */
static void vqkvd__redis_maybe_finish(vqkvd_redis_t *r)
{
    if (!r->closing || r->finishing || r->soon != NULL || r->conns > 0 || r->resolves > 0)
        return;
    r->finishing = true;
    r->handles = 3 + 2 * r->n_nodes;
    uv_close((uv_handle_t *)&r->soon_idle, vqkvd__redis_client_handle_closed);
    uv_close((uv_handle_t *)&r->refresh.timer, vqkvd__redis_client_handle_closed);
    uv_close((uv_handle_t *)&r->retry_timer, vqkvd__redis_client_handle_closed);
    for (uint32_t i = 0; i < r->n_nodes; i++) {
        uv_close((uv_handle_t *)&r->nodes[i]->timer, vqkvd__redis_node_handle_closed);
        uv_close((uv_handle_t *)&r->nodes[i]->deadlines, vqkvd__redis_node_handle_closed);
    }
}

void vqkvd_redis_close(vqkvd_redis_t *r, void (*done)(void *arg), void *arg)
{
    if (r->closing)
        return;
    r->closing = true;
    r->done = done;
    r->done_arg = arg;
    uv_timer_stop(&r->refresh.timer);
    uv_timer_stop(&r->retry_timer);
    for (vqkvd__redis_cmd_t *cmd = r->retry, *next; cmd != NULL; cmd = next) {
        next = cmd->next;
        vqkvd__redis_soon(cmd, VQKVD_REDIS_CLOSED);
    }
    r->retry = r->retry_tail = NULL;
    for (uint32_t i = 0; i < r->n_nodes; i++) {
        vqkvd__redis_node_t *node = r->nodes[i];
        uv_timer_stop(&node->timer);
        uv_timer_stop(&node->deadlines);
        vqkvd__redis_node_unresolve(node);
        if (node->conn != NULL)
            vqkvd__redis_conn_drop(node->conn, "closing");
    }
    /* The rest happens on the loop, even when nothing is left to wait
     * for: done never runs inside this call. */
    uv_idle_start(&r->soon_idle, vqkvd__redis_soon_cb);
}
