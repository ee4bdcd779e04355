/* config.h -- vqkvd's configuration: one table of the keys of [vqkvd]
 * (vqkvd_config_keys), from which the INI file's parser (inih), the
 * command line's flags, the defaults, --help, the shipped vqkvd.conf and
 * reloading (what changed, what applies live) all follow, so a key is
 * added, documented and made reloadable in one place.
 *
 *   [vqkvd]
 *   socket = /run/vqkv/vqkv.sock
 *   pool_bytes = 4G
 *   allow_uids = 1000, 1001
 *   [quota]
 *   default = 4G
 *   uid.1000 = unlimited
 *
 * A flag is parsed by the parser of its key (vqkvd_config_set), so a size,
 * an id or a device is spelled the same way in both. The file is checked
 * whole before anything is applied: the first bad line (unknown section or
 * key, bad value, a key given twice, too many ids, a line inih cannot read)
 * fails the load with VQKV_EINVAL and a message that names the file and the
 * line ("vqkvd.conf:12: unknown key \"pol_bytes\" in [vqkvd]"), and leaves
 * the caller's config as it was. Nothing here logs: messages go into the
 * caller's buffer, so vqkvd --check-config and the daemon's start report
 * them the same way.
 *
 * What the table does not hold, and why:
 *   - [quota]: its keys are named by the uids they limit (uid.1000), so
 *     they are no fixed list; the parser, vqkvd_config_diff and
 *     vqkvd_config_take_live handle the section on their own (all live).
 *   - log_level is a key, but the logger's, not the server's: it is kept in
 *     vqkvd_config_file_t, and comparing it on a reload is the caller's.
 *   - allow_uids' default depends on who runs the daemon (its own uid and
 *     root), and socket's and state_dir's are chosen at start from the
 *     environment (main.c): the table only describes them.
 *   - listen_fd and max_frame are settings but not keys.
 *
 * Syntax (inih, as Debian builds it): "key = value" lines under "[section]"
 * headers; lines starting with # or ; are comments, as is the rest of a
 * line after " ;". Leading whitespace is ignored, so a value cannot
 * continue onto the next line (inih's Python-style continuation lines are
 * turned off that way). A line must fit inih's line buffer (200 bytes with
 * its newline); a longer one is refused, not cut.
 */
#ifndef VQKVD_CONFIG_H
#define VQKVD_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <netinet/in.h>

#include "server.h"

/* The strings a loaded file (and the flags over it) lend to its
 * vqkvd_config_t (owned here, freed by vqkvd_config_file_free), and the
 * one setting that is not part of it. */
typedef struct {
    char *socket_path;
    char *state_dir;
    char *disk_dir;
    char *remote;
    char *remote_password_file;
    char *salt_secret_file;
    char *device;
    char *metrics_address;
    int log_level; /* VQKVD_LOG_* from log_level =, 0 when none was given */
} vqkvd_config_file_t;

/* ---- the keys ------------------------------------------------------------- */

/* What a key's value is: how the file and the flag parse it, where it is
 * kept and how a reload compares it. */
typedef enum {
    VQKVD_CONFIG_STRING,    /* any text: const char *, the copy in vqkvd_config_file_t */
    VQKVD_CONFIG_DEVICE,    /* cpu, auto or cuda:N[,cuda:M...]: likewise */
    VQKVD_CONFIG_ADDRESS,   /* a loopback HOST:PORT: likewise */
    VQKVD_CONFIG_BYTES,     /* uint64_t, N[K|M|G] */
    VQKVD_CONFIG_BYTES_OFF, /* uint64_t, N[K|M|G] or 0 for off */
    VQKVD_CONFIG_COUNT,     /* uint32_t, positive */
    VQKVD_CONFIG_COUNT_OFF, /* uint32_t, positive or 0 for off */
    VQKVD_CONFIG_IDS,       /* uid_t or gid_t[VQKVD_MAX_ALLOWED] and its size_t count */
    VQKVD_CONFIG_LOG_LEVEL, /* int in vqkvd_config_file_t (see above) */
} vqkvd_config_type_t;

