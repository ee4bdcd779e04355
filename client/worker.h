/* worker.h -- the setup a sample inference worker does against vqkvd,
 * shared by vqkv-demo and vqkv-benchmark.
 *
 * A worker here is what an engine such as vLLM would be on the CPU
 * backend: one connection, one model, and one memfd holding its paged KV
 * cache in vLLM's layout (all layers in one region,
 * [layers][K|V][slots][tokens][heads][dim]), mapped into the process and
 * registered with the daemon so that Put reads and Get writes it in place.
 * It also fills blocks with KV data: synthetic (a pure function of the
 * block's key, so any process that knows the prompt can regenerate what
 * another one stored) or real, copied out of a KV dump that
 * tools/kvdump.py wrote.
 *
 * Nothing here is part of libvqkv's API: it is sample code, kept in one
 * place so the demo and the benchmark cannot drift apart in how they set a
 * worker up. Errors are returned as VQKV_E* codes with a readable reason in
 * the caller's buffer.
 */
#ifndef VQKV_WORKER_H
#define VQKV_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"
#include "vqkv.h"

/* One worker: its connection, model and mapped KV region. */
typedef struct {
    vqkv_client_t *client;
    vqkv_model_t *model;
    vqkv_layout_t layout;
    vqkv_kv_view_t view;
    int fd;
    uint8_t *base; /* the mapping of the whole region, view.region_bytes long */
    vqkv_region_t region;
} vqkv_worker_t;

/* The layout of a named model shape ("smollm2-135m": 30 layers, 3 kv heads,
 * head_dim 64; "llama3-8b": 32 layers, 8 kv heads, head_dim 128), 16 tokens
 * per block, f16. VQKV_EINVAL for any other name. */
int vqkv_worker_shape(const char *name, vqkv_layout_t *layout);

/* The reply timeout the tools use: generous, since with dozens of clients
 * on a few cores a get queues behind many others' decodes, and a slow reply
 * is a figure, not an error. */
#define VQKV_WORKER_TIMEOUT_MS 30000

/* Bytes of one block in the worker's dtype: what a get writes per block. */
uint64_t vqkv_worker_block_logical_bytes(const vqkv_layout_t *layout);

/* Connects to socket_path as client_name (every reply awaited up to
 * timeout_ms), registers model_id with layout and codec_spec, creates and
 * maps a memfd of num_slots blocks in vLLM's layout and registers it. On
 * failure everything made so far is undone, the reason is in err and the
 * code returned. */
int vqkv_worker_open(vqkv_worker_t *w, const char *socket_path, const char *client_name,
                     int timeout_ms, const char *model_id, const vqkv_layout_t *layout,
                     const char *codec_spec, uint32_t num_slots, char *err, size_t errlen);

/* Unmaps, closes the memfd and the connection (the daemon drops the
 * region and the model's handle with it; stored blocks stay). */
void vqkv_worker_close(vqkv_worker_t *w);

/* Waits until vqkvd has codebooks for the worker's model: registers
 * model_id again every 50 ms (how a worker learns that online calibration
 * finished; vqkv.h) for at most timeout_s seconds. VQKV_ENOCODEBOOK with the
 * reason in err when training did not finish in time (too few tokens put
 * for the daemon's calibration_tokens, most likely); the registration's
 * own error otherwise. Returns at once for a model that has them. */
int vqkv_worker_wait_codebooks(vqkv_worker_t *w, const char *model_id, double timeout_s, char *err,
                               size_t errlen);

/* Writes synthetic KV into block `slot` of the view at base: keys with
 * per-channel means and scales and a few outlier channels per head (the
 * structure KIVI's per-channel key quantization is built for), values
 * around zero with a scale per token. The channel statistics depend on
 * (layer, head) only, the noise on key: the same key always gives the same
 * bytes, in any process. */
void vqkv_worker_fill_synthetic(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, void *base,
                                uint32_t slot, const uint8_t key[VQKV_KEY_BYTES]);

/* Checks that dump (tools/kvdump.py's layers.N.k and layers.N.v, [tokens,
 * kv_heads, head_dim]) matches layout and holds at least min_tokens
 * tokens; VQKV_EFORMAT with the reason in err otherwise. */
int vqkv_worker_dump_check(const vqkv_st_file_t *dump, const vqkv_layout_t *layout,
                           uint64_t min_tokens, char *err, size_t errlen);

/* Copies the dump's K and V of tokens [first_token, first_token +
 * block_tokens) into block `slot` of the view at base, converted to the
 * layout's dtype. The dump must have passed vqkv_worker_dump_check for a
 * min_tokens covering those tokens. */
void vqkv_worker_fill_dump(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, void *base,
                           uint32_t slot, const vqkv_st_file_t *dump, uint64_t first_token);

#endif
