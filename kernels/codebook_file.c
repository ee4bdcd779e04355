/* codebook_file.c -- codebooks saved to and loaded from msgpack files.
 *
 * A file is one msgpack map:
 *   "format":  "vqkv-codebook"
 *   "version": 1
 *   "body":    bin, itself a msgpack map:
 *                "layout": {num_layers, num_kv_heads, head_dim, block_tokens, dtype}
 *                "codec":  the canonical codec spec
 *                "books":  bin, the codebooks as little-endian float32
 *   "sha256":  bin[32], SHA-256 of the body bytes
 * Loading checks every type, size and the checksum before the codec is
 * touched, so a refused file leaves the codec as it was. The codebooks
 * depend on layers, kv heads and head_dim, not on block_tokens or dtype,
 * so only those three must match.
 */
#include "codec_internal.h"

#include <fcntl.h>
#include <math.h>
#include <msgpack.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define VQKV__CODEBOOK_FORMAT "vqkv-codebook"
#define VQKV__CODEBOOK_VERSION 1
/* Larger than any real codebook set (b=12 tables for 1024 layers stay
 * below it), small enough that a hostile size cannot exhaust memory. */
#define VQKV__CODEBOOK_MAX_BYTES (1ull << 31)

static const char *const vqkv__dtype_names[] = {"f16", "bf16", "f32"};

