/* test_config.c -- vqkvd's configuration: config.c in-process (every key,
 * sizes and their suffixes, id lists, quotas, each kind of refused line
 * with its line number, empty and missing files), then the binary's flags
 * (--check-config on good and bad files, --device cuda:N refused, flags
 * that override the file whatever their place on the command line and are
 * parsed as the file's keys, the state directory created at start or done
 * without), and the table of keys that both follow.
 *
 * Each test works in a fresh temporary directory. The daemon runs are the
 * pattern of daemon_harness.h, with the daemon's output in a file the test
 * reads back.
 */
#include <fcntl.h>

#include "config.h"
#include "daemon_harness.h"
#include "log.h"
#include "test_util.h"

typedef struct {
    char dir[64];
    char conf[128]; /* dir/vqkvd.conf, written by write_conf */
    char log[128];  /* dir/out.log: a daemon run's stdout and stderr */
} fixture_t;

static int setup_dir(void **state)
{
    fixture_t *fx = calloc(1, sizeof *fx);
    assert_non_null(fx);
    snprintf(fx->dir, sizeof fx->dir, "/tmp/vqkv-config.XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(fx->conf, sizeof fx->conf, "%s/vqkvd.conf", fx->dir);
    snprintf(fx->log, sizeof fx->log, "%s/out.log", fx->dir);
    *state = fx;
    return 0;
}

static int teardown_dir(void **state)
{
    fixture_t *fx = *state;
    test_remove_tree(fx->dir);
    free(fx);
    return 0;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* The whole of a small file, NUL-terminated. */
static void read_file(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* A config to load over: the daemon's defaults do not matter here (they
 * live in server.c), only that keys the file does not name keep their
 * values, so every field holds something recognizable. */
static void start_config(vqkvd_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->socket_path = "start.sock";
    cfg->max_frame = 111;
    cfg->max_inflight = 64;
    cfg->max_regions = 16;
    cfg->max_clients = 1024;
    cfg->pool_bytes = 1ull << 30;
    cfg->allow_uids[cfg->n_allow_uids++] = 4242;
    cfg->allow_uids[cfg->n_allow_uids++] = 0;
    cfg->allow_gids[cfg->n_allow_gids++] = 5;
    cfg->device = "auto";
    cfg->calib_tokens = 2048;
    cfg->lease_ms = 30000;
    cfg->quota_uids[cfg->n_quotas] = 77;
    cfg->quota_bytes[cfg->n_quotas++] = 1ull << 20;
}

/* Writes text as fx->conf and loads it over start_config(cfg). */
static int load(fixture_t *fx, const char *text, vqkvd_config_t *cfg, vqkvd_config_file_t *file,
                char *err, size_t err_size)
{
    write_file(fx->conf, text);
    start_config(cfg);
    memset(file, 0, sizeof *file);
    return vqkvd_config_load(cfg, file, fx->conf, err, err_size);
}

/* ---- config.c in-process ------------------------------------------------- */

static void test_every_key(void **state)
{
    fixture_t *fx = *state;
    vqkvd_config_t cfg;
    vqkvd_config_file_t file;
    char err[256];
    assert_int_equal(load(fx,
                          "# vqkvd.conf\n"
                          "; the other comment\n"
                          "[vqkvd]\n"
                          "socket = /run/test/vqkv.sock\n"
                          "pool_bytes = 3G\n"
                          "device = cuda:1\n"
                          "state_dir = /var/lib/test\n"
                          "log_level = debug\n"
                          "allow_uids = 1000, 1001\n"
                          "allow_gids = 27 44\n"
                          "admin_uids = 0,1000\n"
                          "calibration_tokens = 4096\n"
                          "lease_ms = 250\n"
                          "disk_flush_ms = 1500\n"
                          "max_clients = 7\n"
                          "max_inflight = 9\n"
                          "max_regions = 3\n"
                          "[quota]\n"
                          "default = 4G\n"
                          "uid.1000 = 2G\n"
                          "uid.1001 = unlimited\n",
                          &cfg, &file, err, sizeof err),
                     0);
    assert_string_equal(cfg.socket_path, "/run/test/vqkv.sock");
    assert_ptr_equal(cfg.socket_path, file.socket_path); /* the file owns it */
    assert_int_equal(cfg.pool_bytes, 3ull << 30);
    assert_string_equal(cfg.device, "cuda:1");
    assert_ptr_equal(cfg.device, file.device);
    assert_string_equal(cfg.state_dir, "/var/lib/test");
    assert_ptr_equal(cfg.state_dir, file.state_dir);
    assert_int_equal(file.log_level, VQKVD_LOG_DEBUG);
    assert_int_equal(cfg.n_allow_uids, 2);
    assert_int_equal(cfg.allow_uids[0], 1000);
    assert_int_equal(cfg.allow_uids[1], 1001);
    assert_int_equal(cfg.n_allow_gids, 2);
    assert_int_equal(cfg.allow_gids[0], 27);
    assert_int_equal(cfg.allow_gids[1], 44);
    assert_int_equal(cfg.n_admin_uids, 2);
    assert_int_equal(cfg.admin_uids[0], 0);
    assert_int_equal(cfg.admin_uids[1], 1000);
    assert_int_equal(cfg.calib_tokens, 4096);
    assert_int_equal(cfg.lease_ms, 250);
    assert_int_equal(cfg.disk_flush_ms, 1500);
    assert_int_equal(cfg.max_clients, 7);
    assert_int_equal(cfg.max_inflight, 9);
    assert_int_equal(cfg.max_regions, 3);
    assert_int_equal(cfg.max_frame, 111); /* no key sets it */
    assert_int_equal(cfg.default_quota_bytes, 4ull << 30);
    assert_int_equal(cfg.n_quotas, 2); /* uid 77's quota is gone */
    assert_int_equal(cfg.quota_uids[0], 1000);
    assert_int_equal(cfg.quota_bytes[0], 2ull << 30);
    assert_int_equal(cfg.quota_uids[1], 1001);
    assert_int_equal(cfg.quota_bytes[1], 0);
    vqkvd_config_file_free(&file);
    assert_null(file.socket_path);
    vqkvd_config_file_free(&file); /* twice is harmless */
}

/* Keys the file does not name keep the caller's values. */
static void test_untouched_keys(void **state)
{
    fixture_t *fx = *state;
    vqkvd_config_t cfg, start;
    vqkvd_config_file_t file;
    char err[256];
    assert_int_equal(
        load(fx, "[vqkvd]\nmax_regions = 5\n[quota]\ndefault = 1M\n", &cfg, &file, err, sizeof err),
        0);
    start_config(&start);
    assert_int_equal(cfg.max_regions, 5);
    assert_int_equal(cfg.default_quota_bytes, 1u << 20);
    assert_string_equal(cfg.socket_path, start.socket_path);
    assert_string_equal(cfg.device, start.device);
    assert_null(cfg.state_dir);
    assert_null(file.socket_path);
    assert_int_equal(file.log_level, 0);
    assert_int_equal(cfg.pool_bytes, start.pool_bytes);
    assert_int_equal(cfg.max_clients, start.max_clients);
    assert_int_equal(cfg.calib_tokens, start.calib_tokens);
    assert_int_equal(cfg.n_allow_uids, 2);
    assert_int_equal(cfg.allow_uids[0], 4242);
    assert_int_equal(cfg.n_allow_gids, 1);
    assert_int_equal(cfg.n_quotas, 1);
    assert_int_equal(cfg.quota_uids[0], 77);
    vqkvd_config_file_free(&file);
}

static void test_sizes(void **state)
{
    static const struct {
        const char *text;
        uint64_t bytes;
    } good[] = {
        {"1", 1},
        {"512", 512},
        {"4k", 4096},
        {"4K", 4096},
        {"3m", 3u << 20},
        {"2M", 2u << 20},
        {"1g", 1u << 30},
        {"16G", 16ull << 30},
        {"17179869183G", 17179869183ull << 30},
        {"18446744073709551615", UINT64_MAX},
    };
    static const char *const bad[] = {
        "",    "0",  "0K", "-1",   "+1",   " 1",           "1 ",
        "1KB", "1T", "K",  "1.5G", "0x10", "17179869184G", "18446744073709551616",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        uint64_t v = 0;
        assert_int_equal(vqkvd_config_parse_bytes(good[i].text, &v), 0);
        assert_int_equal(v, good[i].bytes);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 99;
        if (vqkvd_config_parse_bytes(bad[i], &v) != VQKV_EINVAL)
            fail_msg("size \"%s\" was accepted", bad[i]);
        assert_int_equal(v, 99);
    }

    /* The file takes the same spellings. */
    fixture_t *fx = *state;
    vqkvd_config_t cfg;
    vqkvd_config_file_t file;
    char err[256];
    assert_int_equal(load(fx, "[vqkvd]\npool_bytes = 64m\n", &cfg, &file, err, sizeof err), 0);
    assert_int_equal(cfg.pool_bytes, 64u << 20);
}

static void test_numbers_and_devices(void **state)
{
    (void)state;
    unsigned id = 0;
    assert_int_equal(vqkvd_config_parse_id("0", &id), 0);
    assert_int_equal(id, 0);
    assert_int_equal(vqkvd_config_parse_id("4294967294", &id), 0);
    assert_int_equal(id, 4294967294u);
    static const char *const bad_ids[] = {"", "4294967295", "-1", "1a", " 1", "+1"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++)
        if (vqkvd_config_parse_id(bad_ids[i], &id) != VQKV_EINVAL)
            fail_msg("id \"%s\" was accepted", bad_ids[i]);

    uint32_t count = 0;
    assert_int_equal(vqkvd_config_parse_count("1", &count), 0);
    assert_int_equal(count, 1);
    assert_int_equal(vqkvd_config_parse_count("4294967295", &count), 0);
    assert_int_equal(count, UINT32_MAX);
    static const char *const bad_counts[] = {"", "0", "4294967296", "2k", "-3"};
    for (size_t i = 0; i < sizeof bad_counts / sizeof bad_counts[0]; i++)
        if (vqkvd_config_parse_count(bad_counts[i], &count) != VQKV_EINVAL)
            fail_msg("count \"%s\" was accepted", bad_counts[i]);

    static const char *const devices[] = {"cpu", "auto", "cuda:0", "cuda:15", "cuda:3,cuda:1"};
    for (size_t i = 0; i < sizeof devices / sizeof devices[0]; i++)
        assert_int_equal(vqkvd_config_check_device(devices[i]), 0);
    static const char *const bad_devices[] = {
        "",
        "CPU",
        "gpu",
        "cuda",
        "cuda:",
        "cuda:-1",
        "cuda:1x",
        "cuda:0 ",
        "cuda:99999999999",
        "cuda:0,",
        ",cuda:0",
        "cuda:0,,cuda:1",
        "cuda:0,cpu",
        "cuda:0, cuda:1",
        "cuda:0,cuda:0",
        "cuda:0;cuda:1",
        "cuda:1,auto",
    };
    for (size_t i = 0; i < sizeof bad_devices / sizeof bad_devices[0]; i++)
        if (vqkvd_config_check_device(bad_devices[i]) != VQKV_EINVAL)
            fail_msg("device \"%s\" was accepted", bad_devices[i]);

    /* The ordinals, in the order given; none for cpu and auto. */
    int gpus[VQKVD_MAX_GPUS];
    uint32_t n = 99;
    assert_int_equal(vqkvd_config_parse_gpus("auto", gpus, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(vqkvd_config_parse_gpus("cuda:7,cuda:0,cuda:12", gpus, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(gpus[0], 7);
    assert_int_equal(gpus[1], 0);
    assert_int_equal(gpus[2], 12);
    /* VQKVD_MAX_GPUS names fit; one more is refused before it is stored. */
    char list[VQKVD_MAX_GPUS * 8 + 8] = "";
    for (int i = 0; i < VQKVD_MAX_GPUS; i++)
        sprintf(list + strlen(list), "%scuda:%d", i ? "," : "", i);
    assert_int_equal(vqkvd_config_parse_gpus(list, gpus, &n), 0);
    assert_int_equal(n, VQKVD_MAX_GPUS);
    assert_int_equal(gpus[VQKVD_MAX_GPUS - 1], VQKVD_MAX_GPUS - 1);
    strcat(list, ",cuda:99");
    assert_int_equal(vqkvd_config_parse_gpus(list, gpus, &n), VQKV_EINVAL);

    /* Against a machine of 0, 1 and 2 GPUs: the one missing named in a list. */
    char why[160];
    const int two[] = {0, 1};
    assert_int_equal(vqkvd_config_check_gpus("cuda:0,cuda:1", two, 2, 2, why, sizeof why), 0);
    assert_int_equal(vqkvd_config_check_gpus("cuda:0,cuda:1", two, 2, 1, why, sizeof why),
                     VQKV_EINVAL);
    assert_string_equal(why, "device cuda:0,cuda:1: this machine has 1 CUDA device, no cuda:1");
    assert_int_equal(vqkvd_config_check_gpus("cuda:1", two + 1, 1, 1, why, sizeof why),
                     VQKV_EINVAL);
    assert_string_equal(why, "device cuda:1: this machine has 1 CUDA device");
    assert_int_equal(vqkvd_config_check_gpus("cuda:0,cuda:1", two, 2, 0, why, sizeof why),
                     VQKV_EINVAL);
    assert_string_equal(why,
                        "device cuda:0,cuda:1: this machine has 0 CUDA devices; use --device cpu");
    /* a message longer than why is cut, never overrun */
    char small[24];
    assert_int_equal(vqkvd_config_check_gpus("cuda:0,cuda:1", two, 2, 1, small, sizeof small),
                     VQKV_EINVAL);
    assert_int_equal(strlen(small), sizeof small - 1);
}

static void test_lists(void **state)
{
    fixture_t *fx = *state;
    vqkvd_config_t cfg;
    vqkvd_config_file_t file;
    char err[256];

    /* Commas, blanks or both; a list key given again adds to its list; the
     * first allow_* drops both allow lists the file started from. */
    assert_int_equal(load(fx, "[vqkvd]\nallow_uids = 1000,1001  1002 ,, 1003\nallow_uids = 1004\n",
                          &cfg, &file, err, sizeof err),
                     0);
    assert_int_equal(cfg.n_allow_uids, 5);
    for (unsigned i = 0; i < 5; i++)
        assert_int_equal(cfg.allow_uids[i], 1000 + i);
    assert_int_equal(cfg.n_allow_gids, 0);

    /* An empty list is a list: admission by group alone. */
    assert_int_equal(
        load(fx, "[vqkvd]\nallow_uids =\nallow_gids = 44\n", &cfg, &file, err, sizeof err), 0);
    assert_int_equal(cfg.n_allow_uids, 0);
    assert_int_equal(cfg.n_allow_gids, 1);
    assert_int_equal(cfg.allow_gids[0], 44);

    /* admin_uids leaves the allow lists alone. */
    assert_int_equal(load(fx, "[vqkvd]\nadmin_uids = 3\n", &cfg, &file, err, sizeof err), 0);
    assert_int_equal(cfg.n_admin_uids, 1);
    assert_int_equal(cfg.admin_uids[0], 3);
    assert_int_equal(cfg.n_allow_uids, 2);
    assert_int_equal(cfg.n_allow_gids, 1);

    /* VQKVD_MAX_ALLOWED ids fit, over two lines. */
    char text[512] = "[vqkvd]\nallow_gids =";
    for (int i = 0; i < VQKVD_MAX_ALLOWED; i++)
        snprintf(text + strlen(text), sizeof text - strlen(text), "%s %d",
                 i == VQKVD_MAX_ALLOWED / 2 ? "\nallow_gids =" : "", 100 + i);
    strcat(text, "\n");
    assert_int_equal(load(fx, text, &cfg, &file, err, sizeof err), 0);
    assert_int_equal(cfg.n_allow_gids, VQKVD_MAX_ALLOWED);
    assert_int_equal(cfg.allow_gids[VQKVD_MAX_ALLOWED - 1], 100 + VQKVD_MAX_ALLOWED - 1);
}

/* What inih does with layout: comments anywhere, indented keys (not
 * continuations), " ;" comments after a value, CRLF, "name: value". */
static void test_layout(void **state)
{
    fixture_t *fx = *state;
    vqkvd_config_t cfg;
    vqkvd_config_file_t file;
    char err[256];
    assert_int_equal(load(fx,
                          "\n   # indented comment\n"
                          "[vqkvd]\r\n"
                          "  socket = /run/a.sock ; where clients connect\n"
                          "\tmax_clients = 5\n"
                          "max_regions: 6\n"
                          "\n",
                          &cfg, &file, err, sizeof err),
                     0);
    assert_string_equal(cfg.socket_path, "/run/a.sock");
    assert_int_equal(cfg.max_clients, 5);
    assert_int_equal(cfg.max_regions, 6);
    vqkvd_config_file_free(&file);
}

static void test_bad_lines(void **state)
{
    fixture_t *fx = *state;
    static const char syntax[] = "expected \"key = value\", \"[section]\" or a # comment";
    char many_ids[512] = "[vqkvd]\nallow_uids =";
    for (int i = 0; i <= VQKVD_MAX_ALLOWED; i++)
        snprintf(many_ids + strlen(many_ids), sizeof many_ids - strlen(many_ids), " %d", i);
    char many_quotas[1024] = "[quota]\n";
    for (int i = 0; i <= VQKVD_MAX_ALLOWED; i++)
        snprintf(many_quotas + strlen(many_quotas), sizeof many_quotas - strlen(many_quotas),
                 "uid.%d = 1G\n", i);
    char long_line[400] = "[vqkvd]\nsocket = /";
    memset(long_line + strlen(long_line), 'x', 300);
    strcat(long_line, "\nmax_clients = 0\n");

    const struct {
        const char *text;
        int line;
        const char *message;
    } cases[] = {
        {"[vqkvd]\n\n# typo below\npol_bytes = 3G\n", 4, "unknown key \"pol_bytes\" in [vqkvd]"},
        {"socket = /x\n", 1, "key \"socket\" before any [section]"},
        {"[vqkvd]\n[qouta]\ndefault = 1G\n", 3, "unknown section [qouta]"},
        {"[vqkvd]\nsocket /x\n", 2, syntax},
        {"[vqkvd\nsocket = /x\n", 1, syntax},
        {"[vqkvd]\nsocket = /a\nsocket = /b\n", 3, "\"socket\" given twice (first on line 2)"},
        {"[vqkvd]\nsocket =\n", 2, "no value for \"socket\""},
        {"[vqkvd]\npool_bytes = 0\n", 2,
         "bad pool_bytes \"0\" (a positive size such as 512M or 4G)"},
        {"[vqkvd]\npool_bytes = 1T\n", 2,
         "bad pool_bytes \"1T\" (a positive size such as 512M or 4G)"},
        {"[vqkvd]\ndevice = gpu\n", 2, "bad device \"gpu\" (cpu, auto or cuda:N[,cuda:M...])"},
        {"[vqkvd]\nlog_level = loud\n", 2, "bad log_level \"loud\" (debug, info, warn or error)"},
        {"[vqkvd]\nallow_uids = 1000, bob\n", 2, "bad id \"bob\" in allow_uids"},
        {"[vqkvd]\nallow_gids = -1\n", 2, "bad id \"-1\" in allow_gids"},
        {"[vqkvd]\nadmin_uids = 99999999999999999999\n", 2,
         "bad id \"99999999999999999999\" in admin_uids"},
        {"[vqkvd]\nmax_clients = 0\n", 2, "bad max_clients \"0\" (a positive whole number)"},
        {"[vqkvd]\ndisk_flush_ms = -1\n", 2,
         "bad disk_flush_ms \"-1\" (a whole number, 0 for off)"},
        {"[vqkvd]\ncalibration_tokens = 2k\n", 2,
         "bad calibration_tokens \"2k\" (a positive whole number)"},
        {"[vqkvd]\nmax_inflight = 4294967296\n", 2,
         "bad max_inflight \"4294967296\" (a positive whole number)"},
        {"[vqkvd]\nmax_regions = 16\nmax_regions = 16\n", 3,
         "\"max_regions\" given twice (first on line 2)"},
        {many_ids, 2, "more than 32 ids in allow_uids"},
        {"[quota]\ndefualt = 1G\n", 2, "unknown key \"defualt\" in [quota] (default or uid.N)"},
        {"[quota]\nuid.bob = 1G\n", 2, "unknown key \"uid.bob\" in [quota] (default or uid.N)"},
        {"[quota]\nuid.1000 = lots\n", 2,
         "bad quota \"lots\" for uid.1000 (a size such as 4G, or unlimited)"},
        {"[quota]\ndefault =\n", 2, "no value for \"default\""},
        {"[quota]\nuid.1000 = 1G\nuid.7 = 1G\nuid.1000 = 2G\n", 4,
         "\"uid.1000\" given twice (first on line 2)"},
        {"[quota]\ndefault = 1G\ndefault = 2G\n", 3, "\"default\" given twice (first on line 2)"},
        {many_quotas, 34, "more than 32 uid quotas"},
        {long_line, 2, "line longer than 198 characters"},
        /* The first error wins, whoever finds it. */
        {"[vqkvd]\nsocket = /a\nbroken line\nbogus = 1\n", 3, syntax},
        {"[vqkvd]\nbogus = 1\nbroken line\n", 2, "unknown key \"bogus\" in [vqkvd]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        vqkvd_config_t cfg, start;
        vqkvd_config_file_t file;
        char err[512], want[512];
        int rc = load(fx, cases[i].text, &cfg, &file, err, sizeof err);
        if (rc != VQKV_EINVAL)
            fail_msg("case %zu: %d, not VQKV_EINVAL, for:\n%s", i, rc, cases[i].text);
        snprintf(want, sizeof want, "%s:%d: %s", fx->conf, cases[i].line, cases[i].message);
        assert_string_equal(err, want);
        /* Nothing was applied. */
        start_config(&start);
        assert_memory_equal(&cfg, &start, sizeof cfg);
        assert_null(file.socket_path);
        assert_null(file.state_dir);
        assert_null(file.device);
        assert_int_equal(file.log_level, 0);
    }
}

static void test_empty_file(void **state)
{
    fixture_t *fx = *state;
    static const char *const texts[] = {"", "\n\n", "# nothing but comments\n; here\n"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        vqkvd_config_t cfg, start;
        vqkvd_config_file_t file;
        char err[256];
        assert_int_equal(load(fx, texts[i], &cfg, &file, err, sizeof err), 0);
        start_config(&start);
        assert_string_equal(cfg.socket_path, start.socket_path);
        assert_int_equal(cfg.pool_bytes, start.pool_bytes);
        assert_int_equal(cfg.n_allow_uids, start.n_allow_uids);
        assert_int_equal(cfg.n_allow_gids, start.n_allow_gids);
        assert_int_equal(cfg.n_quotas, start.n_quotas);
        assert_null(file.socket_path);
        assert_int_equal(file.log_level, 0);
    }
}

static void test_missing_file(void **state)
{
    fixture_t *fx = *state;
    vqkvd_config_t cfg, start;
    vqkvd_config_file_t file = {0};
    char err[256], want[256];
    start_config(&cfg);
    assert_int_equal(vqkvd_config_load(&cfg, &file, fx->conf, err, sizeof err), VQKV_EIO);
    assert_int_equal(errno, ENOENT);
    snprintf(want, sizeof want, "%s: No such file or directory", fx->conf);
    assert_string_equal(err, want);
    /* A directory opens, but does not read. */
    assert_int_equal(vqkvd_config_load(&cfg, &file, fx->dir, err, sizeof err), VQKV_EIO);
    assert_int_equal(errno, EISDIR);
    snprintf(want, sizeof want, "%s: Is a directory", fx->dir);
    assert_string_equal(err, want);
    start_config(&start);
    assert_memory_equal(&cfg, &start, sizeof cfg);
    assert_null(file.socket_path);
}

/* ---- the binary ------------------------------------------------------------ */

/* Starts vqkvd with args (NULL-terminated, argv[0] added here), its stdout
 * and stderr into log, env ("NAME=value") added to its environment unless
 * NULL. Returns its pid. */
static pid_t spawn_logged(const char *const *args, const char *log, const char *env)
{
    const char *argv[24] = {VQKVD_PATH};
    size_t n = 1;
    while (args[n - 1] != NULL && n < 23) {
        argv[n] = args[n - 1];
        n++;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
            _exit(126);
        if (env != NULL)
            putenv((char *)env);
        execv(VQKVD_PATH, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

/* Runs vqkvd with args to its exit; returns the exit status, its output
 * in out. */
static int run_vqkvd(fixture_t *fx, const char *const *args, char *out, size_t size)
{
    int status = wait_exit(spawn_logged(args, fx->log, NULL));
    assert_true(status != -1);
    assert_true(WIFEXITED(status));
    read_file(fx->log, out, size);
    return WEXITSTATUS(status);
}

/* daemon_start, with the daemon's output in fx->log: on d->path, at debug
 * level, with extra arguments. */
static void start_logged(fixture_t *fx, daemon_t *d, const char *const *extra, const char *env)
{
    snprintf(d->path, sizeof d->path, "%s/vqkv.sock", fx->dir);
    const char *args[16] = {"--socket", d->path, "--log-level", "debug"};
    for (size_t i = 0; extra[i] != NULL && i < 11; i++)
        args[4 + i] = extra[i];
    d->pid = spawn_logged(args, fx->log, env);
    daemon_wait_listening(d);
}

static void expect_output(const char *out, const char *want)
{
    if (strstr(out, want) == NULL)
        fail_msg("\"%s\" is not in vqkvd's output:\n%s", want, out);
}

static void test_check_config(void **state)
{
    fixture_t *fx = *state;
    char out[2048];
    write_file(fx->conf, "[vqkvd]\n"
                         "socket = /run/test/vqkv.sock\n"
                         "pool_bytes = 2G\n"
                         "device = cpu\n"
                         "state_dir = /var/lib/test\n"
                         "log_level = warn\n"
                         "allow_uids = 1000\n"
                         "allow_gids = 44\n"
                         "admin_uids = 0\n"
                         "calibration_tokens = 1024\n"
                         "max_clients = 8\n"
                         "max_inflight = 8\n"
                         "max_regions = 8\n"
                         "[quota]\n"
                         "default = 1G\n"
                         "uid.1000 = unlimited\n");
    const char *const good[] = {"--config", fx->conf, "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, good, out, sizeof out), 0);
    assert_string_equal(out, "ok\n");

    char bad_path[160], want[256];
    snprintf(bad_path, sizeof bad_path, "%s/bad.conf", fx->dir);
    write_file(bad_path, "[vqkvd]\nsocket = /run/test/vqkv.sock\npol_bytes = 2G\n");
    const char *const bad[] = {"--check-config", "--config", bad_path, NULL};
    assert_int_equal(run_vqkvd(fx, bad, out, sizeof out), 2);
    snprintf(want, sizeof want, "%s:3: unknown key \"pol_bytes\" in [vqkvd]\n", bad_path);
    expect_output(out, want);

    /* A flag is checked too. */
    const char *const bad_flag[] = {"--config", fx->conf,         "--pool-bytes",
                                    "lots",     "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, bad_flag, out, sizeof out), 2);
    expect_output(out, "bad --pool-bytes \"lots\"");

    /* A pool too small for any real block, from a flag or the file. */
    const char *const tiny[] = {"--config", fx->conf, "--pool-bytes", "1K", "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, tiny, out, sizeof out), 2);
    expect_output(out, "pool_bytes 1024 is below the minimum of 65536");

    /* --config names a file that is not there. */
    char missing[160];
    snprintf(missing, sizeof missing, "%s/none.conf", fx->dir);
    const char *const gone[] = {"--config", missing, "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, gone, out, sizeof out), 2);
    snprintf(want, sizeof want, "%s: No such file or directory", missing);
    expect_output(out, want);
}

/* --version, and --help naming every flag of the table with its default
 * (written as the file writes it); the table's defaults are the ones the
 * daemon has always had. */
static void test_version_and_help(void **state)
{
    fixture_t *fx = *state;
    char out[8192], want[256];
    const char *const version[] = {"--version", NULL};
    assert_int_equal(run_vqkvd(fx, version, out, sizeof out), 0);
    assert_string_equal(out, "vqkvd " VQKV_VERSION "\n");
    const char *const help[] = {"--help", NULL};
    assert_int_equal(run_vqkvd(fx, help, out, sizeof out), 0);
    static const char *const own[] = {"--config FILE",          "--check-config",
                                      "--print-default-config", "--version",
                                      "(default: 1G)",          "(default: 30000)",
                                      "(default: 8192)",        "vqkv/vqkvd.conf, if it exists"};
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
        expect_output(out, own[i]);
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        if (key->flag == NULL)
            continue;
        /* Followed by its text, or by a line break when it is too long. */
        snprintf(want, sizeof want, "  --%s %s", key->flag, key->arg);
        expect_output(out, want);
        if (key->def != NULL && key->def[0] != '\0') {
            snprintf(want, sizeof want, "(default: %s)", key->def);
            expect_output(out, want);
        }
    }
}

/* The table of keys holds together: names found, defaults that parse and
 * are what vqkvd_config_defaults gives, a flag with its argument and help,
 * no live string (the running config would point into a freed file). */
static void test_table(void **state)
{
    (void)state;
    vqkvd_config_t defaults, cfg;
    vqkvd_config_defaults(&defaults);
    for (size_t i = 0; i < VQKVD_CONFIG_N_KEYS; i++) {
        const vqkvd_config_key_t *key = &vqkvd_config_keys[i];
        assert_ptr_equal(vqkvd_config_find(key->name), key);
        assert_non_null(key->doc);
        assert_true(key->flag == NULL || (key->arg != NULL && key->help != NULL));
        assert_true(key->def != NULL || (key->def_doc != NULL && key->example != NULL));
        if (key->type == VQKVD_CONFIG_STRING || key->type == VQKVD_CONFIG_DEVICE ||
            key->type == VQKVD_CONFIG_ADDRESS)
            assert_false(key->live);
        if (key->def == NULL || key->type == VQKVD_CONFIG_LOG_LEVEL)
            continue;
        vqkvd_config_file_t file = {0};
        vqkvd_config_source_t src = {.cfg = &cfg, .file = &file};
        char err[256];
        memset(&cfg, 0, sizeof cfg);
        assert_int_equal(vqkvd_config_set(&src, key, key->name, key->def, err, sizeof err), 0);
        assert_memory_equal((char *)&cfg + key->offset, (char *)&defaults + key->offset,
                            key->type == VQKVD_CONFIG_BYTES ? 8
                            : key->type == VQKVD_CONFIG_COUNT || key->type == VQKVD_CONFIG_COUNT_OFF
                                ? 4
                                : 0);
        vqkvd_config_file_free(&file);
    }
    assert_null(vqkvd_config_find("pol_bytes"));
    assert_int_equal(defaults.pool_bytes, 1ull << 30);
    assert_string_equal(defaults.device, "auto");
    assert_int_equal(defaults.calib_tokens, 8192);
    assert_int_equal(defaults.lease_ms, 30000);
    assert_int_equal(defaults.max_clients, 1024);
    assert_int_equal(defaults.max_inflight, 64);
    assert_int_equal(defaults.max_regions, 16);
    assert_int_equal(defaults.listen_fd, -1);
    assert_null(defaults.socket_path);
    assert_null(defaults.metrics_address);
    assert_int_equal(defaults.allow_uids[0], getuid());
    assert_int_equal(defaults.n_allow_gids + defaults.n_admin_uids + defaults.n_quotas, 0);
    assert_int_equal(vqkvd_log_parse_level(vqkvd_config_find("log_level")->def), VQKVD_LOG_INFO);
}

/* A flag goes through its key's parser: the file's message with the flag's
 * name, the same bounds, and the strings copied (the file's replaced). */
static void test_flags_parse_as_keys(void **state)
{
    fixture_t *fx = *state;
    char out[2048];
    static const struct {
        const char *flag, *value, *want;
    } bad[] = {
        {"--lease-ms", "0", "vqkvd: bad --lease-ms \"0\" (a positive whole number)\n"},
        {"--calibration-tokens", "-1", "bad --calibration-tokens \"-1\" (a positive whole"},
        {"--device", "gpu", "vqkvd: bad --device \"gpu\" (cpu, auto or cuda:N[,cuda:M...])\n"},
        {"--log-level", "loud", "bad --log-level \"loud\" (debug, info, warn or error)"},
        {"--allow-uid", "root", "vqkvd: bad id \"root\" in --allow-uid\n"},
        {"--state-dir", "", "vqkvd: no value for \"--state-dir\"\n"},
    };
    write_file(fx->conf, "");
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *const args[] = {"--config",   fx->conf,         bad[i].flag,
                                    bad[i].value, "--check-config", NULL};
        assert_int_equal(run_vqkvd(fx, args, out, sizeof out), 2);
        expect_output(out, bad[i].want);
    }

    vqkvd_config_t cfg;
    vqkvd_config_file_t file = {0};
    vqkvd_config_source_t src = {.cfg = &cfg, .file = &file};
    char err[256];
    start_config(&cfg);
    const vqkvd_config_key_t *dev = vqkvd_config_find("device");
    assert_int_equal(vqkvd_config_set(&src, dev, "--device", "cpu", err, sizeof err), 0);
    assert_int_equal(vqkvd_config_set(&src, dev, "--device", "cuda:2", err, sizeof err), 0);
    assert_string_equal(cfg.device, "cuda:2");
    assert_ptr_equal(cfg.device, file.device);
    /* The first allow list of a source drops both lists it started with. */
    const vqkvd_config_key_t *gids = vqkvd_config_find("allow_gids");
    assert_int_equal(vqkvd_config_set(&src, gids, "--allow-gid", "7", err, sizeof err), 0);
    assert_int_equal(vqkvd_config_set(&src, gids, "--allow-gid", "8", err, sizeof err), 0);
    assert_int_equal(cfg.n_allow_uids, 0);
    assert_int_equal(cfg.n_allow_gids, 2);
    assert_int_equal(cfg.allow_gids[1], 8);
    vqkvd_config_file_free(&file);
}

/* What vqkvd says of a GPU it cannot have: built without CUDA, it has no
 * backend for any; built with it, no machine has a hundredth GPU. */
#if VQKV_TEST_CUDA_BUILT
#define NO_CUDA_99 "device cuda:99: this machine has "
#define NO_CUDA_0_99 "device cuda:0,cuda:99: this machine has "
#define AUTO_WITHOUT_GPU "device auto: "
#else
#define NO_CUDA_99 "device cuda:99: this vqkvd has no CUDA backend; use --device cpu"
#define NO_CUDA_0_99 "device cuda:0,cuda:99: this vqkvd has no CUDA backend; use --device cpu"
#define AUTO_WITHOUT_GPU "device auto: no CUDA backend is built in; using the CPU"
#endif

static void test_cuda_refused(void **state)
{
    fixture_t *fx = *state;
    char out[2048], sock[160];
    snprintf(sock, sizeof sock, "%s/vqkv.sock", fx->dir);
    const char *const args[] = {"--socket", sock, "--device", "cuda:99", NULL};
    assert_int_equal(run_vqkvd(fx, args, out, sizeof out), 2);
    expect_output(out, NO_CUDA_99);
    struct stat st;
    assert_int_equal(lstat(sock, &st), -1);

    /* From the file as well, unless a flag before --config overrides it. */
    write_file(fx->conf, "[vqkvd]\ndevice = cuda:99\n");
    const char *const from_file[] = {"--config", fx->conf, "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, from_file, out, sizeof out), 2);
    expect_output(out, NO_CUDA_99);
    const char *const overridden[] = {"--device",       "cpu", "--config", fx->conf,
                                      "--check-config", NULL};
    assert_int_equal(run_vqkvd(fx, overridden, out, sizeof out), 0);
    assert_string_equal(out, "ok\n");

    /* A list is refused for any GPU it names that is not there. */
    write_file(fx->conf, "[vqkvd]\ndevice = cuda:0,cuda:99\n");
    assert_int_equal(run_vqkvd(fx, from_file, out, sizeof out), 2);
    expect_output(out, NO_CUDA_0_99);
}

/* --socket and --log-level come before --config on the command line and
 * still win over the file's socket and log_level; the file's state_dir
 * (three levels that do not exist yet) is created 0700. */
static void test_flags_override_file(void **state)
{
    fixture_t *fx = *state;
    char text[512], file_sock[160], state_dir[160], out[8192];
    snprintf(file_sock, sizeof file_sock, "%s/file.sock", fx->dir);
    snprintf(state_dir, sizeof state_dir, "%s/state/a/b", fx->dir);
    snprintf(text, sizeof text, "[vqkvd]\nsocket = %s\nlog_level = error\nstate_dir = %s\n",
             file_sock, state_dir);
    write_file(fx->conf, text);
    daemon_t d = {.pid = -1};
    const char *const extra[] = {"--config", fx->conf, NULL};
    start_logged(fx, &d, extra, NULL);
    struct stat st;
    assert_int_equal(lstat(file_sock, &st), -1);
    assert_int_equal(stat(state_dir, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0700);
    daemon_stop(&d);
    read_file(fx->log, out, sizeof out);
    /* Info lines show: --log-level debug beat log_level = error. */
    char want[256];
    snprintf(want, sizeof want, "state directory %s\n", state_dir);
    expect_output(out, want);
    expect_output(out, AUTO_WITHOUT_GPU);
}

/* $STATE_DIRECTORY (systemd's StateDirectory=) is the default state
 * directory. */
static void test_state_dir_from_systemd(void **state)
{
    fixture_t *fx = *state;
    char env[192], out[8192], want[256];
    snprintf(env, sizeof env, "STATE_DIRECTORY=%s/systemd/vqkv", fx->dir);
    write_file(fx->conf, "");
    daemon_t d = {.pid = -1};
    const char *const extra[] = {"--config", fx->conf, NULL};
    start_logged(fx, &d, extra, env);
    struct stat st;
    assert_int_equal(stat(env + strlen("STATE_DIRECTORY="), &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0700);
    daemon_stop(&d);
    read_file(fx->log, out, sizeof out);
    snprintf(want, sizeof want, "state directory %s\n", env + strlen("STATE_DIRECTORY="));
    expect_output(out, want);
}

/* A state directory that cannot be created is a warning, not a failure.
 * The warning's prefix: its priority for the journal (JOURNAL_STREAM names
 * stderr's file), plain words anywhere else. */
static void test_state_dir_unusable(void **state)
{
    fixture_t *fx = *state;
    char blocked[160], out[8192], want[256], journal[96];
    write_file(fx->conf, "");
    write_file(fx->log, "");
    struct stat st;
    assert_int_equal(stat(fx->log, &st), 0);
    snprintf(journal, sizeof journal, "JOURNAL_STREAM=%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    snprintf(blocked, sizeof blocked, "%s/vqkvd.conf/state", fx->dir); /* under a file */
    const char *const extra[] = {"--config", fx->conf, "--state-dir", blocked, NULL};
    static const char *const prefixes[] = {"vqkvd: warn: ", "<4>"};
    for (int to_journal = 0; to_journal < 2; to_journal++) {
        daemon_t d = {.pid = -1};
        start_logged(fx, &d, extra, to_journal ? journal : NULL);
        daemon_stop(&d);
        read_file(fx->log, out, sizeof out);
        snprintf(want, sizeof want,
                 "%sstate directory %s: Not a directory; trained codebooks will not be kept",
                 prefixes[to_journal], blocked);
        expect_output(out, want);
        assert_null(strstr(out, to_journal ? "vqkvd: info: " : "<6>"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_every_key, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_untouched_keys, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_sizes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_numbers_and_devices, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_lists, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_layout, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_bad_lines, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_empty_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_missing_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_check_config, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_cuda_refused, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_version_and_help, setup_dir, teardown_dir),
        cmocka_unit_test(test_table),
        cmocka_unit_test_setup_teardown(test_flags_parse_as_keys, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_flags_override_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_state_dir_from_systemd, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_state_dir_unusable, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
