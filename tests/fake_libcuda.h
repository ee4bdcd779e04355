/* fake_libcuda.h -- what a test tells the fake CUDA driver
 * (fake_libcuda.c): the device memory it pretends to have. A test reaches
 * these through dlsym on the library VQKV_LIBCUDA names, the same copy
 * libvqkv loads.
 */
#ifndef VQKV_TEST_FAKE_LIBCUDA_H
#define VQKV_TEST_FAKE_LIBCUDA_H

#include <dlfcn.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* cuDeviceGetUuid's answer. */
#define FAKE_CUDA_UUID "\x10\x32\x54\x76\x98\xba\xdc\xfe\x01\x23\x45\x67\x89\xab\xcd\xef"

typedef struct {
    int legacy;                        /* 1: one cudaMalloc allocation of piece_bytes at base */
    uint64_t base;                     /* the first piece's address */
    uint64_t piece_bytes;              /* VMM: each piece's size */
    uint64_t n_pieces;                 /* VMM: how many are mapped from base on */
    uint64_t reserved, reserved_bytes; /* VMM: the reservation holding them */
    int fail_export_at;                /* the export that fails (0-based), or -1 */
} fake_cuda_memory_t;

/* VMM memory of n pieces of piece_bytes from base, one piece into a
 * reservation twice as large as what is mapped (an expandable segment's
 * start is rarely a tensor's). */
static inline fake_cuda_memory_t fake_cuda_vmm(uint64_t base, uint64_t piece_bytes, uint64_t n,
                                               int fail_export_at)
{
    return (fake_cuda_memory_t){.legacy = 0,
                                .base = base,
                                .piece_bytes = piece_bytes,
                                .n_pieces = n,
                                .reserved = base - piece_bytes,
                                .reserved_bytes = 2 * n * piece_bytes,
                                .fail_export_at = fail_export_at};
}

/* Describes the memory; counts start again from 0. */
void fake_cuda_setup(const fake_cuda_memory_t *mem);
/* fds exported since the setup, and handles retained and not released. */
void fake_cuda_counts(int *exports, int *retained);
typedef void (*fake_cuda_setup_fn)(const fake_cuda_memory_t *mem);
typedef void (*fake_cuda_counts_fn)(int *exports, int *retained);

/* The two functions above in the fake driver VQKV_LIBCUDA names: the same
 * copy libvqkv loads, so the setup holds for it. False (dlerror says why)
 * when the library or a function is missing. */
static inline bool fake_cuda_open(fake_cuda_setup_fn *setup, fake_cuda_counts_fn *counts)
{
    const char *path = getenv("VQKV_LIBCUDA");
    void *lib = path != NULL ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
    *setup = lib != NULL ? (fake_cuda_setup_fn)dlsym(lib, "fake_cuda_setup") : NULL;
    *counts = lib != NULL ? (fake_cuda_counts_fn)dlsym(lib, "fake_cuda_counts") : NULL;
    return *setup != NULL && *counts != NULL;
}

#endif
