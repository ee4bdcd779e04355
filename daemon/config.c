/* config.c -- vqkvd's configuration file (config.h).
 *
 * inih splits the file into (section, key, value) and calls
 * vqkvd__config_on_key for each pair; the handler looks the key up, parses
 * the value and applies it to a working copy of the config. The copy (about
 * 1 KiB) and its strings replace the caller's only when the whole file is
 * good, so a bad file changes nothing.
 *
 * inih reports the line of the first error it meets, but Debian builds it
 * without INI_HANDLER_LINENO, so a handler is not told its line. Our own
 * line reader therefore counts the lines (inih asks for exactly one per
 * line it parses), which gives the handler's messages their line numbers;
 * the same reader refuses overlong lines outright (inih would cut them) and
 * drops leading whitespace, which turns inih's continuation lines off.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* The keys of [vqkvd]; the names are in vqkvd__config_keys. */
enum {
    VQKVD__CONFIG_SOCKET,
    VQKVD__CONFIG_POOL_BYTES,
    VQKVD__CONFIG_DEVICE,
    VQKVD__CONFIG_STATE_DIR,
    VQKVD__CONFIG_LOG_LEVEL,
    VQKVD__CONFIG_ALLOW_UIDS,
    VQKVD__CONFIG_ALLOW_GIDS,
    VQKVD__CONFIG_ADMIN_UIDS,
    VQKVD__CONFIG_CALIB_TOKENS,
    VQKVD__CONFIG_MAX_CLIENTS,
    VQKVD__CONFIG_MAX_INFLIGHT,
    VQKVD__CONFIG_MAX_REGIONS,
    VQKVD__CONFIG_LEASE_MS,
    VQKVD__CONFIG_METRICS_ADDRESS,
    VQKVD__CONFIG_N_KEYS,
};

static const char *const vqkvd__config_keys[VQKVD__CONFIG_N_KEYS] = {
    [VQKVD__CONFIG_SOCKET] = "socket",
    [VQKVD__CONFIG_POOL_BYTES] = "pool_bytes",
    [VQKVD__CONFIG_DEVICE] = "device",
    [VQKVD__CONFIG_STATE_DIR] = "state_dir",
    [VQKVD__CONFIG_LOG_LEVEL] = "log_level",
    [VQKVD__CONFIG_ALLOW_UIDS] = "allow_uids",
    [VQKVD__CONFIG_ALLOW_GIDS] = "allow_gids",
    [VQKVD__CONFIG_ADMIN_UIDS] = "admin_uids",
    [VQKVD__CONFIG_CALIB_TOKENS] = "calibration_tokens",
    [VQKVD__CONFIG_MAX_CLIENTS] = "max_clients",
    [VQKVD__CONFIG_MAX_INFLIGHT] = "max_inflight",
    [VQKVD__CONFIG_MAX_REGIONS] = "max_regions",
    [VQKVD__CONFIG_LEASE_MS] = "lease_ms",
    [VQKVD__CONFIG_METRICS_ADDRESS] = "metrics_address",
};

typedef struct {
    vqkvd_config_t cfg;       /* the working copy */
    vqkvd_config_file_t file; /* the strings it points to */
    FILE *f;
    const char *path;
    int lineno;   /* the line inih is parsing */
    int err_line; /* the first error's line; 0 while there is none */
    int rc;       /* the first error's code */
    char *err;
    size_t err_size;
    int key_line[VQKVD__CONFIG_N_KEYS]; /* where each key was set; 0: not yet */
    int default_quota_line;
    int quota_line[VQKVD_MAX_ALLOWED]; /* where cfg.quota_uids[i] was set */
    int own_allow_list;                /* an allow_* key has dropped the defaults */
    int own_quotas;                    /* a uid.N key has dropped the caller's */
} vqkvd__config_parser_t;

/* ---- values ------------------------------------------------------------- */

/* The leading decimal digits of text into *out and the first character
 * after them into *end; -EINVAL when text does not start with a digit (so
 * signs and spaces, which strtoull would take, are refused) or overflows.
 * The public parsers add their suffixes and bounds. */
