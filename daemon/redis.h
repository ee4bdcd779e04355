/* redis.h -- a client of one Redis server or of a Redis Cluster on vqkvd's
 * libuv loop, for a remote tier: commands routed by key, answered once
 * each, never blocking the loop.
 *
 * hiredis (0.14: no TLS, no RESP3, no async timeouts) speaks the
 * protocol; this module adds what it lacks: non-blocking connects (host
 * names resolved with uv_getaddrinfo first), a connect timeout, reconnects
 * with exponential backoff (100 ms doubling to 5 s, back to 100 ms once a
 * connection is up), AUTH and SELECT pipelined before any command,
 * per-command deadlines, and Redis Cluster's slot routing with MOVED, ASK,
 * TRYAGAIN and CLUSTERDOWN handled.
 *
 * A connection counts as up once its handshake (AUTH, SELECT, or a PING
 * when neither is needed) has been answered; a refused AUTH is logged at
 * warn once until the node has been up again, and the node stays down,
 * retried with backoff. Commands to a node that is not up are not queued:
 * they get VQKVD_REDIS_DOWN on the next loop iteration, so a caller treats
 * an unreachable remote as a miss at once instead of piling up waits.
 *
 * Deadlines are checked by one timer per connection, armed for the
 * earliest; commands are kept in deadline order, which costs O(1) per
 * command when deadlines come in order (one deadline_ms for all, the
 * expected use) and O(k) for a command whose deadline is k places earlier.
 * A command that times out is answered with VQKVD_REDIS_TIMEOUT at once and
 * its late reply dropped; a connection with a timed-out command and no
 * reply for twice that command's deadline_ms since is taken for stalled
 * (a stopped or wedged server) and reconnected.
 *
 * Cluster: the first node up is asked CLUSTER SLOTS, which gives the
 * 16384-slot table; nodes are made as the table (or a redirection) names
 * them, and connected while they own slots (seeds always). A command goes
 * to the node of its key's slot (CRC16 of the key, or of the part between
 * the first `{` and the next `}` when that is not empty). MOVED updates
 * the slot, asks for a new CLUSTER SLOTS (one in flight at most, started
 * at most every 100 ms) and sends the command again to the named node;
 * ASK sends ASKING and the command to the named node, the table left
 * alone; TRYAGAIN and CLUSTERDOWN send it again after 20 ms, unless its
 * deadline would pass first. After 5 redirections or retries the last
 * error reply is what the callback gets. A node that goes down asks for a
 * new table too (a replica may have taken over). Each command is routed
 * alone: commands over several keys must keep them in one slot.
 *
 * The process must ignore SIGPIPE (vqkvd does): hiredis writes with
 * write(2). Single-threaded: every function runs on the loop's thread.
 */
#ifndef VQKVD_REDIS_H
#define VQKVD_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>
#include <uv.h>

typedef struct vqkvd_redis vqkvd_redis_t;

typedef enum {
    VQKVD_REDIS_REPLY =
        0, /* reply holds Redis's answer (may be an error reply, REDIS_REPLY_ERROR, or nil) */
    /* no connection to the node that owns the key (connecting, backing off, or no node known for
     * its slot); never sent, or sent only to a node that redirected it elsewhere */
    VQKVD_REDIS_DOWN,
    VQKVD_REDIS_TIMEOUT, /* sent but no answer within the deadline (a late answer is dropped) */
    VQKVD_REDIS_CLOSED,  /* the connection broke, or the client is being closed */
} vqkvd_redis_status_t;

/* Called exactly once per command, on the loop; reply is NULL unless
 * status is VQKVD_REDIS_REPLY and is freed after the callback returns. A
 * callback may issue commands and may call vqkvd_redis_close. */
typedef void (*vqkvd_redis_reply_fn)(void *arg, vqkvd_redis_status_t status,
                                     const redisReply *reply);

typedef struct {
    uint64_t connects;         /* handshakes completed */
    uint64_t disconnects;      /* connections lost or dropped after they were up */
    uint64_t connect_failures; /* attempts that never came up (refused, timed out, AUTH refused) */
    uint64_t moved, ask;       /* redirections followed */
    uint64_t timeouts;         /* commands answered with VQKVD_REDIS_TIMEOUT */
    uint64_t slot_refreshes;   /* CLUSTER SLOTS replies applied, the first included */
    /* Bytes of commands handed to a connection and not yet answered by it
     * (all nodes): a timed-out command counts until its late reply or the
     * connection's end. */
    uint64_t pending_bytes;
    uint64_t pending; /* commands whose callback has not run yet */
    uint32_t nodes, nodes_up;
} vqkvd_redis_stats_t;

/* The longest host name, unix socket path, user and password a spec may hold. */
#define VQKVD_REDIS_HOST_MAX 255
#define VQKVD_REDIS_PATH_MAX 107 /* sun_path less its NUL */
#define VQKVD_REDIS_USER_MAX 255
#define VQKVD_REDIS_PASSWORD_MAX 1023
/* Cluster seeds a spec may list. */
#define VQKVD_REDIS_SEEDS_MAX 16
/* The most bytes of arguments one command may carry: Redis's default
 * proto-max-bulk-len. */
#define VQKVD_REDIS_ARGS_MAX (512u << 20)

