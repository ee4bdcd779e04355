/* vqkv_codec.h -- the codec interface every vqkv block passes through.
 *
 * A codec turns one KV block (block_tokens tokens x all layers x K and V x
 * all kv heads x head_dim) into a fixed number of bytes and back. Blocks are
 * read straight out of, and written straight into, the worker's own paged KV
 * memory, described by a vqkv_kv_view_t of byte strides: there is no dense
 * intermediate copy on either path. The compressed byte layout of every codec
 * is documented in kernels/README.md; a GPU implementation decodes the same
 * bytes to the same values.
 *
 * Codecs are named by spec strings, "name" or "name:key=value,key=value":
 *   fp16                 passthrough, bit-exact for fp16 memory
 *   fp8                  e4m3 with one fp16 scale per token-head
 *   kivi2[:g=32]         KIVI: keys per channel over the block's tokens,
 *   kivi4[:g=32]         values per token in groups of g channels
 *   rvq[:d=8,r=2,dv=d,rv=r,kgroup=strided|contig]
 *                        residual VQ: r stages of 2^b-entry codebooks over
 *                        groups of d channels, per (layer, K|V); values
 *                        with dv, rv (attention is more sensitive to key
 *                        error, so keys may take more of the bits)
 *   vqkv[:dlo=4,dhi=8,dv=4]
 *                        product VQ with separate branches (own norm, own
 *                        codebooks, own sub-vector size) for the low- and
 *                        high-frequency RoPE subspaces of keys
 *   commvq[:d=8,r=2,dv=8,rv=2,rope=neox|inter]
 *                        keys coded by r stages of RoPE-commutative
 *                        codebooks over groups of d/2 RoPE pairs (EM-trained),
 *                        values as rvq with dv, rv
 *   the VQ codecs also take b=8 (code bits), esc=0 (outlier vectors per
 *   part kept in fp8), bc=0 (per-block key channel means), cs=0 (channel
 *   standardization), ph=0 (codebooks per kv head); kernels/README.md says
 *   what each costs and buys.
 * VQ codecs need codebooks: train them (vqkv_codec_train) or load them
 * (vqkv_codebook_load) before encoding.
 *
 * Thread safety: a codec is immutable once its codebooks are in place;
 * encode and decode may then run from any number of threads at once.
 * Training and loading must not race with anything else on the same codec.
 *
 * Errors are negative VQKV_E* codes; vqkv_strerror() names them.
 */
#ifndef VQKV_CODEC_H
#define VQKV_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    VQKV_OK = 0,
    VQKV_EINVAL = -1,      /* an argument is out of its domain */
    VQKV_ESPEC = -2,       /* codec spec not understood */
    VQKV_ERANGE = -3,      /* a slot or stride reaches outside the region */
    VQKV_ENOMEM = -4,      /* allocation failed */
    VQKV_ENOCODEBOOK = -5, /* VQ codec used before training or loading */
    VQKV_EIO = -6,         /* a file could not be read or written */
    VQKV_EFORMAT = -7,     /* file malformed, truncated or checksum wrong */
    VQKV_EMISMATCH = -8,   /* layout or codec differs from the model's, region's or file's */
    VQKV_EDEVICE = -9,     /* no CUDA device, or a CUDA call failed */
};

/* A static string naming err; never NULL. */
const char *vqkv_strerror(int err);

typedef enum {
    VQKV_DTYPE_F16 = 0,
    VQKV_DTYPE_BF16 = 1,
    VQKV_DTYPE_F32 = 2,
} vqkv_dtype_t;

/* Bytes of one element of dtype, 0 for an unknown dtype. */
size_t vqkv_dtype_size(vqkv_dtype_t dtype);

/* Converts n elements of dtype at src (any alignment) to float, and back
 * with round-to-nearest-even. */
void vqkv_dtype_to_f32(vqkv_dtype_t dtype, const void *src, size_t n, float *dst);
void vqkv_dtype_from_f32(vqkv_dtype_t dtype, const float *src, size_t n, void *dst);

/* The model's KV shape as one worker sees it. */
typedef struct {
    uint32_t num_layers;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t block_tokens;
    vqkv_dtype_t dtype;
} vqkv_layout_t;

/* Checks every field: VQKV_OK or VQKV_EINVAL. head_dim must be even (RoPE
 * pairs) and at most VQKV_MAX_HEAD_DIM. */
#define VQKV_MAX_HEAD_DIM 512
int vqkv_layout_check(const vqkv_layout_t *layout);

