/* remote.c -- the remote tier (remote.h) on redis.h's client: blocks
 * written behind puts, fetched by lookups, codebooks published and
 * adopted.
 *
 * Nothing here waits. A SET is formatted and handed to the connection on
 * the loop (one copy of the compressed block into a record, one into the
 * client's output buffer: O(block bytes), a memcpy each), and its answer
 * only moves counters; what limits the bytes in flight is
 * remote_queue_bytes, measured as the client's unanswered bytes, so a
 * Redis that is slow fills it and later blocks are skipped, counted.
 *
 * A fetch sends one GET per key: a cluster routes each alone, and the
 * client pipelines the GETs to one node on one connection. Each answer's
 * buffer is taken over from hiredis's reply (vqkvd_redis_reply_take_str),
 * so the loop copies nothing it brings: hiredis's reader copies each
 * value once out of its read buffer, the Promote job once into the pool,
 * off the loop. At the deadline, answers not in count as late and the lookup goes on with what
 * came. Everything read is checked before it is kept (the header's own
 * checksum, tenant, model, key, parent, lengths, codec identity); the
 * payload's CRC is checked by the job that copies it into the pool, off
 * the loop.
 */
#include "remote.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block_keys.h"
#include "calib.h"
#include "log.h"
#include "redis.h"
#include "tiers.h"

/* A SET not answered in this long counts as failed (the client then
 * drops the connection and reconnects: redis.h). */
#define VQKVD__REMOTE_PUT_DEADLINE_MS 10000u
/* How long codebook requests wait, and how often a model asks again. */
#define VQKVD__REMOTE_CODEBOOK_DEADLINE_MS 5000u
#define VQKVD__REMOTE_CODEBOOK_RETRY_MS 1000u
/* A stopping daemon waits this long for its SETs to be answered. */
#define VQKVD__REMOTE_DRAIN_MS 1000u
/* "vqkv:b:" + a uid + ":" + 64 hex + ":" + 64 hex, with room. */
#define VQKVD__REMOTE_KEY_BYTES 160

struct vqkvd_remote {
    vqkvd_redis_t *redis;
    vqkvd_remote_stats_t st;
    uint64_t puts_pending; /* SETs of blocks not yet answered */
    bool stopping;
    bool closing; /* vqkvd_redis_close called */
    bool closed;  /* and done: the loop holds nothing of ours */
    uv_timer_t drain;
};

/* A GET of a fetch: which fetch, which block. */
struct vqkvd_remote_get {
    vqkvd_remote_fetch_t *f;
    uint32_t i;
};

/* A codebook exchange of one model under way. */
typedef struct {
    vqkvd_server_t *s;
    vqkvd_model_t *m;
    uint8_t sha256[32];
} vqkvd__remote_cb_t;

/* ---- names ------------------------------------------------------------------- */

/* 32 bytes (a key, a model identity, a SHA-256) as 64 hex digits. */
static char *vqkvd__remote_hex(char out[VQKV_BLOCK_KEY_HEX_LEN], const uint8_t *bytes)
{
    vqkv_block_key_hex(bytes, out, VQKV_BLOCK_KEY_HEX_LEN);
    return out;
}

/* vqkv:b:<tenant>:<model ident>:<key>; returns its length. */
static size_t vqkvd__remote_block_key(char *out, uint32_t tenant, const vqkvd_model_t *m,
                                      const uint8_t *key)
{
    char ident[65], hex[65];
    return (size_t)snprintf(out, VQKVD__REMOTE_KEY_BYTES, "vqkv:b:%u:%s:%s", (unsigned)tenant,
                            vqkvd__remote_hex(ident, m->ident), vqkvd__remote_hex(hex, key));
}

static size_t vqkvd__remote_codebooks_key(char *out, const uint8_t sha256[32])
{
    char hex[65];
    return (size_t)snprintf(out, VQKVD__REMOTE_KEY_BYTES, "vqkv:cb:%s",
                            vqkvd__remote_hex(hex, sha256));
}

static size_t vqkvd__remote_model_key(char *out, const vqkvd_model_t *m)
{
    char ident[65];
    return (size_t)snprintf(out, VQKVD__REMOTE_KEY_BYTES, "vqkv:cbm:%u:%s", (unsigned)m->tenant,
                            vqkvd__remote_hex(ident, m->ident));
}

