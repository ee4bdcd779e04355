/* config.h -- vqkvd's configuration file: an INI file (inih) whose keys
 * fill a vqkvd_config_t, plus the value parsers the command line shares
 * with it, so a size, an id or a device is spelled the same way in both.
 *
 *   [vqkvd]
 *   socket = /run/vqkv/vqkv.sock
 *   pool_bytes = 4G
 *   allow_uids = 1000, 1001
 *   [quota]
 *   default = 4G
 *   uid.1000 = unlimited
 *
 * The file is checked whole before anything is applied: the first bad line
 * (unknown section or key, bad value, a key given twice, too many ids, a
 * line inih cannot read) fails the load with -EINVAL and a message that
 * names the file and the line ("vqkvd.conf:12: unknown key \"pol_bytes\" in
 * [vqkvd]"), and leaves the caller's config as it was. Nothing here prints
 * or logs: messages go into the caller's buffer, so vqkvd --check-config and
 * the daemon's start report them the same way.
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

#include <netinet/in.h>

#include "server.h"

/* The strings a loaded file lends to its vqkvd_config_t (owned here, freed
 * by vqkvd_config_file_free), and the one setting that is not part of it. */
typedef struct {
    char *socket_path;
    char *state_dir;
    char *device;
    char *metrics_address;
    int log_level; /* VQKVD_LOG_* from log_level =, 0 when the file has none */
} vqkvd_config_file_t;

/* Reads the INI file at path into cfg, which holds the defaults (or
 * whatever the caller started from): only the keys the file names change.
 * allow_uids or allow_gids, the first time either appears, replaces both
 * default allow lists; a list key given again adds to its list. Strings
 * are copied into file, which must be zeroed (or freed) before the call and
 * must outlive cfg's use of them.
 *
 * Returns 0; -ENOENT (or another negative errno) when the file cannot be
 * opened or read; -EINVAL for a bad line; -ENOMEM. On error err holds a
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
 * allow_uids, allow_gids, admin_uids, calibration_tokens, max_clients,
 * lease_ms and the quotas. The rest of cfg stays: socket, pool_bytes,
 * device, state_dir, max_inflight (every client was told it in Welcome)
 * and max_regions (likewise) need a restart. No pointer is copied, so cfg
 * borrows nothing from next. */
void vqkvd_config_take_live(vqkvd_config_t *cfg, const vqkvd_config_t *next);

/* "N", "NK", "NM" or "NG" (either case; powers of 1024) into *out; -EINVAL
 * for anything else, zero, or a size that overflows. */
int vqkvd_config_parse_bytes(const char *text, uint64_t *out);

/* A uid or gid in decimal (0 .. UINT_MAX - 1; -1 is no id) into *out;
 * -EINVAL otherwise. */
int vqkvd_config_parse_id(const char *text, unsigned *out);

/* A positive decimal count that fits 32 bits into *out; -EINVAL otherwise. */
int vqkvd_config_parse_count(const char *text, uint32_t *out);

/* 0 when text names a device: "cpu", "auto" or "cuda:N" (N a decimal
 * ordinal); -EINVAL otherwise. Whether the device exists is the caller's
 * question. */
int vqkvd_config_check_device(const char *text);

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
 * localhost (127.0.0.1, never looked up), PORT 0 to 65535. -EINVAL for
 * anything else, any other address included: what listens there (the
 * metrics endpoint) has no authentication, so it stays on the host. */
int vqkvd_config_parse_address(const char *text, vqkvd_inet_addr_t *addr);

#endif
