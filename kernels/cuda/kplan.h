/* kplan.h -- a codec and a batch of blocks as the GPU kernels see them.
 *
 * The GPU kernels never touch a vqkv_codec_t: the host turns one into a
 * vqkv_kplan_t (plain data: the codec's kind, parameters, branches and
 * channel maps) plus one float array of codebooks, copies both to the
 * device once, and describes each request as a vqkv_kbatch_t: the blocks'
 * compressed bytes in a store, the worker's slots in its paged cache, and
 * the view that maps slots to bytes. The kernel bodies (kbody.h) read only
 * these, so the CPU emulator in the tests and the GPU run the very same
 * code over the very same inputs.
 *
 * A launch runs one "unit" of work per thread. Units are numbered block by
 * block, layer by layer, K part then V part, so one launch covers a whole
 * request batch (every block, every layer); what a unit is depends on the
 * kernel and the codec (kbody.h). Every index a unit derives is inside the
 * batch because vqkv_kbatch_check has held every slot and block offset to
 * the region and the store before any launch.
 *
 * Errors are the negative VQKV_E* codes of vqkv_codec.h.
 */
#ifndef VQKV_KPLAN_H
#define VQKV_KPLAN_H

#include "../numeric.h"
#include "vqkv_codec.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    VQKV_KIND_FP16 = 0,
    VQKV_KIND_FP8 = 1,
    VQKV_KIND_KIVI = 2,
    VQKV_KIND_VQ = 3,
} vqkv_kind_t;

/* One VQ branch (kernels/README.md): channels chan[n_channels] in branch
 * order, groups of d, `stages` residual codebooks of 2^bits words each. */
typedef struct {
    uint32_t n_channels;
    uint32_t d;
    uint32_t stages;
    uint32_t groups;
    uint32_t first_code;   /* this branch's first code in a vector's codes */
    uint32_t first_group;  /* this branch's first group among its side's */
    uint64_t first_word;   /* codewords of the side before this branch's, per set layer */
    uint64_t first_wfloat; /* codeword floats of the side before this branch's, per set layer */
    uint16_t chan[VQKV_MAX_HEAD_DIM];
} vqkv_kbranch_t;

typedef struct {
    uint32_t n_branches;
    uint32_t codes;   /* codes per token-head vector */
    uint32_t groups;  /* groups over all branches */
    uint64_t words;   /* codewords per set layer */
    uint64_t wfloats; /* codeword floats per set layer */
    vqkv_kbranch_t br[2];
} vqkv_kside_t;

/* The books array a plan indexes (floats): every codeword, expanded for
 * commutative branches, [set layer][K, V][branch][group][stage][2^b][d];
 * at norms_at each codeword's squared norm in the same order; at stats_at
 * the channel statistics [layer][K, V][head]{mean[D], scale[D]}. */
typedef struct {
    vqkv_kind_t kind;
    vqkv_layout_t layout;
    uint64_t part_bytes[2];
    uint64_t block_bytes;
    uint32_t bits;  /* code bits: KIVI's 2 or 4, VQ's b */
    uint32_t group; /* KIVI value channels per group */
    /* VQ only. */
    uint32_t sets; /* codebook sets per layer: 1, or one per kv head */
    uint32_t channel_scale;
    uint32_t block_center;
    uint32_t escapes;
    vqkv_kside_t side[2];
    uint64_t norms_at;
    uint64_t stats_at;
    uint64_t book_floats; /* the whole array, 0 for codecs without codebooks */
} vqkv_kplan_t;

/* The kernels of a batch, launched in this order for an encode. */
typedef enum {
    VQKV_KERNEL_DECODE = 0,
    VQKV_KERNEL_ENCODE_PREP = 1, /* VQ block means and escapes, one unit per part */
    VQKV_KERNEL_ENCODE = 2,
} vqkv_kernel_t;

/* One launch. Pointers are device pointers on the GPU, host pointers in
 * the emulator; the struct itself is passed by value. */
typedef struct {
    const vqkv_kplan_t *plan;
    const float *books;
    uint8_t *store;           /* compressed blocks (read by decode, written by encode) */
    const uint64_t *store_at; /* byte offset in store of each block */
    uint8_t *worker;          /* the region's base: view.offset is added to it */
    const uint32_t *slots;    /* each block's slot in the view */
    vqkv_kv_view_t view;
    uint32_t n_blocks;
    uint32_t units[2]; /* units of one (layer, K) and one (layer, V) part */
    uint64_t total;    /* units in the launch */
    vqkv_kind_t kind;  /* a copy of plan->kind, known on the host */
} vqkv_kbatch_t;

/* One k-means assignment step (kmeans.h's vqkv_assigner): point i of
 * x[n][d] gets the nearest of centroids[k][d], norms[k] their squared
 * norms. One unit per point. */
typedef struct {
    const float *x;
    const float *centroids;
    const float *norms;
    uint32_t *assign;
    float *mind;
    uint64_t n;
    uint32_t d;
    uint32_t k;
} vqkv_kassign_t;

/* How a batch is launched: grid x block threads, shared bytes. */
typedef struct {
    uint32_t grid;
    uint32_t block;
    size_t shared;
} vqkv_kgeom_t;

/* Threads per block of every kernel: enough warps to hide latency, few
 * enough that a small batch still spreads over the SMs. */
#define VQKV_KERNEL_THREADS 128u

/* Channels one decode unit of a codec without codebooks writes. */
#define VQKV_KDECODE_CHANNELS 8u

/* Vectors one encode unit codes in a row so that it owns whole bytes of a
 * code stream of bits_per_vector bits a vector: 8 / gcd(bits_per_vector, 8).
 * Host and kernel bodies both use it. */
VQKV_HD uint32_t vqkv_kplan_run(uint64_t bits_per_vector)
{
    uint32_t aligned = 8;
    while (bits_per_vector % aligned != 0)
        aligned /= 2;
    return 8 / aligned;
}

/* Fills *plan from a codec whose codebooks are in place and, for codecs
 * with codebooks, sets *books to a malloc'd array of plan->book_floats
 * floats (NULL otherwise). VQKV_ENOCODEBOOK before training. */
int vqkv_kplan_build(const vqkv_codec_t *codec, vqkv_kplan_t *plan, float **books);

/* Checks a request before anything is launched: every slot inside the
 * view's region (vqkv_kv_view_check), every block's bytes inside a store of
 * store_bytes, an offset and strides that are multiples of the element
 * size, no layer_offsets (not on the GPU yet), n_blocks > 0 and a launch
 * that fits one grid. VQKV_OK, VQKV_ERANGE
 * or VQKV_EINVAL. Host arrays. */
int vqkv_kbatch_check(const vqkv_kplan_t *plan, const vqkv_kv_view_t *view, const uint32_t *slots,
                      const uint64_t *store_at, uint32_t n_blocks, uint64_t store_bytes);

/* Sets batch->units, batch->total and batch->kind for `kernel` from the
 * host copy of the plan (batch->n_blocks must be set); returns the launch
 * geometry, grid 0 when the kernel has nothing to do for this codec. */
vqkv_kgeom_t vqkv_kbatch_prepare(vqkv_kbatch_t *batch, const vqkv_kplan_t *plan,
                                 vqkv_kernel_t kernel);

/* The geometry of an assignment step over n points. */
vqkv_kgeom_t vqkv_kassign_geometry(uint64_t n);

#ifdef __cplusplus
}
#endif

#endif