/* ---- start and stop ------------------------------------------------------------ */

/* The password in path: a regular file of this user that no one else can
 * read, its first line. VQKV_OK or VQKV_EINVAL, logged. */
static int vqkvd__remote_password(const char *path, char *out, size_t size)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "remote_password_file %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return VQKV_EINVAL;
    }
    ssize_t got = -1;
    if (S_ISREG(st.st_mode) && st.st_uid == geteuid() && (st.st_mode & 077) == 0)
        got = read(fd, out, size - 1);
    close(fd);
    if (got < 0 || (size_t)got == size - 1) {
        vqkvd_log(VQKVD_LOG_ERROR,
                  "remote_password_file %s must be a file of this user, under %d bytes, that no "
                  "one else can read (chmod 600)",
                  path, VQKVD_REDIS_PASSWORD_MAX + 1);
        return VQKV_EINVAL;
    }
    out[got] = '\0';
    out[strcspn(out, "\r\n")] = '\0';
    return VQKV_OK;
}

/* Where spec points, without its credentials, for the log. */
static void vqkvd__remote_describe(const vqkvd_redis_spec_t *spec, char *out, size_t size)
{
    if (spec->path[0] != '\0') {
        snprintf(out, size, "unix://%s db %u", spec->path, (unsigned)spec->db);
        return;
    }
    int n = snprintf(out, size, "%s", spec->cluster ? "cluster" : "redis");
    for (uint32_t i = 0; i < spec->n_addrs && n > 0 && (size_t)n < size; i++)
        n += snprintf(out + n, size - (size_t)n, "%s%s:%u", i == 0 ? " " : ",", spec->addrs[i].host,
                      (unsigned)spec->addrs[i].port);
    if (!spec->cluster && n > 0 && (size_t)n < size)
        snprintf(out + n, size - (size_t)n, " db %u", (unsigned)spec->db);
}

int vqkvd_remote_start(vqkvd_server_t *s)
{
    const vqkvd_config_t *cfg = &s->cfg;
    if (cfg->remote == NULL)
        return VQKV_OK;
    /* Messages name the servers, never the URL: it may hold a password. */
    char password[VQKVD_REDIS_PASSWORD_MAX + 1], why[256], where[256];
    vqkvd_redis_spec_t spec;
    if (vqkvd_redis_parse(cfg->remote, NULL, &spec, why, sizeof why) != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "remote: %s", why);
        return VQKV_EINVAL;
    }
    vqkvd__remote_describe(&spec, where, sizeof where);
    if (spec.password[0] != '\0' && cfg->remote_password_file == NULL)
        vqkvd_log(VQKVD_LOG_WARN, "remote: the URL holds a password, which the command line "
                                  "and the process list show; use remote_password_file");
    explicit_bzero(&spec, sizeof spec);
    if (cfg->remote_password_file != NULL &&
        vqkvd__remote_password(cfg->remote_password_file, password, sizeof password) != VQKV_OK)
        return VQKV_EINVAL;
    vqkvd_remote_t *rt = calloc(1, sizeof *rt);
    if (rt == NULL)
        return VQKV_ENOMEM;
    int rc = vqkvd_redis_create(
        s->loop, cfg->remote, cfg->remote_password_file != NULL ? password : NULL,
        cfg->remote_lookup_ms > 1000 ? cfg->remote_lookup_ms : 1000, &rt->redis, why, sizeof why);
    explicit_bzero(password, sizeof password);
    if (rc != VQKV_OK) {
        if (rc == VQKV_EINVAL)
            vqkvd_log(VQKVD_LOG_ERROR, "remote %s: %s", where, why);
        free(rt);
        return rc;
    }
    uv_timer_init(s->loop, &rt->drain); /* cannot fail */
    rt->drain.data = rt;
    s->remote = rt;
    vqkvd_log(VQKVD_LOG_INFO, "remote tier: %s (connecting in the background)", where);
    return VQKV_OK;
}

static void vqkvd__remote_closed(void *arg)
{
    ((vqkvd_remote_t *)arg)->closed = true;
}

static void vqkvd__remote_close(vqkvd_remote_t *rt)
{
    if (rt->closing)
        return;
    rt->closing = true;
    uv_close((uv_handle_t *)&rt->drain, NULL);
    vqkvd_redis_close(rt->redis, vqkvd__remote_closed, rt);
}

