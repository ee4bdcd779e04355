/* models.c -- RegisterModel (a model's layout and codec, shared by
 * every connection of its tenant that registers the same name, heads and
 * codec; codebooks from a file or calibrated online), RegisterRegion
 * (worker KV memory, opened by the backend, usable by every model of its
 * region's shape) and FindModel (an admin tool's way to a tenant's model).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "calib.h"
#include "log.h"
#include "session.h"
#include "transcode.h"

/* RegisterModel.model_id may be this long. */
#define VQKVD_MODEL_ID_MAX 256

/* ---- RegisterModel --------------------------------------------------------- */

static vqkvd_model_t *vqkvd__model_find(const vqkvd_server_t *s, uint32_t tenant,
                                        const char *model_id, uint32_t first, uint32_t count)
{
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->tenant == tenant && m->kv_head_first == first && m->kv_head_count == count &&
            strcmp(m->model_id, model_id) == 0)
            return m;
    }
    return NULL;
}

/* Names the first field in which the registration `now` differs from the
 * model as registered (`was`, with codec spec was_spec), as
 * "num_kv_heads 4, registered 3"; 0 when none differs. With NULL specs the
 * layouts alone are compared. */
int vqkvd__model_diff(const vqkv_layout_t *was, const char *was_spec, const vqkv_layout_t *now,
                      const char *now_spec, char *buf, size_t size)
{
    static const char *const dtypes[] = {"f16", "bf16", "f32"};
    const struct {
        const char *name;
        uint32_t was, now;
    } fields[] = {
        {"num_layers", was->num_layers, now->num_layers},
        {"num_kv_heads", was->num_kv_heads, now->num_kv_heads},
        {"head_dim", was->head_dim, now->head_dim},
        {"block_tokens", was->block_tokens, now->block_tokens},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (fields[i].was != fields[i].now) {
            snprintf(buf, size, "%s %u, registered %u", fields[i].name, (unsigned)fields[i].now,
                     (unsigned)fields[i].was);
            return 1;
        }
    if (was->dtype != now->dtype) { /* both checked by vqkv_layout_check */
        snprintf(buf, size, "dtype %s, registered %s", dtypes[now->dtype], dtypes[was->dtype]);
        return 1;
    }
    if (was_spec != NULL && now_spec != NULL && strcmp(was_spec, now_spec) != 0) {
        snprintf(buf, size, "codec %s, registered %s", now_spec, was_spec);
        return 1;
    }
    return 0;
}

/* SHA-256 of what a model is, in a text that does not change between
 * releases: saved codebook files are named by it (calib.c), and the
 * store's model number is its first 4 bytes. VQKV_OK, or VQKV_ENOMEM. */
static int vqkvd__model_identify(vqkvd_model_t *m)
{
    char text[1024];
    const vqkv_layout_t *l = &m->layout;
    int n = snprintf(text, sizeof text, "%s\n%u %u\n%u %u %u %u %d\n%s", m->model_id,
                     (unsigned)m->kv_head_first, (unsigned)m->kv_head_count,
                     (unsigned)l->num_layers, (unsigned)l->num_kv_heads, (unsigned)l->head_dim,
                     (unsigned)l->block_tokens, (int)l->dtype, vqkv_codec_spec(m->codec));
    unsigned md_len = 0;
    if (n < 0 || (size_t)n >= sizeof text ||
        EVP_Digest(text, (size_t)n, m->ident, &md_len, EVP_sha256(), NULL) != 1 ||
        md_len != sizeof m->ident)
        return VQKV_ENOMEM;
    m->store_id = (uint32_t)m->ident[0] | (uint32_t)m->ident[1] << 8 | (uint32_t)m->ident[2] << 16 |
                  (uint32_t)m->ident[3] << 24;
    if (m->store_id == 0)
        m->store_id = 1;
    return VQKV_OK;
}

/* The model of tenant whose store number is store_id, or NULL. O(models):
 * a Get asks once, and models are few. */
vqkvd_model_t *vqkvd_model_by_store_id(const vqkvd_server_t *s, uint32_t tenant, uint32_t store_id)
{
    for (uint32_t i = 0; i < s->n_models; i++)
        if (s->models[i]->tenant == tenant && s->models[i]->store_id == store_id)
            return s->models[i];
    return NULL;
}

int vqkvd_codec_ident_set(vqkvd_codec_ident_t *id, const vqkv_codec_t *codec)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    unsigned md_len = 0;
    id->spec = vqkv_codec_spec(codec);
    memset(id->codebooks_sha256, 0, sizeof id->codebooks_sha256);
    int rc = vqkv_codebook_save_buffer(codec, &buf, &len);
    if (rc == VQKV_EINVAL) /* a codec without codebooks */
        return VQKV_OK;
    if (rc == VQKV_OK &&
        (EVP_Digest(buf, len, id->codebooks_sha256, &md_len, EVP_sha256(), NULL) != 1 ||
         md_len != sizeof id->codebooks_sha256))
        rc = VQKV_ENOMEM;
    free(buf);
    return rc;
}

