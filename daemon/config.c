/* config.c -- vqkvd's configuration (config.h).
 *
 * vqkvd_config_keys is the one list of the keys of [vqkvd]. A row names
 * the key's type, and the type decides the rest: vqkvd__config_parse reads
 * a value of it (for the defaults, the file and the flags alike), and the
 * reload code compares, writes and copies it. --help and the shipped
 * vqkvd.conf are written from the same rows, so neither can forget a key.
 *
 * inih splits the file into (section, key, value) and calls
 * vqkvd__config_on_key for each pair; the handler looks the key up and sets
 * it in a working copy of the config. The copy (about 1 KiB) and its
 * strings replace the caller's only when the whole file is good, so a bad
 * file changes nothing.
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
#include <unistd.h>

#include "frame.h"
#include "log.h"

/* ---- the keys --------------------------------------------------------------- */

/* clang-format off */
#define VQKVD__AT(field) .offset = offsetof(vqkvd_config_t, field)
/* A string lives in the config and its copy in vqkvd_config_file_t under
 * the same name. */
#define VQKVD__STRING(field) VQKVD__AT(field), .file_offset = offsetof(vqkvd_config_file_t, field)
#define VQKVD__LIST(field) VQKVD__AT(field), .n_offset = offsetof(vqkvd_config_t, n_##field)
/* clang-format on */

/* Strings and sizes are never live: nothing running could take them
 * without a restart (the socket, the pool, the device, the state
 * directory), and a live string would leave the running config pointing
 * into the reloaded file's copy. */
