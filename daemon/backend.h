/* backend.h -- what differs between vqkvd's CPU and CUDA backends, behind
 * one table of functions.
 *
 * The session layer (session.c) checks every request, owns the handles,
 * leases and the store, and never touches worker memory or runs a codec
 * itself. It asks the backend for three things: to open the worker memory a
 * RegisterRegion names (CPU: seal and map a memfd; CUDA: open an IPC handle
 * or import a VMM fd), to run one request's batch of encodes or decodes (on
 * a libuv thread-pool thread: the CPU backend runs the codec there, block
 * by block; a CUDA backend launches one kernel for the batch on its stream
 * and waits for it or records an event), and to close a region once the
 * last job using it has finished. Where compressed blocks live is the
 * pool's arena (pool.h), which the backend supplies: one factory,
 * vqkvd_backend_create, keyed on the configured device, makes both. A
 * backend is an instance with a lifecycle: created from the configuration,
 * told when a model's codebooks are final (a device backend uploads them
 * then), destroyed after the pool.
 *
 * A batch names its blocks by slot; the session has checked every slot
 * against the region's view before the backend sees it.
 */
#ifndef VQKVD_BACKEND_H
#define VQKVD_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pool.h"
#include "vqkv_codec.h"
#include "vqkv_proto.h"

/* Worker memory a backend opened. */
typedef struct {
    uint8_t *base;   /* where view offsets start (CPU: the host mapping; CUDA: a device address) */
    size_t bytes;    /* the region's size, all of it reachable from base */
    bool vmm;        /* CUDA: VMM pieces mapped at base by us; else an IPC mapping */
    uint32_t device; /* CUDA: which of the backend's devices holds it; 0 on the CPU */
} vqkvd_region_mem_t;

/* A GPU a backend serves, for Welcome.devices and the logs. */
typedef struct {
    char name[256];   /* "NVIDIA H100 80GB HBM3" */
    uint8_t uuid[16]; /* cuDeviceGetUuid's */
    uint64_t pool_bytes;
} vqkvd_device_t;

/* Bytes of a cudaIpcEventHandle_t, a worker's event in a Put or a Get. */
#define VQKVD_EVENT_BYTES 64

/* One request's blocks. Encode reads slots[i] of the view at base into
 * dst[i] with codec, skipping blocks whose dst is NULL (present already,
 * or refused); decode writes src[i] into slots[i] with codecs[i] (blocks
 * stored before a model's codebooks were ready decode with its fp16
 * fallback). dst and src are pool slots: addresses in the backend's own
 * arena (pool.h), resolved on the loop, so the bytes go straight between
 * the worker's memory and the pool. */
typedef struct {
    uint8_t *base;
    uint32_t device; /* the region's (vqkvd_region_mem_t.device): where the work runs */
    const vqkv_kv_view_t *view;
    const uint32_t *slots;
    uint32_t n;
    /* Only layers [first_layer, end_layer) of each block: a request split
     * over threads. */
    uint32_t first_layer, end_layer;
    /* encode */
    const vqkv_codec_t *codec;
    uint8_t *const *dst;
    /* decode */
    const vqkv_codec_t *const *codecs;
    const uint8_t *const *src;
    /* set by the backend on failure: the block that failed, and what the
     * device said ("cudaErrorIllegalAddress"; empty when the code says it) */
    uint32_t failed;
    char why[96];
    /* A worker's interprocess event (64 bytes; backends with events only),
     * or NULL. Encode waits on wait_event before reading. Decode records
     * record_event after the last write and returns without waiting, the
     * work left in *pending for finish. */
    const uint8_t *wait_event;
    const uint8_t *record_event;
    void *pending;
} vqkvd_batch_t;

typedef struct vqkvd_backend vqkvd_backend_t;

/* What a backend does. Every function gets its instance. */
typedef struct {
    const char *name; /* Welcome.backend */
    /* On the loop: opens the memory of rr (its view already checked
     * against rr->region_bytes) from the kinds of region and the fds the
     * backend takes: what a region must carry is the backend's rule alone.
     * A CUDA_VMM_FD region comes as its n_pieces pieces, every one
     * imported already, in address order (piece_import: those of
     * RegionPieces and of the frame; the caller lets them go after,
     * whatever the answer); fds are the frame's. VQKV_OK, or an error
     * with why (a message for the client) filled. */
    int (*region_open)(vqkvd_backend_t *be, const Vqkv__RegisterRegion *rr, const int *fds,
                       size_t n_fds, const uint64_t *pieces, size_t n_pieces,
                       vqkvd_region_mem_t *mem, char *why, size_t why_size);
    /* On the loop: imports the VMM allocation exported as fd (the fd stays
     * the caller's) into *piece, for region_open: the session imports every
     * piece of a CUDA_VMM_FD region, from RegionPieces and from the
     * RegisterRegion's own frame. NULL for a backend without GPU memory
     * (which refuses such regions). VQKV_OK, or an error with why filled. */
    int (*piece_import)(vqkvd_backend_t *be, int fd, uint64_t *piece, char *why, size_t why_size);
    /* Lets go of a piece from piece_import; a region mapped from it keeps
     * its memory until region_close. */
    void (*piece_release)(vqkvd_backend_t *be, uint64_t piece);
    /* Once no job uses the region any more. */
    void (*region_close)(vqkvd_backend_t *be, vqkvd_region_mem_t *mem);
    /* On a thread-pool thread; VQKV_OK or the first block's error. */
    int (*encode)(vqkvd_backend_t *be, vqkvd_batch_t *b);
    int (*decode)(vqkvd_backend_t *be, vqkvd_batch_t *b);
    /* Copies a stored block between its slot and host memory, for the
     * work that runs the CPU codecs on stored bytes (calibration samples,
     * re-encoding the fp16 fallback's blocks). Any thread; VQKV_OK or an
     * error. */
    int (*block_read)(vqkvd_backend_t *be, const uint8_t *slot, size_t bytes, void *host);
    int (*block_write)(vqkvd_backend_t *be, uint8_t *slot, const void *host, size_t bytes);
    /* true: a batch covers whole blocks (one launch for every layer), so
     * the session does not split a request by layers over threads. */
    bool whole_blocks;
    /* true: batches may carry a worker's events (the CUDA backend). */
    bool events;
    /* true: regions are host memory the thread pool may copy with memcpy,
     * so puts may be staged (staging.h): the CPU backend. */
    bool host_regions;
    /* On a thread-pool thread: waits for a decode a batch left pending
     * (record_event) and frees what it held. NULL without events. */
    void (*finish)(vqkvd_backend_t *be, void *pending);
    /* On the loop, once for each codec whose codebooks have become final
     * (loaded, received or trained), before any block is encoded with
     * them: a device backend uploads them. The host copy stays the
     * reference. VQKV_OK or an error (the model then stays on its fp16
     * fallback). */
    int (*codebooks_ready)(vqkvd_backend_t *be, const vqkv_codec_t *codec);
    /* On a thread-pool thread about to train codebooks: where k-means runs
     * its assignment steps there (the GPU made current on that thread), or
     * NULL for the CPU. */
    const vqkv_assigner_t *(*assigner)(vqkvd_backend_t *be);
    /* After the last region closed and the pool is gone. */
    void (*destroy)(vqkvd_backend_t *be);
} vqkvd_backend_ops_t;