/* A new model taking codec; NULL (codec still the caller's) on failure,
 * with *why set. */
static vqkvd_model_t *vqkvd__model_new(vqkvd_server_t *s, uint32_t tenant, const char *model_id,
                                       const Vqkv__RegisterModel *rm, const vqkv_layout_t *layout,
                                       vqkv_codec_t *codec, uint64_t logical, const char **why)
{
    vqkvd_model_t *m = NULL;
    *why = "out of memory";
    if (s->n_models == s->cap_models) {
        uint32_t cap = s->cap_models ? 2 * s->cap_models : 8;
        vqkvd_model_t **grown = realloc(s->models, cap * sizeof *grown);
        if (grown == NULL)
            goto fail;
        s->models = grown;
        s->cap_models = cap;
    }
    m = calloc(1, sizeof *m);
    if (m == NULL || (m->model_id = strdup(model_id)) == NULL)
        goto fail;
    m->tenant = tenant;
    m->kv_head_first = rm->kv_head_first;
    m->kv_head_count = rm->kv_head_count;
    m->layout = *layout;
    m->codec = codec;
    if (vqkvd__model_identify(m) != VQKV_OK)
        goto fail;
    if (vqkvd_model_by_store_id(s, tenant, m->store_id) != NULL) {
        *why = "its identity hash collides with another model's: rename it";
        goto fail;
    }
    size_t bb = vqkv_codec_block_bytes(codec);
    /* The class is taken last: a pool class cannot be given back. */
    int cls = bb <= UINT32_MAX ? vqkvd_pool_add_class(&s->pool, (uint32_t)bb) : VQKV_EINVAL;
    if (cls < 0) {
        *why = "the codec's block does not fit one pool chunk";
        goto fail;
    }
    m->id = s->n_models + 1;
    m->cls = (uint32_t)cls;
    m->block_bytes = (uint32_t)bb;
    m->logical_bytes = (uint32_t)logical;
    s->models[s->n_models++] = m;
    if (!vqkv_codec_needs_training(codec))
        vqkvd_model_set_ready(s, m, NULL);
    return m;

fail:
    if (m != NULL)
        free(m->model_id);
    free(m);
    return NULL;
}

/* ModelRegistered for m: the reply to RegisterModel and FindModel. */
static void vqkvd__model_reply(vqkvd_client_t *c, uint64_t id, const vqkvd_model_t *m)
{
    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = m->layout.num_layers;
    wl.num_kv_heads = m->layout.num_kv_heads;
    wl.head_dim = m->layout.head_dim;
    wl.block_tokens = m->layout.block_tokens;
    wl.dtype = (Vqkv__DType)m->layout.dtype;
    Vqkv__ModelRegistered mr = VQKV__MODEL_REGISTERED__INIT;
    mr.model_handle = m->id;
    mr.codec = (char *)vqkv_codec_spec(m->codec);
    mr.block_bytes = m->block_bytes;
    mr.codebooks_ready = m->ready;
    mr.layout = &wl;
    mr.kv_head_first = m->kv_head_first;
    mr.kv_head_count = m->kv_head_count;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_MODEL_REGISTERED;
    env.model_registered = &mr;
    vqkvd_client_reply(c, &env);
}

/* A fresh codec like m's holding the codebook file open on fd; NULL with
 * *rc and *why set when the file does not hold codebooks for it. */
