/* calib.c -- vqkvd's codebooks: loading them, and training them online.
 *
 * A model registered with a VQ codec needs codebooks before it can encode.
 * They come from one of three places, in this order: a codebook file the
 * client sends with RegisterModel (vqkvd_calib_load_fd), the file an
 * earlier run of the daemon saved under the state dir for the same tenant,
 * model id, head range, layout and codec (vqkvd_calib_load_saved), or
 * online calibration: the model stores its Puts with an fp16 fallback while
 * the first cfg.calib_tokens tokens of them are kept as samples; the Put
 * that completes the set queues one job on libuv's thread pool, which
 * trains every (layer, K|V) codebook in place on the model's codec and
 * saves the result under the state dir (written to a temporary name, then
 * renamed, so a crash leaves no half file). Its completion, back on the
 * loop, flips the model to ready. Nothing reads the codec while it trains:
 * Puts use the fallback until ready, and no block of the codec's class
 * exists before.
 *
 * Samples are the fallback's own block bytes (fp16 [T][H][D] per part,
 * kernels/README.md): exact for fp16 workers, rounded to fp16 for bf16 and
 * f32 ones, which moves a codebook by far less than quantization does. They
 * cost calib_tokens * layers * 2 * heads * head_dim * 2 bytes until the
 * training ends (1 GiB for a Llama-3-8B shape, 32 layers of 8 kv heads of
 * 128, at the default 8192 tokens).
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "calib.h"
#include "log.h"
#include "transcode.h"

struct vqkvd_calib {
    uv_work_t work;
    vqkvd_server_t *server;
    vqkvd_model_t *model;
    uint8_t *samples; /* want * fallback_bytes */
    uint32_t have, want;
    int training;
    vqkv_train_opts_t opts; /* set on the loop as training starts */
    /* Set by the job. */
    int rc;
    int save_rc;    /* VQKV_OK, or VQKV_EIO; not tried when path is "" */
    int save_errno; /* why it failed */
    uint64_t train_ns;
    vqkvd_codec_ident_t ident; /* of the trained codebooks, hashed off the loop */
    char path[PATH_MAX];       /* the codebook file, "" without a state dir */
};

/* ---- files ----------------------------------------------------------------- */

int vqkvd_calib_load_fd(vqkv_codec_t *codec, int fd, const char **why)
{
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        *why = "the codebook fd is not a regular file or memfd";
        return VQKV_EINVAL;
    }
    if (st.st_size <= 0 || (uint64_t)st.st_size > VQKVD_CODEBOOK_FILE_MAX) {
        *why = "the codebook file is empty or over 256 MiB";
        return VQKV_EINVAL;
    }
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len);
    if (buf == NULL) {
        *why = "out of memory";
        return VQKV_ENOMEM;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    int rc;
    if (got < len) {
        *why = "the codebook file could not be read whole";
        rc = VQKV_EINVAL;
    } else {
        rc = vqkv_codebook_load_buffer(codec, buf, len);
        *why = rc == VQKV_EMISMATCH ? "the codebooks are for another layout or codec"
                                    : "the codebook file is malformed";
    }
    free(buf);
    return rc;
}

/* Bytes of the identity hash a codebook file is named by (in hex). */
#define VQKVD__CODEBOOK_NAME_BYTES 16

/* <state_dir>/codebooks/<uid>-<hash>.vqcb, the hash over everything that
 * makes codebooks interchangeable: the model's identity (model id, head
 * range, layout, canonical spec). False without a state dir or when the
 * path does not fit: such a daemon keeps no codebooks. */