/* A backend instance; a backend with state of its own embeds this first. */
struct vqkvd_backend {
    const vqkvd_backend_ops_t *ops;
    const vqkvd_device_t *devices; /* the GPUs served, n_devices of them; none on the CPU */
    uint32_t n_devices;
};

/* Whether rr's payload has the shape its kind asks for, whatever the
 * backend: one fd with MEMFD, none with CUDA_IPC, and with CUDA_VMM_FD 1
 * to VQKV_FRAME_MAX_FDS that with the n_held pieces of earlier
 * RegionPieces make one a piece (VQKV_EFDS; pieces held for any other kind
 * too); a 64-byte cuda_ipc_handle with CUDA_IPC only, a 16-byte gpu_uuid
 * with the CUDA kinds only, device 0, piece_bytes with CUDA_VMM_FD only,
 * at most VQKV_REGION_MAX_PIECES of them, none 0, adding up to
 * region_bytes (VQKV_EINVAL). VQKV_OK, or the code with why filled.
 * Checked before region_open, so a malformed payload reads the same to a
 * CPU and to a CUDA daemon. */
int vqkvd_region_payload_check(const Vqkv__RegisterRegion *rr, size_t n_fds, size_t n_held,
                               char *why, size_t why_size);

/* A GPU's UUID as nvidia-smi -L writes it, "GPU-xxxxxxxx-xxxx-xxxx-xxxx-
 * xxxxxxxxxxxx", for messages and logs. */
#define VQKVD_GPU_UUID_TEXT 41
void vqkvd_gpu_uuid_format(const uint8_t uuid[16], char out[VQKVD_GPU_UUID_TEXT]);

/* Whether this vqkvd can serve device ("cpu", "auto" or
 * "cuda:N[,cuda:M...]"): VQKV_OK, or VQKV_EINVAL with why filled ("this
 * vqkvd has no CUDA backend; use --device cpu", "this machine has 1 CUDA
 * device"). Counts the GPUs but opens none: --check-config asks it. */
int vqkvd_backend_check(const char *device, char *why, size_t why_size);

/* The factory: creates the backend of device and the arena of arena_bytes
 * in chunks of chunk_bytes it supplies the pool with (pool.h: the pool owns
 * the arena from vqkvd_pool_init on). VQKV_OK; VQKV_EINVAL (a device this
 * vqkvd cannot serve, bad sizes) or VQKV_ENOMEM, with why filled and
 * nothing left open. */
int vqkvd_backend_create(const char *device, uint64_t arena_bytes, uint64_t chunk_bytes,
                         vqkvd_backend_t **be, vqkvd_arena_t *arena, char *why, size_t why_size);

/* Host memory: memfd regions, codecs run on the calling thread. */
int vqkvd_backend_cpu_create(vqkvd_backend_t **be);

/* vqkvd built with CUDA only (VQKVD_CUDA): the backend of the n GPUs
 * ordinals names (1 .. VQKVD_MAX_GPUS, distinct and present: the factory
 * passes only a list vqkvd_backend_check accepts) with its arena of
 * arena_bytes in their memory, split evenly (one address range over pieces
 * of at most VQKVD_CUDA_MAX_ALLOC: cuda_store.h), carved into chunk_bytes
 * chunks. VQKV_OK, VQKV_EINVAL (n out of range, GPUs without peer access
 * to each other, sizes), VQKV_ENOMEM or VQKV_EDEVICE, with why filled and
 * nothing left allocated. */
#define VQKVD_CUDA_MAX_ALLOC (64ull << 30)
int vqkvd_backend_cuda_create(const int *ordinals, uint32_t n, uint64_t arena_bytes,
                              uint64_t chunk_bytes, vqkvd_backend_t **be, vqkvd_arena_t *arena,
                              char *why, size_t why_size);
/* GPUs this process sees; 0 without a driver, a device, or CUDA support. */
int vqkvd_backend_cuda_count(void);

#endif