static vqkv_codec_t *vqkvd__codebook_read(const vqkvd_model_t *m, int fd, int *rc, const char **why)
{
    vqkv_codec_t *codec = NULL;
    *why = "out of memory";
    *rc = vqkv_codec_create(vqkv_codec_spec(m->codec), &m->layout, &codec);
    if (*rc == VQKV_OK)
        *rc = vqkvd_calib_load_fd(codec, fd, why);
    if (*rc != VQKV_OK) {
        vqkv_codec_free(codec);
        return NULL;
    }
    return codec;
}

/* 1 when a and b hold the same codebooks (compared as saved files). */
static int vqkvd__codebooks_equal(const vqkv_codec_t *a, const vqkv_codec_t *b)
{
    uint8_t *ba = NULL, *bb = NULL;
    size_t la = 0, lb = 0;
    int equal = vqkv_codebook_save_buffer(a, &ba, &la) == VQKV_OK &&
                vqkv_codebook_save_buffer(b, &bb, &lb) == VQKV_OK && la == lb &&
                memcmp(ba, bb, la) == 0;
    free(ba);
    free(bb);
    return equal;
}

/* Codebooks sent for a model already registered. Taken while it has none
 * (its fp16 blocks keep their fallback); once it has some, accepted only
 * when equal, since blocks already encoded with them would decode wrongly
 * under others. Swapping m->codec is safe while it is not ready: no job
 * reads it, and no block of its class exists. */
static int vqkvd__model_take_codebooks(vqkvd_server_t *s, vqkvd_model_t *m, int fd,
                                       const char **why)
{
    if (vqkvd_calib_training(m)) {
        *why = "the model is training its own codebooks; register it again without a file";
        return VQKV_EMISMATCH;
    }
    int rc;
    vqkv_codec_t *sent = vqkvd__codebook_read(m, fd, &rc, why);
    if (sent == NULL)
        return rc;
    if (m->ready) {
        rc = vqkvd__codebooks_equal(sent, m->codec) ? VQKV_OK : VQKV_EMISMATCH;
        *why = "the model already stores blocks with other codebooks";
        vqkv_codec_free(sent);
        return rc;
    }
    vqkv_codec_free(m->codec);
    m->codec = sent;
    vqkvd_calib_free(m);
    rc = vqkvd_model_set_ready(s, m, NULL);
    *why = "the backend cannot take its codebooks";
    return rc;
}

/* The worker's layout of a RegisterModel, narrowed to its heads, into
 * *layout with the uncompressed bytes of one block in *logical; false
 * after an Error reply. */
static bool vqkvd__model_layout(vqkvd_client_t *c, uint64_t id, const Vqkv__RegisterModel *rm,
                                vqkv_layout_t *layout, uint64_t *logical)
{
    const Vqkv__Layout *wl = rm->layout;
    size_t id_len = strlen(rm->model_id);
    if (id_len == 0 || id_len > VQKVD_MODEL_ID_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "model_id must have 1 to %d bytes, not %zu",
                           VQKVD_MODEL_ID_MAX, id_len);
        return false;
    }
    if (wl == NULL) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "RegisterModel has no layout");
        return false;
    }
    if (rm->kv_head_count == 0 || rm->kv_head_first > wl->num_kv_heads ||
        rm->kv_head_count > wl->num_kv_heads - rm->kv_head_first) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "kv heads [%u, +%u) are not within the %u of %s",
                           (unsigned)rm->kv_head_first, (unsigned)rm->kv_head_count,
                           (unsigned)wl->num_kv_heads, rm->model_id);
        return false;
    }
    *layout = (vqkv_layout_t){wl->num_layers, rm->kv_head_count, wl->head_dim, wl->block_tokens,
                              (vqkv_dtype_t)wl->dtype};
    if (vqkv_layout_check(layout) != VQKV_OK) {
        vqkvd_client_error(c, id, VQKV_EINVAL,
                           "layout %u layers x %u heads x %u dims x %u tokens (dtype %d) is not "
                           "valid (head_dim even, at most %d)",
                           (unsigned)layout->num_layers, (unsigned)layout->num_kv_heads,
                           (unsigned)layout->head_dim, (unsigned)layout->block_tokens,
                           (int)layout->dtype, VQKV_MAX_HEAD_DIM);
        return false;
    }
    /* Uncompressed bytes of one block: K and V of every layer, token, head. */
    *logical = (uint64_t)layout->num_layers * 2 * layout->block_tokens * layout->num_kv_heads *
               layout->head_dim * vqkv_dtype_size(layout->dtype);
    if (*logical > UINT32_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "a block of %llu bytes is too large",
                           (unsigned long long)*logical);
        return false;
    }
    return true;
}

