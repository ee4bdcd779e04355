/* libvqkv.c -- the worker library (vqkv.h): synchronous request/reply over
 * the blocking frame helpers of proto/frame.h. */
/* vqkv_proto.h first: vqkv.h then leaves out its copy of the codes. */
#include "frame.h"
#include "vqkv_proto.h"

#include "block_keys.h"
#include "vqkv.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define VQKV__ERR_LEN 512
_Static_assert(VQKV_KEY_BYTES == VQKV_PROTO_KEY_BYTES, "key size");
#define VQKV__NAME_MAX 64

struct vqkv_model {
    struct vqkv_model *next;
    uint64_t handle;
    char *model_id;
    char *codec; /* canonical spec */
    uint32_t block_bytes;
    vqkv_layout_t layout;
    int codebooks_ready; /* as of the last RegisterModel or FindModel */
    uint8_t salt[VQKV_BLOCK_KEY_SALT_LEN];
};

struct vqkv_client {
    int fd;
    vqkv_frame_reader_t reader;
    uint64_t next_id;
    uint32_t max_frame; /* the daemon's, from Welcome */
    int timeout_ms;
    uint8_t salt[VQKV_BLOCK_KEY_SALT_LEN];
    char *tenant;
    char *backend;
    char *server_version;
    vqkv_model_t *models;
    char err[VQKV__ERR_LEN];
};

/* ---- helpers ---------------------------------------------------------------- */

