/* worker.c -- a sample worker's setup and KV data (worker.h).
 *
 * Synthetic KV is generated a row (one token-head vector) at a time in
 * float and converted to the layout's dtype with the codec library's own
 * conversion, so the bytes are exactly what a real f16 cache would hold.
 * The Gaussian draws are Irwin-Hall sums of four uniforms rather than
 * Box-Muller: a few percent off in the tails, but a Llama-8B-sized block
 * (2M values) fills in milliseconds, which matters for the benchmark's
 * capacity fill and for the demo under ASan.
 */
#include "worker.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int vqkv__worker_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return rc;
}

int vqkv_worker_shape(const char *name, vqkv_layout_t *layout)
{
    static const struct {
        const char *name;
        vqkv_layout_t layout;
    } shapes[] = {
        {"smollm2-135m", {30, 3, 64, 16, VQKV_DTYPE_F16}},
        {"llama3-8b", {32, 8, 128, 16, VQKV_DTYPE_F16}},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        if (strcmp(name, shapes[i].name) == 0) {
            *layout = shapes[i].layout;
            return VQKV_OK;
        }
    }
    return VQKV_EINVAL;
}

uint64_t vqkv_worker_block_logical_bytes(const vqkv_layout_t *layout)
{
    return 2ull * layout->num_layers * layout->block_tokens * layout->num_kv_heads *
           layout->head_dim * vqkv_dtype_size(layout->dtype);
}

int vqkv_worker_open(vqkv_worker_t *w, const char *socket_path, const char *client_name,
                     int timeout_ms, const char *model_id, const vqkv_layout_t *layout,
                     const char *codec_spec, uint32_t num_slots, char *err, size_t errlen)
{
    memset(w, 0, sizeof *w);
    w->fd = -1;
    w->layout = *layout;
    vqkv_kv_view_vllm(&w->view, layout, num_slots);

    int rc = vqkv_connect(socket_path, client_name, timeout_ms, &w->client);
    if (rc != VQKV_OK) {
        int saved = errno;
        return vqkv__worker_fail(err, errlen, rc, "cannot connect to %s: %s%s%s", socket_path,
                                 vqkv_client_strerror(rc), rc == VQKV_EIO ? ": " : "",
                                 rc == VQKV_EIO ? strerror(saved) : "");
    }
    rc = vqkv_register_model(w->client, model_id, layout, codec_spec, &w->model);
    if (rc != VQKV_OK) {
        vqkv__worker_fail(err, errlen, rc, "registering %s with codec %s: %s", model_id, codec_spec,
                          vqkv_last_error(w->client));
        goto fail;
    }
    rc = vqkv_memfd_create(client_name, w->view.region_bytes, &w->fd);
    if (rc != VQKV_OK) {
        vqkv__worker_fail(err, errlen, rc, "memfd of %llu bytes: %s",
                          (unsigned long long)w->view.region_bytes, strerror(errno));
        goto fail;
    }
    w->base = mmap(NULL, w->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, w->fd, 0);
    if (w->base == MAP_FAILED) {
        w->base = NULL;
        rc = vqkv__worker_fail(err, errlen, VQKV_EIO, "mapping the KV region: %s", strerror(errno));
        goto fail;
    }
    rc = vqkv_register_memfd_region(w->client, w->model, w->fd, w->view.region_bytes, 0, &w->view,
                                    &w->region);
    if (rc != VQKV_OK) {
        vqkv__worker_fail(err, errlen, rc, "registering the KV region: %s",
                          vqkv_last_error(w->client));
        goto fail;
    }
    return VQKV_OK;

fail:
    vqkv_worker_close(w);
    return rc;
}

void vqkv_worker_close(vqkv_worker_t *w)
{
    if (w->base != NULL)
        munmap(w->base, w->view.region_bytes);
    if (w->fd >= 0)
        close(w->fd);
    vqkv_close(w->client);
    w->base = NULL;
    w->fd = -1;
    w->client = NULL;
    w->model = NULL;
}

/* ---- KV data ----------------------------------------------------------------- */

int vqkv_worker_wait_codebooks(vqkv_worker_t *w, const char *model_id, double timeout_s, char *err,
                               size_t errlen)
{
    const struct timespec pause = {0, 50 * 1000 * 1000};
    for (double waited = 0.0; !vqkv_model_codebooks_ready(w->model); waited += 0.05) {
        if (waited >= timeout_s)
            return vqkv__worker_fail(err, errlen, VQKV_ENOCODEBOOK,
                                     "no codebooks for %s after %.0f s: is vqkvd's "
                                     "calibration_tokens over the tokens put?",
                                     vqkv_model_codec(w->model), timeout_s);
        nanosleep(&pause, NULL);
        vqkv_model_t *again = NULL;
        int rc = vqkv_register_model(w->client, model_id, &w->layout, vqkv_model_codec(w->model),
                                     &again);
        if (rc != VQKV_OK)
            return vqkv__worker_fail(err, errlen, rc, "register %s again: %s", model_id,
                                     vqkv_last_error(w->client));
    }
    return VQKV_OK;
}

static uint64_t vqkv__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* About N(0, 1): four 16-bit uniforms summed, centred and scaled. */
static float vqkv__gauss(uint64_t *state)
{
    uint64_t r = vqkv__splitmix64(state);
    float sum = (float)(r & 0xffff) + (float)((r >> 16) & 0xffff) + (float)((r >> 32) & 0xffff) +
                (float)(r >> 48);
    return (sum / 65536.0f - 2.0f) * 1.7320508f;
}