typedef struct {
    const char *name; /* in [vqkvd] */
    vqkvd_config_type_t type;
    int live; /* a reload applies a change (vqkvd_config_take_live); else it waits for a restart */
    /* The default as the file writes it, which vqkvd_config_defaults
     * parses; "" for an empty list; NULL where there is none or it is
     * chosen at start (def_doc says which, example is what vqkvd.conf
     * shows). */
    const char *def;
    const char *def_doc;
    const char *example;
    const char *flag;   /* the long option without "--"; NULL: the file only */
    const char *arg;    /* the flag's argument, for --help */
    const char *help;   /* --help's line */
    const char *doc;    /* vqkvd.conf's paragraph */
    size_t offset;      /* of the value (a list's array) in vqkvd_config_t */
    size_t n_offset;    /* of a list's count in vqkvd_config_t */
    size_t file_offset; /* of the string's copy, or log_level, in vqkvd_config_file_t */
} vqkvd_config_key_t;

#define VQKVD_CONFIG_N_KEYS 25

/* In the order of the file's [vqkvd] section. */
extern const vqkvd_config_key_t vqkvd_config_keys[VQKVD_CONFIG_N_KEYS];

/* The key of [vqkvd] called name, or NULL. */
const vqkvd_config_key_t *vqkvd_config_find(const char *name);

/* One source of settings laid over a config: the file, then the flags. */
typedef struct {
    vqkvd_config_t *cfg;
    vqkvd_config_file_t *file; /* owns the strings set, holds log_level */
    int own_allow_list;        /* an allow list key has emptied both allow lists */
} vqkvd_config_source_t;

/* Sets key from value, text as the file writes it: a string is copied
 * into src->file (replacing and freeing the copy it held), an id list
 * grows (the first allow_uids or allow_gids of a source empties both allow
 * lists, so the defaults or an earlier source's lists are replaced, not
 * added to). label names the key in messages: the key's name for the file,
 * "--flag" for the command line. Returns 0, or VQKV_EINVAL or VQKV_ENOMEM with a
 * message in err ("bad pool_bytes \"x\" (a positive size such as 512M or
 * 4G)"), src->cfg then being partly set. */
int vqkvd_config_set(vqkvd_config_source_t *src, const vqkvd_config_key_t *key, const char *label,
                     const char *value, char *err, size_t err_size);

/* --help's lines for the keys that have a flag, each with its default. */
void vqkvd_config_help(FILE *f);

/* One --help line: option in the first column, text after it, wrapped;
 * "(default: def)" after it unless def is NULL. For the flags that are no
 * key (--check-config, --help). */
void vqkvd_config_help_line(FILE *f, const char *option, const char *text, const char *def);

/* The shipped vqkvd.conf: every key commented out with its default, and
 * what it does (tests/CMakeLists.txt checks daemon/vqkvd.conf against it). */
void vqkvd_config_write_default(FILE *f);

/* ---- the file --------------------------------------------------------------- */

/* Reads the INI file at path into cfg, which holds the defaults (or
 * whatever the caller started from): only the keys the file names change
 * (vqkvd_config_set sets each). A list key given again adds to its list;
 * any other key given twice is refused. Strings are copied into file,
 * which must be zeroed (or freed) before the call and must outlive cfg's
 * use of them.
 *
 * Returns 0; VQKV_EIO when the file cannot be opened or read, with errno
 * saying why (ENOENT: no such file); VQKV_EINVAL for a bad line;
 * VQKV_ENOMEM. On error err holds a
 * one-line message starting with path (and ":LINE: " for a bad line), and
 * cfg and file are untouched. */
int vqkvd_config_load(vqkvd_config_t *cfg, vqkvd_config_file_t *file, const char *path, char *err,
                      size_t err_size);

/* Frees the strings of a loaded file and zeroes it. Safe twice. */
void vqkvd_config_file_free(vqkvd_config_file_t *file);

/* ---- reloading (SIGHUP) -------------------------------------------------- */

/* One setting whose value differs between two configs, named and written
 * the way the file names and writes it. */