/* The RoPE a RegisterModel names into *rope (theta 0 for none): both
 * fields or neither. False after an Error reply. */
static bool vqkvd__model_rope(vqkvd_client_t *c, uint64_t id, const Vqkv__RegisterModel *rm,
                              vqkv_rope_t *rope)
{
    /* RopeStyle is vqkv_rope_style_t + 1; the frame check refused others. */
    *rope = (vqkv_rope_t){rm->rope_theta, (vqkv_rope_style_t)(rm->rope_style - 1)};
    if (rm->rope_style == VQKV__ROPE_STYLE__ROPE_STYLE_UNSPECIFIED && rope->theta == 0.0) {
        *rope = (vqkv_rope_t){0};
        return true;
    }
    if (rm->rope_style == VQKV__ROPE_STYLE__ROPE_STYLE_UNSPECIFIED ||
        vqkv_rope_check(rope) != VQKV_OK) {
        vqkvd_client_error(c, id, VQKV_EINVAL,
                           "RoPE: rope_theta %g with rope_style %d; a RoPE is a base, finite "
                           "and above 1, and a style (1 rotate-half, 2 interleaved), or neither",
                           rope->theta, (int)rm->rope_style);
        return false;
    }
    return true;
}

/* False after an Error reply (VQKV_EMISMATCH) when m has a RoPE and a
 * registration names another. */
static bool vqkvd__model_rope_agrees(vqkvd_client_t *c, uint64_t id, const vqkvd_model_t *m,
                                     const vqkv_rope_t *rope)
{
    if (rope->theta == 0.0 || m->rope.theta == 0.0 ||
        (m->rope.style == rope->style && m->rope.theta == rope->theta))
        return true;
    vqkvd_client_error(c, id, VQKV_EMISMATCH,
                       "model \"%s\" is registered with RoPE base %g, style %d; this "
                       "registration says base %g, style %d",
                       m->model_id, m->rope.theta, (int)m->rope.style + 1, rope->theta,
                       (int)rope->style + 1);
    return false;
}

/* A model first registered: its codebooks from codebook_fd, from the
 * state directory, or calibration started. Takes *codec (NULL on return
 * once the model holds it). The model, or NULL after an Error reply. */
static vqkvd_model_t *vqkvd__model_register_new(vqkvd_client_t *c, uint64_t id,
                                                const Vqkv__RegisterModel *rm,
                                                const vqkv_layout_t *layout, vqkv_codec_t **codec,
                                                int codebook_fd, uint64_t logical)
{
    vqkvd_server_t *s = c->server;
    const char *why;
    int rc;
    if (codebook_fd >= 0 && (rc = vqkvd_calib_load_fd(*codec, codebook_fd, &why)) != VQKV_OK) {
        vqkvd_client_error(c, id, rc, "model \"%s\": %s", rm->model_id, why);
        return NULL;
    }
    vqkvd_model_t *m =
        vqkvd__model_new(s, (uint32_t)c->uid, rm->model_id, rm, layout, *codec, logical, &why);
    if (m == NULL) {
        vqkvd_client_error(c, id, VQKV_ENOMEM, "model \"%s\": %s", rm->model_id, why);
        return NULL;
    }
    *codec = NULL; /* the model's now */
    /* Registered even when calibration cannot start: its Puts then say
     * why, and a later RegisterModel with a codebook file mends it. */
    if (!m->ready && !vqkvd_calib_load_saved(s, m) && (rc = vqkvd_calib_begin(s, m)) != VQKV_OK) {
        vqkvd_client_error(c, id, rc, "model \"%s\": cannot start calibration: %s", rm->model_id,
                           vqkv_strerror(rc));
        return NULL;
    }
    vqkvd_log(VQKVD_LOG_INFO, "model %u: \"%s\" heads [%u, +%u) codec %s, %u-byte blocks",
              (unsigned)m->id, m->model_id, (unsigned)m->kv_head_first, (unsigned)m->kv_head_count,
              vqkv_codec_spec(m->codec), (unsigned)m->block_bytes);
    return m;
}