typedef struct {
    char host[VQKVD_REDIS_HOST_MAX + 1]; /* a name or a numeric address (IPv6 without brackets) */
    uint16_t port;
} vqkvd_redis_addr_t;

/* A spec as vqkvd_redis_parse reads it. */
typedef struct {
    bool cluster;
    char path[VQKVD_REDIS_PATH_MAX + 1];             /* a unix socket; empty for TCP */
    vqkvd_redis_addr_t addrs[VQKVD_REDIS_SEEDS_MAX]; /* the server, or the cluster's seeds */
    uint32_t n_addrs;                                /* 0 with a path */
    uint32_t db;
    char user[VQKVD_REDIS_USER_MAX + 1];         /* empty: AUTH with the password alone */
    char password[VQKVD_REDIS_PASSWORD_MAX + 1]; /* empty: no AUTH */
} vqkvd_redis_spec_t;

/* Reads spec, which is one of
 *
 *   redis://[user[:password]@]host:port[/db]     one server over TCP
 *   unix:///path/to/socket[?db=N]                 one server on a unix socket
 *   cluster://[user[:password]@]host:port[,host:port...]   Redis Cluster
 *
 * and the rule for a cluster is: the cluster:// scheme, or more than one
 * address. So "redis://a:6379,b:6379" is a cluster too (each address after
 * the first may repeat "redis://"), and a cluster reached through a single
 * seed is written cluster://host:port. A cluster has only db 0. host is a
 * name, an IPv4 address or a bracketed IPv6 one ([::1]:6379); the port is
 * required (1-65535); user and password are percent-decoded; credentials
 * given on several addresses of a list must be the same. TLS (rediss://)
 * is not available with hiredis 0.14 and is refused. password_override,
 * when not NULL, replaces the spec's password (vqkvd reads it from a
 * file); an empty password means no AUTH, and a user needs a password.
 *
 * VQKV_OK, or VQKV_EINVAL with a message in why (why_len bytes) that never
 * repeats a password. Pure: no I/O, no allocation. */
int vqkvd_redis_parse(const char *spec, const char *password_override, vqkvd_redis_spec_t *out,
                      char *why, size_t why_len);

/* Parses spec (vqkvd_redis_parse) and starts connecting: the server, or
 * every seed of a cluster. connect_timeout_ms (at least 1) bounds a name's
 * resolution, the connect and the handshake together, and is the deadline
 * of CLUSTER SLOTS. VQKV_OK with *out set; VQKV_EINVAL (why says what) or
 * VQKV_ENOMEM, *out then untouched and nothing started. */
int vqkvd_redis_create(uv_loop_t *loop, const char *spec, const char *password_override,
                       uint32_t connect_timeout_ms, vqkvd_redis_t **out, char *why, size_t why_len);

/* Issues a command routed by key (cluster: the slot of key, honouring
 * {hash tags}; standalone: the one connection). argv/argvlen as for
 * redisAsyncCommandArgv (argvlen NULL: C strings); copied, so they may go
 * as soon as this returns. deadline_ms 0 = no deadline. Returns VQKV_OK
 * (fn will be called exactly once, never from inside this call),
 * VQKV_EINVAL for argc < 1, more than VQKVD_REDIS_ARGS_MAX bytes of
 * arguments (each counted with 32 bytes more for its framing), or a command that would change what
 * the connection is, which a reconnect would not redo ((P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE, MONITOR,
 * SELECT, AUTH, HELLO, RESET), or VQKV_ENOMEM; fn is never called on an
 * error. When the node is down the callback gets VQKVD_REDIS_DOWN (on the
 * next loop iteration). */
int vqkvd_redis_command(vqkvd_redis_t *r, const void *key, size_t keylen, int argc,
                        const char **argv, const size_t *argvlen, uint32_t deadline_ms,
                        vqkvd_redis_reply_fn fn, void *arg);

/* Standalone: connected; cluster: every slot has a node and every such
 * node is connected. O(nodes). */
bool vqkvd_redis_up(const vqkvd_redis_t *r);

void vqkvd_redis_stats(const vqkvd_redis_t *r, vqkvd_redis_stats_t *st);

/* In a reply callback: takes the string of reply (a string, status or
 * error reply) away from it, a malloc'd buffer of reply->len bytes and a
 * NUL that the caller frees; hiredis then frees the rest. A large value
 * changes hands instead of being copied out on the loop. NULL when reply
 * has none. */
char *vqkvd_redis_reply_take_str(const redisReply *reply);

/* The cluster slot (0-16383) of key: CRC16 (XMODEM) of the key or of its
 * hash tag, modulo 16384. */
uint16_t vqkvd_redis_slot(const void *key, size_t keylen);

/* Fails every command not yet answered with VQKVD_REDIS_CLOSED (on later
 * loop iterations, never inside this call; a command such a callback
 * issues gets VQKVD_REDIS_CLOSED too), closes every connection and handle;
 * done(arg) runs on the loop once every uv handle is closed and memory is
 * freed (the loop can then run dry); that may wait for a name resolution
 * that has started on libuv's thread pool, which cannot be cancelled. r
 * is gone once this is called, except to callbacks that run before done. */
void vqkvd_redis_close(vqkvd_redis_t *r, void (*done)(void *arg), void *arg);

#endif