static bool vqkvd__calib_path(const vqkvd_server_t *s, const vqkvd_model_t *m, char *buf,
                              size_t size)
{
    if (s->cfg.state_dir == NULL)
        return false;
    const uint8_t *md = m->ident; /* a name that stays across releases (models.c) */
    char hex[2 * VQKVD__CODEBOOK_NAME_BYTES + 1];
    for (int i = 0; i < VQKVD__CODEBOOK_NAME_BYTES; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    int n =
        snprintf(buf, size, "%s/codebooks/%u-%s.vqcb", s->cfg.state_dir, (unsigned)m->tenant, hex);
    return n >= 0 && (size_t)n < size;
}

bool vqkvd_calib_load_saved(vqkvd_server_t *s, vqkvd_model_t *m)
{
    char path[PATH_MAX];
    if (!vqkvd__calib_path(s, m, path, sizeof path) || access(path, F_OK) < 0)
        return false;
    int rc = vqkv_codebook_load(m->codec, path);
    if (rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_WARN, "model %u: ignoring saved codebooks %s: %s", (unsigned)m->id,
                  path, vqkv_strerror(rc));
        return false;
    }
    if (vqkvd_model_set_ready(s, m, NULL) != VQKV_OK)
        return false;
    vqkvd_log(VQKVD_LOG_INFO, "model %u: codebooks loaded from %s", (unsigned)m->id, path);
    return true;
}

static int vqkvd__calib_save_failed(struct vqkvd_calib *k, int err)
{
    k->save_errno = err;
    return VQKV_EIO;
}

/* Writes the codebooks to k->path through a temporary name; VQKV_OK, or
 * VQKV_EIO with k->save_errno set. */
static int vqkvd__calib_save(struct vqkvd_calib *k)
{
    char dir[PATH_MAX], tmp[PATH_MAX + 8];
    int n = snprintf(dir, sizeof dir, "%s/codebooks", k->server->cfg.state_dir);
    if (n < 0 || (size_t)n >= sizeof dir)
        return vqkvd__calib_save_failed(k, ENAMETOOLONG);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        return vqkvd__calib_save_failed(k, errno);
    snprintf(tmp, sizeof tmp, "%s.tmp", k->path);
    if (vqkv_codebook_save(k->model->codec, tmp) != VQKV_OK) {
        unlink(tmp);
        return vqkvd__calib_save_failed(k, EIO);
    }
    if (rename(tmp, k->path) < 0) {
        int err = errno;
        unlink(tmp);
        return vqkvd__calib_save_failed(k, err);
    }
    return VQKV_OK;
}

/* ---- training ----------------------------------------------------------------- */

/* On a pool thread: trains every (layer, kv) of the model's codec from the
 * samples, hashes them for the model's codec identity, then saves. Touches
 * only k, the codec and immutable model fields. */
static void vqkvd__calib_work(uv_work_t *w)
{
    struct vqkvd_calib *k = w->data;
    const vqkvd_model_t *m = k->model;
    const vqkv_layout_t *l = &m->layout;
    uint64_t t0 = uv_hrtime();
    size_t part = (size_t)l->block_tokens * l->num_kv_heads * l->head_dim;
    float *x = malloc((size_t)k->have * part * sizeof *x);
    if (x == NULL) {
        k->rc = VQKV_ENOMEM;
        return;
    }
    const vqkv_train_opts_t *opts = &k->opts;
    for (uint32_t layer = 0; layer < l->num_layers && k->rc == VQKV_OK; layer++) {
        for (int kv = 0; kv < 2 && k->rc == VQKV_OK; kv++) {
            size_t at = ((size_t)layer * 2 + (size_t)kv) * part * 2;
            for (uint32_t b = 0; b < k->have; b++)
                vqkv_dtype_to_f32(VQKV_DTYPE_F16, k->samples + (size_t)b * m->fallback_bytes + at,
                                  part, x + (size_t)b * part);
            k->rc = vqkv_codec_train(m->codec, layer, kv, x, (size_t)k->have * part / l->head_dim,
                                     opts);
        }
    }
    free(x);
    if (k->rc == VQKV_OK)
        k->rc = vqkvd_codec_ident_set(&k->ident, m->codec);
    k->train_ns = uv_hrtime() - t0;
    if (k->rc == VQKV_OK && k->path[0] != '\0')
        k->save_rc = vqkvd__calib_save(k);
}

