/* backend_cpu.c -- vqkvd's CPU backend: worker KV memory shared as a
 * memfd, mapped into the daemon, and the CPU codecs of kernels/ run on
 * libuv's thread-pool threads: a put block after block, a get as batches
 * layer by layer; a large request split by layers over several threads.
 *
 * A region is a memfd; a CUDA region is refused (VQKV_EDEVICE): no GPU here.
 * A memfd is sealed against shrinking before it is mapped: a worker that
 * truncated it under the mapping would turn the daemon's next read into
 * SIGBUS. Growing stays allowed; the mapping covers region_bytes only.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "backend.h"

static int vqkvd__cpu_region_open(vqkvd_backend_t *be, const Vqkv__RegisterRegion *rr,
                                  const int *fds, size_t n_fds, const uint64_t *pieces,
                                  size_t n_pieces, vqkvd_region_mem_t *mem, char *why,
                                  size_t why_size)
{
    (void)be;
    (void)n_fds;  /* one, for a MEMFD region: vqkvd_region_payload_check */
    (void)pieces; /* none: RegionPieces are refused without piece_import */
    (void)n_pieces;
    if (rr->kind != VQKV__REGION_KIND__REGION_KIND_MEMFD) {
        char gpu[VQKVD_GPU_UUID_TEXT];
        vqkvd_gpu_uuid_format(rr->gpu_uuid.data, gpu);
        snprintf(why, why_size,
                 "%s: this vqkvd runs the cpu backend and owns no GPU; a CUDA region needs "
                 "vqkvd started with --device auto or cuda:N on that GPU's node",
                 gpu);
        return VQKV_EDEVICE;
    }
    int fd = fds[0];
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(why, why_size, "the fd is not a memfd");
        return VQKV_EMAP;
    }
    if (rr->region_bytes > (uint64_t)st.st_size) {
        snprintf(why, why_size, "the region is larger than the memfd");
        return VQKV_ERANGE;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) < 0) {
        snprintf(why, why_size,
                 "cannot seal the memfd against shrinking; create it with MFD_ALLOW_SEALING");
        return VQKV_EMAP;
    }
    void *base = mmap(NULL, rr->region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        snprintf(why, why_size, "%s",
                 errno == ENOMEM ? "mmap: out of address space or memory" : "mmap refused");
        return VQKV_EMAP;
    }
    /* The mapping keeps the memory; the caller's frame closes the fd. */
    mem->base = base;
    mem->bytes = rr->region_bytes;
    mem->device = 0;
    return VQKV_OK;
}

static void vqkvd__cpu_region_close(vqkvd_backend_t *be, vqkvd_region_mem_t *mem)
{
    (void)be;
    munmap(mem->base, mem->bytes);
    mem->base = NULL;
}

/* The runs of blocks between NULL dsts (blocks already held) encoded as
 * one batch each (an empty run is a batch of none): layer by layer, so a
 * layer's codebooks are read once for the run. */
static int vqkvd__cpu_encode(vqkvd_backend_t *be, vqkvd_batch_t *b)
{
    (void)be;
    for (uint32_t i = 0, end; i < b->n; i = end + 1) {
        for (end = i; end < b->n && b->dst[end] != NULL; end++)
            ;
        int rc = vqkv_codec_encode_batch(b->codec, b->base, b->view, b->slots + i, b->dst + i,
                                         end - i, b->first_layer, b->end_layer);
        if (rc != VQKV_OK) {
            b->failed = i;
            return rc;
        }
    }
    return VQKV_OK;
}

/* Runs of blocks with one codec (blocks stored before a model's codebooks
 * were ready have their fp16 fallback) decoded as one batch each: layer
 * by layer, so a layer's codebooks are read once for the run. */
static int vqkvd__cpu_decode(vqkvd_backend_t *be, vqkvd_batch_t *b)
{
    (void)be;
    for (uint32_t i = 0, end; i < b->n; i = end) {
        for (end = i + 1; end < b->n && b->codecs[end] == b->codecs[i]; end++)
            ;
        int rc = vqkv_codec_decode_batch(b->codecs[i], b->src + i, b->base, b->view, b->slots + i,
                                         end - i, b->first_layer, b->end_layer);
        if (rc != VQKV_OK) {
            b->failed = i;
            return rc;
        }
    }
    return VQKV_OK;
}

static int vqkvd__cpu_block_read(vqkvd_backend_t *be, const uint8_t *slot, size_t bytes, void *host)
{
    (void)be;
    memcpy(host, slot, bytes);
    return VQKV_OK;
}

static int vqkvd__cpu_block_write(vqkvd_backend_t *be, uint8_t *slot, const void *host,
                                  size_t bytes)
{
    (void)be;
    memcpy(slot, host, bytes);
    return VQKV_OK;
}

/* The codecs run on the host copy: nothing to upload. */
static int vqkvd__cpu_codebooks_ready(vqkvd_backend_t *be, const vqkv_codec_t *codec)
{
    (void)be;
    (void)codec;
    return VQKV_OK;
}

static void vqkvd__cpu_destroy(vqkvd_backend_t *be)
{
    free(be);
}

static const vqkvd_backend_ops_t vqkvd__cpu_ops = {
    .name = "cpu",
    .region_open = vqkvd__cpu_region_open,
    .region_close = vqkvd__cpu_region_close,
    .piece_import = NULL,
    .piece_release = NULL,
    .encode = vqkvd__cpu_encode,
    .decode = vqkvd__cpu_decode,
    .block_read = vqkvd__cpu_block_read,
    .block_write = vqkvd__cpu_block_write,
    .whole_blocks = false,
    .events = false,
    .host_regions = true,
    .finish = NULL,
    .codebooks_ready = vqkvd__cpu_codebooks_ready,
    .assigner = NULL,
    .destroy = vqkvd__cpu_destroy,
};

/* Stateless: the instance is its table of functions. */
int vqkvd_backend_cpu_create(vqkvd_backend_t **be)
{
    *be = malloc(sizeof **be);
    if (*be == NULL)
        return VQKV_ENOMEM;
    (*be)->ops = &vqkvd__cpu_ops;
    (*be)->devices = NULL;
    (*be)->n_devices = 0;
    return VQKV_OK;
}