const vqkvd_config_key_t vqkvd_config_keys[] = {
    {
        .name = "socket",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "/run/vqkv/vqkv.sock as root, else $XDG_RUNTIME_DIR/vqkv/vqkv.sock",
        .example = "/run/vqkv/vqkv.sock",
        .flag = "socket",
        .arg = "PATH",
        .help = "Unix socket to serve",
        .doc = "The Unix socket clients connect to; its directory is created 0750 when missing. "
               "Under systemd the socket unit's ListenStream= decides it instead.",
        VQKVD__STRING(socket_path),
    },
    {
        .name = "pool_bytes",
        .type = VQKVD_CONFIG_BYTES,
        .def = "1G",
        .flag = "pool-bytes",
        .arg = "N[K|M|G]",
        .help = "memory for compressed blocks",
        .doc = "Bytes of memory that hold compressed blocks; K, M and G are powers of 1024. "
               "The least recently used blocks are evicted past 90 %.",
        VQKVD__AT(pool_bytes),
    },
    {
        .name = "staging_bytes",
        .type = VQKVD_CONFIG_BYTES_OFF,
        .live = 1,
        .def = "256M",
        .flag = "staging-bytes",
        .arg = "N[K|M|G]",
        .help = "memory for puts not yet encoded (0: puts wait for their encode)",
        .doc = "Bytes of memory for the blocks of puts that are answered before they are "
               "encoded (CPU backend): a Put copies its blocks here, replies, and they are "
               "encoded in the background, served from here until then. A Put that does not "
               "fit waits for its encode instead. 0 turns staging off.",
        VQKVD__AT(staging_bytes),
    },
    {
        .name = "device",
        .type = VQKVD_CONFIG_DEVICE,
        .def = "auto",
        .flag = "device",
        .arg = "DEV",
        .help = "cpu, auto (every GPU, else the CPU) or cuda:N[,cuda:M...]",
        .doc = "Where blocks are kept and coded: cpu (host memory; workers register memfd "
               "regions), cuda:N[,cuda:M...] (the memory of the GPUs named, the pool split "
               "evenly over them; workers register CUDA memory on any of them) or auto "
               "(every GPU vqkvd sees when it is built with CUDA, else cpu). Several GPUs "
               "must reach each other's memory (peer access). A vqkvd built without CUDA "
               "refuses cuda:N.",
        VQKVD__STRING(device),
    },
    {
        .name = "state_dir",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "$STATE_DIRECTORY when systemd sets it, /var/lib/vqkv as root, else "
                   "$XDG_STATE_HOME/vqkv or ~/.local/state/vqkv",
        .example = "/var/lib/vqkv",
        .flag = "state-dir",
        .arg = "DIR",
        .help = "where trained codebooks are kept",
        .doc = "Where trained codebooks are saved, so a restart does not retrain them; created "
               "0700 with its parents when missing. When it cannot be created vqkvd runs "
               "without one.",
        VQKVD__STRING(state_dir),
    },
    {
        .name = "disk_dir",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "none: no disk tier",
        .example = "/var/cache/vqkv",
        .flag = "disk-dir",
        .arg = "DIR",
        .help = "where evicted blocks are kept (the disk tier; off when unset)",
        .doc = "Where blocks evicted from memory are written, compressed, in segment files, "
               "so that lookups find them again, after a restart too; created 0700 when "
               "missing. A stopping vqkvd writes there what memory holds and the disk lacks. "
               "Off when unset.",
        VQKVD__STRING(disk_dir),
    },
    {
        .name = "disk_bytes",
        .type = VQKVD_CONFIG_BYTES,
        .def = "16G",
        .flag = "disk-bytes",
        .arg = "N[K|M|G]",
        .help = "the most the disk tier's files hold",
        .doc = "The most bytes the disk tier's segment files hold; past it the oldest segment "
               "goes, with its blocks.",
        VQKVD__AT(disk_bytes),
    },
    {
        .name = "disk_flush_ms",
        .type = VQKVD_CONFIG_COUNT_OFF,
        .live = 1,
        .def = "0",
        .flag = "disk-flush-ms",
        .arg = "N",
        .help = "write what memory holds down to the disk tier every N ms (0: never)",
        .doc = "Every N milliseconds, write to the disk tier every block memory holds that it "
               "lacks, in the background, so that a crash loses at most the blocks put in the "
               "last N ms (and those still being written). 0: blocks reach disk only when "
               "evicted, at a clean stop, or on `vqkvctl flush`.",
        VQKVD__AT(disk_flush_ms),
    },
    {
        .name = "remote",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "none: no remote tier",
        .example = "redis://127.0.0.1:6379/0",
        .flag = "remote",
        .arg = "URL",
        .help = "a Redis (or Redis Cluster) that nodes share blocks through (off when unset)",
        .doc = "A Redis that every node of a deployment shares: redis://[user@]host:port[/db], "
               "unix:///path[?db=N], or several redis://host:port seeds separated by commas for "
               "a Redis Cluster. Blocks put here are also written there in the background, "
               "compressed, and a lookup that ends in the local tiers fetches the chain's next "
               "blocks from there; models adopt the codebooks another node published. "
               "Off when unset.",
        VQKVD__STRING(remote),
    },
    {
        .name = "remote_password_file",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "none: no password (or the URL's)",
        .example = "/etc/vqkv/redis-password",
        .flag = "remote-password-file",
        .arg = "FILE",
        .help = "the remote tier's password, from a file only vqkvd's user reads",
        .doc = "A file holding the remote tier's password (one line), owned by vqkvd's user and "
               "readable by no one else; never put a password on the command line.",
        VQKVD__STRING(remote_password_file),
    },
    {
        .name = "remote_ttl_s",
        .type = VQKVD_CONFIG_COUNT_OFF,
        .live = 1,
        .def = "86400",
        .flag = "remote-ttl-s",
        .arg = "N",
        .help = "seconds a block written to the remote tier lives there (0: no expiry)",
        .doc = "Seconds a block written to the remote tier lives there (Redis's EXPIRE). With "
               "maxmemory-policy allkeys-lru, Redis's own eviction bounds its memory too. "
               "0: no expiry.",
        VQKVD__AT(remote_ttl_s),
    },
    {
        .name = "remote_queue_bytes",
        .type = VQKVD_CONFIG_BYTES,
        .live = 1,
        .def = "64M",
        .flag = "remote-queue-bytes",
        .arg = "N[K|M|G]",
        .help = "the most bytes written to the remote tier and not yet acknowledged",
        .doc = "The most bytes of blocks on their way to the remote tier and not yet "
               "acknowledged; a block that would pass it is not sent (and counted), so a slow "
               "or absent Redis never slows a put.",
        VQKVD__AT(remote_queue_bytes),
    },
    {
        .name = "remote_lookup_ms",
        .type = VQKVD_CONFIG_COUNT,
        .live = 1,
        .def = "50",
        .flag = "remote-lookup-ms",
        .arg = "N",
        .help = "how long a lookup waits for the remote tier before answering",
        .doc = "How long a lookup that asks the remote tier waits for its answers; past it the "
               "lookup answers with what the local tiers hold.",
        VQKVD__AT(remote_lookup_ms),
    },
    {
        .name = "salt_secret_file",
        .type = VQKVD_CONFIG_STRING,
        .def_doc = "salt-secret in the state directory, made at the first start",
        .example = "/etc/vqkv/salt-secret",
        .flag = "salt-secret-file",
        .arg = "FILE",
        .help = "the tenant salts' 32-byte secret (the same file on every node)",
        .doc = "A file of exactly 32 random bytes, owned by vqkvd's user and readable by no one "
               "else, from which tenants' salts (and with them block keys) are derived. Give "
               "every node of a deployment the same file so that one tenant's prefixes have "
               "the same keys on all of them (head -c 32 /dev/urandom > FILE; chmod 600 FILE).",
        VQKVD__STRING(salt_secret_file),
    },
    {
        /* The logger's: kept in vqkvd_config_file_t, compared by the caller. */
        .name = "log_level",
        .type = VQKVD_CONFIG_LOG_LEVEL,
        .live = 1,
        .def = "info",
        .flag = "log-level",
        .arg = "LEVEL",
        .help = "debug, info, warn or error",
        .doc = "Log lines of this level and above: debug, info, warn or error.",
        .file_offset = offsetof(vqkvd_config_file_t, log_level),
    },
    {
        /* The default is the daemon's own uid and root: vqkvd_config_defaults. */
        .name = "allow_uids",
        .type = VQKVD_CONFIG_IDS,
        .live = 1,
        .def_doc = "this daemon's uid and root",
        .example = "0",
        .flag = "allow-uid",
        .arg = "N",
        .help = "a uid that may connect; repeatable; the first --allow-uid or --allow-gid "
                "replaces both default lists",
        .doc = "Peers whose uid is in this list may connect (comma or blank separated, at most "
               "32). allow_uids or allow_gids, the first time either appears, replaces both "
               "default lists, so with only allow_gids = 1001 only processes of group 1001 "
               "may connect.",
        VQKVD__LIST(allow_uids),
    },
    {
        .name = "allow_gids",
        .type = VQKVD_CONFIG_IDS,
        .live = 1,
        .def = "",
        .flag = "allow-gid",
        .arg = "N",
        .help = "a gid whose members may connect; repeatable",
        .doc = "Peers whose primary gid is in this list may connect (comma or blank separated, "
               "at most 32).",
        VQKVD__LIST(allow_gids),
    },
    {
        .name = "admin_uids",
        .type = VQKVD_CONFIG_IDS,
        .live = 1,
        .def = "",
        .doc = "Uids whose stats show every tenant (an operator's vqkvctl); others see the "
               "totals and their own tenant (comma or blank separated, at most 32).",
        VQKVD__LIST(admin_uids),
    },
    {
        /* Read when a model starts calibrating: later models get the new count. */
        .name = "calibration_tokens",
        .type = VQKVD_CONFIG_COUNT,
        .live = 1,
        .def = "8192",
        .flag = "calibration-tokens",
        .arg = "N",
        .help = "tokens a VQ model stores in fp16 before its codebooks are trained",
        .doc = "A model with a VQ codec but no codebooks yet stores its blocks uncompressed "
               "(fp16) until this many tokens have arrived, then trains its codebooks on them "
               "in the background. The samples are kept in host memory until the training "
               "ends: tokens x layers x 2 x kv heads x head_dim x 2 bytes (1 GiB for a "
               "Llama-3-8B shape at 8192). Fewer tokens train sooner and code worse "
               "(bench/RESULTS.md: SmolLM2 at 2048 and 8192 tokens).",
        VQKVD__AT(calib_tokens),
    },
    {
        /* Read when a model starts training: later trainings get the new value. */
        .name = "calibration_positions",
        .type = VQKVD_CONFIG_COUNT_OFF,
        .live = 1,
        .def = "0",
        .flag = "calibration-positions",
        .arg = "N",
        .help = "calibration keys of a model that named its RoPE sample positions below N",
        .doc = "Keys are cached after RoPE, so codebooks trained on the first tokens a model "
               "stores code keys further into long prompts worse. For a model whose workers "
               "named its RoPE when registering, each calibration block's keys are turned "
               "through a random offset below this many positions before training. Set it to "
               "about the longest prompt served when that is well past calibration_tokens: it "
               "costs fidelity on short prompts. 0 trains on the keys as they came.",
        VQKVD__AT(calib_positions),
    },
    {
        /* Checked as a connection arrives; clients past a lowered limit stay. */
        .name = "max_clients",
        .type = VQKVD_CONFIG_COUNT,
        .live = 1,
        .def = "1024",
        .doc = "Connections at once; more are refused.",
        VQKVD__AT(max_clients),
    },
    {
        /* Every client was told this one and the next in Welcome. */
        .name = "max_inflight",
        .type = VQKVD_CONFIG_COUNT,
        .def = "64",
        .doc = "Requests a client may have unanswered; more are refused (VQKV_ELIMIT).",
        VQKVD__AT(max_inflight),
    },
    {
        .name = "max_regions",
        .type = VQKVD_CONFIG_COUNT,
        .def = "16",
        .doc = "Memory regions a client may register.",
        VQKVD__AT(max_regions),
    },
    {
        /* Leases taken from now on; those held keep their expiry. */
        .name = "lease_ms",
        .type = VQKVD_CONFIG_COUNT,
        .live = 1,
        .def = "30000",
        .flag = "lease-ms",
        .arg = "N",
        .help = "how long a lookup's lease holds blocks, in milliseconds",
        .doc = "How long a Lookup's lease keeps its blocks from eviction when the worker "
               "neither gets nor releases them, in milliseconds.",
        VQKVD__AT(lease_ms),
    },
    {
        /* The HTTP listener is bound once, at start. */
        .name = "metrics_address",
        .type = VQKVD_CONFIG_ADDRESS,
        .def_doc = "none",
        .example = "127.0.0.1:9464",
        .flag = "metrics-address",
        .arg = "HOST:PORT",
        .help = "where to serve Prometheus metrics over HTTP, loopback only",
        .doc = "Serve Prometheus metrics (GET /metrics) and a health check (GET /healthz: 200 "
               "while the daemon answers, else 503) over HTTP on HOST:PORT. Only loopback is "
               "accepted: 127.0.0.0/8, [::1] or localhost; the endpoint has no "
               "authentication. Port 0 picks a free port, which vqkvd logs. docs/METRICS.md "
               "lists the metrics.",
        VQKVD__STRING(metrics_address),
    },
};