/* Where the paged KV cache lives inside a region of worker memory. Element
 * (layer, kv, slot, token, head, dim) sits at byte
 *   offset + layer*layer_stride + kv*kv_stride + slot*slot_stride
 *          + token*token_stride + head*head_stride + dim*element_size
 * with kv 0 for K and 1 for V. head_dim is always contiguous. With
 * layer_offsets (num_layers entries, borrowed) layer l starts at
 * offset + layer_offsets[l] instead of offset + l*layer_stride, which is
 * ignored: layers allocated apart, as vLLM's per-layer tensors are, within
 * one region. */
typedef struct {
    uint64_t region_bytes;
    uint64_t offset;
    uint64_t layer_stride;
    uint64_t kv_stride;
    uint64_t slot_stride;
    uint64_t token_stride;
    uint64_t head_stride;
    uint32_t num_slots;
    const uint64_t *layer_offsets; /* NULL: layer * layer_stride */
} vqkv_kv_view_t;

/* Where layer `layer` of the view starts, relative to view->offset. */
static inline uint64_t vqkv_kv_view_layer(const vqkv_kv_view_t *view, uint32_t layer)
{
    return view->layer_offsets != NULL ? view->layer_offsets[layer]
                                       : (uint64_t)layer * view->layer_stride;
}

/* vLLM's cache, all layers in one region: [layers][2][slots][tokens][heads][dim]. */
void vqkv_kv_view_vllm(vqkv_kv_view_t *view, const vqkv_layout_t *layout, uint32_t num_slots);

/* Separate K and V tensors per layer, [slots][tokens][heads][dim] each, laid
 * out K0 V0 K1 V1 ... with `gap` bytes of padding after every tensor. */
void vqkv_kv_view_split(vqkv_kv_view_t *view, const vqkv_layout_t *layout, uint32_t num_slots,
                        uint64_t gap);

/* VQKV_OK when no byte of worker memory belongs to two elements of the
 * view, VQKV_EINVAL otherwise, *stride (unless NULL) then naming the stride
 * too small to clear what it steps over ("head_stride", ...). Dimensions
 * are taken from the smallest stride up, each having to step past
 * everything the smaller ones span: views that interleave, such as K and V
 * per token, pass; a decode into an overlapping view would scramble other
 * blocks. O(1). */
int vqkv_kv_view_disjoint(const vqkv_layout_t *layout, const vqkv_kv_view_t *view,
                          const char **stride);

/* VQKV_OK when every byte of block `slot` lies inside the region, else
 * VQKV_ERANGE (VQKV_EINVAL for a malformed view). Encode and decode call it
 * before touching memory; the arithmetic cannot overflow. */
int vqkv_kv_view_check(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, uint32_t slot);

typedef struct vqkv_codec vqkv_codec_t;

/* Parses spec for layout. On success *out owns a new codec. */
int vqkv_codec_create(const char *spec, const vqkv_layout_t *layout, vqkv_codec_t **out);
void vqkv_codec_free(vqkv_codec_t *codec);

/* The canonical spec: every parameter spelled out, so equal codecs have
 * equal strings. */
const char *vqkv_codec_spec(const vqkv_codec_t *codec);
const vqkv_layout_t *vqkv_codec_layout(const vqkv_codec_t *codec);

/* Fixed size of one compressed block. */
size_t vqkv_codec_block_bytes(const vqkv_codec_t *codec);

/* Stored bits per K/V value: block_bytes * 8 over the values in a block. */
double vqkv_codec_bits_per_value(const vqkv_codec_t *codec);

/* 1 while a VQ codec lacks codebooks for some (layer, K|V), else 0. */
int vqkv_codec_needs_training(const vqkv_codec_t *codec);

/* Where k-means runs its assignment steps (vqkv_cuda_assigner() for a GPU). */
typedef struct vqkv_assigner vqkv_assigner_t;

/* How a model pairs a head's channels for RoPE: rotate-half, pair i is
 * channels (i, i + head_dim/2), as vLLM and Hugging Face Llama cache keys;
 * or interleaved, pair i is (2i, 2i + 1), as GGUF/llama.cpp. */
typedef enum {
    VQKV_ROPE_NEOX = 0,
    VQKV_ROPE_INTERLEAVED = 1,
} vqkv_rope_style_t;

/* The RoPE a model turns its keys by. */
typedef struct {
    double theta;            /* the base: 10000 (Llama 2, SmolLM2), 500000 (Llama 3) */
    vqkv_rope_style_t style; /* VQKV_ROPE_NEOX for vLLM's and Hugging Face's caches */
} vqkv_rope_t;

/* VQKV_OK when rope's theta (finite, > 1) and style make a RoPE, else
 * VQKV_EINVAL. */
int vqkv_rope_check(const vqkv_rope_t *rope);

