/* backend.c -- the backend factory (backend.h): the configured device
 * names the backend, and the backend supplies the pool's arena. Only the
 * CPU backend is built into vqkvd so far, so "auto" means the CPU and
 * "cuda:N" is refused with a message that says so; a CUDA backend adds its
 * case here and nowhere else.
 */
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "log.h"

int vqkvd_backend_check(const char *device, char *why, size_t why_size)
{
    if (device == NULL || strcmp(device, "cpu") == 0 || strcmp(device, "auto") == 0)
        return VQKV_OK;
    snprintf(why, why_size, "device %s: this vqkvd has no CUDA backend; use --device cpu", device);
    return VQKV_EINVAL;
}

int vqkvd_backend_create(const char *device, uint64_t arena_bytes, uint64_t chunk_bytes,
                         vqkvd_backend_t **be, vqkvd_arena_t *arena, char *why, size_t why_size)
{
    *be = NULL;
    int rc = vqkvd_backend_check(device, why, why_size);
    if (rc != VQKV_OK)
        return rc;
    if (device != NULL && strcmp(device, "auto") == 0)
        vqkvd_log(VQKVD_LOG_INFO, "device auto: no CUDA backend is built in; using the CPU");
    rc = vqkvd_arena_init_cpu(arena, arena_bytes, chunk_bytes);
    if (rc != VQKV_OK) {
        snprintf(why, why_size, "cannot make a pool of %llu bytes: %s%s",
                 (unsigned long long)arena_bytes, vqkv_strerror(rc),
                 rc == VQKV_ENOMEM ? " (lower pool_bytes, or raise the memory limit)" : "");
        return rc;
    }
    rc = vqkvd_backend_cpu_create(be);
    if (rc != VQKV_OK) {
        arena->ops->free_all(arena);
        snprintf(why, why_size, "cannot make the cpu backend: %s", vqkv_strerror(rc));
    }
    return rc;
}