void vqkvd_session_register_model(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    const Vqkv__RegisterModel *rm = req->register_model;
    vqkv_codec_t *codec = NULL;
    uint64_t id = req->request_id;
    vqkv_layout_t layout;
    uint64_t logical;

    vqkv_rope_t rope;
    if (!vqkvd__model_layout(c, id, rm, &layout, &logical) || !vqkvd__model_rope(c, id, rm, &rope))
        return;
    int rc = vqkv_codec_create(rm->codec, &layout, &codec);
    if (rc != VQKV_OK) {
        vqkvd_client_error(c, id, rc, "codec \"%s\": %s", rm->codec, vqkv_strerror(rc));
        return;
    }
    const char *spec = vqkv_codec_spec(codec);
    if (rm->num_fds > 1 || frame->n_fds != rm->num_fds) {
        vqkvd_client_error(c, id, VQKV_EFDS,
                           "RegisterModel comes with 0 fds or 1 (a codebook file): num_fds %u, "
                           "%zu came",
                           (unsigned)rm->num_fds, frame->n_fds);
        goto cleanup;
    }
    int codebook_fd = frame->n_fds == 1 ? frame->fds[0] : -1;
    if (codebook_fd >= 0 && !vqkv_codec_needs_training(codec)) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "codec %s has no codebooks to load", spec);
        goto cleanup;
    }
    vqkvd_model_t *m = vqkvd__model_find(c->server, (uint32_t)c->uid, rm->model_id,
                                         rm->kv_head_first, rm->kv_head_count);
    char differs[160];
    if (m != NULL && vqkvd__model_diff(&m->layout, vqkv_codec_spec(m->codec), &layout, spec,
                                       differs, sizeof differs)) {
        vqkvd_client_error(c, id, VQKV_EMISMATCH,
                           "model \"%s\" is registered otherwise: this registration says %s",
                           rm->model_id, differs);
        goto cleanup;
    }
    if (m != NULL && !vqkvd__model_rope_agrees(c, id, m, &rope))
        goto cleanup;
    if ((m == NULL || vqkvd__client_model(c, m->id) == NULL) &&
        c->n_models == VQKVD_CLIENT_MAX_MODELS) {
        vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %d models",
                           VQKVD_CLIENT_MAX_MODELS);
        goto cleanup;
    }
    const char *why;
    if (m != NULL && codebook_fd >= 0 &&
        (rc = vqkvd__model_take_codebooks(c->server, m, codebook_fd, &why)) != VQKV_OK) {
        vqkvd_client_error(c, id, rc, "model \"%s\": %s", rm->model_id, why);
        goto cleanup;
    }
    if (m == NULL &&
        (m = vqkvd__model_register_new(c, id, rm, &layout, &codec, codebook_fd, logical)) == NULL)
        goto cleanup;
    if (vqkvd__client_model(c, m->id) == NULL)
        c->models[c->n_models++] = m->id;
    /* The first RoPE named stays; read when training starts (calib.c). */
    if (m->rope.theta == 0.0)
        m->rope = rope;
    vqkvd__model_reply(c, id, m);

cleanup:
    vqkv_codec_free(codec);
}

/* The one place a model turns ready: its codebooks are final (it has
 * none to train, or they were loaded, received or trained), the backend
 * has taken them, and Puts from now on use the codec. VQKV_OK, or the
 * backend's error, logged, with the model left as it was. */
int vqkvd_model_set_ready(vqkvd_server_t *s, vqkvd_model_t *m, const vqkvd_codec_ident_t *ident)
{
    int rc = VQKV_OK;
    if (ident != NULL)
        m->codec_ident = *ident;
    else
        rc = vqkvd_codec_ident_set(&m->codec_ident, m->codec);
    if (rc == VQKV_OK)
        rc = s->backend->ops->codebooks_ready(s->backend, m->codec);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR, "model %u: the %s backend cannot take its codebooks: %s",
                  (unsigned)m->id, s->backend->ops->name, vqkv_strerror(rc));
        return rc;
    }
    m->ready = 1;
    return VQKV_OK;
}