_Static_assert(sizeof vqkvd_config_keys / sizeof vqkvd_config_keys[0] == VQKVD_CONFIG_N_KEYS,
               "VQKVD_CONFIG_N_KEYS counts the rows of vqkvd_config_keys");

#undef VQKVD__AT
#undef VQKVD__STRING
#undef VQKVD__LIST

/* The allow lists share one reader: gid_t and uid_t are both 32-bit
 * unsigned on Linux. */
_Static_assert(sizeof(uid_t) == sizeof(gid_t), "uid_t and gid_t differ");

/* What a refused value of each type should have been, for messages. */
static const char *const vqkvd__config_expected[] = {
    [VQKVD_CONFIG_DEVICE] = "cpu, auto or cuda:N[,cuda:M...]",
    [VQKVD_CONFIG_ADDRESS] = VQKVD_CONFIG_ADDRESS_HELP,
    [VQKVD_CONFIG_BYTES] = "a positive size such as 512M or 4G",
    [VQKVD_CONFIG_BYTES_OFF] = "a size such as 256M, or 0 for off",
    [VQKVD_CONFIG_COUNT] = "a positive whole number",
    [VQKVD_CONFIG_COUNT_OFF] = "a whole number, 0 for off",
    [VQKVD_CONFIG_LOG_LEVEL] = "debug, info, warn or error",
};