static void vqkvd__calib_after(uv_work_t *w, int status)
{
    struct vqkvd_calib *k = w->data;
    vqkvd_model_t *m = k->model;
    k->training = 0;
    if (status < 0 || k->rc != VQKV_OK) {
        vqkvd_log(VQKVD_LOG_ERROR,
                  "model %u: codebook training failed (%s); blocks stay in the fp16 fallback",
                  (unsigned)m->id, status < 0 ? uv_strerror(status) : vqkv_strerror(k->rc));
    } else if (vqkvd_model_set_ready(k->server, m, &k->ident) == VQKV_OK) {
        vqkvd_log(VQKVD_LOG_INFO, "model %u: codebooks trained on %u tokens in %.2f s; now %s",
                  (unsigned)m->id, (unsigned)(k->have * m->layout.block_tokens),
                  (double)k->train_ns / 1e9, vqkv_codec_spec(m->codec));
        /* No path: no state dir to keep them in, as said at start. */
        if (k->path[0] != '\0' && k->save_rc != VQKV_OK)
            vqkvd_log(VQKVD_LOG_WARN, "model %u: cannot save codebooks to %s: %s", (unsigned)m->id,
                      k->path, strerror(k->save_errno));
        else if (k->path[0] != '\0')
            vqkvd_log(VQKVD_LOG_INFO, "model %u: codebooks saved to %s", (unsigned)m->id, k->path);
    }
    vqkvd_server_t *s = k->server;
    vqkvd_calib_free(m);
    vqkvd_transcode_poll(s); /* the fp16 blocks stored meanwhile */
}

int vqkvd_calib_adopt(vqkvd_server_t *s, vqkvd_model_t *m, const uint8_t *buf, size_t len,
                      const uint8_t sha256[32], const char **why)
{
    struct vqkvd_calib *k = m->calib;
    *why = "the model is not calibrating";
    if (m->ready || k == NULL || k->training)
        return VQKV_EINVAL;
    /* Checked in a codec of its own first: m's must not be left with half
     * a set, nor with one that is not what its name says. */
    vqkv_codec_t *check = NULL;
    vqkvd_codec_ident_t ident;
    int rc = vqkv_codec_create(vqkv_codec_spec(m->codec), &m->layout, &check);
    *why = "not a codebook file of this model";
    if (rc == VQKV_OK)
        rc = vqkv_codebook_load_buffer(check, buf, len);
    if (rc == VQKV_OK)
        rc = vqkvd_codec_ident_set(&ident, check);
    vqkv_codec_free(check);
    if (rc == VQKV_OK && memcmp(ident.codebooks_sha256, sha256, 32) != 0) {
        *why = "its SHA-256 is not the one it was published under";
        rc = VQKV_EMISMATCH;
    }
    /* set_ready takes the identity from m's codec: ident's spec was the
     * freed check codec's. */
    if (rc == VQKV_OK && (rc = vqkv_codebook_load_buffer(m->codec, buf, len)) == VQKV_OK &&
        (rc = vqkvd_model_set_ready(s, m, NULL)) != VQKV_OK)
        *why = "the backend cannot take its codebooks";
    if (rc != VQKV_OK)
        return rc;
    /* One write of about a megabyte on the loop, once per model. */
    if (k->path[0] != '\0' && vqkvd__calib_save(k) != VQKV_OK)
        vqkvd_log(VQKVD_LOG_WARN, "model %u: cannot save codebooks to %s: %s", (unsigned)m->id,
                  k->path, strerror(k->save_errno));
    vqkvd_calib_free(m);
    vqkvd_transcode_poll(s); /* the fp16 blocks stored meanwhile */
    return VQKV_OK;
}