/* ---- RegionPieces ------------------------------------------------------------- */

void vqkvd__pieces_release(vqkvd_client_t *c)
{
    vqkvd_backend_t *be = c->server->backend;
    for (uint32_t i = 0; i < c->n_pieces; i++)
        be->ops->piece_release(be, c->pieces[i]);
    c->n_pieces = 0;
}

/* Imports the n fds (from RegionPieces, or a VMM RegisterRegion's own)
 * after the pieces c holds already. VQKV_OK, or an error with why filled
 * and the pieces imported so far held (the caller lets every one go). */
static int vqkvd__pieces_import(vqkvd_client_t *c, const int *fds, size_t n, char *why,
                                size_t why_size)
{
    vqkvd_backend_t *be = c->server->backend;
    if (c->n_pieces + n > VQKV_REGION_MAX_PIECES) {
        snprintf(why, why_size, "a region spans at most %d pieces", VQKV_REGION_MAX_PIECES);
        return VQKV_ELIMIT;
    }
    if (c->n_pieces + n > c->cap_pieces) {
        /* Doubling: O(pieces) copies over a registration. */
        uint32_t cap = c->cap_pieces ? c->cap_pieces : VQKV_FRAME_MAX_FDS;
        while (cap < c->n_pieces + n)
            cap *= 2;
        uint64_t *grown = realloc(c->pieces, cap * sizeof *grown);
        if (grown == NULL) {
            snprintf(why, why_size, "out of memory");
            return VQKV_ENOMEM;
        }
        c->pieces = grown;
        c->cap_pieces = cap;
    }
    for (size_t i = 0; i < n; i++) {
        int rc = be->ops->piece_import(be, fds[i], &c->pieces[c->n_pieces], why, why_size);
        if (rc != VQKV_OK)
            return rc;
        c->n_pieces++;
    }
    return VQKV_OK;
}

/* Imports the frame's pieces and holds them for the next RegisterRegion.
 * Any refusal lets go of every piece held too, so that the RegisterRegion
 * which follows a failed batch is refused for its count rather than
 * registered over the wrong memory. */
void vqkvd_session_region_pieces(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    const Vqkv__RegionPieces *rp = req->region_pieces;
    uint64_t id = req->request_id;
    vqkvd_backend_t *be = c->server->backend;
    char why[256];
    int rc = VQKV_OK;
    if (be->ops->piece_import == NULL) {
        rc = VQKV_EDEVICE;
        snprintf(why, sizeof why,
                 "this vqkvd runs the %s backend and owns no GPU; RegionPieces carry CUDA VMM "
                 "memory",
                 be->ops->name);
    } else if (rp->num_fds != frame->n_fds || frame->n_fds == 0) {
        rc = VQKV_EFDS;
        snprintf(why, sizeof why, "RegionPieces come with 1 to %d fds (num_fds %u, %zu came)",
                 VQKV_FRAME_MAX_FDS, (unsigned)rp->num_fds, frame->n_fds);
    } else {
        rc = vqkvd__pieces_import(c, frame->fds, frame->n_fds, why, sizeof why);
    }
    if (rc != VQKV_OK) {
        uint32_t held = c->n_pieces;
        vqkvd__pieces_release(c);
        vqkvd_client_error(c, id, rc, "RegionPieces: %s%s", why,
                           held > 0 ? "; the pieces held before are let go" : "");
        return;
    }
    vqkvd__ack(c, id, c->n_pieces);
}

/* ---- RegisterRegion -------------------------------------------------------- */

/* The view of a RegisterRegion, checked whole against m's layout: every
 * slot inside the region, no two bytes of the blocks overlapping. False
 * after an Error reply. */