static void vqkvd__remote_drained(uv_timer_t *t)
{
    vqkvd__remote_close(t->data);
}

void vqkvd_remote_stop(vqkvd_server_t *s)
{
    vqkvd_remote_t *rt = s->remote;
    if (rt == NULL || rt->stopping)
        return;
    rt->stopping = true;
    if (rt->puts_pending == 0)
        vqkvd__remote_close(rt);
    else
        uv_timer_start(&rt->drain, vqkvd__remote_drained, VQKVD__REMOTE_DRAIN_MS, 0);
}

void vqkvd_remote_destroy(vqkvd_server_t *s)
{
    free(s->remote);
    s->remote = NULL;
}

void vqkvd_remote_stats(const vqkvd_server_t *s, vqkvd_remote_stats_t *st)
{
    const vqkvd_remote_t *rt = s->remote;
    if (rt == NULL) {
        memset(st, 0, sizeof *st);
        return;
    }
    *st = rt->st;
    if (rt->closing)
        return;
    vqkvd_redis_stats_t rs;
    vqkvd_redis_stats(rt->redis, &rs);
    st->up = vqkvd_redis_up(rt->redis);
    st->reconnects = rs.connects > rs.nodes ? rs.connects - rs.nodes : 0;
}

/* ---- write-behind ------------------------------------------------------------- */

static void vqkvd__remote_put_done(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    vqkvd_remote_t *rt = arg;
    bool ok = status == VQKVD_REDIS_REPLY && reply->type == REDIS_REPLY_STATUS;
    rt->st.puts_stored += ok;
    rt->st.puts_failed += !ok;
    if (--rt->puts_pending == 0 && rt->stopping)
        vqkvd__remote_close(rt);
}

void vqkvd_remote_put(vqkvd_server_t *s, const vqkvd_model_t *m, const vqkvd_block_t *b)
{
    vqkvd_remote_t *rt = s->remote;
    if (rt == NULL || rt->stopping || b->stage != NULL)
        return;
    uint32_t bytes = vqkvd_tiers_block_bytes(m, b->codec);
    if (bytes == 0)
        return;
    size_t len = VQKVD_SEGMENT_RECORD_BYTES + (size_t)bytes;
    vqkvd_redis_stats_t rs;
    vqkvd_redis_stats(rt->redis, &rs);
    if (!vqkvd_redis_up(rt->redis) || rs.pending_bytes + len > s->cfg.remote_queue_bytes) {
        rt->st.puts_skipped++;
        return;
    }
    uint8_t *value = malloc(len);
    vqkvd_segment_record_t rec;
    vqkvd_tiers_record(&rec, b->tenant, b->model, b->logical_bytes, b->key,
                       b->parent != NULL ? b->parent->key : NULL, b->codec, bytes);
    rec.seq = 1; /* one record per key: no order to keep */
    if (value == NULL ||
        s->backend->ops->block_read(s->backend, vqkvd_pool_slot_ptr(&s->pool, b->slot), bytes,
                                    value + VQKVD_SEGMENT_RECORD_BYTES) != VQKV_OK) {
        free(value);
        rt->st.puts_skipped++;
        return;
    }
    rec.payload_crc = vqkvd_segment_crc32c(0, value + VQKVD_SEGMENT_RECORD_BYTES, bytes);
    vqkvd_segment_encode(&rec, value); /* fields from a model that checked them */
    char key[VQKVD__REMOTE_KEY_BYTES], ttl[16];
    size_t key_len = vqkvd__remote_block_key(key, b->tenant, m, b->key);
    int ttl_len = snprintf(ttl, sizeof ttl, "%u", (unsigned)s->cfg.remote_ttl_s);
    const char *argv[] = {"SET", key, (const char *)value, "EX", ttl};
    size_t lens[] = {3, key_len, len, 2, (size_t)ttl_len};
    int argc = s->cfg.remote_ttl_s > 0 ? 5 : 3;
    if (vqkvd_redis_command(rt->redis, key, key_len, argc, argv, lens,
                            VQKVD__REMOTE_PUT_DEADLINE_MS, vqkvd__remote_put_done, rt) == VQKV_OK) {
        rt->puts_pending++;
        rt->st.puts_sent++;
        rt->st.bytes_sent += len;
    } else {
        rt->st.puts_skipped++;
    }
    free(value);
}