static int vqkvd__config_parse_digits(const char *text, const char **end, unsigned long long *out)
{
    if (text[0] < '0' || text[0] > '9')
        return -EINVAL;
    char *stop;
    errno = 0;
    unsigned long long v = strtoull(text, &stop, 10);
    if (errno != 0)
        return -EINVAL;
    *end = stop;
    *out = v;
    return 0;
}

int vqkvd_config_parse_bytes(const char *text, uint64_t *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0)
        return -EINVAL;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k':
    case 'K': shift = 10; break;
    case 'm':
    case 'M': shift = 20; break;
    case 'g':
    case 'G': shift = 30; break;
    default: return -EINVAL;
    }
    if (*end != '\0' && end[1] != '\0')
        return -EINVAL;
    if (v == 0 || v > (UINT64_MAX >> shift))
        return -EINVAL;
    *out = (uint64_t)v << shift;
    return 0;
}

int vqkvd_config_parse_id(const char *text, unsigned *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0 || *end != '\0' || v >= UINT_MAX)
        return -EINVAL;
    *out = (unsigned)v;
    return 0;
}

int vqkvd_config_parse_count(const char *text, uint32_t *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0 || *end != '\0' || v == 0 || v > UINT32_MAX)
        return -EINVAL;
    *out = (uint32_t)v;
    return 0;
}

int vqkvd_config_check_device(const char *text)
{
    if (strcmp(text, "cpu") == 0 || strcmp(text, "auto") == 0)
        return 0;
    const char *end;
    unsigned long long ordinal;
    if (strncmp(text, "cuda:", 5) != 0 ||
        vqkvd__config_parse_digits(text + 5, &end, &ordinal) < 0 || *end != '\0' ||
        ordinal > INT_MAX)
        return -EINVAL;
    return 0;
}

int vqkvd_config_parse_address(const char *text, vqkvd_inet_addr_t *addr)
{
    const char *colon = strrchr(text, ':');
    const char *end;
    unsigned long long port;
    if (colon == NULL || vqkvd__config_parse_digits(colon + 1, &end, &port) < 0 || *end != '\0' ||
        port > 65535)
        return -EINVAL;
    char host[INET6_ADDRSTRLEN + 2]; /* with the brackets */
    size_t host_len = (size_t)(colon - text);
    if (host_len >= sizeof host)
        return -EINVAL;
    memcpy(host, text, host_len);
    host[host_len] = '\0';
    memset(addr, 0, sizeof *addr);
    if (host_len > 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host[host_len - 1] = '\0';
        if (inet_pton(AF_INET6, host + 1, &addr->in6.sin6_addr) != 1 ||
            !IN6_IS_ADDR_LOOPBACK(&addr->in6.sin6_addr))
            return -EINVAL;
        addr->in6.sin6_family = AF_INET6;
        addr->in6.sin6_port = htons((uint16_t)port);
        return 0;
    }
    /* "localhost" is loopback by definition (RFC 6761), so it is not
     * looked up: /etc/hosts could point it anywhere. */
    if (strcmp(host, "localhost") == 0)
        addr->in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else if (inet_pton(AF_INET, host, &addr->in.sin_addr) != 1)
        return -EINVAL;
    if (ntohl(addr->in.sin_addr.s_addr) >> 24 != IN_LOOPBACKNET)
        return -EINVAL;
    addr->in.sin_family = AF_INET;
    addr->in.sin_port = htons((uint16_t)port);
    return 0;
}

/* ---- the parser ----------------------------------------------------------- */

/* Records the first error as "path:line: message" (later ones are often its
 * consequences, and one clear message is what an operator acts on).
 * Returns 0, which is "failed" to inih. */