static bool vqkvd__region_view(vqkvd_client_t *c, uint64_t id, const Vqkv__RegisterRegion *rr,
                               const vqkvd_model_t *m, vqkv_kv_view_t *out)
{
    vqkv_kv_view_t view = {
        rr->region_bytes, rr->offset,      rr->layer_stride,
        rr->kv_stride,    rr->slot_stride, rr->token_stride,
        rr->head_stride,  rr->num_slots,   rr->n_layer_offsets > 0 ? rr->layer_offsets : NULL};
    /* Strides are unsigned, so the last slot reaches furthest: checking it
     * checks every slot, once, here instead of per request. */
    if (rr->num_slots == 0 || vqkv_kv_view_check(&m->layout, &view, rr->num_slots - 1) != VQKV_OK) {
        vqkvd_client_error(c, id, VQKV_ERANGE,
                           "the view of %u slots reaches past the region's %llu bytes",
                           (unsigned)rr->num_slots, (unsigned long long)rr->region_bytes);
        return false;
    }
    const char *stride;
    if (vqkv_kv_view_disjoint(&m->layout, &view, &stride) != VQKV_OK) {
        if (stride != NULL && strcmp(stride, "layer_offsets") == 0)
            vqkvd_client_error(c, id, VQKV_EINVAL,
                               "the view overlaps itself: by its layer_offsets a layer starts "
                               "before the one below it ends, so blocks would overwrite each "
                               "other");
        else
            vqkvd_client_error(c, id, VQKV_EINVAL,
                               "the view overlaps itself: its %s is too small to step past what "
                               "the smaller strides span, so blocks would overwrite each other",
                               stride != NULL ? stride : "strides");
        return false;
    }
    *out = view;
    return true;
}

static void vqkvd__region_register(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                   vqkv_frame_t *frame)
{
    const Vqkv__RegisterRegion *rr = req->register_region;
    uint64_t id = req->request_id;

    vqkvd_model_t *m = vqkvd__client_model(c, rr->model_handle);
    if (m == NULL) {
        vqkvd_client_error(c, id, VQKV_EHANDLE, "no model %llu on this connection",
                           (unsigned long long)rr->model_handle);
        return;
    }
    if (c->n_regions >= c->server->cfg.max_regions) {
        vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %u regions",
                           (unsigned)c->server->cfg.max_regions);
        return;
    }
    if (rr->region_bytes == 0 || rr->offset >= rr->region_bytes) {
        vqkvd_client_error(c, id, VQKV_ERANGE, "offset %llu is outside the region's %llu bytes",
                           (unsigned long long)rr->offset, (unsigned long long)rr->region_bytes);
        return;
    }
    if (rr->n_layer_offsets != 0 && rr->n_layer_offsets != m->layout.num_layers) {
        vqkvd_client_error(c, id, VQKV_EINVAL,
                           "layer_offsets has %zu entries; the model has %u layers (or give none)",
                           rr->n_layer_offsets, (unsigned)m->layout.num_layers);
        return;
    }
    vqkv_kv_view_t view;
    if (!vqkvd__region_view(c, id, rr, m, &view))
        return;
    vqkvd_region_t *r = calloc(1, sizeof *r);
    size_t offsets_bytes = rr->n_layer_offsets * sizeof *rr->layer_offsets;
    if (r != NULL && offsets_bytes > 0 && (r->layer_offsets = malloc(offsets_bytes)) == NULL) {
        free(r);
        r = NULL;
    }
    if (r == NULL) {
        vqkvd_client_error(c, id, VQKV_ENOMEM, "out of memory");
        return;
    }
    if (offsets_bytes > 0) /* the request's copy goes with the frame */
        memcpy(r->layer_offsets, rr->layer_offsets, offsets_bytes);
    view.layer_offsets = r->layer_offsets;
    char why[256];
    vqkvd_backend_t *be = c->server->backend;
    int rc = vqkvd_region_payload_check(rr, frame->n_fds, c->n_pieces, why, sizeof why);
    /* A VMM region's own fds join the pieces held, so the backend maps
     * pieces only; a backend that imports none refuses the region itself. */
    if (rc == VQKV_OK && rr->kind == VQKV__REGION_KIND__REGION_KIND_CUDA_VMM_FD &&
        be->ops->piece_import != NULL)
        rc = vqkvd__pieces_import(c, frame->fds, frame->n_fds, why, sizeof why);
    if (rc == VQKV_OK)
        rc = be->ops->region_open(be, rr, frame->fds, frame->n_fds, c->pieces, c->n_pieces, &r->mem,
                                  why, sizeof why);
    if (rc != VQKV_OK) {
        free(r->layer_offsets);
        free(r);
        vqkvd_client_error(c, id, rc, "region of %llu bytes: %s",
                           (unsigned long long)rr->region_bytes, why);
        return;
    }
    r->backend = c->server->backend;
    r->handle = ++c->next_region;
    r->refs = 1; /* the client's list */
    r->model = m;
    r->view = view;
    r->next = c->regions;
    c->regions = r;
    c->n_regions++;

    Vqkv__RegionRegistered rg = VQKV__REGION_REGISTERED__INIT;
    rg.region_handle = r->handle;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.request_id = id;
    env.body_case = VQKV__ENVELOPE__BODY_REGION_REGISTERED;
    env.region_registered = &rg;
    vqkvd_client_reply(c, &env);
}