static int vqkv__fail(vqkv_client_t *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

static char *vqkv__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

/* Sends env (request_id assigned here) with fds, then waits for the reply
 * carrying its id; replies to earlier requests that timed out are skipped.
 * *reply is the reply (an Error becomes its code, the message kept). */
static int vqkv__call(vqkv_client_t *c, Vqkv__Envelope *env, const int *fds, size_t n_fds,
                      Vqkv__Envelope__BodyCase want, Vqkv__Envelope **reply)
{
    *reply = NULL;
    c->err[0] = '\0';
    if (c->fd < 0)
        return vqkv__fail(c, VQKV_ECLOSED, "connection is closed after an earlier error");
    env->request_id = c->next_id++;
    int rc = vqkv_frame_send(c->fd, env, fds, n_fds, c->max_frame);
    if (rc == VQKV_ETOOBIG)
        return vqkv__fail(c, rc, "request exceeds the daemon's frame limit of %u bytes",
                          c->max_frame);
    if (rc != VQKV_OK) {
        int e = errno;
        rc = vqkv__fail(c, rc, "sending request: %s", strerror(e));
        errno = e;
        return rc;
    }
    for (;;) {
        vqkv_frame_t frame;
        rc = vqkv_frame_recv(c->fd, &c->reader, &frame);
        if (rc == VQKV_EAGAIN)
            return vqkv__fail(c, rc, "no reply from vqkvd within %d ms", c->timeout_ms);
        if (rc != VQKV_OK) {
            /* The stream is out of step or gone: no later call can succeed. */
            close(c->fd);
            c->fd = -1;
            return vqkv__fail(c, rc, "receiving reply: %s", vqkv_proto_strerror(rc));
        }
        Vqkv__Envelope *r = NULL;
        rc = vqkv_frame_unpack(frame.data, frame.len, &r);
        vqkv_frame_clear(&frame);
        if (rc == VQKV_OK)
            rc = vqkv_frame_check(r);
        if (rc != VQKV_OK) {
            vqkv_frame_envelope_free(r);
            return vqkv__fail(c, rc, "reply not understood: %s", vqkv_proto_strerror(rc));
        }
        if (r->request_id != env->request_id && r->request_id != 0) {
            vqkv_frame_envelope_free(r); /* a late reply to an abandoned request */
            continue;
        }
        if (r->body_case == VQKV__ENVELOPE__BODY_ERROR) {
            int code = r->error->code < 0 ? r->error->code : VQKV_EPROTO;
            vqkv__fail(c, code, "%s", r->error->message);
            vqkv_frame_envelope_free(r);
            return code;
        }
        if (r->body_case != want) {
            vqkv_frame_envelope_free(r);
            return vqkv__fail(c, VQKV_EPROTO, "unexpected reply type %d", (int)r->body_case);
        }
        *reply = r;
        return VQKV_OK;
    }
}

/* ---- connections -------------------------------------------------------------- */

int vqkv_default_socket(char *buf, size_t size)
{
    if (buf == NULL)
        return VQKV_EINVAL;
    const char *base = getuid() == 0 ? "/run" : getenv("XDG_RUNTIME_DIR");
    if (base == NULL || base[0] == '\0')
        return VQKV_EINVAL;
    int n = snprintf(buf, size, "%s/vqkv/vqkv.sock", base);
    return n < 0 || (size_t)n >= size ? VQKV_EINVAL : VQKV_OK;
}

const char *vqkv_client_strerror(int err)
{
    return vqkv_proto_strerror(err);
}

const char *vqkv_last_error(const vqkv_client_t *client)
{
    return client == NULL ? "" : client->err;
}

const char *vqkv_client_tenant(const vqkv_client_t *client)
{
    return client->tenant;
}

const char *vqkv_client_backend(const vqkv_client_t *client)
{
    return client->backend;
}

const char *vqkv_client_server_version(const vqkv_client_t *client)
{
    return client->server_version;
}

void vqkv_close(vqkv_client_t *client)
{
    if (client == NULL)
        return;
    if (client->fd >= 0)
        close(client->fd);
    vqkv_frame_reader_free(&client->reader);
    vqkv_model_t *m = client->models;
    while (m != NULL) {
        vqkv_model_t *next = m->next;
        free(m->model_id);
        free(m->codec);
        free(m);
        m = next;
    }
    free(client->tenant);
    free(client->backend);
    free(client->server_version);
    free(client);
}

int vqkv_connect(const char *socket_path, const char *client_name, int timeout_ms,
                 vqkv_client_t **client)
{
    if (client == NULL)
        return VQKV_EINVAL;
    *client = NULL;
    char path_buf[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (socket_path == NULL) {
        if (vqkv_default_socket(path_buf, sizeof path_buf) != VQKV_OK)
            return VQKV_EINVAL;
        socket_path = path_buf;
    }
    if (client_name == NULL)
        client_name = "libvqkv";
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (timeout_ms <= 0 || strlen(socket_path) >= sizeof addr.sun_path ||
        strlen(client_name) > VQKV__NAME_MAX)
        return VQKV_EINVAL;
    memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);

    vqkv_client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return VQKV_ENOMEM;
    c->next_id = 1;
    c->max_frame = VQKV_FRAME_DEFAULT_MAX;
    c->timeout_ms = timeout_ms;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        vqkv_close(c);
        errno = e;
        return VQKV_EIO;
    }
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc = vqkv_frame_reader_init(&c->reader, VQKV_FRAME_DEFAULT_MAX);
    if (rc != VQKV_OK) {
        vqkv_close(c);
        return rc;
    }

    Vqkv__Hello h = VQKV__HELLO__INIT;
    h.protocol_version = VQKV_PROTO_VERSION;
    h.client_name = (char *)client_name;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    Vqkv__Envelope *r;
    rc = vqkv__call(c, &env, NULL, 0, VQKV__ENVELOPE__BODY_WELCOME, &r);
    if (rc != VQKV_OK) {
        vqkv_close(c);
        return rc;
    }
    Vqkv__Welcome *w = r->welcome;
    if (w->tenant_salt.len != VQKV_BLOCK_KEY_SALT_LEN || w->max_frame_bytes == 0) {
        vqkv_frame_envelope_free(r);
        vqkv_close(c);
        return VQKV_EPROTO;
    }
    memcpy(c->salt, w->tenant_salt.data, VQKV_BLOCK_KEY_SALT_LEN);
    c->max_frame = w->max_frame_bytes < VQKV_FRAME_LIMIT ? w->max_frame_bytes : VQKV_FRAME_LIMIT;
    c->tenant = vqkv__strdup(w->tenant);
    c->backend = vqkv__strdup(w->backend);
    c->server_version = vqkv__strdup(w->server_version);
    vqkv_frame_envelope_free(r);
    if (c->tenant == NULL || c->backend == NULL || c->server_version == NULL) {
        vqkv_close(c);
        return VQKV_ENOMEM;
    }
    *client = c;
    return VQKV_OK;
}

/* ---- models ------------------------------------------------------------------- */

