/* safetensors.h -- a read-only view of a safetensors file.
 *
 * The file is mapped, its JSON header parsed and every tensor's dtype,
 * shape and byte range checked against the file before anything is handed
 * out, so callers may index tensors without further checks. F16, BF16 and
 * F32 tensors are supported: the KV dumps vqkv evaluates use nothing else.
 */
#ifndef VQKV_SAFETENSORS_H
#define VQKV_SAFETENSORS_H

#include "vqkv_codec.h"

#include <stddef.h>
#include <stdint.h>

#define VQKV_ST_MAX_DIMS 8

typedef struct {
    char *name;
    vqkv_dtype_t dtype;
    uint32_t ndim;
    uint64_t shape[VQKV_ST_MAX_DIMS];
    uint64_t count; /* elements */
    const uint8_t *data;
} vqkv_st_tensor_t;

typedef struct {
    void *map;
    size_t map_len;
    vqkv_st_tensor_t *tensors;
    size_t n_tensors;
} vqkv_st_file_t;

/* Opens path. On failure returns VQKV_EIO or VQKV_EFORMAT and writes a
 * readable reason to err. */
int vqkv_st_open(const char *path, vqkv_st_file_t *file, char *err, size_t errlen);

/* The same, over bytes in memory (kept by the caller while file is open). */
int vqkv_st_open_buffer(const uint8_t *buf, size_t len, vqkv_st_file_t *file, char *err,
                        size_t errlen);

void vqkv_st_close(vqkv_st_file_t *file);

/* The tensor called name, or NULL. O(n) over the tensors. */
const vqkv_st_tensor_t *vqkv_st_find(const vqkv_st_file_t *file, const char *name);

/* Converts the elements [first, first + n) of tensor to float. */
void vqkv_st_read_f32(const vqkv_st_tensor_t *tensor, uint64_t first, uint64_t n, float *out);

#endif