static void *vqkvd__config_slot(void *base, size_t offset)
{
    return (char *)base + offset;
}

static const void *vqkvd__config_at(const void *base, size_t offset)
{
    return (const char *)base + offset;
}

static int vqkvd__config_is_string(vqkvd_config_type_t type)
{
    return type == VQKVD_CONFIG_STRING || type == VQKVD_CONFIG_DEVICE ||
           type == VQKVD_CONFIG_ADDRESS;
}

/* allow_uids and allow_gids are one rule (a uid or a gid admits), so the
 * first of either in a source replaces both defaults. */
static int vqkvd__config_is_allow_list(const vqkvd_config_key_t *key)
{
    return key->type == VQKVD_CONFIG_IDS && (key->offset == offsetof(vqkvd_config_t, allow_uids) ||
                                             key->offset == offsetof(vqkvd_config_t, allow_gids));
}

const vqkvd_config_key_t *vqkvd_config_find(const char *name)
{
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++)
        if (strcmp(vqkvd_config_keys[i].name, name) == 0)
            return &vqkvd_config_keys[i];
    return NULL;
}

/* ---- values ------------------------------------------------------------- */

/* The leading decimal digits of text into *out and the first character
 * after them into *end; VQKV_EINVAL when text does not start with a digit (so
 * signs and spaces, which strtoull would take, are refused) or overflows.
 * The public parsers add their suffixes and bounds. */
static int vqkvd__config_parse_digits(const char *text, const char **end, unsigned long long *out)
{
    if (text[0] < '0' || text[0] > '9')
        return VQKV_EINVAL;
    char *stop;
    errno = 0;
    unsigned long long v = strtoull(text, &stop, 10);
    if (errno != 0)
        return VQKV_EINVAL;
    *end = stop;
    *out = v;
    return 0;
}

int vqkvd_config_parse_bytes(const char *text, uint64_t *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0)
        return VQKV_EINVAL;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k':
    case 'K': shift = 10; break;
    case 'm':
    case 'M': shift = 20; break;
    case 'g':
    case 'G': shift = 30; break;
    default: return VQKV_EINVAL;
    }
    if (*end != '\0' && end[1] != '\0')
        return VQKV_EINVAL;
    if (v == 0 || v > (UINT64_MAX >> shift))
        return VQKV_EINVAL;
    *out = (uint64_t)v << shift;
    return 0;
}

int vqkvd_config_parse_id(const char *text, unsigned *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0 || *end != '\0' || v >= UINT_MAX)
        return VQKV_EINVAL;
    *out = (unsigned)v;
    return 0;
}

int vqkvd_config_parse_count(const char *text, uint32_t *out)
{
    const char *end;
    unsigned long long v;
    if (vqkvd__config_parse_digits(text, &end, &v) < 0 || *end != '\0' || v == 0 || v > UINT32_MAX)
        return VQKV_EINVAL;
    *out = (uint32_t)v;
    return 0;
}

int vqkvd_config_parse_gpus(const char *text, int ordinals[VQKVD_MAX_GPUS], uint32_t *n)
{
    *n = 0;
    if (strcmp(text, "cpu") == 0 || strcmp(text, "auto") == 0)
        return 0;
    /* O(n^2) for the duplicate check over at most VQKVD_MAX_GPUS names. */
    for (const char *at = text;; at++) {
        const char *end;
        unsigned long long ordinal;
        if (strncmp(at, "cuda:", 5) != 0 ||
            vqkvd__config_parse_digits(at + 5, &end, &ordinal) < 0 ||
            (*end != '\0' && *end != ',') || ordinal > INT_MAX || *n == VQKVD_MAX_GPUS)
            return VQKV_EINVAL;
        for (uint32_t i = 0; i < *n; i++)
            if (ordinals[i] == (int)ordinal)
                return VQKV_EINVAL;
        ordinals[(*n)++] = (int)ordinal;
        if (*end == '\0')
            return 0;
        at = end;
    }
}

int vqkvd_config_check_gpus(const char *device, const int *ordinals, uint32_t n, int gpus,
                            char *why, size_t why_size)
{
    for (uint32_t i = 0; i < n; i++) {
        if (ordinals[i] < gpus)
            continue;
        int at = snprintf(why, why_size, "device %s: this machine has %d CUDA device%s", device,
                          gpus, gpus == 1 ? "" : "s");
        size_t left = at > 0 && (size_t)at < why_size ? why_size - (size_t)at : 0;
        if (left > 0 && gpus == 0)
            snprintf(why + at, left, "; use --device cpu");
        else if (left > 0 && n > 1)
            snprintf(why + at, left, ", no cuda:%d", ordinals[i]);
        return VQKV_EINVAL;
    }
    return 0;
}

int vqkvd_config_check_device(const char *text)
{
    int ordinals[VQKVD_MAX_GPUS];
    uint32_t n;
    return vqkvd_config_parse_gpus(text, ordinals, &n);
}