/* Sends env (RegisterModel or FindModel, with fd when >= 0) and keeps the
 * model its ModelRegistered reply names: layout, or the reply's when NULL.
 * A handle the client has already is the same model, its codebooks_ready
 * brought up to date. */
static int vqkv__model_call(vqkv_client_t *client, Vqkv__Envelope *env, int fd,
                            const char *model_id, const vqkv_layout_t *layout, vqkv_model_t **model)
{
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, env, &fd, fd >= 0, VQKV__ENVELOPE__BODY_MODEL_REGISTERED, &r);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__ModelRegistered *mr = r->model_registered;
    vqkv_model_t *m = NULL;
    if (layout == NULL && mr->layout == NULL) {
        rc = vqkv__fail(client, VQKV_EPROTO, "the daemon sent no layout for \"%s\"", model_id);
        goto cleanup;
    }
    for (m = client->models; m != NULL; m = m->next) {
        if (m->handle == mr->model_handle) {
            m->codebooks_ready = mr->codebooks_ready;
            goto cleanup;
        }
    }
    m = calloc(1, sizeof *m);
    if (m != NULL) {
        m->model_id = vqkv__strdup(model_id);
        m->codec = vqkv__strdup(mr->codec);
    }
    if (m == NULL || m->model_id == NULL || m->codec == NULL) {
        if (m != NULL) {
            free(m->model_id);
            free(m->codec);
            free(m);
        }
        m = NULL;
        rc = vqkv__fail(client, VQKV_ENOMEM, "model \"%s\": out of memory", model_id);
        goto cleanup;
    }
    m->handle = mr->model_handle;
    m->block_bytes = mr->block_bytes;
    m->codebooks_ready = mr->codebooks_ready;
    if (layout != NULL)
        m->layout = *layout;
    else
        m->layout =
            (vqkv_layout_t){mr->layout->num_layers, mr->layout->num_kv_heads, mr->layout->head_dim,
                            mr->layout->block_tokens, (vqkv_dtype_t)mr->layout->dtype};
    memcpy(m->salt, client->salt, sizeof m->salt);
    m->next = client->models;
    client->models = m;
cleanup:
    vqkv_frame_envelope_free(r);
    *model = m;
    return rc;
}

/* RegisterModel, with the codebook file open on codebook_fd (or -1). */
static int vqkv__register_model(vqkv_client_t *client, const char *model_id,
                                const vqkv_layout_t *layout, const char *codec_spec,
                                int codebook_fd, vqkv_model_t **model)
{
    *model = NULL;
    Vqkv__Layout wl = VQKV__LAYOUT__INIT;
    wl.num_layers = layout->num_layers;
    wl.num_kv_heads = layout->num_kv_heads;
    wl.head_dim = layout->head_dim;
    wl.block_tokens = layout->block_tokens;
    wl.dtype = (Vqkv__DType)layout->dtype;
    Vqkv__RegisterModel rm = VQKV__REGISTER_MODEL__INIT;
    rm.model_id = (char *)model_id;
    rm.layout = &wl;
    rm.kv_head_first = 0;
    rm.kv_head_count = layout->num_kv_heads;
    rm.codec = (char *)codec_spec;
    rm.num_fds = codebook_fd >= 0;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_MODEL;
    env.register_model = &rm;
    return vqkv__model_call(client, &env, codebook_fd, model_id, layout, model);
}

int vqkv_register_model(vqkv_client_t *client, const char *model_id, const vqkv_layout_t *layout,
                        const char *codec_spec, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || layout == NULL || codec_spec == NULL || model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "register_model: NULL argument");
    return vqkv__register_model(client, model_id, layout, codec_spec, -1, model);
}

int vqkv_register_model_codebook(vqkv_client_t *client, const char *model_id,
                                 const vqkv_layout_t *layout, const char *codec_spec,
                                 const char *codebook_path, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || layout == NULL || codec_spec == NULL || codebook_path == NULL ||
        model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "register_model_codebook: NULL argument");
    int fd = open(codebook_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *model = NULL;
        return vqkv__fail(client, VQKV_EINVAL, "register_model_codebook: %s: %s", codebook_path,
                          strerror(errno));
    }
    int rc = vqkv__register_model(client, model_id, layout, codec_spec, fd, model);
    close(fd);
    return rc;
}