typedef struct {
    char key[32];  /* "pool_bytes", "allow_uids", "[quota] default", "[quota] uid.1000" */
    char was[400]; /* "1G", "1000, 1001", "unlimited", "(default)", "(not set)" */
    char now[400];
    int live; /* vqkvd_config_take_live takes it: no restart needed */
} vqkvd_config_change_t;

typedef void (*vqkvd_config_change_fn)(const vqkvd_config_change_t *change, void *user);

/* Calls fn once for every key whose value differs between running and
 * next, in the order of the keys in [vqkvd], then [quota]. Id lists are
 * compared as sets (their order means nothing). log_level is not part of a
 * vqkvd_config_t and is the caller's to compare; listen_fd, max_frame are
 * not keys. */
void vqkvd_config_diff(const vqkvd_config_t *running, const vqkvd_config_t *next,
                       vqkvd_config_change_fn fn, void *user);

/* Copies from next into cfg what a running daemon takes without a restart:
 * the keys the table marks live (allow_uids, allow_gids, admin_uids,
 * calibration_tokens, max_clients, lease_ms) and the quotas. The rest of
 * cfg stays. No string key is live, so no pointer is copied and cfg
 * borrows nothing from next. */
void vqkvd_config_take_live(vqkvd_config_t *cfg, const vqkvd_config_t *next);

/* "N", "NK", "NM" or "NG" (either case; powers of 1024) into *out; VQKV_EINVAL
 * for anything else, zero, or a size that overflows. */
int vqkvd_config_parse_bytes(const char *text, uint64_t *out);

/* A uid or gid in decimal (0 .. UINT_MAX - 1; -1 is no id) into *out;
 * VQKV_EINVAL otherwise. */
int vqkvd_config_parse_id(const char *text, unsigned *out);

/* A positive decimal count that fits 32 bits into *out; VQKV_EINVAL otherwise. */
int vqkvd_config_parse_count(const char *text, uint32_t *out);

/* 0 when text names a device: "cpu", "auto" or a list of GPUs
 * "cuda:N[,cuda:M...]" (vqkvd_config_parse_gpus); VQKV_EINVAL otherwise.
 * Whether the devices exist is the caller's question. */
int vqkvd_config_check_device(const char *text);

/* The most GPUs one vqkvd serves. */
#define VQKVD_MAX_GPUS 16

/* The GPU ordinals a device setting names, in its order: none for "cpu" and
 * "auto" (*n = 0; auto's GPUs are found at start), else those of
 * "cuda:N[,cuda:M...]" (N decimal), at most VQKVD_MAX_GPUS and none twice.
 * 0, or VQKV_EINVAL for anything else. */
int vqkvd_config_parse_gpus(const char *text, int ordinals[VQKVD_MAX_GPUS], uint32_t *n);

/* Whether the n GPU ordinals a device setting named (vqkvd_config_parse_gpus)
 * are all on a machine with gpus of them: 0, or VQKV_EINVAL with why
 * saying so ("device cuda:0,cuda:5: this machine has 2 CUDA devices, no
 * cuda:5"; with none, "...; use --device cpu"). Pure: the caller counts. */
int vqkvd_config_check_gpus(const char *device, const int *ordinals, uint32_t n, int gpus,
                            char *why, size_t why_size);

/* A TCP address to listen on. */
typedef union {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
} vqkvd_inet_addr_t;

/* What vqkvd_config_parse_address takes, for messages. */
#define VQKVD_CONFIG_ADDRESS_HELP                                                                  \
    "HOST:PORT on loopback: 127.0.0.1:9464, [::1]:9464 or localhost:9464; port 0 picks a free one"

/* "HOST:PORT" into *addr: HOST an IPv4 address in 127.0.0.0/8, [::1] or
 * localhost (127.0.0.1, never looked up), PORT 0 to 65535. VQKV_EINVAL for
 * anything else, any other address included: what listens there (the
 * metrics endpoint) has no authentication, so it stays on the host. */
int vqkvd_config_parse_address(const char *text, vqkvd_inet_addr_t *addr);

#endif