int vqkvd_calib_begin(vqkvd_server_t *s, vqkvd_model_t *m)
{
    vqkv_codec_t *fallback = NULL;
    struct vqkvd_calib *k = calloc(1, sizeof *k);
    int rc = k == NULL ? VQKV_ENOMEM : vqkv_codec_create("fp16", &m->layout, &fallback);
    if (rc != VQKV_OK)
        goto fail;
    size_t bytes = vqkv_codec_block_bytes(fallback);
    uint32_t tokens = s->cfg.calib_tokens ? s->cfg.calib_tokens : 1;
    k->want = (tokens + m->layout.block_tokens - 1) / m->layout.block_tokens;
    k->samples = malloc((size_t)k->want * bytes);
    if (k->samples == NULL) {
        rc = VQKV_ENOMEM;
        goto fail;
    }
    rc = bytes <= UINT32_MAX ? vqkvd_pool_add_class(&s->pool, (uint32_t)bytes) : VQKV_EINVAL;
    if (rc < 0)
        goto fail;
    m->fallback_cls = (uint32_t)rc;
    m->fallback_bytes = (uint32_t)bytes;
    m->fallback = fallback;
    vqkvd_codec_ident_set(&m->fallback_ident, fallback); /* fp16: no codebooks, cannot fail */
    k->server = s;
    k->model = m;
    k->work.data = k;
    if (!vqkvd__calib_path(s, m, k->path, sizeof k->path))
        k->path[0] = '\0';
    m->calib = k;
    vqkvd_log(
        VQKVD_LOG_INFO, "model %u: no codebooks for %s; storing fp16 until %u tokens are collected",
        (unsigned)m->id, vqkv_codec_spec(m->codec), (unsigned)(k->want * m->layout.block_tokens));
    return VQKV_OK;

fail:
    vqkv_codec_free(fallback);
    if (k != NULL)
        free(k->samples);
    free(k);
    return rc < 0 ? rc : VQKV_EINVAL;
}

void vqkvd_calib_add(vqkvd_server_t *s, vqkvd_model_t *m, const uint8_t *block)
{
    struct vqkvd_calib *k = m->calib;
    if (k == NULL || k->training || k->have == k->want)
        return;
    /* On the loop: a memcpy on the CPU, one small device-to-host copy on
     * a GPU; at most `want` of them per model. */
    if (s->backend->ops->block_read(s->backend, block, m->fallback_bytes,
                                    k->samples + (size_t)k->have * m->fallback_bytes) != VQKV_OK)
        return; /* a sample less; the next put brings another */
    if (++k->have < k->want)
        return;
    /* Seeded: the same samples give the same codebooks on every run; the
     * assignment steps on the backend's GPU when it has one (the CPU
     * trainer's updates, so the same codebooks either way). Keys are turned
     * through RoPE offsets when the model named its RoPE. Set here, on the
     * loop, which alone changes the model and the config. */
    vqkvd_backend_t *be = s->backend;
    k->opts = (vqkv_train_opts_t){
        .seed = 1, .assigner = be->ops->assigner != NULL ? be->ops->assigner(be) : NULL};
    if (m->rope.theta != 0.0) {
        k->opts.rope_positions = s->cfg.calib_positions;
        k->opts.rope = m->rope;
    }
    int rc = uv_queue_work(s->loop, &k->work, vqkvd__calib_work, vqkvd__calib_after);
    if (rc < 0) {
        vqkvd_log(VQKVD_LOG_ERROR, "model %u: cannot queue codebook training: %s", (unsigned)m->id,
                  uv_strerror(rc));
        vqkvd_calib_free(m);
        return;
    }
    k->training = 1;
    vqkvd_log(VQKVD_LOG_INFO, "model %u: training codebooks on %u tokens, keys at offsets below %u",
              (unsigned)m->id, (unsigned)(k->have * m->layout.block_tokens),
              (unsigned)k->opts.rope_positions);
}

int vqkvd_calib_training(const vqkvd_model_t *m)
{
    return m->calib != NULL && m->calib->training;
}

void vqkvd_calib_free(vqkvd_model_t *m)
{
    if (m->calib == NULL)
        return;
    free(m->calib->samples);
    free(m->calib);
    m->calib = NULL;
}
