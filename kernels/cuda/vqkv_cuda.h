/* vqkv_cuda.h -- the codecs on a CUDA device: blocks decoded straight into a
 * worker's paged KV cache in GPU memory, and encoded straight out of it.
 *
 * A vqkv_cuda_codec_t is a codec's kernel plan and codebooks copied to the
 * current device once (vqkv_cuda_codec_create). A vqkv_cuda_job_t is a
 * stream plus the device scratch that carries one request's slot and block
 * lists; requests on one job run in order on its stream, jobs on different
 * streams run concurrently, and a job must not be used by two threads at
 * once. Each request is ONE kernel launch (two for an encode whose codec
 * has block means or escapes) over every block, layer and side it names.
 *
 * Before anything is copied or launched, every slot is checked against the
 * view (vqkv_kv_view_check) and every block's bytes against the store, so
 * a bad index from a client is refused with VQKV_ERANGE and no byte moves.
 * Calls return once the work is queued on the job's stream; the slot and
 * offset arrays may be reused as soon as they return. Synchronize the
 * stream (or record an event) before reading what a request wrote.
 *
 * Pointers named `device` are device memory the caller owns; the
 * worker's region may be memory opened through CUDA IPC. Errors are
 * negative VQKV_E* codes; VQKV_EDEVICE when a CUDA call fails (the
 * CUDA error string is kept for vqkv_cuda_last_error).
 */
#ifndef VQKV_CUDA_H
#define VQKV_CUDA_H

#include "vqkv_codec.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct vqkv_cuda_codec vqkv_cuda_codec_t;
typedef struct vqkv_cuda_job vqkv_cuda_job_t;

/* CUDA devices this process can use; 0 without a driver or a device. */
int vqkv_cuda_device_count(void);

/* The text of the last CUDA error this thread's calls met, or "". */
const char *vqkv_cuda_last_error(void);

/* Copies codec's kernel plan and codebooks to the current device. The
 * codec must have its codebooks (VQKV_ENOCODEBOOK otherwise); it is not
 * referenced afterwards. */
int vqkv_cuda_codec_create(const vqkv_codec_t *codec, vqkv_cuda_codec_t **out);
void vqkv_cuda_codec_free(vqkv_cuda_codec_t *codec);

/* A job on `stream` (a cudaStream_t; NULL for the per-thread default
 * stream) for requests of up to max_blocks blocks. */
int vqkv_cuda_job_create(void *stream, uint32_t max_blocks, vqkv_cuda_job_t **out);
/* Waits for the job's work, then frees it. */
void vqkv_cuda_job_free(vqkv_cuda_job_t *job);
/* Waits until every request queued on the job has finished. */
int vqkv_cuda_job_sync(vqkv_cuda_job_t *job);

/* Decodes blocks i < n_blocks, whose compressed bytes start at
 * store_device + store_at[i] (a store of store_bytes), into slot slots[i]
 * of the view at worker_device. store_at and slots are host arrays. */
int vqkv_cuda_decode(vqkv_cuda_job_t *job, const vqkv_cuda_codec_t *codec,
                     const uint8_t *store_device, uint64_t store_bytes, const uint64_t *store_at,
                     void *worker_device, const vqkv_kv_view_t *view, const uint32_t *slots,
                     uint32_t n_blocks);

/* Encodes slot slots[i] of the view at worker_device into
 * store_device + store_at[i], for i < n_blocks. */
int vqkv_cuda_encode(vqkv_cuda_job_t *job, const vqkv_cuda_codec_t *codec, uint8_t *store_device,
                     uint64_t store_bytes, const uint64_t *store_at, const void *worker_device,
                     const vqkv_kv_view_t *view, const uint32_t *slots, uint32_t n_blocks);

/* k-means on the GPU, for vqkv_train_opts_t.assigner: each assignment step
 * of codebook training runs on the device that is current on the training
 * thread when it runs, on that thread's default stream; the codebooks are
 * the CPU's (the step gives the CPU's assignments). NULL without a device. */
const vqkv_assigner_t *vqkv_cuda_assigner(void);

#ifdef __cplusplus
}
#endif

#endif