int vqkv_model_codebooks_ready(const vqkv_model_t *model)
{
    return model != NULL && model->codebooks_ready;
}

int vqkv_model_find(vqkv_client_t *client, const char *model_id, uint32_t kv_head_first,
                    uint32_t kv_head_count, vqkv_model_t **model)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model_id == NULL || model == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "model_find: NULL argument");
    *model = NULL;
    Vqkv__FindModel fm = VQKV__FIND_MODEL__INIT;
    fm.model_id = (char *)model_id;
    fm.kv_head_first = kv_head_first;
    fm.kv_head_count = kv_head_count;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_FIND_MODEL;
    env.find_model = &fm;
    return vqkv__model_call(client, &env, -1, model_id, NULL, model);
}

void vqkv_model_layout(const vqkv_model_t *model, vqkv_layout_t *layout)
{
    *layout = model->layout;
}

const char *vqkv_model_codec(const vqkv_model_t *model)
{
    return model->codec;
}

uint32_t vqkv_model_block_bytes(const vqkv_model_t *model)
{
    return model->block_bytes;
}

int vqkv_model_block_keys(const vqkv_model_t *model, const uint8_t *parent, const uint32_t *tokens,
                          size_t n_tokens, const uint8_t *extra, size_t extra_len,
                          uint8_t (*keys)[VQKV_KEY_BYTES], size_t max_keys, size_t *n_keys)
{
    if (model == NULL)
        return VQKV_EINVAL;
    vqkv_block_key_ctx_t ctx;
    memcpy(ctx.tenant_salt, model->salt, sizeof ctx.tenant_salt);
    ctx.model_id = model->model_id;
    ctx.codec_id = model->codec;
    return vqkv_block_keys_continue(&ctx, parent, tokens, n_tokens, model->layout.block_tokens,
                                    extra, extra_len, keys, max_keys, n_keys);
}

/* ---- regions ------------------------------------------------------------------- */

int vqkv_memfd_create(const char *name, uint64_t bytes, int *fd)
{
    if (name == NULL || fd == NULL || bytes == 0 || bytes > (uint64_t)INT64_MAX)
        return VQKV_EINVAL;
    int f = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (f < 0)
        return VQKV_EIO;
    if (ftruncate(f, (off_t)bytes) < 0) {
        int e = errno;
        close(f);
        errno = e;
        return VQKV_EIO;
    }
    *fd = f;
    return VQKV_OK;
}

int vqkv_register_memfd_region(vqkv_client_t *client, const vqkv_model_t *model, int memfd,
                               uint64_t bytes, uint64_t offset, const vqkv_kv_view_t *strides,
                               vqkv_region_t *region)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || strides == NULL || region == NULL || memfd < 0)
        return vqkv__fail(client, VQKV_EINVAL, "register_memfd_region: bad argument");
    Vqkv__RegisterRegion rr = VQKV__REGISTER_REGION__INIT;
    rr.model_handle = model->handle;
    rr.kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    rr.region_bytes = bytes;
    rr.offset = offset;
    rr.layer_stride = strides->layer_stride;
    rr.kv_stride = strides->kv_stride;
    rr.slot_stride = strides->slot_stride;
    rr.token_stride = strides->token_stride;
    rr.head_stride = strides->head_stride;
    rr.num_slots = strides->num_slots;
    rr.num_fds = 1;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, &memfd, 1, VQKV__ENVELOPE__BODY_REGION_REGISTERED, &r);
    if (rc != VQKV_OK)
        return rc;
    *region = r->region_registered->region_handle;
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}

/* ---- blocks ------------------------------------------------------------------- */

static bool vqkv__zero_key(const uint8_t *key)
{
    for (size_t i = 0; i < VQKV_KEY_BYTES; i++)
        if (key[i] != 0)
            return false;
    return true;
}

/* The wire form of n keys: entries pointing into keys (borrowed, not
 * copied); NULL when out of memory. The caller frees the array. */
