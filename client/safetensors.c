/* safetensors.c -- safetensors reading: an 8-byte little-endian header
 * length, a JSON object naming each tensor's dtype, shape and
 * [begin, end) byte offsets into the data that follows, then the data.
 * The header is parsed with json-c; every number in it is checked before
 * it becomes an address.
 */
#include "safetensors.h"

#include <fcntl.h>
#include <json-c/json.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Headers of real KV dumps are a few KiB; this bounds a hostile one. */
#define VQKV_ST_MAX_HEADER (64u << 20)

static int vqkv__st_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static bool vqkv__st_dtype(const char *name, vqkv_dtype_t *dtype)
{
    static const struct {
        const char *name;
        vqkv_dtype_t dtype;
    } known[] = {{"F16", VQKV_DTYPE_F16}, {"BF16", VQKV_DTYPE_BF16}, {"F32", VQKV_DTYPE_F32}};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (strcmp(name, known[i].name) == 0) {
            *dtype = known[i].dtype;
            return true;
        }
    }
    return false;
}

/* A non-negative JSON integer, or false. */
static bool vqkv__st_u64(struct json_object *o, uint64_t *out)
{
    if (!json_object_is_type(o, json_type_int))
        return false;
    int64_t v = json_object_get_int64(o);
    if (v < 0)
        return false;
    *out = (uint64_t)v;
    return true;
}

/* Fills tensor from its header entry; data_len bounds the offsets. */
static int vqkv__st_tensor(const char *name, struct json_object *desc, const uint8_t *data,
                           uint64_t data_len, vqkv_st_tensor_t *tensor, char *err, size_t errlen)
{
    struct json_object *dtype, *shape, *offsets;
    uint64_t begin, end;

    if (!json_object_is_type(desc, json_type_object) ||
        !json_object_object_get_ex(desc, "dtype", &dtype) ||
        !json_object_object_get_ex(desc, "shape", &shape) ||
        !json_object_object_get_ex(desc, "data_offsets", &offsets))
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT,
                             "tensor %s: needs dtype, shape and data_offsets", name);
    if (!json_object_is_type(dtype, json_type_string) ||
        !vqkv__st_dtype(json_object_get_string(dtype), &tensor->dtype))
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "tensor %s: dtype must be F16, BF16 or F32",
                             name);
    if (!json_object_is_type(shape, json_type_array) ||
        json_object_array_length(shape) > VQKV_ST_MAX_DIMS)
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT,
                             "tensor %s: shape must be an array of at most %d sizes", name,
                             VQKV_ST_MAX_DIMS);
    tensor->ndim = (uint32_t)json_object_array_length(shape);
    tensor->count = 1;
    for (uint32_t i = 0; i < tensor->ndim; i++) {
        if (!vqkv__st_u64(json_object_array_get_idx(shape, i), &tensor->shape[i]) ||
            __builtin_mul_overflow(tensor->count, tensor->shape[i], &tensor->count))
            return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "tensor %s: bad shape", name);
    }
    if (!json_object_is_type(offsets, json_type_array) || json_object_array_length(offsets) != 2 ||
        !vqkv__st_u64(json_object_array_get_idx(offsets, 0), &begin) ||
        !vqkv__st_u64(json_object_array_get_idx(offsets, 1), &end) || begin > end || end > data_len)
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "tensor %s: data_offsets outside the file",
                             name);
    uint64_t bytes;
    if (__builtin_mul_overflow(tensor->count, vqkv_dtype_size(tensor->dtype), &bytes) ||
        bytes != end - begin)
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT,
                             "tensor %s: %llu bytes of data for its shape and dtype", name,
                             (unsigned long long)(end - begin));
    tensor->name = strdup(name);
    if (tensor->name == NULL)
        return vqkv__st_fail(err, errlen, VQKV_ENOMEM, "out of memory");
    tensor->data = data + begin;
    return VQKV_OK;
}

int vqkv_st_open_buffer(const uint8_t *buf, size_t len, vqkv_st_file_t *file, char *err,
                        size_t errlen)
{
    struct json_tokener *tok = NULL;
    struct json_object *root = NULL;
    uint64_t header_len = 0;
    int rc;

    if (buf == NULL || file == NULL)
        return VQKV_EINVAL;
    memset(file, 0, sizeof *file);
    if (len < 8)
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "file shorter than its 8-byte header");
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | buf[i];
    if (header_len < 2 || header_len > VQKV_ST_MAX_HEADER || header_len > len - 8)
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "header length %llu does not fit the file",
                             (unsigned long long)header_len);

    tok = json_tokener_new();
    if (tok == NULL)
        return vqkv__st_fail(err, errlen, VQKV_ENOMEM, "out of memory");
    root = json_tokener_parse_ex(tok, (const char *)buf + 8, (int)header_len);
    if (root == NULL || json_tokener_get_parse_end(tok) != header_len ||
        !json_object_is_type(root, json_type_object)) {
        rc = vqkv__st_fail(err, errlen, VQKV_EFORMAT, "header is not one JSON object");
        goto out;
    }

    size_t n = (size_t)json_object_object_length(root);
    file->tensors = calloc(n ? n : 1, sizeof *file->tensors);
    if (file->tensors == NULL) {
        rc = vqkv__st_fail(err, errlen, VQKV_ENOMEM, "out of memory");
        goto out;
    }
    const uint8_t *data = buf + 8 + header_len;
    uint64_t data_len = len - 8 - header_len;
    json_object_object_foreach(root, key, val)
    {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        rc =
            vqkv__st_tensor(key, val, data, data_len, &file->tensors[file->n_tensors], err, errlen);
        if (rc != VQKV_OK)
            goto out;
        file->n_tensors++;
    }
    rc = VQKV_OK;
out:
    if (rc != VQKV_OK)
        vqkv_st_close(file);
    json_object_put(root);
    json_tokener_free(tok);
    return rc;
}

int vqkv_st_open(const char *path, vqkv_st_file_t *file, char *err, size_t errlen)
{
    struct stat st;
    if (path == NULL || file == NULL)
        return VQKV_EINVAL;
    memset(file, 0, sizeof *file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return vqkv__st_fail(err, errlen, VQKV_EIO, "%s: cannot open", path);
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        close(fd);
        return vqkv__st_fail(err, errlen, VQKV_EFORMAT, "%s: not a non-empty regular file", path);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return vqkv__st_fail(err, errlen, VQKV_EIO, "%s: cannot map", path);
    int rc = vqkv_st_open_buffer(map, (size_t)st.st_size, file, err, errlen);
    if (rc != VQKV_OK) {
        munmap(map, (size_t)st.st_size);
        return rc;
    }
    file->map = map;
    file->map_len = (size_t)st.st_size;
    return VQKV_OK;
}

void vqkv_st_close(vqkv_st_file_t *file)
{
    if (file == NULL)
        return;
    for (size_t i = 0; i < file->n_tensors; i++)
        free(file->tensors[i].name);
    free(file->tensors);
    if (file->map != NULL)
        munmap(file->map, file->map_len);
    memset(file, 0, sizeof *file);
}

const vqkv_st_tensor_t *vqkv_st_find(const vqkv_st_file_t *file, const char *name)
{
    for (size_t i = 0; i < file->n_tensors; i++)
        if (strcmp(file->tensors[i].name, name) == 0)
            return &file->tensors[i];
    return NULL;
}

void vqkv_st_read_f32(const vqkv_st_tensor_t *tensor, uint64_t first, uint64_t n, float *out)
{
    vqkv_dtype_to_f32(tensor->dtype, tensor->data + first * vqkv_dtype_size(tensor->dtype), n, out);
}