static int vqkvd__config_fail(vqkvd__config_parser_t *p, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int vqkvd__config_fail(vqkvd__config_parser_t *p, int rc, const char *fmt, ...)
{
    if (p->err_line != 0)
        return 0;
    p->err_line = p->lineno;
    p->rc = rc;
    int n = snprintf(p->err, p->err_size, "%s:%d: ", p->path, p->lineno);
    if (n >= 0 && (size_t)n < p->err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->err + n, p->err_size - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return 0;
}

/* inih's reader: one line per call, counted. A line that does not fit buf
 * is read to its end and refused; leading blanks are dropped, since inih
 * would take an indented line for the continuation of the previous value. */
static char *vqkvd__config_read_line(char *buf, int size, void *stream)
{
    vqkvd__config_parser_t *p = stream;
    if (fgets(buf, size, p->f) == NULL)
        return NULL;
    p->lineno++;
    size_t len = strlen(buf);
    if (len == (size_t)size - 1 && buf[len - 1] != '\n') {
        int c;
        do
            c = getc(p->f);
        while (c != EOF && c != '\n');
        vqkvd__config_fail(p, -EINVAL, "line longer than %d characters", size - 2);
        buf[0] = '\0';
        return buf;
    }
    size_t blanks = strspn(buf, " \t");
    memmove(buf, buf + blanks, len - blanks + 1);
    return buf;
}

static int vqkvd__config_set_string(vqkvd__config_parser_t *p, char **own, const char **use,
                                    const char *value)
{
    char *copy = strdup(value);
    if (copy == NULL)
        return vqkvd__config_fail(p, -ENOMEM, "out of memory");
    *own = copy;
    *use = copy;
    return 1;
}

static int vqkvd__config_set_count(vqkvd__config_parser_t *p, const char *name, const char *value,
                                   uint32_t *out)
{
    if (vqkvd_config_parse_count(value, out) < 0)
        return vqkvd__config_fail(p, -EINVAL, "bad %s \"%s\" (a positive whole number)", name,
                                  value);
    return 1;
}

/* Adds a comma or blank separated list of ids, possibly empty, to the list
 * key names. The first allow_uids or allow_gids empties both allow lists,
 * as the command line's first --allow-* does: the file's allow list is the
 * whole of it, not an addition to the defaults (the daemon's uid and root),
 * so "allow_uids =" with allow_gids admits by group alone. */
static int vqkvd__config_add_ids(vqkvd__config_parser_t *p, int key, const char *value)
{
    vqkvd_config_t *cfg = &p->cfg;
    const char *name = vqkvd__config_keys[key];
    if (key != VQKVD__CONFIG_ADMIN_UIDS && !p->own_allow_list) {
        cfg->n_allow_uids = cfg->n_allow_gids = 0;
        p->own_allow_list = 1;
    }
    size_t *n = key == VQKVD__CONFIG_ALLOW_UIDS   ? &cfg->n_allow_uids
                : key == VQKVD__CONFIG_ALLOW_GIDS ? &cfg->n_allow_gids
                                                  : &cfg->n_admin_uids;
    for (const char *s = value + strspn(value, ", \t"); *s != '\0'; s += strspn(s, ", \t")) {
        size_t len = strcspn(s, ", \t");
        char word[16];
        unsigned id;
        if (len >= sizeof word)
            return vqkvd__config_fail(p, -EINVAL, "bad id \"%.*s\" in %s", (int)len, s, name);
        memcpy(word, s, len);
        word[len] = '\0';
        if (vqkvd_config_parse_id(word, &id) < 0)
            return vqkvd__config_fail(p, -EINVAL, "bad id \"%s\" in %s", word, name);
        if (*n == VQKVD_MAX_ALLOWED)
            return vqkvd__config_fail(p, -EINVAL, "more than %d ids in %s", VQKVD_MAX_ALLOWED,
                                      name);
        if (key == VQKVD__CONFIG_ALLOW_UIDS)
            cfg->allow_uids[*n] = (uid_t)id;
        else if (key == VQKVD__CONFIG_ALLOW_GIDS)
            cfg->allow_gids[*n] = (gid_t)id;
        else
            cfg->admin_uids[*n] = (uid_t)id;
        ++*n;
        s += len;
    }
    return 1;
}

static int vqkvd__config_on_vqkvd(vqkvd__config_parser_t *p, const char *name, const char *value)
{
    int key = 0;
    while (key < VQKVD__CONFIG_N_KEYS && strcmp(name, vqkvd__config_keys[key]) != 0)
        key++;
    if (key == VQKVD__CONFIG_N_KEYS)
        return vqkvd__config_fail(p, -EINVAL, "unknown key \"%s\" in [vqkvd]", name);
    int list = key == VQKVD__CONFIG_ALLOW_UIDS || key == VQKVD__CONFIG_ALLOW_GIDS ||
               key == VQKVD__CONFIG_ADMIN_UIDS;
    if (!list && value[0] == '\0')
        return vqkvd__config_fail(p, -EINVAL, "no value for \"%s\"", name);
    if (!list && p->key_line[key] != 0)
        return vqkvd__config_fail(p, -EINVAL, "\"%s\" given twice (first on line %d)", name,
                                  p->key_line[key]);
    p->key_line[key] = p->lineno;

    vqkvd_config_t *cfg = &p->cfg;
    switch (key) {
    case VQKVD__CONFIG_SOCKET:
        return vqkvd__config_set_string(p, &p->file.socket_path, &cfg->socket_path, value);
    case VQKVD__CONFIG_STATE_DIR:
        return vqkvd__config_set_string(p, &p->file.state_dir, &cfg->state_dir, value);
    case VQKVD__CONFIG_DEVICE:
        if (vqkvd_config_check_device(value) < 0)
            return vqkvd__config_fail(p, -EINVAL, "bad device \"%s\" (cpu, auto or cuda:N)", value);
        return vqkvd__config_set_string(p, &p->file.device, &cfg->device, value);
    case VQKVD__CONFIG_POOL_BYTES:
        if (vqkvd_config_parse_bytes(value, &cfg->pool_bytes) < 0)
            return vqkvd__config_fail(
                p, -EINVAL, "bad pool_bytes \"%s\" (a positive size such as 512M or 4G)", value);
        return 1;
    case VQKVD__CONFIG_LOG_LEVEL:
        p->file.log_level = vqkvd_log_parse_level(value);
        if (p->file.log_level < 0)
            return vqkvd__config_fail(p, -EINVAL,
                                      "bad log_level \"%s\" (debug, info, warn or error)", value);
        return 1;
    case VQKVD__CONFIG_CALIB_TOKENS:
        return vqkvd__config_set_count(p, name, value, &cfg->calib_tokens);
    case VQKVD__CONFIG_MAX_CLIENTS:
        return vqkvd__config_set_count(p, name, value, &cfg->max_clients);
    case VQKVD__CONFIG_MAX_INFLIGHT:
        return vqkvd__config_set_count(p, name, value, &cfg->max_inflight);
    case VQKVD__CONFIG_MAX_REGIONS:
        return vqkvd__config_set_count(p, name, value, &cfg->max_regions);
    case VQKVD__CONFIG_LEASE_MS: return vqkvd__config_set_count(p, name, value, &cfg->lease_ms);
    case VQKVD__CONFIG_METRICS_ADDRESS: {
        vqkvd_inet_addr_t addr;
        if (vqkvd_config_parse_address(value, &addr) < 0)
            return vqkvd__config_fail(p, -EINVAL, "bad metrics_address \"%s\" (%s)", value,
                                      VQKVD_CONFIG_ADDRESS_HELP);
        return vqkvd__config_set_string(p, &p->file.metrics_address, &cfg->metrics_address, value);
    }
    default: return vqkvd__config_add_ids(p, key, value);
    }
}

/* "default = SIZE" and "uid.N = SIZE", SIZE a byte size or "unlimited"
 * (stored as 0). The first uid.N drops the caller's per-uid quotas, as the
 * allow lists do, so every entry came from this file and a uid named twice
 * can point at the line of the first. */
static int vqkvd__config_on_quota(vqkvd__config_parser_t *p, const char *name, const char *value)
{
    vqkvd_config_t *cfg = &p->cfg;
    unsigned uid = 0;
    int is_default = strcmp(name, "default") == 0;
    if (!is_default && (strncmp(name, "uid.", 4) != 0 || vqkvd_config_parse_id(name + 4, &uid) < 0))
        return vqkvd__config_fail(p, -EINVAL, "unknown key \"%s\" in [quota] (default or uid.N)",
                                  name);
    if (value[0] == '\0')
        return vqkvd__config_fail(p, -EINVAL, "no value for \"%s\"", name);
    uint64_t bytes = 0;
    if (strcmp(value, "unlimited") != 0 && vqkvd_config_parse_bytes(value, &bytes) < 0)
        return vqkvd__config_fail(
            p, -EINVAL, "bad quota \"%s\" for %s (a size such as 4G, or unlimited)", value, name);
    if (is_default) {
        if (p->default_quota_line != 0)
            return vqkvd__config_fail(p, -EINVAL, "\"default\" given twice (first on line %d)",
                                      p->default_quota_line);
        p->default_quota_line = p->lineno;
        cfg->default_quota_bytes = bytes;
        return 1;
    }
    if (!p->own_quotas) {
        cfg->n_quotas = 0;
        p->own_quotas = 1;
    }
    for (size_t i = 0; i < cfg->n_quotas; i++)
        if (cfg->quota_uids[i] == (uid_t)uid)
            return vqkvd__config_fail(p, -EINVAL, "\"%s\" given twice (first on line %d)", name,
                                      p->quota_line[i]);
    if (cfg->n_quotas == VQKVD_MAX_ALLOWED)
        return vqkvd__config_fail(p, -EINVAL, "more than %d uid quotas", VQKVD_MAX_ALLOWED);
    p->quota_line[cfg->n_quotas] = p->lineno;
    cfg->quota_uids[cfg->n_quotas] = (uid_t)uid;
    cfg->quota_bytes[cfg->n_quotas++] = bytes;
    return 1;
}

static int vqkvd__config_on_key(void *user, const char *section, const char *name,
                                const char *value)
{
    vqkvd__config_parser_t *p = user;
    if (p->err_line != 0)
        return 1; /* only the first error is reported */
    if (section[0] == '\0')
        return vqkvd__config_fail(p, -EINVAL, "key \"%s\" before any [section]", name);
    if (strcmp(section, "vqkvd") != 0 && strcmp(section, "quota") != 0)
        return vqkvd__config_fail(p, -EINVAL, "unknown section [%s]", section);
    if (strcmp(section, "vqkvd") == 0)
        return vqkvd__config_on_vqkvd(p, name, value);
    return vqkvd__config_on_quota(p, name, value);
}

int vqkvd_config_load(vqkvd_config_t *cfg, vqkvd_config_file_t *file, const char *path, char *err,
                      size_t err_size)
{
    vqkvd__config_parser_t p = {.cfg = *cfg, .path = path, .err = err, .err_size = err_size};
    p.f = fopen(path, "re");
    if (p.f == NULL) {
        int rc = -errno;
        snprintf(err, err_size, "%s: %s", path, strerror(-rc));
        return rc;
    }
    int rc = 0;
    int line = ini_parse_stream(vqkvd__config_read_line, &p, vqkvd__config_on_key, &p);
    int read_errno = errno;
    if (ferror(p.f)) {
        /* fgets failed: EISDIR for a directory, EIO for a bad disk. */
        rc = read_errno != 0 ? -read_errno : -EIO;
        snprintf(err, err_size, "%s: %s", path, strerror(-rc));
        goto out;
    }
    if (line < 0) {
        rc = -ENOMEM; /* inih's only other failure: its line buffer */
        snprintf(err, err_size, "%s: out of memory", path);
        goto out;
    }
    /* inih's own complaints (a line that is neither a section, a pair nor
     * a comment) come without a message; ours are on later lines or none. */
    if (line > 0 && (p.err_line == 0 || line < p.err_line)) {
        p.err_line = 0;
        p.lineno = line;
        vqkvd__config_fail(&p, -EINVAL, "expected \"key = value\", \"[section]\" or a # comment");
    }
    if (p.err_line != 0) {
        rc = p.rc;
        goto out;
    }
    *cfg = p.cfg;
    *file = p.file;
    memset(&p.file, 0, sizeof p.file);

out:
    fclose(p.f);
    vqkvd_config_file_free(&p.file);
    return rc;
}

/* ---- reloading ------------------------------------------------------------ */

/* How vqkvd_config_diff compares and writes each key of [vqkvd], and
 * whether vqkvd_config_take_live takes it: this table is the one place
 * that says which keys a running daemon applies. A key added above needs a
 * row here; without one a reload neither reports nor applies it. Strings
 * and sizes are never live: nothing running could take them without a
 * restart (the socket, the pool, the device, the state directory). */
enum {
    VQKVD__VALUE_NONE, /* not in vqkvd_config_t (log_level) */
    VQKVD__VALUE_STRING,
    VQKVD__VALUE_BYTES,
    VQKVD__VALUE_COUNT,
    VQKVD__VALUE_IDS,
};

typedef struct {
    unsigned char kind;
    unsigned char live;
    size_t offset;   /* of the value (a list's array) in vqkvd_config_t */
    size_t n_offset; /* of a list's length */
} vqkvd__config_field_t;

/* clang-format off */
#define VQKVD__FIELD(kind, live, field) {kind, live, offsetof(vqkvd_config_t, field), 0}
#define VQKVD__LIST(field) \
    {VQKVD__VALUE_IDS, 1, offsetof(vqkvd_config_t, field), offsetof(vqkvd_config_t, n_##field)}
/* clang-format on */

static const vqkvd__config_field_t vqkvd__config_fields[VQKVD__CONFIG_N_KEYS] = {
    [VQKVD__CONFIG_SOCKET] = VQKVD__FIELD(VQKVD__VALUE_STRING, 0, socket_path),
    [VQKVD__CONFIG_POOL_BYTES] = VQKVD__FIELD(VQKVD__VALUE_BYTES, 0, pool_bytes),
    [VQKVD__CONFIG_DEVICE] = VQKVD__FIELD(VQKVD__VALUE_STRING, 0, device),
    [VQKVD__CONFIG_STATE_DIR] = VQKVD__FIELD(VQKVD__VALUE_STRING, 0, state_dir),
    [VQKVD__CONFIG_LOG_LEVEL] = {VQKVD__VALUE_NONE, 1, 0, 0}, /* the caller's: see config.h */
    [VQKVD__CONFIG_ALLOW_UIDS] = VQKVD__LIST(allow_uids),
    [VQKVD__CONFIG_ALLOW_GIDS] = VQKVD__LIST(allow_gids),
    [VQKVD__CONFIG_ADMIN_UIDS] = VQKVD__LIST(admin_uids),
    /* Read when a model starts calibrating: later models get the new count. */
    [VQKVD__CONFIG_CALIB_TOKENS] = VQKVD__FIELD(VQKVD__VALUE_COUNT, 1, calib_tokens),
    /* Checked as a connection arrives; clients past a lowered limit stay. */
    [VQKVD__CONFIG_MAX_CLIENTS] = VQKVD__FIELD(VQKVD__VALUE_COUNT, 1, max_clients),
    /* Every client was told these two in Welcome. */
    [VQKVD__CONFIG_MAX_INFLIGHT] = VQKVD__FIELD(VQKVD__VALUE_COUNT, 0, max_inflight),
    [VQKVD__CONFIG_MAX_REGIONS] = VQKVD__FIELD(VQKVD__VALUE_COUNT, 0, max_regions),
    /* Leases taken from now on; those held keep their expiry. */
    [VQKVD__CONFIG_LEASE_MS] = VQKVD__FIELD(VQKVD__VALUE_COUNT, 1, lease_ms),
    /* The HTTP listener is bound once, at start. */
    [VQKVD__CONFIG_METRICS_ADDRESS] = VQKVD__FIELD(VQKVD__VALUE_STRING, 0, metrics_address),
};

#undef VQKVD__FIELD
#undef VQKVD__LIST

/* The allow lists share one reader: gid_t and uid_t are both 32-bit
 * unsigned on Linux. */
_Static_assert(sizeof(uid_t) == sizeof(gid_t), "uid_t and gid_t differ");

static const void *vqkvd__config_at(const vqkvd_config_t *cfg, size_t offset)
{
    return (const char *)cfg + offset;
}

static size_t vqkvd__config_n_ids(const vqkvd_config_t *cfg, int key)
{
    return *(const size_t *)vqkvd__config_at(cfg, vqkvd__config_fields[key].n_offset);
}

static int vqkvd__config_has_id(const uid_t *ids, size_t n, uid_t id)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] == id)
            return 1;
    return 0;
}

/* A byte size the way the file writes it: "4G" when it is a whole number
 * of GiB, and so on down to bytes. */
static void vqkvd__config_format_bytes(char *buf, size_t size, uint64_t bytes)
{
    static const char suffix[] = "GMK";
    for (unsigned i = 0; i < 3; i++) {
        unsigned shift = 30 - 10 * i;
        if (bytes != 0 && bytes % (1ull << shift) == 0) {
            snprintf(buf, size, "%llu%c", (unsigned long long)(bytes >> shift), suffix[i]);
            return;
        }
    }
    snprintf(buf, size, "%llu", (unsigned long long)bytes);
}

static void vqkvd__config_format_quota(char *buf, size_t size, uint64_t bytes)
{
    if (bytes == 0)
        snprintf(buf, size, "unlimited");
    else
        vqkvd__config_format_bytes(buf, size, bytes);
}

/* Writes key's value in cfg into buf. */
static void vqkvd__config_format(char *buf, size_t size, const vqkvd_config_t *cfg, int key)
{
    const void *v = vqkvd__config_at(cfg, vqkvd__config_fields[key].offset);
    switch (vqkvd__config_fields[key].kind) {
    case VQKVD__VALUE_STRING: {
        const char *text = *(const char *const *)v;
        snprintf(buf, size, "%s", text != NULL ? text : "(default)");
        return;
    }
    case VQKVD__VALUE_BYTES: vqkvd__config_format_bytes(buf, size, *(const uint64_t *)v); return;
    case VQKVD__VALUE_COUNT: snprintf(buf, size, "%u", (unsigned)*(const uint32_t *)v); return;
    default: break;
    }
    const uid_t *ids = v;
    size_t n = vqkvd__config_n_ids(cfg, key), len = 0;
    buf[0] = '\0';
    if (n == 0)
        snprintf(buf, size, "(none)");
    for (size_t i = 0; i < n && len < size; i++) {
        int w = snprintf(buf + len, size - len, "%s%u", i > 0 ? ", " : "", (unsigned)ids[i]);
        len += w > 0 ? (size_t)w : 0;
    }
}

static int vqkvd__config_equal(const vqkvd_config_t *a, const vqkvd_config_t *b, int key)
{
    const void *va = vqkvd__config_at(a, vqkvd__config_fields[key].offset);
    const void *vb = vqkvd__config_at(b, vqkvd__config_fields[key].offset);
    switch (vqkvd__config_fields[key].kind) {
    case VQKVD__VALUE_STRING: {
        const char *sa = *(const char *const *)va, *sb = *(const char *const *)vb;
        return sa == sb || (sa != NULL && sb != NULL && strcmp(sa, sb) == 0);
    }
    case VQKVD__VALUE_BYTES: return *(const uint64_t *)va == *(const uint64_t *)vb;
    case VQKVD__VALUE_COUNT: return *(const uint32_t *)va == *(const uint32_t *)vb;
    default: break;
    }
    /* As sets: every id of each is in the other. O(n^2) on 32 ids. */
    size_t na = vqkvd__config_n_ids(a, key), nb = vqkvd__config_n_ids(b, key);
    for (size_t i = 0; i < na; i++)
        if (!vqkvd__config_has_id(vb, nb, ((const uid_t *)va)[i]))
            return 0;
    for (size_t i = 0; i < nb; i++)
        if (!vqkvd__config_has_id(va, na, ((const uid_t *)vb)[i]))
            return 0;
    return 1;
}

/* The quota cfg names for uid on a uid.N line, or -1 when it names none. */
static int64_t vqkvd__config_uid_quota(const vqkvd_config_t *cfg, uid_t uid)
{
    for (size_t i = 0; i < cfg->n_quotas; i++)
        if (cfg->quota_uids[i] == uid)
            return (int64_t)cfg->quota_bytes[i];
    return -1;
}

/* Reports the line "uid.N" when its value differs: a uid named in one
 * config only is "(not set)" in the other (it gets the default there). */
static void vqkvd__config_diff_uid_quota(const vqkvd_config_t *running, const vqkvd_config_t *next,
                                         uid_t uid, vqkvd_config_change_fn fn, void *user)
{
    int64_t was = vqkvd__config_uid_quota(running, uid), now = vqkvd__config_uid_quota(next, uid);
    if (was == now)
        return;
    vqkvd_config_change_t ch = {.live = 1};
    snprintf(ch.key, sizeof ch.key, "[quota] uid.%u", (unsigned)uid);
    if (was < 0)
        snprintf(ch.was, sizeof ch.was, "(not set)");
    else
        vqkvd__config_format_quota(ch.was, sizeof ch.was, (uint64_t)was);
    if (now < 0)
        snprintf(ch.now, sizeof ch.now, "(not set)");
    else
        vqkvd__config_format_quota(ch.now, sizeof ch.now, (uint64_t)now);
    fn(&ch, user);
}

void vqkvd_config_diff(const vqkvd_config_t *running, const vqkvd_config_t *next,
                       vqkvd_config_change_fn fn, void *user)
{
    vqkvd_config_change_t ch;
    for (int key = 0; key < VQKVD__CONFIG_N_KEYS; key++) {
        if (vqkvd__config_fields[key].kind == VQKVD__VALUE_NONE ||
            vqkvd__config_equal(running, next, key))
            continue;
        memset(&ch, 0, sizeof ch);
        snprintf(ch.key, sizeof ch.key, "%s", vqkvd__config_keys[key]);
        vqkvd__config_format(ch.was, sizeof ch.was, running, key);
        vqkvd__config_format(ch.now, sizeof ch.now, next, key);
        ch.live = vqkvd__config_fields[key].live;
        fn(&ch, user);
    }
    if (running->default_quota_bytes != next->default_quota_bytes) {
        memset(&ch, 0, sizeof ch);
        snprintf(ch.key, sizeof ch.key, "[quota] default");
        vqkvd__config_format_quota(ch.was, sizeof ch.was, running->default_quota_bytes);
        vqkvd__config_format_quota(ch.now, sizeof ch.now, next->default_quota_bytes);
        ch.live = 1;
        fn(&ch, user);
    }
    for (size_t i = 0; i < running->n_quotas; i++)
        vqkvd__config_diff_uid_quota(running, next, running->quota_uids[i], fn, user);
    for (size_t i = 0; i < next->n_quotas; i++)
        if (vqkvd__config_uid_quota(running, next->quota_uids[i]) < 0)
            vqkvd__config_diff_uid_quota(running, next, next->quota_uids[i], fn, user);
}

void vqkvd_config_take_live(vqkvd_config_t *cfg, const vqkvd_config_t *next)
{
    for (int key = 0; key < VQKVD__CONFIG_N_KEYS; key++) {
        size_t offset = vqkvd__config_fields[key].offset;
        size_t n_offset = vqkvd__config_fields[key].n_offset;
        if (!vqkvd__config_fields[key].live)
            continue;
        switch (vqkvd__config_fields[key].kind) {
        case VQKVD__VALUE_COUNT:
            memcpy((char *)cfg + offset, vqkvd__config_at(next, offset), sizeof(uint32_t));
            break;
        case VQKVD__VALUE_IDS:
            memcpy((char *)cfg + offset, vqkvd__config_at(next, offset),
                   VQKVD_MAX_ALLOWED * sizeof(uid_t));
            memcpy((char *)cfg + n_offset, vqkvd__config_at(next, n_offset), sizeof(size_t));
            break;
        default: break; /* log_level is the caller's */
        }
    }
    cfg->default_quota_bytes = next->default_quota_bytes;
    memcpy(cfg->quota_uids, next->quota_uids, sizeof cfg->quota_uids);
    memcpy(cfg->quota_bytes, next->quota_bytes, sizeof cfg->quota_bytes);
    cfg->n_quotas = next->n_quotas;
}

void vqkvd_config_file_free(vqkvd_config_file_t *file)
{
    free(file->socket_path);
    free(file->state_dir);
    free(file->device);
    free(file->metrics_address);
    memset(file, 0, sizeof *file);
}