static ProtobufCBinaryData *vqkv__wire_keys(const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n)
{
    ProtobufCBinaryData *k = calloc(n ? n : 1, sizeof *k);
    if (k == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        k[i] = (ProtobufCBinaryData){VQKV_KEY_BYTES, (uint8_t *)keys[i]};
    return k;
}

int vqkv_put(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
             const uint8_t (*keys)[VQKV_KEY_BYTES], const uint8_t (*parents)[VQKV_KEY_BYTES],
             const uint32_t *slots, size_t n, vqkv_put_status_t *statuses)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && (keys == NULL || slots == NULL)) || n > UINT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "put: bad argument");
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    ProtobufCBinaryData *p = calloc(n ? n : 1, sizeof *p);
    if (k == NULL || p == NULL) {
        free(k);
        free(p);
        return vqkv__fail(client, VQKV_ENOMEM, "put: out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        const uint8_t *parent = NULL;
        if (parents != NULL)
            parent = vqkv__zero_key(parents[i]) ? NULL : parents[i];
        else if (i > 0)
            parent = keys[i - 1];
        p[i] = parent == NULL ? (ProtobufCBinaryData){0, NULL}
                              : (ProtobufCBinaryData){VQKV_KEY_BYTES, (uint8_t *)parent};
    }
    Vqkv__Put put = VQKV__PUT__INIT;
    put.model_handle = model->handle;
    put.region_handle = region;
    put.n_keys = n;
    put.keys = k;
    put.n_parent_keys = n;
    put.parent_keys = p;
    put.n_slots = n;
    put.slots = (uint32_t *)slots;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_PUT;
    env.put = &put;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_PUT_DONE, &r);
    free(k);
    free(p);
    if (rc != VQKV_OK)
        return rc;
    Vqkv__PutDone *pd = r->put_done;
    if (pd->n_status != n) {
        vqkv_frame_envelope_free(r);
        return vqkv__fail(client, VQKV_EPROTO, "put: %zu statuses for %zu blocks", pd->n_status, n);
    }
    if (statuses != NULL)
        for (size_t i = 0; i < n; i++)
            statuses[i] = (vqkv_put_status_t)pd->status[i];
    int stored = (int)pd->stored;
    vqkv_frame_envelope_free(r);
    return stored;
}

int vqkv_lookup(vqkv_client_t *client, const vqkv_model_t *model,
                const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *found, vqkv_lease_t *lease)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || found == NULL || lease == NULL || (n > 0 && keys == NULL))
        return vqkv__fail(client, VQKV_EINVAL, "lookup: bad argument");
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    if (k == NULL)
        return vqkv__fail(client, VQKV_ENOMEM, "lookup: out of memory");
    Vqkv__Lookup lk = VQKV__LOOKUP__INIT;
    lk.model_handle = model->handle;
    lk.n_keys = n;
    lk.keys = k;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
    env.lookup = &lk;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_LOOKUP_RESULT, &r);
    free(k);
    if (rc != VQKV_OK)
        return rc;
    *found = r->lookup_result->present;
    *lease = r->lookup_result->lease_id;
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}

int vqkv_get(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region, const uint32_t *slots,
             size_t n)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if ((n > 0 && slots == NULL) || n > UINT32_MAX)
        return vqkv__fail(client, VQKV_EINVAL, "get: bad argument");
    Vqkv__Get g = VQKV__GET__INIT;
    g.lease_id = lease;
    g.region_handle = region;
    g.n_slots = n;
    g.slots = (uint32_t *)slots;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_GET;
    env.get = &g;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_GET_DONE, &r);
    if (rc != VQKV_OK)
        return rc;
    int written = (int)r->get_done->written;
    vqkv_frame_envelope_free(r);
    return written;
}

int vqkv_release(vqkv_client_t *client, vqkv_lease_t lease)
{
    if (client == NULL)
        return VQKV_EINVAL;
    client->err[0] = '\0';
    if (lease == 0)
        return VQKV_OK;
    Vqkv__Release rel = VQKV__RELEASE__INIT;
    rel.lease_id = lease;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_RELEASE;
    env.release = &rel;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_ACK, &r);
    if (rc != VQKV_OK)
        return rc;
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}

/* Sends env, whose reply is an Ack; its count into *count (may be NULL). */
static int vqkv__ack_call(vqkv_client_t *client, Vqkv__Envelope *env, size_t *count)
{
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, env, NULL, 0, VQKV__ENVELOPE__BODY_ACK, &r);
    if (rc != VQKV_OK)
        return rc;
    if (count != NULL)
        *count = r->ack->count;
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}