typedef struct {
    uint64_t seed;        /* same seed, same data: same codebooks */
    uint32_t iterations;  /* Lloyd iterations per stage (default 16) */
    uint32_t threads;     /* worker threads (0: one per online CPU) */
    /* Subsample to at most this many vectors (0: 16384): whole tokens,
     * evenly spaced, with all their heads (a set per head: that head's),
     * at least one token. */
    uint32_t max_samples;
    /* NULL: every step on this CPU's threads. Otherwise k-means hands its
     * assignment steps to it, and the codebooks come out the same. commvq's
     * key tables (EM) are trained on the CPU either way. */
    const vqkv_assigner_t *assigner;
    /* Keys are cached after RoPE, so codebooks trained on the positions a
     * calibration saw (a daemon's first requests: a few thousand tokens)
     * code keys further on worse. With rope_positions > 0, the keys of
     * every block of block_tokens tokens are turned by `rope` through a
     * random offset in [0, rope_positions) drawn from seed before training:
     * the keys those tokens would have that much later (RoPE turns
     * compose), so the codebooks
     * see the rotations of every position up to about rope_positions.
     * The codebooks spread over more rotations, so keys near the start
     * are coded somewhat worse: rope_positions should be about the
     * longest prompt served (bench/RESULTS.md). Values are trained as
     * given. A scaled RoPE (Llama 3.1's) turns its slowest pairs less
     * than rope.theta says, so they are sampled over a wider angle than
     * the model reaches. O(tokens * head_dim) before the training. */
    uint32_t rope_positions;
    vqkv_rope_t rope; /* read only with rope_positions > 0 */
} vqkv_train_opts_t;

/* Trains the codebooks of one (layer, kv) from n_vectors token-head vectors
 * x[tokens][num_kv_heads][head_dim], n_vectors = tokens * num_kv_heads
 * (kv 0 for keys, 1 for values; VQKV_EINVAL for a non-finite value,
 * n_vectors not a multiple of num_kv_heads, or rope_positions set with a
 * rope vqkv_rope_check refuses). Codecs without codebooks accept
 * and ignore it. */
int vqkv_codec_train(vqkv_codec_t *codec, uint32_t layer, int kv, const float *x, size_t n_vectors,
                     const vqkv_train_opts_t *opts);

/* Compresses block `slot` of the view at base into out[block_bytes]. */
int vqkv_codec_encode(const vqkv_codec_t *codec, const void *base, const vqkv_kv_view_t *view,
                      uint32_t slot, uint8_t *out);

/* Compresses slots[i] of the view at base into out[i][block_bytes], i < n,
 * layers [first_layer, end_layer) only (0 and num_layers for whole blocks;
 * nothing else of out[i] is written, so threads can share a put's blocks
 * by layers). Every slot is checked before anything is written. The same
 * bytes as vqkv_codec_encode block by block, faster for several blocks:
 * layer by layer, so a VQ codec's codebooks for a layer are read from
 * memory once for all of them. */
int vqkv_codec_encode_batch(const vqkv_codec_t *codec, const void *base, const vqkv_kv_view_t *view,
                            const uint32_t *slots, uint8_t *const *out, size_t n,
                            uint32_t first_layer, uint32_t end_layer);

/* Writes the block in[block_bytes] into slot `slot` of the view at base. */
int vqkv_codec_decode(const vqkv_codec_t *codec, const uint8_t *in, void *base,
                      const vqkv_kv_view_t *view, uint32_t slot);

/* Decodes blocks in[i] into slots[i] of the view at base, i < n, layers
 * [first_layer, end_layer) only (0 and num_layers for whole blocks; a
 * range lets threads share one request's blocks by layers). Every slot is
 * checked before anything is written. The same bytes as vqkv_codec_decode
 * block by block, faster for several blocks: part by part (a layer's K
 * over all blocks, then its V), so a VQ codec's codebooks for a part
 * (often larger than the blocks' bytes for it) are read from memory once
 * for all of them, not once per block. */
int vqkv_codec_decode_batch(const vqkv_codec_t *codec, const uint8_t *const *in, void *base,
                            const vqkv_kv_view_t *view, const uint32_t *slots, size_t n,
                            uint32_t first_layer, uint32_t end_layer);

/* Codebook files: msgpack, versioned, with the layout, the canonical spec
 * and a SHA-256 of the contents. load refuses a file for another layout or
 * codec (VQKV_EMISMATCH) and anything malformed (VQKV_EFORMAT). */
int vqkv_codebook_save(const vqkv_codec_t *codec, const char *path);
int vqkv_codebook_load(vqkv_codec_t *codec, const char *path);

/* Same, to and from memory; save allocates *buf with malloc. */
int vqkv_codebook_save_buffer(const vqkv_codec_t *codec, uint8_t **buf, size_t *len);
int vqkv_codebook_load_buffer(vqkv_codec_t *codec, const uint8_t *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif
