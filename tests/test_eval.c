/* test_eval.c -- the safetensors reader, `vqkvctl eval` and its JSON, and
 * its progress line: drawn on a terminal, never into a pipe.
 *
 * Dumps are written by the tests themselves: a small model of 2 layers,
 * 4 query heads over 2 kv heads, head_dim 16, with values that fp16 holds
 * exactly, so the fp16 codec must measure zero error.
 */
#include "eval.h"
#include "safetensors.h"
#include "vqkv_codec.h"

#include <json-c/json.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "capture.h"

#define T_LAYERS 2
#define T_TOKENS 192
#define T_QHEADS 4
#define T_KVHEADS 2
#define T_DIM 16

/* Appends one tensor's header entry and data. */
typedef struct {
    char header[8192];
    size_t header_len;
    uint8_t *data;
    size_t data_len;
} dump_builder_t;

static void builder_add(dump_builder_t *b, const char *name, const char *dtype, uint64_t d0,
                        uint64_t d1, uint64_t d2, const void *bytes, size_t len)
{
    b->header_len += (size_t)snprintf(
        b->header + b->header_len, sizeof b->header - b->header_len,
        "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%llu,%llu,%llu],\"data_offsets\":[%zu,%zu]}",
        b->header_len > 1 ? "," : "", name, dtype, (unsigned long long)d0, (unsigned long long)d1,
        (unsigned long long)d2, b->data_len, b->data_len + len);
    b->data = realloc(b->data, b->data_len + len);
    memcpy(b->data + b->data_len, bytes, len);
    b->data_len += len;
}

static void builder_write(dump_builder_t *b, const char *path)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t n = b->header_len + 1;
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(n >> (8 * i));
    fwrite(le, 1, 8, f);
    fwrite(b->header, 1, b->header_len, f);
    fputc('}', f);
    fwrite(b->data, 1, b->data_len, f);
    fclose(f);
    free(b->data);
}

/* Values on a 1/64 grid, so f16 holds them exactly. */
static float grid_value(uint32_t layer, uint32_t which, size_t i)
{
    uint32_t h = (uint32_t)(i * 2654435761u + layer * 97u + which * 13u);
    return (float)((int)(h % 257u) - 128) / 64.0f;
}

/* A well-formed dump; skip names one tensor ("layers.1.q") to leave out. */
static void write_dump(const char *path, const char *skip)
{
    dump_builder_t b = {.header = "{"};
    b.header_len = 1;
    size_t kv_n = (size_t)T_TOKENS * T_KVHEADS * T_DIM, q_n = (size_t)T_TOKENS * T_QHEADS * T_DIM;
    uint16_t *buf = malloc(q_n * sizeof *buf);
    float *f = malloc(q_n * sizeof *f);
    for (uint32_t l = 0; l < T_LAYERS; l++) {
        static const char which[] = {'q', 'k', 'v'};
        for (uint32_t w = 0; w < 3; w++) {
            char name[32];
            snprintf(name, sizeof name, "layers.%u.%c", l, which[w]);
            size_t n = w == 0 ? q_n : kv_n;
            for (size_t i = 0; i < n; i++)
                f[i] = grid_value(l, w, i);
            vqkv_dtype_from_f32(VQKV_DTYPE_F16, f, n, buf);
            if (skip != NULL && strcmp(skip, name) == 0)
                continue;
            builder_add(&b, name, "F16", T_TOKENS, w == 0 ? T_QHEADS : T_KVHEADS, T_DIM, buf,
                        n * 2);
        }
    }
    free(buf);
    free(f);
    builder_write(&b, path);
}

static char *temp_path(const char *tag)
{
    static char path[128];
    snprintf(path, sizeof path, "test_eval_%s_%d.safetensors", tag, (int)getpid());
    return path;
}

static int run_eval(const char *path, const char *const *specs, size_t n, vqkv_eval_result_t *res,
                    char *err, size_t errlen)
{
    vqkv_eval_opts_t opts = {.kv_path = path,
                             .specs = specs,
                             .n_specs = n,
                             .block_tokens = 16,
                             .train_tokens = 96,
                             .attn_stride = 2,
                             .seed = 1,
                             .threads = 2};
    return vqkv_eval_run(&opts, res, err, errlen);
}

static void test_fp16_measures_zero_error(void **state)
{
    (void)state;
    char *path = temp_path("fp16");
    write_dump(path, NULL);
    const char *specs[] = {"fp16", "kivi4", "rvq:d=4,b=4,r=2"};
    vqkv_eval_result_t res[3];
    char err[256] = "";
    assert_int_equal(run_eval(path, specs, 3, res, err, sizeof err), VQKV_OK);
    assert_string_equal(res[0].spec, "fp16");
    assert_true(res[0].bits_per_value == 16.0 && res[0].compression_ratio == 1.0);
    assert_true(res[0].k_rel_err == 0.0 && res[0].v_rel_err == 0.0);
    assert_true(res[0].attn_rel_err == 0.0);
    /* Lossy codecs: some error, but far from none of the signal. */
    for (int i = 1; i < 3; i++) {
        assert_true(res[i].k_rel_err > 0.0 && res[i].k_rel_err < 0.6);
        assert_true(res[i].v_rel_err > 0.0 && res[i].v_rel_err < 0.6);
        assert_true(res[i].attn_rel_err > 0.0 && isfinite(res[i].attn_rel_err));
        assert_true(res[i].compression_ratio > 2.0);
    }
    unlink(path);
}

static void expect_refused(const char *path, int want_rc, const char *want_text)
{
    const char *specs[] = {"fp16"};
    vqkv_eval_result_t res[1];
    char err[256] = "";
    assert_int_equal(run_eval(path, specs, 1, res, err, sizeof err), want_rc);
    if (strstr(err, want_text) == NULL)
        fail_msg("error '%s' does not mention '%s'", err, want_text);
}

static void test_missing_tensor_refused(void **state)
{
    (void)state;
    char *path = temp_path("missing");
    write_dump(path, "layers.1.q");
    expect_refused(path, VQKV_EFORMAT, "layer 1");
    unlink(path);
}

/* Writes raw bytes as a file. */
static void write_bytes(const char *path, const void *bytes, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(bytes, 1, len, f);
    fclose(f);
}

static void write_header_only(const char *path, const char *json, size_t data_len)
{
    size_t n = strlen(json);
    uint8_t *buf = calloc(1, 8 + n + data_len);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, json, n);
    write_bytes(path, buf, 8 + n + data_len);
    free(buf);
}