static void vqkv__pack_cstr(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void vqkv__pack_uint_kv(msgpack_packer *pk, const char *key, uint32_t value)
{
    vqkv__pack_cstr(pk, key);
    msgpack_pack_uint32(pk, value);
}

static void vqkv__pack_bin(msgpack_packer *pk, const void *data, size_t len)
{
    msgpack_pack_bin(pk, len);
    msgpack_pack_bin_body(pk, data, len);
}

int vqkv_codebook_save_buffer(const vqkv_codec_t *codec, uint8_t **buf, size_t *len)
{
    size_t n_floats;
    uint8_t digest[32];
    msgpack_sbuffer body, file;
    msgpack_packer pk;

    if (codec == NULL || buf == NULL || len == NULL || codec->ops->books == NULL)
        return VQKV_EINVAL;
    if (vqkv_codec_needs_training(codec))
        return VQKV_ENOCODEBOOK;
    const float *books = codec->ops->books(codec, &n_floats);
    const vqkv_layout_t *l = &codec->layout;

    msgpack_sbuffer_init(&body);
    msgpack_packer_init(&pk, &body, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    vqkv__pack_cstr(&pk, "layout");
    msgpack_pack_map(&pk, 5);
    vqkv__pack_uint_kv(&pk, "num_layers", l->num_layers);
    vqkv__pack_uint_kv(&pk, "num_kv_heads", l->num_kv_heads);
    vqkv__pack_uint_kv(&pk, "head_dim", l->head_dim);
    vqkv__pack_uint_kv(&pk, "block_tokens", l->block_tokens);
    vqkv__pack_cstr(&pk, "dtype");
    vqkv__pack_cstr(&pk, vqkv__dtype_names[l->dtype]);
    vqkv__pack_cstr(&pk, "codec");
    vqkv__pack_cstr(&pk, codec->spec);
    vqkv__pack_cstr(&pk, "books");
    /* Floats go out little-endian whatever the host, byte by byte. */
    msgpack_pack_bin(&pk, n_floats * 4);
    for (size_t i = 0; i < n_floats; i++) {
        uint32_t u = vqkv_f32_to_bits(books[i]);
        uint8_t le[4] = {(uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
        msgpack_pack_bin_body(&pk, le, 4);
    }
    EVP_Digest(body.data, body.size, digest, NULL, EVP_sha256(), NULL);

    msgpack_sbuffer_init(&file);
    msgpack_packer_init(&pk, &file, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    vqkv__pack_cstr(&pk, "format");
    vqkv__pack_cstr(&pk, VQKV__CODEBOOK_FORMAT);
    vqkv__pack_uint_kv(&pk, "version", VQKV__CODEBOOK_VERSION);
    vqkv__pack_cstr(&pk, "body");
    vqkv__pack_bin(&pk, body.data, body.size);
    vqkv__pack_cstr(&pk, "sha256");
    vqkv__pack_bin(&pk, digest, sizeof digest);
    msgpack_sbuffer_destroy(&body);

    if (file.data == NULL) {
        msgpack_sbuffer_destroy(&file);
        return VQKV_ENOMEM;
    }
    *len = file.size;
    *buf = (uint8_t *)msgpack_sbuffer_release(&file);
    return VQKV_OK;
}

/* The value under key in a map whose keys must all be strings, or NULL. */
static const msgpack_object *vqkv__map_get(const msgpack_object *map, const char *key)
{
    size_t klen = strlen(key);
    if (map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == klen &&
            memcmp(kv->key.via.str.ptr, key, klen) == 0)
            return &kv->val;
    }
    return NULL;
}

static bool vqkv__map_uint(const msgpack_object *map, const char *key, uint32_t *out)
{
    const msgpack_object *o = vqkv__map_get(map, key);
    if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > UINT32_MAX)
        return false;
    *out = (uint32_t)o->via.u64;
    return true;
}

static bool vqkv__map_bin(const msgpack_object *map, const char *key, const char **ptr,
                          size_t *size)
{
    const msgpack_object *o = vqkv__map_get(map, key);
    if (o == NULL || o->type != MSGPACK_OBJECT_BIN)
        return false;
    *ptr = o->via.bin.ptr;
    *size = o->via.bin.size;
    return true;
}

static bool vqkv__map_str_is(const msgpack_object *map, const char *key, const char *want)
{
    const msgpack_object *o = vqkv__map_get(map, key);
    return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(want) &&
           memcmp(o->via.str.ptr, want, o->via.str.size) == 0;
}

/* Nesting deeper than a codebook file's is refused before unpacking. */
#define VQKV__MSGPACK_MAX_DEPTH 8

/* Big-endian n-byte unsigned at p. */
static uint64_t vqkv__load_be(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* msgpack-c's unpacker allocates a map's or array's elements as soon as it
 * reads the count, before it knows whether the input holds them: a 6-byte
 * file declaring 2^32 map entries makes it ask for 96 GiB. Every element
 * takes at least one byte, so this walk over the headers (bins and strings
 * skipped whole, O(objects)) refuses a count over the bytes left, and deep
 * nesting, which bounds what the unpacker then allocates by len. */
static bool vqkv__msgpack_bounded(const uint8_t *p, size_t len)
{
    uint64_t pending[VQKV__MSGPACK_MAX_DEPTH + 1] = {1}; /* objects left per level */
    int depth = 0;
    size_t off = 0;
    while (depth >= 0) {
        if (pending[depth] == 0) {
            depth--;
            continue;
        }
        pending[depth]--;
        if (off >= len)
            return false;
        uint8_t b = p[off++];
        size_t count_bytes = 0, size_bytes = 0; /* a count or a size follows */
        uint64_t skip = 0, per = 0;             /* fixed bytes; objects per count */
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
            continue; /* fixint, nil, bool */
        if ((b & 0xf0) == 0x80 || (b & 0xf0) == 0x90) {
            uint64_t n = (uint64_t)(b & 0x0f) * ((b & 0xf0) == 0x80 ? 2 : 1);
            if (n > len - off || depth == VQKV__MSGPACK_MAX_DEPTH)
                return false;
            pending[++depth] = n;
            continue;
        }
        if ((b & 0xe0) == 0xa0) {
            skip = b & 0x1f; /* fixstr */
        } else if (b >= 0xc4 && b <= 0xc6) {
            size_bytes = (size_t)1 << (b - 0xc4); /* bin 8/16/32 */
        } else if (b >= 0xc7 && b <= 0xc9) {
            size_bytes = (size_t)1 << (b - 0xc7); /* ext 8/16/32, then a type byte */
            skip = 1;
        } else if (b >= 0xca && b <= 0xd3) {
            static const uint8_t fixed[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8}; /* floats, ints */
            skip = fixed[b - 0xca];
        } else if (b >= 0xd4 && b <= 0xd8) {
            skip = 1 + ((uint64_t)1 << (b - 0xd4)); /* fixext: type and 1..16 bytes */
        } else if (b >= 0xd9 && b <= 0xdb) {
            size_bytes = (size_t)1 << (b - 0xd9); /* str 8/16/32 */
        } else if (b >= 0xdc && b <= 0xdf) {
            count_bytes = b & 1 ? 4 : 2; /* array 16/32, map 16/32 */
            per = b >= 0xde ? 2 : 1;
        } else {
            return false; /* 0xc1, never used */
        }
        size_t n_bytes = count_bytes + size_bytes;
        if (n_bytes > len - off)
            return false;
        uint64_t n = vqkv__load_be(p + off, n_bytes);
        off += n_bytes;
        if (count_bytes > 0) {
            if (n * per > len - off || depth == VQKV__MSGPACK_MAX_DEPTH)
                return false;
            pending[++depth] = n * per;
            continue;
        }
        skip += n;
        if (skip > len - off)
            return false;
        off += (size_t)skip;
    }
    return true;
}

/* Unpacks exactly one object spanning all of buf. */
static bool vqkv__unpack_whole(msgpack_unpacked *u, const char *buf, size_t len)
{
    size_t off = 0;
    return vqkv__msgpack_bounded((const uint8_t *)buf, len) &&
           msgpack_unpack_next(u, buf, len, &off) == MSGPACK_UNPACK_SUCCESS && off == len;
}

/* Checks the body against codec and copies its codebooks into books. */
static int vqkv__body_load(const vqkv_codec_t *codec, const msgpack_object *body, float *books,
                           size_t n_floats)
{
    const vqkv_layout_t *l = &codec->layout;
    const msgpack_object *layout = vqkv__map_get(body, "layout");
    vqkv_layout_t file_layout = {0};
    const char *data;
    size_t size;
    bool dtype_known = false;

    if (body->type != MSGPACK_OBJECT_MAP || body->via.map.size != 3 || layout == NULL ||
        layout->type != MSGPACK_OBJECT_MAP || layout->via.map.size != 5 ||
        !vqkv__map_uint(layout, "num_layers", &file_layout.num_layers) ||
        !vqkv__map_uint(layout, "num_kv_heads", &file_layout.num_kv_heads) ||
        !vqkv__map_uint(layout, "head_dim", &file_layout.head_dim) ||
        !vqkv__map_uint(layout, "block_tokens", &file_layout.block_tokens) ||
        !vqkv__map_bin(body, "books", &data, &size))
        return VQKV_EFORMAT;
    for (int i = 0; i < 3; i++)
        dtype_known |= vqkv__map_str_is(layout, "dtype", vqkv__dtype_names[i]);
    const msgpack_object *spec = vqkv__map_get(body, "codec");
    if (!dtype_known || spec == NULL || spec->type != MSGPACK_OBJECT_STR)
        return VQKV_EFORMAT;
    if (file_layout.num_layers != l->num_layers || file_layout.num_kv_heads != l->num_kv_heads ||
        file_layout.head_dim != l->head_dim || !vqkv__map_str_is(body, "codec", codec->spec))
        return VQKV_EMISMATCH;
    if (size != n_floats * 4)
        return VQKV_EFORMAT;
    for (size_t i = 0; i < n_floats; i++) {
        const uint8_t *p = (const uint8_t *)data + 4 * i;
        float f = vqkv_bits_to_f32((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                   (uint32_t)p[3] << 24);
        if (!isfinite(f))
            return VQKV_EFORMAT;
        books[i] = f;
    }
    return VQKV_OK;
}

int vqkv_codebook_load_buffer(vqkv_codec_t *codec, const uint8_t *buf, size_t len)
{
    msgpack_unpacked top, body;
    uint32_t version;
    const char *body_ptr, *sha_ptr;
    size_t body_size, sha_size, n_floats;
    uint8_t digest[32];
    float *staged = NULL;
    int rc = VQKV_EFORMAT;

    if (codec == NULL || buf == NULL)
        return VQKV_EINVAL;
    if (codec->ops->books == NULL)
        return VQKV_EINVAL;
    if (len == 0 || len > VQKV__CODEBOOK_MAX_BYTES)
        return VQKV_EFORMAT;
    msgpack_unpacked_init(&top);
    msgpack_unpacked_init(&body);
    if (!vqkv__unpack_whole(&top, (const char *)buf, len))
        goto out;
    const msgpack_object *root = &top.data;
    if (root->type != MSGPACK_OBJECT_MAP || root->via.map.size != 4 ||
        !vqkv__map_str_is(root, "format", VQKV__CODEBOOK_FORMAT) ||
        !vqkv__map_uint(root, "version", &version) || version != VQKV__CODEBOOK_VERSION ||
        !vqkv__map_bin(root, "body", &body_ptr, &body_size) ||
        !vqkv__map_bin(root, "sha256", &sha_ptr, &sha_size) || sha_size != sizeof digest)
        goto out;
    EVP_Digest(body_ptr, body_size, digest, NULL, EVP_sha256(), NULL);
    if (memcmp(digest, sha_ptr, sizeof digest) != 0 ||
        !vqkv__unpack_whole(&body, body_ptr, body_size))
        goto out;

    codec->ops->books(codec, &n_floats);
    staged = malloc(n_floats * sizeof *staged);
    if (staged == NULL) {
        rc = VQKV_ENOMEM;
        goto out;
    }
    rc = vqkv__body_load(codec, &body.data, staged, n_floats);
    if (rc == VQKV_OK)
        rc = codec->ops->books_install(codec, staged);
out:
    free(staged);
    msgpack_unpacked_destroy(&top);
    msgpack_unpacked_destroy(&body);
    return rc;
}

int vqkv_codebook_save(const vqkv_codec_t *codec, const char *path)
{
    uint8_t *buf;
    size_t len;
    if (path == NULL)
        return VQKV_EINVAL;
    int rc = vqkv_codebook_save_buffer(codec, &buf, &len);
    if (rc != VQKV_OK)
        return rc;
    /* Write a file of our own beside the target (O_EXCL, so concurrent
     * saves never share one; mode 0666 less the umask, like any file the
     * user creates) and rename it into place: readers see whole files. */
    static atomic_uint counter;
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.%ld.%u.tmp", path, (long)getpid(),
                 atomic_fetch_add(&counter, 1)) >= (int)sizeof tmp) {
        free(buf);
        return VQKV_EINVAL;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    rc = VQKV_EIO;
    if (fd >= 0) {
        bool ok = true;
        for (size_t off = 0; ok && off < len;) {
            ssize_t n = write(fd, buf + off, len - off);
            ok = n > 0;
            off += ok ? (size_t)n : 0;
        }
        ok = close(fd) == 0 && ok;
        if (ok && rename(tmp, path) == 0)
            rc = VQKV_OK;
        else
            unlink(tmp);
    }
    free(buf);
    return rc;
}

int vqkv_codebook_load(vqkv_codec_t *codec, const char *path)
{
    if (codec == NULL || path == NULL)
        return VQKV_EINVAL;
    /* O_NONBLOCK: a FIFO must not hang the open; only regular files pass. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return VQKV_EIO;
    int rc = VQKV_EIO;
    uint8_t *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        goto out;
    if (st.st_size == 0 || (unsigned long long)st.st_size > VQKV__CODEBOOK_MAX_BYTES) {
        rc = VQKV_EFORMAT;
        goto out;
    }
    size_t size = (size_t)st.st_size, got = 0;
    buf = malloc(size);
    if (buf == NULL) {
        rc = VQKV_ENOMEM;
        goto out;
    }
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got == size)
        rc = vqkv_codebook_load_buffer(codec, buf, size);
out:
    free(buf);
    close(fd);
    return rc;
}