/* Registered or refused, the region takes the pieces RegionPieces sent
 * before it: a mapping keeps its own hold on their memory. */
void vqkvd_session_register_region(vqkvd_client_t *c, const Vqkv__Envelope *req,
                                   vqkv_frame_t *frame)
{
    vqkvd__region_register(c, req, frame);
    vqkvd__pieces_release(c);
}

/* Whether region r can hold model m's blocks: a region serves every model
 * of its own model's shape (one memfd for several models, a model and its
 * draft); otherwise replies VQKV_EMISMATCH naming the field that differs. */
bool vqkvd__region_fits(vqkvd_client_t *c, uint64_t id, const vqkvd_region_t *r,
                        const vqkvd_model_t *m)
{
    char differs[160];
    if (r->model == m ||
        !vqkvd__model_diff(&r->model->layout, NULL, &m->layout, NULL, differs, sizeof differs))
        return true;
    vqkvd_client_error(c, id, VQKV_EMISMATCH,
                       "region %llu is shaped for model %u, which model %u does not fit (%s)",
                       (unsigned long long)r->handle, (unsigned)r->model->id, (unsigned)m->id,
                       differs);
    return false;
}

/* The model a FindModel names, of c's tenant only; kv_head_count 0 takes
 * the first registered with kv_head_first. O(models): finds are rare. */
static vqkvd_model_t *vqkvd__find_tenant_model(const vqkvd_client_t *c, const Vqkv__FindModel *fm)
{
    const vqkvd_server_t *s = c->server;
    for (uint32_t i = 0; i < s->n_models; i++) {
        vqkvd_model_t *m = s->models[i];
        if (m->tenant == (uint32_t)c->uid && m->kv_head_first == fm->kv_head_first &&
            (fm->kv_head_count == 0 || m->kv_head_count == fm->kv_head_count) &&
            strcmp(m->model_id, fm->model_id) == 0)
            return m;
    }
    return NULL;
}

void vqkvd_session_find_model(vqkvd_client_t *c, const Vqkv__Envelope *req, vqkv_frame_t *frame)
{
    (void)frame;
    const Vqkv__FindModel *fm = req->find_model;
    uint64_t id = req->request_id;

    size_t id_len = strlen(fm->model_id);
    if (id_len == 0 || id_len > VQKVD_MODEL_ID_MAX) {
        vqkvd_client_error(c, id, VQKV_EINVAL, "model_id must have 1 to %d bytes, not %zu",
                           VQKVD_MODEL_ID_MAX, id_len);
        return;
    }
    vqkvd_model_t *m = vqkvd__find_tenant_model(c, fm);
    if (m == NULL) {
        vqkvd_client_error(
            c, id, VQKV_EHANDLE, "tenant %s has registered no model \"%s\" with heads [%u, +%u)",
            c->tenant, fm->model_id, (unsigned)fm->kv_head_first, (unsigned)fm->kv_head_count);
        return;
    }
    if (vqkvd__client_model(c, m->id) == NULL) {
        if (c->n_models == VQKVD_CLIENT_MAX_MODELS) {
            vqkvd_client_error(c, id, VQKV_ELIMIT, "a connection may register %d models",
                               VQKVD_CLIENT_MAX_MODELS);
            return;
        }
        c->models[c->n_models++] = m->id;
    }

    vqkvd__model_reply(c, id, m);
}
