/* fuzz_config.c -- vqkvd's configuration file (daemon/config.h), read by
 * vqkvd_config_load, the function vqkvd itself calls, from a memfd named by
 * its /proc/self/fd path.
 *
 * Input: the file's text, as is.
 *
 * Invariants: a refused file leaves the config and the file strings as
 * they were and explains itself with a message that starts with the path;
 * an accepted one gives a config within every documented bound (sizes and
 * counts positive, at most VQKVD_MAX_ALLOWED ids per list, distinct quota
 * uids, a device name config.c itself accepts, the strings the file owns);
 * loading twice gives the same result, and an error buffer of a few bytes
 * gets a truncated, terminated message; no fd stays open.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "fuzz.h"
#include "log.h"

static int fuzz__str_eq(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Field by field (padding and string addresses aside). */
static int fuzz__config_eq(const vqkvd_config_t *a, const vqkvd_config_t *b)
{
    int eq = fuzz__str_eq(a->socket_path, b->socket_path) && fuzz__str_eq(a->device, b->device) &&
             fuzz__str_eq(a->state_dir, b->state_dir) && a->max_frame == b->max_frame &&
             a->max_inflight == b->max_inflight && a->max_regions == b->max_regions &&
             a->max_clients == b->max_clients && a->pool_bytes == b->pool_bytes &&
             a->calib_tokens == b->calib_tokens && a->lease_ms == b->lease_ms &&
             a->default_quota_bytes == b->default_quota_bytes &&
             a->n_allow_uids == b->n_allow_uids && a->n_allow_gids == b->n_allow_gids &&
             a->n_admin_uids == b->n_admin_uids && a->n_quotas == b->n_quotas;
    for (size_t i = 0; eq && i < a->n_allow_uids; i++)
        eq = a->allow_uids[i] == b->allow_uids[i];
    for (size_t i = 0; eq && i < a->n_allow_gids; i++)
        eq = a->allow_gids[i] == b->allow_gids[i];
    for (size_t i = 0; eq && i < a->n_admin_uids; i++)
        eq = a->admin_uids[i] == b->admin_uids[i];
    for (size_t i = 0; eq && i < a->n_quotas; i++)
        eq = a->quota_uids[i] == b->quota_uids[i] && a->quota_bytes[i] == b->quota_bytes[i];
    return eq;
}

static int fuzz__file_empty(const vqkvd_config_file_t *f)
{
    return f->socket_path == NULL && f->state_dir == NULL && f->device == NULL && f->log_level == 0;
}

static void fuzz__check_accepted(const vqkvd_config_t *cfg, const vqkvd_config_file_t *file)
{
    FUZZ_CHECK(cfg->pool_bytes > 0 && cfg->max_inflight > 0 && cfg->max_regions > 0 &&
                   cfg->max_clients > 0 && cfg->calib_tokens > 0 && cfg->lease_ms > 0,
               "a size or count of 0 was accepted");
    FUZZ_CHECK(cfg->n_allow_uids <= VQKVD_MAX_ALLOWED && cfg->n_allow_gids <= VQKVD_MAX_ALLOWED &&
                   cfg->n_admin_uids <= VQKVD_MAX_ALLOWED && cfg->n_quotas <= VQKVD_MAX_ALLOWED,
               "an id list longer than %d", VQKVD_MAX_ALLOWED);
    for (size_t i = 0; i < cfg->n_quotas; i++)
        for (size_t j = 0; j < i; j++)
            FUZZ_CHECK(cfg->quota_uids[i] != cfg->quota_uids[j], "uid %u has two quotas",
                       (unsigned)cfg->quota_uids[i]);
    FUZZ_CHECK(cfg->device != NULL && vqkvd_config_check_device(cfg->device) == 0,
               "device \"%s\" accepted", cfg->device ? cfg->device : "(null)");
    FUZZ_CHECK(file->socket_path == NULL || cfg->socket_path == file->socket_path,
               "socket path not the file's");
    FUZZ_CHECK(file->state_dir == NULL || cfg->state_dir == file->state_dir,
               "state dir not the file's");
    FUZZ_CHECK(file->device == NULL || cfg->device == file->device, "device not the file's");
    FUZZ_CHECK(file->log_level == 0 || vqkvd_log_parse_level("debug") == file->log_level ||
                   vqkvd_log_parse_level("info") == file->log_level ||
                   vqkvd_log_parse_level("warn") == file->log_level ||
                   vqkvd_log_parse_level("error") == file->log_level,
               "log level %d", file->log_level);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fds_before = fuzz_fd_count();
    int fd = fuzz_memfd("vqkvd.conf", data, size);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    vqkvd_config_t defaults, cfg, cfg2;
    vqkvd_config_defaults(&defaults);
    cfg = defaults;
    vqkvd_config_file_t file = {0}, file2 = {0};
    char err[512] = "", small[16];
    int rc = vqkvd_config_load(&cfg, &file, path, err, sizeof err);
    size_t path_len = strlen(path);
    if (rc != 0) {
        FUZZ_CHECK(rc == VQKV_EINVAL, "a file in memory gave %d (%s)", rc, err);
        FUZZ_CHECK(fuzz__config_eq(&cfg, &defaults), "a refused file changed the config");
        FUZZ_CHECK(fuzz__file_empty(&file), "a refused file left strings");
        FUZZ_CHECK(strncmp(err, path, path_len) == 0 && err[path_len] == ':' &&
                       strlen(err) > path_len + 2,
                   "message \"%s\"", err);
    } else {
        fuzz__check_accepted(&cfg, &file);
    }

    /* Again, into an error buffer of 1 to 16 bytes. */
    size_t small_size = 1 + size % sizeof small;
    memset(small, 'x', sizeof small);
    cfg2 = defaults;
    int rc2 = vqkvd_config_load(&cfg2, &file2, path, small, small_size);
    FUZZ_CHECK(rc2 == rc, "loading twice gave %d then %d", rc, rc2);
    FUZZ_CHECK(fuzz__config_eq(&cfg, &cfg2), "loading twice gave two configs");
    if (rc != 0)
        FUZZ_CHECK(memchr(small, '\0', small_size) != NULL &&
                       strncmp(small, err, strlen(small)) == 0,
                   "a %zu-byte message buffer", small_size);
    vqkvd_config_file_free(&file);
    vqkvd_config_file_free(&file2);
    vqkvd_config_file_free(&file2); /* documented safe twice */
    close(fd);
    FUZZ_CHECK(fuzz_fd_count() == fds_before, "an fd stayed open");
    return 0;
}