/* ---- read-through ------------------------------------------------------------- */

/* Which of the model's identities value i of f has, when it is exactly
 * the block the lookup asked for; NULL otherwise, counted. */
static const vqkvd_codec_ident_t *vqkvd__remote_check(vqkvd_remote_fetch_t *f, uint32_t i,
                                                      size_t len)
{
    static const uint8_t root[VQKVD_KEY_BYTES];
    vqkvd_remote_stats_t *st = &f->s->remote->st;
    vqkvd_segment_record_t *rec = &f->recs[i];
    const vqkvd_model_t *m = f->m;
    const uint8_t *key = f->keys + (size_t)(f->first + i) * VQKVD_KEY_BYTES;
    const uint8_t *parent = f->first + i > 0 ? key - VQKVD_KEY_BYTES : root;
    if (vqkvd_segment_parse(f->values[i], len, rec) != VQKV_OK || rec->flags != 0 ||
        rec->tenant != f->tenant || rec->model != m->store_id ||
        memcmp(rec->key, key, VQKVD_KEY_BYTES) != 0 ||
        memcmp(rec->parent, parent, VQKVD_KEY_BYTES) != 0 ||
        rec->logical_bytes != m->logical_bytes ||
        len != VQKVD_SEGMENT_RECORD_BYTES + (size_t)rec->payload_bytes) {
        st->rejected++;
        return NULL;
    }
    const vqkvd_codec_ident_t *ident = vqkvd_tiers_ident(m, rec->spec, rec->codebooks_sha256);
    if (ident == NULL || rec->payload_bytes != vqkvd_tiers_block_bytes(m, ident)) {
        st->rejected++; /* codebooks this node lacks: never decoded */
        return NULL;
    }
    return ident;
}

/* Every answer is in: each value checked, then the lookup goes on. */
static void vqkvd__remote_fetched(vqkvd_remote_fetch_t *f)
{
    for (uint32_t i = 0; i < f->n; i++) {
        if (f->values[i] == NULL)
            continue;
        f->idents[i] = vqkvd__remote_check(f, i, f->lens[i]);
        if (f->idents[i] == NULL) {
            free(f->values[i]);
            f->values[i] = NULL;
        }
    }
    f->done(f->arg, f);
}

static void vqkvd__remote_got(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    struct vqkvd_remote_get *g = arg;
    vqkvd_remote_fetch_t *f = g->f;
    vqkvd_remote_stats_t *st = &f->s->remote->st;
    uint32_t i = g->i;
    if (status != VQKVD_REDIS_REPLY) {
        st->fetch_late++;
    } else if (reply->type == REDIS_REPLY_NIL) {
        st->fetch_misses++;
    } else if (reply->type != REDIS_REPLY_STRING || reply->len < VQKVD_SEGMENT_RECORD_BYTES ||
               reply->len > VQKVD_SEGMENT_RECORD_BYTES + (size_t)VQKVD_SEGMENT_MAX_PAYLOAD) {
        st->rejected++;
    } else {
        f->lens[i] = (uint32_t)reply->len;
        f->values[i] = (uint8_t *)vqkvd_redis_reply_take_str(reply);
        st->bytes_fetched += reply->len;
    }
    if (--f->left == 0)
        vqkvd__remote_fetched(f);
}

void vqkvd_remote_fetch_free(vqkvd_remote_fetch_t *f)
{
    if (f == NULL)
        return;
    for (uint32_t i = 0; f->values != NULL && i < f->n; i++)
        free(f->values[i]);
    free(f->values);
    free(f->recs);
    free(f->idents);
    free(f->lens);
    free(f->gets);
    free(f);
}