/* Pin (unpin 0) or Unpin (unpin 1); the Ack's count into *count. */
static int vqkv__pin_call(vqkv_client_t *client, const vqkv_model_t *model,
                          const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, uint32_t ttl_ms,
                          int unpin, size_t *count)
{
    const char *what = unpin ? "unpin" : "pin";
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && keys == NULL))
        return vqkv__fail(client, VQKV_EINVAL, "%s: bad argument", what);
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    if (k == NULL)
        return vqkv__fail(client, VQKV_ENOMEM, "%s: out of memory", what);
    Vqkv__Pin p = VQKV__PIN__INIT;
    Vqkv__Unpin u = VQKV__UNPIN__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    if (unpin) {
        u.model_handle = model->handle;
        u.n_keys = n;
        u.keys = k;
        env.body_case = VQKV__ENVELOPE__BODY_UNPIN;
        env.unpin = &u;
    } else {
        p.model_handle = model->handle;
        p.n_keys = n;
        p.keys = k;
        p.ttl_ms = ttl_ms;
        env.body_case = VQKV__ENVELOPE__BODY_PIN;
        env.pin = &p;
    }
    int rc = vqkv__ack_call(client, &env, count);
    free(k);
    return rc;
}

int vqkv_pin(vqkv_client_t *client, const vqkv_model_t *model,
             const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, uint32_t ttl_ms, size_t *count)
{
    return vqkv__pin_call(client, model, keys, n, ttl_ms, 0, count);
}

int vqkv_unpin(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *count)
{
    return vqkv__pin_call(client, model, keys, n, 0, 1, count);
}

int vqkv_evict(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, int all, size_t *count)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (model == NULL || (n > 0 && keys == NULL) || (all && n > 0))
        return vqkv__fail(client, VQKV_EINVAL, "evict: bad argument");
    ProtobufCBinaryData *k = vqkv__wire_keys(keys, n);
    if (k == NULL)
        return vqkv__fail(client, VQKV_ENOMEM, "evict: out of memory");
    Vqkv__Evict e = VQKV__EVICT__INIT;
    e.model_handle = model->handle;
    e.n_keys = n;
    e.keys = k;
    e.all = all != 0;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_EVICT;
    env.evict = &e;
    int rc = vqkv__ack_call(client, &env, count);
    free(k);
    return rc;
}

static void vqkv__tenant_stats(vqkv_tenant_stats_t *out, const Vqkv__TenantStats *t)
{
    snprintf(out->tenant, sizeof out->tenant, "%s", t->tenant);
    out->hits = t->hits;
    out->misses = t->misses;
    out->blocks = t->blocks;
    out->bytes_stored = t->bytes_stored;
    out->bytes_logical = t->bytes_logical;
    out->evictions = t->evictions;
    out->quota_bytes = t->quota_bytes;
}

int vqkv_stats(vqkv_client_t *client, vqkv_stats_t *stats)
{
    if (client == NULL)
        return VQKV_EINVAL;
    if (stats == NULL)
        return vqkv__fail(client, VQKV_EINVAL, "stats: NULL argument");
    Vqkv__Stats st = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &st;
    Vqkv__Envelope *r;
    int rc = vqkv__call(client, &env, NULL, 0, VQKV__ENVELOPE__BODY_STATS_REPLY, &r);
    if (rc != VQKV_OK)
        return rc;
    const Vqkv__StatsReply *s = r->stats_reply;
    *stats = (vqkv_stats_t){
        .hits = s->hits,
        .misses = s->misses,
        .blocks = s->blocks,
        .bytes_stored = s->bytes_stored,
        .bytes_logical = s->bytes_logical,
        .evictions = s->evictions,
        .clients = s->clients,
        .pool_bytes = s->pool_bytes,
        .leases = s->leases,
        .n_tenants_total = s->n_tenants > UINT32_MAX ? UINT32_MAX : (uint32_t)s->n_tenants,
    };
    for (size_t i = 0; i < s->n_tenants && i < VQKV_STATS_MAX_TENANTS; i++)
        vqkv__tenant_stats(&stats->tenants[stats->n_tenants++], s->tenants[i]);
    vqkv_frame_envelope_free(r);
    return VQKV_OK;
}