static void test_malformed_files_refused(void **state)
{
    (void)state;
    char *path = temp_path("bad");
    static const struct {
        const char *json;
        size_t data_len;
        const char *mentions;
    } cases[] = {
        {"{\"layers.0.k\":{\"dtype\":\"I8\",\"shape\":[1,1,2],\"data_offsets\":[0,2]}}", 2,
         "dtype"},
        {"{\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[1,1,2],\"data_offsets\":[0,400]}}", 4,
         "outside"},
        {"{\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[1,1,4],\"data_offsets\":[0,4]}}", 4,
         "bytes of data"},
        {"{\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[-1,1,2],\"data_offsets\":[0,4]}}", 4,
         "shape"},
        {"{\"layers.0.k\":{\"dtype\":\"F16\",\"shape\":[4294967296,4294967296,2],"
         "\"data_offsets\":[0,4]}}",
         4, "shape"},
        {"{\"layers.0.k\":{\"dtype\":\"F16\"}}", 0, "needs"},
        {"{\"layers.0.k\": [1, 2", 0, "JSON"},
        {"[1, 2]", 0, "JSON"},
        {"{\"other\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]}}", 2, "layers.0.k"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_header_only(path, cases[i].json, cases[i].data_len);
        expect_refused(path, VQKV_EFORMAT, cases[i].mentions);
    }
    /* A header length beyond the file, and a file shorter than 8 bytes. */
    write_bytes(path, "\xff\xff\xff\x00\x00\x00\x00\x00{}", 10);
    expect_refused(path, VQKV_EFORMAT, "header length");
    write_bytes(path, "\x02\x00", 2);
    expect_refused(path, VQKV_EFORMAT, "shorter");
    unlink(path);
    expect_refused("no-such-dump.safetensors", VQKV_EIO, "cannot open");
}

static void test_bad_requests_refused(void **state)
{
    (void)state;
    char *path = temp_path("req");
    write_dump(path, NULL);
    const char *specs[] = {"fp16", "rvq:d=5"};
    vqkv_eval_result_t res[2];
    char err[256] = "";
    assert_int_equal(run_eval(path, specs, 2, res, err, sizeof err), VQKV_ESPEC);
    assert_non_null(strstr(err, "rvq:d=5"));

    vqkv_eval_opts_t opts = {
        .kv_path = path, .specs = specs, .n_specs = 1, .train_tokens = T_TOKENS};
    assert_int_equal(vqkv_eval_run(&opts, res, err, sizeof err), VQKV_EINVAL);
    assert_non_null(strstr(err, "nothing"));
    opts.train_tokens = T_TOKENS - 8; /* 8 held-out tokens: no whole 32-token block */
    assert_int_equal(vqkv_eval_run(&opts, res, err, sizeof err), VQKV_EINVAL);
    assert_non_null(strstr(err, "whole block"));
    unlink(path);
}

static void test_reader_converts_dtypes(void **state)
{
    (void)state;
    /* One tensor per dtype with the same values: the reader must return
     * them all as the same floats. */
    static const float values[4] = {1.5f, -2.25f, 0.0f, 1024.0f};
    uint16_t f16[4], bf16[4];
    vqkv_dtype_from_f32(VQKV_DTYPE_F16, values, 4, f16);
    vqkv_dtype_from_f32(VQKV_DTYPE_BF16, values, 4, bf16);
    dump_builder_t b = {.header = "{"};
    b.header_len = 1;
    builder_add(&b, "a", "F16", 1, 2, 2, f16, sizeof f16);
    builder_add(&b, "b", "BF16", 1, 2, 2, bf16, sizeof bf16);
    builder_add(&b, "c", "F32", 1, 2, 2, values, sizeof values);
    char *path = temp_path("dtypes");
    builder_write(&b, path);

    vqkv_st_file_t file;
    char err[128];
    assert_int_equal(vqkv_st_open(path, &file, err, sizeof err), VQKV_OK);
    assert_int_equal(file.n_tensors, 3);
    static const char *const names[] = {"a", "b", "c"};
    for (size_t i = 0; i < 3; i++) {
        const vqkv_st_tensor_t *t = vqkv_st_find(&file, names[i]);
        assert_non_null(t);
        assert_int_equal(t->count, 4);
        float out[4];
        vqkv_st_read_f32(t, 0, 4, out);
        assert_memory_equal(out, values, sizeof values);
    }
    assert_null(vqkv_st_find(&file, "missing"));
    vqkv_st_close(&file);
    unlink(path);
}

/* vqkvctl eval --json prints one array with the fields scripts rely on. */
static void test_vqkvctl_json(void **state)
{
    (void)state;
    char *path = temp_path("cli");
    write_dump(path, NULL);
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "%s eval --kv %s --codec fp16 --codec kivi2 --block-tokens 16 --train-tokens 96 "
             "--json",
             VQKVCTL_PATH, path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char out[8192];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    assert_int_equal(pclose(p), 0);
    struct json_object *arr = json_tokener_parse(out);
    assert_non_null(arr);
    assert_true(json_object_is_type(arr, json_type_array));
    assert_int_equal(json_object_array_length(arr), 2);
    static const char *fields[] = {"bits_per_value", "compression_ratio", "k_rel_err", "v_rel_err",
                                   "attn_rel_err"};
    for (size_t i = 0; i < 2; i++) {
        struct json_object *o = json_object_array_get_idx(arr, i), *v;
        assert_true(json_object_object_get_ex(o, "codec", &v));
        assert_string_equal(json_object_get_string(v), i == 0 ? "fp16" : "kivi2:g=16");
        for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
            assert_true(json_object_object_get_ex(o, fields[f], &v));
            assert_true(json_object_is_type(v, json_type_double) ||
                        json_object_is_type(v, json_type_int));
        }
    }
    json_object_put(arr);

    /* Usage errors exit 2, failures 1, with a message and no JSON. */
    snprintf(cmd, sizeof cmd, "%s eval --kv %s 2>/dev/null", VQKVCTL_PATH, path);
    assert_int_equal(WEXITSTATUS(pclose(popen(cmd, "r"))), 2);
    snprintf(cmd, sizeof cmd, "%s eval --kv %s --codec nope --json 2>/dev/null", VQKVCTL_PATH,
             path);
    assert_int_equal(WEXITSTATUS(pclose(popen(cmd, "r"))), 1);
    unlink(path);
}

/* vqkvctl eval's progress: with stderr a pipe, not a byte of it (stderr
 * stays empty); on a pseudo-terminal, a line naming the phase, codec and
 * layer with a rate and an ETA, erased before the results. */
static void test_vqkvctl_progress(void **state)
{
    (void)state;
    char *path = temp_path("progress");
    write_dump(path, NULL);
    const char *argv[] = {VQKVCTL_PATH,     "eval", "--kv",           path,
                          "--codec",        "fp16", "--codec",        "rvq:d=4,b=4,r=2",
                          "--block-tokens", "16",   "--train-tokens", "96",
                          "--json",         NULL};
    static char err[1 << 16];
    assert_int_equal(capture_run(argv, false, err, sizeof err), 0);
    capture_assert_no_progress("vqkvctl eval", err);
    assert_string_equal(err, "");

    assert_int_equal(capture_run(argv, true, err, sizeof err), 0);
    static const char *const words[] = {"eval reference: attention layer 1/2, 0%, ", " layers/s",
                                        NULL};
    capture_assert_progress("vqkvctl eval", err, words);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_measures_zero_error),
        cmocka_unit_test(test_missing_tensor_refused),
        cmocka_unit_test(test_malformed_files_refused),
        cmocka_unit_test(test_bad_requests_refused),
        cmocka_unit_test(test_reader_converts_dtypes),
        cmocka_unit_test(test_vqkvctl_json),
        cmocka_unit_test(test_vqkvctl_progress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