int vqkvd_remote_fetch(vqkvd_server_t *s, const vqkvd_model_t *m, uint32_t tenant,
                       const uint8_t *keys, uint32_t first, uint32_t n,
                       void (*done)(void *arg, vqkvd_remote_fetch_t *f), void *arg)
{
    vqkvd_remote_t *rt = s->remote;
    if (rt == NULL || rt->stopping || n == 0 || !vqkvd_redis_up(rt->redis))
        return VQKV_EAGAIN;
    vqkvd_remote_fetch_t *f = calloc(1, sizeof *f);
    if (f == NULL)
        return VQKV_ENOMEM;
    *f = (vqkvd_remote_fetch_t){.first = first,
                                .n = n,
                                .values = calloc(n, sizeof *f->values),
                                .recs = calloc(n, sizeof *f->recs),
                                .idents = calloc(n, sizeof *f->idents),
                                .s = s,
                                .m = m,
                                .tenant = tenant,
                                .left = n,
                                .keys = keys,
                                .lens = calloc(n, sizeof *f->lens),
                                .gets = calloc(n, sizeof *f->gets),
                                .done = done,
                                .arg = arg};
    if (f->values == NULL || f->recs == NULL || f->idents == NULL || f->lens == NULL ||
        f->gets == NULL) {
        vqkvd_remote_fetch_free(f);
        return VQKV_ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        char key[VQKVD__REMOTE_KEY_BYTES];
        size_t key_len =
            vqkvd__remote_block_key(key, tenant, m, keys + (size_t)(first + i) * VQKVD_KEY_BYTES);
        const char *argv[] = {"GET", key};
        size_t lens[] = {3, key_len};
        f->gets[i] = (struct vqkvd_remote_get){.f = f, .i = i};
        if (vqkvd_redis_command(rt->redis, key, key_len, 2, argv, lens, s->cfg.remote_lookup_ms,
                                vqkvd__remote_got, &f->gets[i]) != VQKV_OK) {
            /* The GETs sent finish the fetch; none sent: nothing will. */
            f->left -= n - i;
            if (i == 0) {
                vqkvd_remote_fetch_free(f);
                return VQKV_ENOMEM;
            }
            break;
        }
        rt->st.fetches++;
    }
    return VQKV_OK;
}

void vqkvd_remote_fetch_result(vqkvd_server_t *s, uint32_t hits, uint32_t damaged)
{
    if (s->remote == NULL)
        return;
    s->remote->st.fetch_hits += hits;
    s->remote->st.rejected += damaged;
}

/* ---- codebooks ---------------------------------------------------------------- */

static bool vqkvd__remote_has_codebooks(const vqkvd_model_t *m)
{
    static const uint8_t none[32];
    return memcmp(m->codec_ident.codebooks_sha256, none, 32) != 0;
}

/* A codebook request ends: the model may ask again a while later. */
static void vqkvd__remote_cb_end(vqkvd__remote_cb_t *x)
{
    x->m->remote_busy = false;
    x->m->remote_next_ms = uv_now(x->s->loop) + VQKVD__REMOTE_CODEBOOK_RETRY_MS;
    free(x);
}

static bool vqkvd__remote_cb_send(vqkvd__remote_cb_t *x, int argc, const char **argv,
                                  const size_t *lens, vqkvd_redis_reply_fn fn)
{
    if (x->s->remote->stopping)
        return false;
    return vqkvd_redis_command(x->s->remote->redis, argv[1], lens[1], argc, argv, lens,
                               VQKVD__REMOTE_CODEBOOK_DEADLINE_MS, fn, x) == VQKV_OK;
}

/* The set is stored (or was already): now it is the model's. */
static void vqkvd__remote_named(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    vqkvd__remote_cb_t *x = arg;
    if (status == VQKVD_REDIS_REPLY && reply->type != REDIS_REPLY_ERROR) {
        /* OK, or nil: another node named its set first, which the others
         * adopt; this node keeps its own and decodes its own blocks. */
        x->m->remote_shared = true;
        x->s->remote->st.codebooks_published += reply->type == REDIS_REPLY_STATUS;
    }
    vqkvd__remote_cb_end(x);
}

static void vqkvd__remote_stored(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    vqkvd__remote_cb_t *x = arg;
    if (status != VQKVD_REDIS_REPLY || reply->type == REDIS_REPLY_ERROR || x->s->stopping) {
        vqkvd__remote_cb_end(x);
        return;
    }
    char key[VQKVD__REMOTE_KEY_BYTES], hex[65];
    size_t key_len = vqkvd__remote_model_key(key, x->m);
    const char *argv[] = {"SET", key, vqkvd__remote_hex(hex, x->sha256), "NX"};
    size_t lens[] = {3, key_len, 64, 2};
    if (!vqkvd__remote_cb_send(x, 4, argv, lens, vqkvd__remote_named))
        vqkvd__remote_cb_end(x);
}