/* The address of row (layer, kv, slot, token, head) of the view. */
static uint8_t *vqkv__row(const vqkv_kv_view_t *view, void *base, uint32_t layer, uint32_t kv,
                          uint32_t slot, uint32_t token, uint32_t head)
{
    return (uint8_t *)base + view->offset + vqkv_kv_view_layer(view, layer) + kv * view->kv_stride +
           slot * view->slot_stride + token * view->token_stride + head * view->head_stride;
}

void vqkv_worker_fill_synthetic(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, void *base,
                                uint32_t slot, const uint8_t key[VQKV_KEY_BYTES])
{
    float row[VQKV_MAX_HEAD_DIM], mean[VQKV_MAX_HEAD_DIM], scale[VQKV_MAX_HEAD_DIM];
    uint64_t noise;
    memcpy(&noise, key, sizeof noise);
    for (uint32_t l = 0; l < layout->num_layers; l++) {
        for (uint32_t h = 0; h < layout->num_kv_heads; h++) {
            /* Key channel statistics of this (layer, head): log-normal
             * scales, and about one channel in 32 an outlier with a large
             * mean and spread, as real post-RoPE keys have. */
            uint64_t ch = 0x5eed0000ull + l * 1024u + h;
            for (uint32_t d = 0; d < layout->head_dim; d++) {
                int outlier = (vqkv__splitmix64(&ch) & 31) == 0;
                mean[d] = 0.5f * vqkv__gauss(&ch) * (outlier ? 8.0f : 1.0f);
                scale[d] = expf(0.5f * vqkv__gauss(&ch)) * (outlier ? 6.0f : 1.0f);
            }
            for (uint32_t t = 0; t < layout->block_tokens; t++) {
                for (uint32_t d = 0; d < layout->head_dim; d++)
                    row[d] = mean[d] + scale[d] * vqkv__gauss(&noise);
                vqkv_dtype_from_f32(layout->dtype, row, layout->head_dim,
                                    vqkv__row(view, base, l, 0, slot, t, h));
                float token_scale = 0.7f * expf(0.3f * vqkv__gauss(&noise));
                for (uint32_t d = 0; d < layout->head_dim; d++)
                    row[d] = token_scale * vqkv__gauss(&noise);
                vqkv_dtype_from_f32(layout->dtype, row, layout->head_dim,
                                    vqkv__row(view, base, l, 1, slot, t, h));
            }
        }
    }
}

int vqkv_worker_dump_check(const vqkv_st_file_t *dump, const vqkv_layout_t *layout,
                           uint64_t min_tokens, char *err, size_t errlen)
{
    for (uint32_t l = 0; l < layout->num_layers; l++) {
        for (int kv = 0; kv < 2; kv++) {
            char name[64];
            snprintf(name, sizeof name, "layers.%u.%c", l, kv == 0 ? 'k' : 'v');
            const vqkv_st_tensor_t *t = vqkv_st_find(dump, name);
            if (t == NULL)
                return vqkv__worker_fail(err, errlen, VQKV_EFORMAT, "no tensor %s", name);
            if (t->ndim != 3 || t->shape[1] != layout->num_kv_heads ||
                t->shape[2] != layout->head_dim)
                return vqkv__worker_fail(err, errlen, VQKV_EFORMAT,
                                         "%s is not [tokens, %u, %u]: another model's dump?", name,
                                         layout->num_kv_heads, layout->head_dim);
            if (t->shape[0] < min_tokens)
                return vqkv__worker_fail(
                    err, errlen, VQKV_EFORMAT, "%s holds %llu tokens, %llu are needed", name,
                    (unsigned long long)t->shape[0], (unsigned long long)min_tokens);
        }
    }
    /* One layer more than the layout has means the dump is of another model. */
    char name[64];
    snprintf(name, sizeof name, "layers.%u.k", layout->num_layers);
    if (vqkv_st_find(dump, name) != NULL)
        return vqkv__worker_fail(err, errlen, VQKV_EFORMAT,
                                 "the dump has more than %u layers: another model's dump?",
                                 layout->num_layers);
    return VQKV_OK;
}

void vqkv_worker_fill_dump(const vqkv_layout_t *layout, const vqkv_kv_view_t *view, void *base,
                           uint32_t slot, const vqkv_st_file_t *dump, uint64_t first_token)
{
    float row[VQKV_MAX_HEAD_DIM];
    uint64_t token_values = (uint64_t)layout->num_kv_heads * layout->head_dim;
    for (uint32_t l = 0; l < layout->num_layers; l++) {
        for (uint32_t kv = 0; kv < 2; kv++) {
            char name[64];
            snprintf(name, sizeof name, "layers.%u.%c", l, kv == 0 ? 'k' : 'v');
            const vqkv_st_tensor_t *t = vqkv_st_find(dump, name);
            for (uint32_t tok = 0; tok < layout->block_tokens; tok++) {
                for (uint32_t h = 0; h < layout->num_kv_heads; h++) {
                    uint64_t first = (first_token + tok) * token_values + h * layout->head_dim;
                    vqkv_st_read_f32(t, first, layout->head_dim, row);
                    vqkv_dtype_from_f32(layout->dtype, row, layout->head_dim,
                                        vqkv__row(view, base, l, kv, slot, tok, h));
                }
            }
        }
    }
}