int vqkvd_config_parse_address(const char *text, vqkvd_inet_addr_t *addr)
{
    const char *colon = strrchr(text, ':');
    const char *end;
    unsigned long long port;
    if (colon == NULL || vqkvd__config_parse_digits(colon + 1, &end, &port) < 0 || *end != '\0' ||
        port > 65535)
        return VQKV_EINVAL;
    char host[INET6_ADDRSTRLEN + 2]; /* with the brackets */
    size_t host_len = (size_t)(colon - text);
    if (host_len >= sizeof host)
        return VQKV_EINVAL;
    memcpy(host, text, host_len);
    host[host_len] = '\0';
    memset(addr, 0, sizeof *addr);
    if (host_len > 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host[host_len - 1] = '\0';
        if (inet_pton(AF_INET6, host + 1, &addr->in6.sin6_addr) != 1 ||
            !IN6_IS_ADDR_LOOPBACK(&addr->in6.sin6_addr))
            return VQKV_EINVAL;
        addr->in6.sin6_family = AF_INET6;
        addr->in6.sin6_port = htons((uint16_t)port);
        return 0;
    }
    /* "localhost" is loopback by definition (RFC 6761), so it is not
     * looked up: /etc/hosts could point it anywhere. */
    if (strcmp(host, "localhost") == 0)
        addr->in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else if (inet_pton(AF_INET, host, &addr->in.sin_addr) != 1)
        return VQKV_EINVAL;
    if (ntohl(addr->in.sin_addr.s_addr) >> 24 != IN_LOOPBACKNET)
        return VQKV_EINVAL;
    addr->in.sin_family = AF_INET;
    addr->in.sin_port = htons((uint16_t)port);
    return 0;
}

/* ---- setting a key ------------------------------------------------------------ */

/* Adds a comma or blank separated list of ids, possibly empty, to key's
 * list. Returns 0 or VQKV_EINVAL with the message in err. */
static int vqkvd__config_add_ids(vqkvd_config_t *cfg, const vqkvd_config_key_t *key,
                                 const char *label, const char *value, char *err, size_t err_size)
{
    uid_t *ids = vqkvd__config_slot(cfg, key->offset);
    size_t *n = vqkvd__config_slot(cfg, key->n_offset);
    for (const char *s = value + strspn(value, ", \t"); *s != '\0'; s += strspn(s, ", \t")) {
        size_t len = strcspn(s, ", \t");
        char word[16];
        unsigned id;
        if (len >= sizeof word) {
            snprintf(err, err_size, "bad id \"%.*s\" in %s", (int)len, s, label);
            return VQKV_EINVAL;
        }
        memcpy(word, s, len);
        word[len] = '\0';
        if (vqkvd_config_parse_id(word, &id) < 0) {
            snprintf(err, err_size, "bad id \"%s\" in %s", word, label);
            return VQKV_EINVAL;
        }
        if (*n == VQKVD_MAX_ALLOWED) {
            snprintf(err, err_size, "more than %d ids in %s", VQKVD_MAX_ALLOWED, label);
            return VQKV_EINVAL;
        }
        ids[(*n)++] = (uid_t)id;
        s += len;
    }
    return 0;
}

/* Parses value as key's type into cfg, or into *level for log_level. A
 * string is pointed at, not copied. Returns 0 or VQKV_EINVAL with the message
 * in err. */
static int vqkvd__config_parse(vqkvd_config_t *cfg, int *level, const vqkvd_config_key_t *key,
                               const char *label, const char *value, char *err, size_t err_size)
{
    void *slot = vqkvd__config_slot(cfg, key->offset);
    vqkvd_inet_addr_t addr;
    int ok = 1;
    switch (key->type) {
    case VQKVD_CONFIG_IDS: return vqkvd__config_add_ids(cfg, key, label, value, err, err_size);
    case VQKVD_CONFIG_BYTES: ok = vqkvd_config_parse_bytes(value, slot) == 0; break;
    case VQKVD_CONFIG_BYTES_OFF:
        if (strcmp(value, "0") == 0)
            *(uint64_t *)slot = 0;
        else
            ok = vqkvd_config_parse_bytes(value, slot) == 0;
        break;
    case VQKVD_CONFIG_COUNT: ok = vqkvd_config_parse_count(value, slot) == 0; break;
    case VQKVD_CONFIG_COUNT_OFF:
        if (strcmp(value, "0") == 0)
            *(uint32_t *)slot = 0;
        else
            ok = vqkvd_config_parse_count(value, slot) == 0;
        break;
    case VQKVD_CONFIG_DEVICE: ok = vqkvd_config_check_device(value) == 0; break;
    case VQKVD_CONFIG_ADDRESS: ok = vqkvd_config_parse_address(value, &addr) == 0; break;
    case VQKVD_CONFIG_STRING: break;
    case VQKVD_CONFIG_LOG_LEVEL:
        ok = vqkvd_log_parse_level(value) >= 0;
        if (ok)
            *level = vqkvd_log_parse_level(value);
        break;
    }
    if (!ok) {
        snprintf(err, err_size, "bad %s \"%s\" (%s)", label, value,
                 vqkvd__config_expected[key->type]);
        return VQKV_EINVAL;
    }
    if (vqkvd__config_is_string(key->type))
        *(const char **)slot = value;
    return 0;
}

int vqkvd_config_set(vqkvd_config_source_t *src, const vqkvd_config_key_t *key, const char *label,
                     const char *value, char *err, size_t err_size)
{
    if (key->type != VQKVD_CONFIG_IDS && value[0] == '\0') {
        snprintf(err, err_size, "no value for \"%s\"", label);
        return VQKV_EINVAL;
    }
    if (vqkvd__config_is_allow_list(key) && !src->own_allow_list) {
        src->cfg->n_allow_uids = src->cfg->n_allow_gids = 0;
        src->own_allow_list = 1;
    }
    char *copy = NULL;
    if (vqkvd__config_is_string(key->type) && (copy = strdup(value)) == NULL) {
        snprintf(err, err_size, "out of memory");
        return VQKV_ENOMEM;
    }
    int rc = vqkvd__config_parse(src->cfg, &src->file->log_level, key, label,
                                 copy != NULL ? copy : value, err, err_size);
    if (copy != NULL) {
        char **own = vqkvd__config_slot(src->file, key->file_offset);
        if (rc < 0) {
            free(copy);
        } else {
            free(*own); /* a flag given twice, or over the file's */
            *own = copy;
        }
    }
    return rc;
}

void vqkvd_config_defaults(vqkvd_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->listen_fd = -1;
    cfg->max_frame = VQKV_FRAME_DEFAULT_MAX;
    int level; /* the logger keeps its own default */
    char err[8];
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        /* The table's defaults are literals, so pointing at them is safe;
         * test_config checks that each one parses. */
        if (key->def != NULL)
            (void)vqkvd__config_parse(cfg, &level, key, key->name, key->def, err, sizeof err);
    }
    /* Who runs the daemon is no constant: its uid and root. */
    cfg->allow_uids[cfg->n_allow_uids++] = getuid();
    if (getuid() != 0)
        cfg->allow_uids[cfg->n_allow_uids++] = 0;
}

/* ---- the parser ----------------------------------------------------------- */

typedef struct {
    vqkvd_config_t cfg;        /* the working copy */
    vqkvd_config_file_t file;  /* the strings it points to */
    vqkvd_config_source_t src; /* sets keys in the two */
    FILE *f;
    const char *path;
    int lineno;   /* the line inih is parsing */
    int err_line; /* the first error's line; 0 while there is none */
    int rc;       /* the first error's code */
    char *err;
    size_t err_size;
    int key_line[VQKVD_CONFIG_N_KEYS]; /* where each key was set; 0: not yet */
    int default_quota_line;
    int quota_line[VQKVD_MAX_ALLOWED]; /* where cfg.quota_uids[i] was set */
    int own_quotas;                    /* a uid.N key has dropped the caller's */
} vqkvd__config_parser_t;

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
        vqkvd__config_fail(p, VQKV_EINVAL, "line longer than %d characters", size - 2);
        buf[0] = '\0';
        return buf;
    }
    size_t blanks = strspn(buf, " \t");
    memmove(buf, buf + blanks, len - blanks + 1);
    return buf;
}

/* A key of [vqkvd]: set as a flag sets it, after the checks that only a
 * file needs (a list key adds up; any other key given twice is refused). */
static int vqkvd__config_on_vqkvd(vqkvd__config_parser_t *p, const char *name, const char *value)
{
    const vqkvd_config_key_t *key = vqkvd_config_find(name);
    if (key == NULL)
        return vqkvd__config_fail(p, VQKV_EINVAL, "unknown key \"%s\" in [vqkvd]", name);
    size_t i = (size_t)(key - vqkvd_config_keys);
    /* An empty value is reported as such (vqkvd_config_set), before this. */
    if (key->type != VQKVD_CONFIG_IDS && value[0] != '\0' && p->key_line[i] != 0)
        return vqkvd__config_fail(p, VQKV_EINVAL, "\"%s\" given twice (first on line %d)", name,
                                  p->key_line[i]);
    p->key_line[i] = p->lineno;
    char msg[512];
    int rc = vqkvd_config_set(&p->src, key, name, value, msg, sizeof msg);
    if (rc < 0)
        return vqkvd__config_fail(p, rc, "%s", msg);
    return 1;
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
        return vqkvd__config_fail(p, VQKV_EINVAL,
                                  "unknown key \"%s\" in [quota] (default or uid.N)", name);
    if (value[0] == '\0')
        return vqkvd__config_fail(p, VQKV_EINVAL, "no value for \"%s\"", name);
    uint64_t bytes = 0;
    if (strcmp(value, "unlimited") != 0 && vqkvd_config_parse_bytes(value, &bytes) < 0)
        return vqkvd__config_fail(p, VQKV_EINVAL,
                                  "bad quota \"%s\" for %s (a size such as 4G, or unlimited)",
                                  value, name);
    if (is_default) {
        if (p->default_quota_line != 0)
            return vqkvd__config_fail(p, VQKV_EINVAL, "\"default\" given twice (first on line %d)",
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
            return vqkvd__config_fail(p, VQKV_EINVAL, "\"%s\" given twice (first on line %d)", name,
                                      p->quota_line[i]);
    if (cfg->n_quotas == VQKVD_MAX_ALLOWED)
        return vqkvd__config_fail(p, VQKV_EINVAL, "more than %d uid quotas", VQKVD_MAX_ALLOWED);
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
        return vqkvd__config_fail(p, VQKV_EINVAL, "key \"%s\" before any [section]", name);
    if (strcmp(section, "vqkvd") != 0 && strcmp(section, "quota") != 0)
        return vqkvd__config_fail(p, VQKV_EINVAL, "unknown section [%s]", section);
    if (strcmp(section, "vqkvd") == 0)
        return vqkvd__config_on_vqkvd(p, name, value);
    return vqkvd__config_on_quota(p, name, value);
}

int vqkvd_config_load(vqkvd_config_t *cfg, vqkvd_config_file_t *file, const char *path, char *err,
                      size_t err_size)
{
    vqkvd__config_parser_t p = {.cfg = *cfg, .path = path, .err = err, .err_size = err_size};
    p.src = (vqkvd_config_source_t){.cfg = &p.cfg, .file = &p.file};
    p.f = fopen(path, "re");
    if (p.f == NULL) {
        int open_errno = errno;
        snprintf(err, err_size, "%s: %s", path, strerror(open_errno));
        errno = open_errno;
        return VQKV_EIO;
    }
    int rc = VQKV_OK, sys_errno = 0;
    int line = ini_parse_stream(vqkvd__config_read_line, &p, vqkvd__config_on_key, &p);
    int read_errno = errno;
    if (ferror(p.f)) {
        /* fgets failed: EISDIR for a directory, EIO for a bad disk. */
        rc = VQKV_EIO;
        sys_errno = read_errno != 0 ? read_errno : EIO;
        snprintf(err, err_size, "%s: %s", path, strerror(sys_errno));
        goto out;
    }
    if (line < 0) {
        rc = VQKV_ENOMEM; /* inih's only other failure: its line buffer */
        snprintf(err, err_size, "%s: out of memory", path);
        goto out;
    }
    /* inih's own complaints (a line that is neither a section, a pair nor
     * a comment) come without a message; ours are on later lines or none. */
    if (line > 0 && (p.err_line == 0 || line < p.err_line)) {
        p.err_line = 0;
        p.lineno = line;
        vqkvd__config_fail(&p, VQKV_EINVAL,
                           "expected \"key = value\", \"[section]\" or a # comment");
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
    if (rc == VQKV_EIO)
        errno = sys_errno;
    return rc;
}

/* ---- reloading ------------------------------------------------------------ */

/* Bytes of a key's value that vqkvd_config_take_live copies: 0 for the
 * strings (never live, see the table) and for log_level (the caller's). */
static size_t vqkvd__config_value_size(vqkvd_config_type_t type)
{
    switch (type) {
    case VQKVD_CONFIG_BYTES:
    case VQKVD_CONFIG_BYTES_OFF: return sizeof(uint64_t);
    case VQKVD_CONFIG_COUNT:
    case VQKVD_CONFIG_COUNT_OFF: return sizeof(uint32_t);
    case VQKVD_CONFIG_IDS: return VQKVD_MAX_ALLOWED * sizeof(uid_t);
    default: return 0;
    }
}

static size_t vqkvd__config_n_ids(const vqkvd_config_t *cfg, const vqkvd_config_key_t *key)
{
    return *(const size_t *)vqkvd__config_at(cfg, key->n_offset);
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
static void vqkvd__config_format(char *buf, size_t size, const vqkvd_config_t *cfg,
                                 const vqkvd_config_key_t *key)
{
    const void *v = vqkvd__config_at(cfg, key->offset);
    if (vqkvd__config_is_string(key->type)) {
        const char *text = *(const char *const *)v;
        snprintf(buf, size, "%s", text != NULL ? text : "(default)");
        return;
    }
    if (key->type == VQKVD_CONFIG_BYTES || key->type == VQKVD_CONFIG_BYTES_OFF) {
        vqkvd__config_format_bytes(buf, size, *(const uint64_t *)v);
        return;
    }
    if (key->type == VQKVD_CONFIG_COUNT || key->type == VQKVD_CONFIG_COUNT_OFF) {
        snprintf(buf, size, "%u", (unsigned)*(const uint32_t *)v);
        return;
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

static int vqkvd__config_equal(const vqkvd_config_t *a, const vqkvd_config_t *b,
                               const vqkvd_config_key_t *key)
{
    const void *va = vqkvd__config_at(a, key->offset);
    const void *vb = vqkvd__config_at(b, key->offset);
    if (vqkvd__config_is_string(key->type)) {
        const char *sa = *(const char *const *)va, *sb = *(const char *const *)vb;
        return sa == sb || (sa != NULL && sb != NULL && strcmp(sa, sb) == 0);
    }
    if (key->type != VQKVD_CONFIG_IDS)
        return memcmp(va, vb, vqkvd__config_value_size(key->type)) == 0;
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
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        if (key->type == VQKVD_CONFIG_LOG_LEVEL || vqkvd__config_equal(running, next, key))
            continue;
        memset(&ch, 0, sizeof ch);
        snprintf(ch.key, sizeof ch.key, "%s", key->name);
        vqkvd__config_format(ch.was, sizeof ch.was, running, key);
        vqkvd__config_format(ch.now, sizeof ch.now, next, key);
        ch.live = key->live;
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
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        if (!key->live)
            continue;
        memcpy(vqkvd__config_slot(cfg, key->offset), vqkvd__config_at(next, key->offset),
               vqkvd__config_value_size(key->type));
        if (key->type == VQKVD_CONFIG_IDS)
            memcpy(vqkvd__config_slot(cfg, key->n_offset), vqkvd__config_at(next, key->n_offset),
                   sizeof(size_t));
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
    free(file->disk_dir);
    free(file->remote);
    free(file->remote_password_file);
    free(file->salt_secret_file);
    free(file->device);
    free(file->metrics_address);
    memset(file, 0, sizeof *file);
}

/* ---- --help and vqkvd.conf ------------------------------------------------------ */

#define VQKVD__HELP_WIDTH 79
#define VQKVD__HELP_COLUMN 26 /* where --help's text starts */
#define VQKVD__CONF_WIDTH 76

/* Writes text's words from column *col on, starting a new line with indent
 * (its length the new column) before a word that would pass width; a word
 * at the start of a line gets no blank before it. */
static void vqkvd__config_wrap(FILE *f, int *col, const char *indent, int width, const char *text)
{
    int margin = (int)strlen(indent);
    for (const char *s = text + strspn(text, " "); *s != '\0'; s += strspn(s, " ")) {
        int len = (int)strcspn(s, " ");
        if (*col > margin && *col + 1 + len > width) {
            fprintf(f, "\n%s", indent);
            *col = margin;
        }
        if (*col > margin) {
            fputc(' ', f);
            ++*col;
        }
        fwrite(s, 1, (size_t)len, f);
        *col += len;
        s += len;
    }
}

/* The default in words: as the file writes it, "none" for an empty list,
 * or the row's description of one the table cannot hold. */
static const char *vqkvd__config_default_words(const vqkvd_config_key_t *key)
{
    if (key->def == NULL)
        return key->def_doc;
    return key->def[0] != '\0' ? key->def : "none";
}

void vqkvd_config_help_line(FILE *f, const char *option, const char *text, const char *def)
{
    char indent[VQKVD__HELP_COLUMN + 1];
    memset(indent, ' ', VQKVD__HELP_COLUMN);
    indent[VQKVD__HELP_COLUMN] = '\0';
    int col = fprintf(f, "  %s", option);
    if (col + 2 > VQKVD__HELP_COLUMN) {
        fputc('\n', f);
        col = 0;
    }
    fprintf(f, "%*s", VQKVD__HELP_COLUMN - col, "");
    col = VQKVD__HELP_COLUMN;
    vqkvd__config_wrap(f, &col, indent, VQKVD__HELP_WIDTH, text);
    if (def != NULL) {
        char phrase[256];
        int len = snprintf(phrase, sizeof phrase, "(default: %s)", def);
        /* Kept on one line where it fits one, so it reads (and greps) whole. */
        if (col + 1 + len > VQKVD__HELP_WIDTH && VQKVD__HELP_COLUMN + len <= VQKVD__HELP_WIDTH) {
            fprintf(f, "\n%s", indent);
            col = VQKVD__HELP_COLUMN;
        }
        vqkvd__config_wrap(f, &col, indent, VQKVD__HELP_WIDTH, phrase);
    }
    fputc('\n', f);
}

void vqkvd_config_help(FILE *f)
{
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        char option[64];
        if (key->flag == NULL)
            continue;
        snprintf(option, sizeof option, "--%s %s", key->flag, key->arg);
        vqkvd_config_help_line(f, option, key->help, vqkvd__config_default_words(key));
    }
}

static const char vqkvd__config_conf_head[] =
    "# vqkvd.conf -- the configuration of vqkvd, the vqkv KV-cache daemon.\n"
    "#\n"
    "# vqkvd reads this file when started without --config; a flag on its\n"
    "# command line overrides the key of the same meaning here. Every key is\n"
    "# shown commented out with its default, or an example where the default\n"
    "# depends on the machine. Comments take whole lines (# or ;): a \"#\" after\n"
    "# a value is part of the value. A key given twice is refused, except the\n"
    "# id lists, which add up. Check an edited file with\n"
    "#   vqkvd --check-config --config /etc/vqkv/vqkvd.conf\n"
    "# vqkvd --print-default-config writes this file.\n"
    "\n"
    "[vqkvd]\n";

/* [quota]'s keys are named by uid, so the section is written whole here. */
static const char vqkvd__config_conf_quota[] =
    "[quota]\n"
    "# Compressed bytes each tenant (uid) may hold, K, M or G as above, or\n"
    "# unlimited. default applies to every uid without a uid.N line of its own.\n"
    "# A reload (SIGHUP) applies a change.\n"
    "#default = unlimited\n"
    "#uid.1000 = 4G\n";

/* A key's paragraph: what it does, the default where the commented-out
 * line cannot show it, its flag and whether a reload applies it. */
static void vqkvd__config_write_key(FILE *f, const vqkvd_config_key_t *key)
{
    char sentence[256];
    int col = fprintf(f, "# ");
    vqkvd__config_wrap(f, &col, "# ", VQKVD__CONF_WIDTH, key->doc);
    if (key->def == NULL || key->def[0] == '\0') {
        snprintf(sentence, sizeof sentence, "Default: %s.", vqkvd__config_default_words(key));
        vqkvd__config_wrap(f, &col, "# ", VQKVD__CONF_WIDTH, sentence);
    }
    if (key->flag != NULL) {
        snprintf(sentence, sizeof sentence, "Flag: --%s.", key->flag);
        vqkvd__config_wrap(f, &col, "# ", VQKVD__CONF_WIDTH, sentence);
    }
    vqkvd__config_wrap(f, &col, "# ", VQKVD__CONF_WIDTH,
                       key->live ? "A reload (SIGHUP) applies a change."
                                 : "A change needs a restart.");
    const char *value = key->def != NULL ? key->def : key->example;
    fprintf(f, "\n#%s =%s%s\n\n", key->name, value[0] != '\0' ? " " : "", value);
}

void vqkvd_config_write_default(FILE *f)
{
    fputs(vqkvd__config_conf_head, f);
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++)
        vqkvd__config_write_key(f, &vqkvd_config_keys[i]);
    fputs(vqkvd__config_conf_quota, f);
}