/* Stores m's codebook file under its SHA-256, then names it for m. */
static void vqkvd__remote_publish(vqkvd_server_t *s, vqkvd_model_t *m)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    vqkvd__remote_cb_t *x = malloc(sizeof *x);
    if (x == NULL || vqkv_codebook_save_buffer(m->codec, &buf, &len) != VQKV_OK) {
        free(x);
        return;
    }
    *x = (vqkvd__remote_cb_t){.s = s, .m = m};
    memcpy(x->sha256, m->codec_ident.codebooks_sha256, 32);
    char key[VQKVD__REMOTE_KEY_BYTES];
    size_t key_len = vqkvd__remote_codebooks_key(key, x->sha256);
    const char *argv[] = {"SET", key, (const char *)buf, "NX"};
    size_t lens[] = {3, key_len, len, 2};
    m->remote_busy = vqkvd__remote_cb_send(x, 4, argv, lens, vqkvd__remote_stored);
    if (!m->remote_busy)
        free(x);
    free(buf);
}

/* The published file arrived: adopted when it is what its name says. */
static void vqkvd__remote_file(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    vqkvd__remote_cb_t *x = arg;
    vqkvd_model_t *m = x->m;
    if (status == VQKVD_REDIS_REPLY && reply->type == REDIS_REPLY_STRING && !x->s->stopping &&
        !m->ready && m->calib != NULL && !vqkvd_calib_training(m)) {
        const char *why = NULL;
        int rc =
            vqkvd_calib_adopt(x->s, m, (const uint8_t *)reply->str, reply->len, x->sha256, &why);
        if (rc == VQKV_OK) {
            m->remote_shared = true;
            x->s->remote->st.codebooks_adopted++;
            vqkvd_log(VQKVD_LOG_INFO,
                      "model %u: adopted the codebooks another node published; now %s",
                      (unsigned)m->id, vqkv_codec_spec(m->codec));
        } else {
            x->s->remote->st.rejected++;
            vqkvd_log(VQKVD_LOG_WARN, "model %u: refusing the published codebooks: %s (%s)",
                      (unsigned)m->id, why, vqkv_strerror(rc));
        }
    }
    vqkvd__remote_cb_end(x);
}

static void vqkvd__remote_name(void *arg, vqkvd_redis_status_t status, const redisReply *reply)
{
    vqkvd__remote_cb_t *x = arg;
    if (status != VQKVD_REDIS_REPLY || reply->type != REDIS_REPLY_STRING || x->s->stopping) {
        vqkvd__remote_cb_end(x);
        return;
    }
    /* hiredis ends a string reply with a NUL, which from_hex needs. */
    if (reply->len != 64 || vqkv_block_key_from_hex(reply->str, x->sha256) != VQKV_OK) {
        x->s->remote->st.rejected++;
        vqkvd__remote_cb_end(x);
        return;
    }
    char key[VQKVD__REMOTE_KEY_BYTES];
    size_t key_len = vqkvd__remote_codebooks_key(key, x->sha256);
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, key_len};
    if (!vqkvd__remote_cb_send(x, 2, argv, lens, vqkvd__remote_file))
        vqkvd__remote_cb_end(x);
}

/* Asks which set m's (tenant, identity) was published with. */
static void vqkvd__remote_adopt(vqkvd_server_t *s, vqkvd_model_t *m)
{
    vqkvd__remote_cb_t *x = malloc(sizeof *x);
    if (x == NULL)
        return;
    *x = (vqkvd__remote_cb_t){.s = s, .m = m};
    char key[VQKVD__REMOTE_KEY_BYTES];
    size_t key_len = vqkvd__remote_model_key(key, m);
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, key_len};
    m->remote_busy = vqkvd__remote_cb_send(x, 2, argv, lens, vqkvd__remote_name);
    if (!m->remote_busy)
        free(x);
}

void vqkvd_remote_tick(vqkvd_server_t *s, uint64_t now_ms)
{
    vqkvd_remote_t *rt = s->remote;
    if (rt == NULL || rt->stopping || !vqkvd_redis_up(rt->redis))
        return;
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->remote_shared || m->remote_busy || now_ms < m->remote_next_ms)
            continue;
        if (m->ready && vqkvd__remote_has_codebooks(m))
            vqkvd__remote_publish(s, m);
        else if (!m->ready && m->calib != NULL && !vqkvd_calib_training(m))
            vqkvd__remote_adopt(s, m);
    }
}
