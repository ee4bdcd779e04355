/* vqkv.h -- libvqkv, the worker library for vqkvd.
 *
 * A worker (an inference engine process, one per TP rank) connects to the
 * node's vqkvd over its Unix socket, declares the model it serves, shares
 * the memory of its paged KV cache with the daemon, and then offloads full
 * blocks to the daemon (vqkv_put) and brings them back (vqkv_lookup, then
 * vqkv_get into its own slots, then vqkv_release). The daemon compresses the
 * blocks with the model's codec and keeps them for every worker of the
 * tenant; blocks are named by chained keys that vqkv_model_block_keys computes
 * from the token ids, so two workers that share a prompt prefix share its
 * blocks.
 *
 *   vqkv_client_t *c;
 *   vqkv_model_t *m;
 *   vqkv_region_t r;
 *   vqkv_connect(NULL, "worker-tp0", 5000, &c);
 *   vqkv_register_model(c, "org/model@rev", &layout, "fp16", &m);
 *   vqkv_memfd_create("kv", view.region_bytes, &fd);   (map it, use it)
 *   vqkv_register_memfd_region(c, m, fd, view.region_bytes, 0, &view, &r);
 *   vqkv_model_block_keys(m, NULL, tokens, n_tokens, NULL, 0, keys, max, &n_keys);
 *   vqkv_put(c, m, r, keys, NULL, slots, n_keys, NULL);
 *   ...
 *   vqkv_lookup(c, m, keys, n_keys, &found, &lease);
 *   vqkv_get(c, lease, r, slots, found);
 *   vqkv_release(c, lease);
 *   vqkv_close(c);
 *
 * Every call but the *_start ones is synchronous: it sends its request and
 * blocks until the reply (or the connection's receive timeout).
 * vqkv_put_start and vqkv_get_start send a request and return at once; its
 * completion is collected later by vqkv_complete, so an engine's loop can
 * overlap offloads and restores with its own work (see "Asynchronous
 * calls" below). Every function returns
 * VQKV_OK (0) or a non-negative count on success and a negative VQKV_E*
 * code on failure; vqkv_client_strerror names a code. Codes the daemon sent
 * in an Error reply are passed through unchanged (vqkv_errors.h lists
 * them: VQKV_EHANDLE, VQKV_ELEASE, VQKV_EQUOTA, ...), and the daemon's
 * message, or a local one, is kept until the next call on that client:
 * vqkv_last_error. Failed requests have no effect on the daemon.
 *
 * Handles (models, regions, leases) belong to the client that made them:
 * closing it (or the process dying) releases everything it held in the
 * daemon.
 *
 * Reconnecting. When the daemon goes away (it stopped, crashed or was
 * restarted), the call in progress fails with VQKV_ECLOSED ("vqkvd closed
 * the connection; the next call reconnects"), having taken effect or not.
 * The next call on the client connects again to the same socket with the
 * same name and timeout, registers again every model (same id, layout,
 * codec and codebook file) and region the client holds, and then makes its
 * own request; the caller's vqkv_model_t pointers and region handles stay
 * valid. While the daemon is not back, that call fails (VQKV_EIO with errno
 * set when the socket cannot be reached, or the code of what else failed;
 * the message starts "reconnecting") and the next one tries again. What
 * the daemon held for the old connection is gone: a lease taken before is
 * refused (VQKV_ELEASE; look the blocks up again) and pins with ttl_ms 0
 * are undone. A restarted daemon holds no blocks and draws new tenant
 * salts, so keys computed before it restarted find nothing: compute them
 * again after a VQKV_ECLOSED (vqkv_model_block_keys uses the new salt from
 * the reconnect on). A VQ model registered without a codebook file gets the
 * codebooks the daemon saved in its state directory
 * (vqkv_model_codebooks_ready says so). To register regions again the
 * client keeps a dup of each region's memfd, and of a model's codebook
 * file, until vqkv_close: one fd each.
 *
 * Retrying. A put, lookup, pin, unpin, evict or stats whose connection is
 * lost under it is sent once more on a new connection (reconnecting as
 * above), so a daemon that was restarted and is back costs the caller
 * nothing: only when that second try fails too does the call return its
 * error. A get or release is never retried (its lease went with the old
 * connection: VQKV_ECLOSED, then look the blocks up again). A retried
 * request may have run on the old daemon as well; every retried one may
 * run twice without harm, and the blocks the old daemon held are gone.
 *
 * Limits. Each is the daemon's unless said otherwise, and checked before
 * anything happens (the code in parentheses):
 *   - vqkv_put: any n; libvqkv cuts a large put into several requests, each
 *     within the frame (max_frame, 1 MiB by default: about 13,000 blocks)
 *     and within 256 MiB of blocks as the daemon
 *     stages them (fp16 while a model calibrates: 128 blocks of a
 *     Llama-3-8B-shaped model, 2048 tokens, per request). A 128k-token
 *     prompt is one call. On an error, the requests before it have stored
 *     their blocks (their statuses say so).
 *   - vqkv_lookup: one request, so at most about (max_frame - 1 KiB) / 34
 *     keys (30,000 at 1 MiB: 480k tokens of 16-token blocks;
 *     VQKV_ETOOBIG beyond) and at most VQKV_KEYS_MAX (VQKV_EINVAL).
 *   - vqkv_pin, vqkv_unpin, vqkv_evict: at most VQKV_KEYS_MAX keys a call
 *     (VQKV_EINVAL), sent in parts that fit the frame; a client holds at
 *     most 65536 blocks pinned with ttl_ms 0 (VQKV_ELIMIT).
 *   - vqkv_get: the lease's blocks, at most about max_frame / 5 slots.
 *   - per connection: 64 models (VQKV_ELIMIT), max_regions regions (16),
 *     max_inflight requests in flight (64); per daemon max_clients
 *     connections (1024); model ids of 1 to 256 bytes (VQKV_EINVAL).
 *   vqkvd.conf(5) sets max_frame, max_regions, max_inflight and max_clients.
 *
 * Thread safety: a vqkv_client_t is one connection and must be used by one
 * thread at a time (use one connection per thread, or lock around every
 * call). An engine's scheduler thread and each worker thread therefore
 * hold clients of their own (a lease is read on the client that took it,
 * so the worker looks up again what the scheduler decided to load); a
 * thread that wants several requests in flight uses the *_start calls on
 * its one client rather than more threads. Different clients may be used from different threads at
 * once. vqkv_model_block_keys only reads its model and may be called from any thread while the
 * model's client is open, concurrently with calls on that client (keys computed during a call that
 * reconnects have the old or the new salt). vqkv_memfd_create and vqkv_client_strerror are
 * thread-safe.
 */
#ifndef VQKV_H
#define VQKV_H

#include <stddef.h>
#include <stdint.h>

#include "vqkv_codec.h"  /* vqkv_layout_t, vqkv_kv_view_t, VQKV_OK and the VQKV_E* codes */
#include "vqkv_errors.h" /* the protocol's codes, VQKV_ETOOBIG and on */

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of a block key. */
#define VQKV_KEY_BYTES 32

/* One connection to vqkvd. Opaque. */
typedef struct vqkv_client vqkv_client_t;

/* A model registered on a connection. Opaque; owned by its client and
 * freed by vqkv_close. */
typedef struct vqkv_model vqkv_model_t;

/* A region of worker memory registered on a connection; never 0. */
typedef uint64_t vqkv_region_t;

/* A lease on looked-up blocks; 0 means nothing is leased. */
typedef uint64_t vqkv_lease_t;

/* What happened to one block of vqkv_put (the values of PutStatus in
 * proto/vqkv.proto). */
typedef enum {
    VQKV_PUT_STORED = 0,     /* compressed and stored */
    VQKV_PUT_PRESENT = 1,    /* already held under this key; nothing was read */
    VQKV_PUT_NO_PARENT = 2,  /* the parent key is not held: refused */
    VQKV_PUT_NO_SPACE = 3,   /* the pool is full and nothing could be evicted */
    VQKV_PUT_OVER_QUOTA = 4, /* the tenant's byte quota is used up */
} vqkv_put_status_t;

/* One tenant's counters (vqkv_stats_t.tenants). */
typedef struct {
    char tenant[32];        /* the daemon's name for the tenant (the uid in decimal) */
    uint64_t hits;          /* keys its lookups found */
    uint64_t misses;        /* keys its lookups asked for past the found prefix */
    uint64_t blocks;        /* blocks it holds now */
    uint64_t bytes_stored;  /* compressed bytes it holds now: what the quota limits */
    uint64_t bytes_logical; /* the same blocks uncompressed */
    uint64_t evictions;     /* its blocks evicted since the daemon started, for room
                               (the pool or its quota) or by vqkv_evict */
    uint64_t quota_bytes;   /* its quota on bytes_stored; 0 when unlimited */
} vqkv_tenant_stats_t;

/* Tenant entries vqkv_stats keeps; more are counted, not kept. */
#define VQKV_STATS_MAX_TENANTS 64

/* Daemon-wide counters and per-tenant entries (vqkv_stats). Byte counts
 * are bytes. */
typedef struct {
    uint64_t hits;          /* keys lookups found */
    uint64_t misses;        /* keys lookups asked for past the found prefix */
    uint64_t blocks;        /* blocks held now */
    uint64_t bytes_stored;  /* compressed bytes held now */
    uint64_t bytes_logical; /* the same blocks uncompressed, in the workers' dtype */
    uint64_t evictions;     /* blocks evicted since the daemon started */
    uint32_t clients;       /* connections open now */
    uint64_t pool_bytes;    /* pool capacity */
    uint64_t leases;        /* leases held now */
    uint64_t regions;       /* regions registered by the connections open now */
    /* The pool's own count of slots in use and of their bytes: equal to
     * blocks and bytes_stored unless a slot went astray. */
    uint64_t pool_slots_used;
    uint64_t pool_bytes_used;
    /* Puts answered before their encode: the bytes staged now, the blocks
     * not yet encoded, and, since the daemon started, the puts staged and
     * those that found staging full and waited for their encode. */
    uint64_t staging_bytes;
    uint64_t encode_backlog;
    uint64_t puts_staged;
    uint64_t puts_staging_full;
    /* The disk tier (zero without one): blocks and bytes held now, its
     * limit; since start, blocks written, blocks read back (its hits),
     * damaged records dropped, failed writes, blocks dropped with the
     * oldest segments. */
    uint64_t disk_blocks;
    uint64_t disk_bytes;
    uint64_t disk_limit_bytes;
    uint64_t disk_writes;
    uint64_t disk_reads;
    uint64_t disk_bad_records;
    uint64_t disk_write_errors;
    uint64_t disk_dropped;
    /* The caller's own tenant first; then, when the daemon's config names
     * the caller's uid an admin, every other tenant it knows. tenants[0 ..
     * n_tenants) are kept; n_tenants_total is how many the daemon sent. */
    uint32_t n_tenants;
    uint32_t n_tenants_total;
    vqkv_tenant_stats_t tenants[VQKV_STATS_MAX_TENANTS];
} vqkv_stats_t;

/* ---- connections ---------------------------------------------------------- */

/* The daemon's default socket into buf: $VQKV_SOCKET when set; else, as
 * root, /run/vqkv/vqkv.sock (the system service's, vqkvd.socket); else
 * $XDG_RUNTIME_DIR/vqkv/vqkv.sock when that socket exists (a vqkvd the user
 * runs), else /run/vqkv/vqkv.sock: a worker in group vqkv reaches the system
 * service with no configuration. VQKV_EINVAL when buf is too small. */
int vqkv_default_socket(char *buf, size_t size);

/* Connects to the daemon at socket_path (NULL: vqkv_default_socket) and
 * opens the session (Hello, Welcome), keeping the tenant's key salt.
 * client_name (NULL: "libvqkv", at most 64 bytes) shows in the daemon's
 * logs. timeout_ms (> 0) bounds the wait for every reply on this client;
 * a request whose reply does not come in time fails with VQKV_EAGAIN (a
 * late reply is skipped by the next call). The client keeps socket_path,
 * client_name and timeout_ms to reconnect with. On success *client is a new
 * client (vqkv_close); on failure it is NULL and the code says why:
 * VQKV_EIO with errno set when the socket cannot be reached, VQKV_EVERSION,
 * VQKV_EPERM or another code the daemon sent. */
int vqkv_connect(const char *socket_path, const char *client_name, int timeout_ms,
                 vqkv_client_t **client);

/* Closes the connection and frees the client and its models. NULL is fine. */
void vqkv_close(vqkv_client_t *client);

/* The message of the last failed call on client ("" after a success); valid
 * until the next call on client. Never NULL. */
const char *vqkv_last_error(const vqkv_client_t *client);

/* A static string naming a VQKV_E* code (either header's); never NULL. */
const char *vqkv_client_strerror(int err);

/* What the daemon said in Welcome, for logs: its tenant name for this peer,
 * its backend ("cpu" or "cuda") and its version. Valid while client is,
 * until a reconnect finds the daemon saying something else. */
const char *vqkv_client_tenant(const vqkv_client_t *client);
const char *vqkv_client_backend(const vqkv_client_t *client);
const char *vqkv_client_server_version(const vqkv_client_t *client);

/* ---- models --------------------------------------------------------------- */

/* Declares the model this worker serves: model_id names the weights (at
 * most 256 bytes, e.g. "org/name@revision"), layout its KV shape (all of
 * its kv heads: this version registers no tensor-parallel head slice), and
 * codec_spec the codec the daemon stores its blocks with
 * (kernels/vqkv_codec.h: "fp16", "kivi4:g=32", ...). Workers registering
 * the same id, layout and codec share blocks. On success *model belongs to
 * client. The daemon refuses a spec it does not know (VQKV_ESPEC; the
 * message names the spec) or an id registered with another layout or codec
 * (VQKV_EMISMATCH). */
int vqkv_register_model(vqkv_client_t *client, const char *model_id, const vqkv_layout_t *layout,
                        const char *codec_spec, vqkv_model_t **model);

/* Opens a model the client's tenant has already registered, on any
 * connection, without knowing its layout or codec (an admin tool pinning
 * or evicting a worker's blocks): model_id and the head range
 * [kv_head_first, kv_head_first + kv_head_count); kv_head_count 0 takes
 * the range starting at kv_head_first that was registered first (0 and 0
 * for a model registered with vqkv_register_model). On success *model
 * belongs to client like vqkv_register_model's, with the daemon's layout
 * (vqkv_model_layout). VQKV_EHANDLE when the tenant has registered no such
 * model; another tenant's models are never found. */
int vqkv_model_find(vqkv_client_t *client, const char *model_id, uint32_t kv_head_first,
                    uint32_t kv_head_count, vqkv_model_t **model);

/* Like vqkv_register_model, with codebooks for a VQ codec from a file
 * (kernels/vqkv_codec.h vqkv_codebook_save, e.g. trained by `vqkvctl eval
 * --save-codebooks`), sent to the daemon as an fd. Without a file the daemon
 * uses codebooks it saved earlier for this model, or calibrates online:
 * blocks are stored fp16 until it has trained codebooks on the first
 * blocks put. VQKV_EMISMATCH when the model already stores blocks under
 * other codebooks; the file's own errors as the daemon found them. */
int vqkv_register_model_codebook(vqkv_client_t *client, const char *model_id,
                                 const vqkv_layout_t *layout, const char *codec_spec,
                                 const char *codebook_path, vqkv_model_t **model);

/* vqkv_register_model, or vqkv_register_model_codebook when codebook_path
 * is not NULL, also naming the model's RoPE (vqkv_rope_t of
 * kernels/vqkv_codec.h; NULL: none, as those do), for the daemon's online
 * calibration: keys are cached after RoPE, so codebooks trained on the
 * first blocks the daemon sees would code keys further into long prompts
 * worse; knowing the RoPE, it trains on keys turned to positions sampled
 * below its calibration_positions (vqkvd.conf(5)). VQKV_EINVAL for a RoPE vqkv_rope_check refuses,
 * before anything is sent; VQKV_EMISMATCH when the model was registered with another RoPE. The
 * model keeps it, to send again after a reconnect. */
int vqkv_register_model_rope(vqkv_client_t *client, const char *model_id,
                             const vqkv_layout_t *layout, const char *codec_spec,
                             const char *codebook_path, const vqkv_rope_t *rope,
                             vqkv_model_t **model);

/* 1 when the model's codec had its codebooks at its last registration on
 * this connection (always for codecs without codebooks); registering again
 * refreshes it, which is how a worker learns that calibration finished. */
int vqkv_model_codebooks_ready(const vqkv_model_t *model);

/* The canonical codec spec the daemon answered (every parameter spelled
 * out; the codec_id in block keys), and the stored bytes of one block. */
const char *vqkv_model_codec(const vqkv_model_t *model);
uint32_t vqkv_model_block_bytes(const vqkv_model_t *model);

/* The model's layout: the one registered, or for vqkv_model_find the
 * daemon's, whose num_kv_heads counts the head range's heads. */
void vqkv_model_layout(const vqkv_model_t *model, vqkv_layout_t *layout);

/* Computes the keys of the full blocks of tokens (floor(n_tokens /
 * layout.block_tokens) of them) for model under the client's tenant: the
 * chained SHA-256 of client/block_keys.h with the tenant salt from Welcome,
 * the model id and the canonical codec spec. parent is the key of the
 * block just before tokens[0] (NULL starts a sequence); extra (extra_len
 * bytes, may be NULL when 0) goes into every key (a LoRA adapter's name,
 * image hashes). VQKV_EINVAL when max_keys is too small. Pure: see the
 * thread-safety note above. */
int vqkv_model_block_keys(const vqkv_model_t *model, const uint8_t *parent, const uint32_t *tokens,
                          size_t n_tokens, const uint8_t *extra, size_t extra_len,
                          uint8_t (*keys)[VQKV_KEY_BYTES], size_t max_keys, size_t *n_keys);

/* ---- regions -------------------------------------------------------------- */

/* Creates a memfd of bytes bytes that vqkv_register_memfd_region accepts:
 * close-on-exec and with MFD_ALLOW_SEALING (the daemon seals its size so
 * the memory it maps cannot shrink under it). name shows in
 * /proc/PID/fd. *fd is the caller's to mmap and close. VQKV_EIO with errno
 * set when the kernel refuses. */
int vqkv_memfd_create(const char *name, uint64_t bytes, int *fd);

/* Lets the daemon read and write the worker's KV cache in memfd (from
 * vqkv_memfd_create; the fd stays the caller's, the daemon maps its own
 * copy). bytes is the memfd's size and offset where the KV view starts in
 * it; strides gives the view's strides and num_slots (its region_bytes and
 * offset fields are ignored in favour of the arguments), and its
 * layer_offsets, when not NULL, where each layer starts (copied: layers
 * allocated apart inside the memfd, as vLLM's per-layer tensors are). The daemon checks
 * the whole view against bytes (VQKV_ERANGE), refuses a view whose strides
 * overlap, so that blocks would overwrite each other (VQKV_EINVAL, the
 * message naming the stride; vqkv_kv_view_disjoint checks it here first),
 * and refuses a memfd it cannot seal or map (VQKV_EMAP). On success *region
 * names it in vqkv_put and vqkv_get on this client, for model and for any
 * other model of the same layout (one cache for several models, or a model
 * and its draft); another layout is VQKV_EMISMATCH, naming the field. */
int vqkv_register_memfd_region(vqkv_client_t *client, const vqkv_model_t *model, int memfd,
                               uint64_t bytes, uint64_t offset, const vqkv_kv_view_t *strides,
                               vqkv_region_t *region);

/* Lets the daemon read and write a worker's KV cache in GPU memory: bytes
 * at devptr (a CUDA device pointer: cudaMalloc, PyTorch's caching
 * allocator, or the VMM API as PyTorch's expandable segments use it),
 * laid out as strides says (its region_bytes and offset are ignored; the
 * view starts at devptr and must lie within bytes: VQKV_ERANGE). The
 * library asks the CUDA driver, loaded at run time (libcuda.so.1, or the
 * library $VQKV_LIBCUDA names: neither is needed to load libvqkv), for the
 * allocation holding devptr and its GPU's UUID, and sends vqkvd either a
 * legacy IPC handle of the allocation with devptr's offset in it, or, for
 * VMM memory, each physical allocation the bytes span exported as a POSIX
 * fd (allocated with that handle type; at most VQKV_REGION_MAX_PIECES of
 * them, 8192, else VQKV_ELIMIT; PyTorch's expandable segments map a
 * tensor over many), which the daemon maps one after another.
 *
 * VQKV_EDEVICE when the driver cannot be loaded, devptr is not device
 * memory or a driver call fails (the error names it: vqkv_last_error), and
 * from a vqkvd that does not own that GPU (a CPU daemon, or one on
 * another node); otherwise as vqkv_register_memfd_region. Call it from a
 * thread that can use devptr (the worker's own CUDA context). The memory
 * must stay allocated until vqkv_close; after a reconnect the region is
 * registered again from what was sent the first time. */
int vqkv_register_cuda_region(vqkv_client_t *client, const vqkv_model_t *model, uint64_t devptr,
                              uint64_t bytes, const vqkv_kv_view_t *strides, vqkv_region_t *region);

/* ---- blocks --------------------------------------------------------------- */

/* ---- asynchronous calls --------------------------------------------------- */

/* An asynchronous call, named by the client that started it. */
typedef uint64_t vqkv_request_t;

/* A finished asynchronous call: rc is what the synchronous call would have
 * returned (blocks stored or written, or a negative code). */
typedef struct {
    vqkv_request_t request;
    int rc;
} vqkv_completion_t;

/* Calls and completions a client holds at most: in flight plus finished
 * but not yet taken by vqkv_complete. */
#define VQKV_ASYNC_MAX 256

/* vqkv_put, started: sends the request (as several, like vqkv_put, when
 * large) and returns; *request names it in its completion. keys, parents
 * and slots may be reused at once; the slots' memory must not change, and
 * statuses (when not NULL) must stay valid, until the completion is taken.
 * Returns VQKV_OK, or a negative code and then no completion will come:
 * VQKV_ELIMIT when the client already holds VQKV_ASYNC_MAX calls and
 * completions, or as many requests as the daemon's max_inflight less one
 * (one stays for synchronous calls). A started call is never retried: a
 * lost connection completes it with VQKV_ECLOSED. */
int vqkv_put_start(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
                   const uint8_t (*keys)[VQKV_KEY_BYTES], const uint8_t (*parents)[VQKV_KEY_BYTES],
                   const uint32_t *slots, size_t n, vqkv_put_status_t *statuses,
                   vqkv_request_t *request);

/* vqkv_get, started: the blocks are in place when its completion comes
 * (rc the number written). */
int vqkv_get_start(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region,
                   const uint32_t *slots, size_t n, vqkv_request_t *request);

/* Takes up to max finished calls into done[], waiting up to timeout_ms for
 * the first (0: not at all, -1: as long as it takes). Every reply already
 * read off the socket is taken in first. Returns how many were taken (0
 * when none finished in time or none is in flight), or a negative code;
 * when it returns max, more may be waiting: call it again before polling.
 * Synchronous calls on the same client read the replies of started ones as
 * they come and keep them here, so completions are never lost. */
int vqkv_complete(vqkv_client_t *client, int timeout_ms, vqkv_completion_t *done, size_t max);

/* The connection's socket, for an event loop: poll it for POLLIN, and when
 * it is readable call vqkv_complete with timeout 0. Also call that after
 * any synchronous call, which may have read replies already. -1 while
 * disconnected; the socket changes when the client reconnects. */
int vqkv_client_fd(const vqkv_client_t *client);

/* Started calls not yet taken by vqkv_complete (in flight or finished). */
size_t vqkv_async_pending(const vqkv_client_t *client);

/* Keys one lookup, pin, unpin or evict may name: a chain of a million
 * tokens in 16-token blocks. */
#define VQKV_KEYS_MAX 65536

/* Offloads n full blocks: block i, in slot slots[i] of region, is stored
 * under keys[i]. parents[i] is the key of the block before it in its
 * sequence, all zero bytes for a sequence's first block; parents may be
 * NULL, and then keys must be one chain from its start (block 0 has no
 * parent, block i's parent is keys[i - 1]), as vqkv_model_block_keys computes
 * them. The slots must not be overwritten before this returns. statuses,
 * when not NULL, receives n vqkv_put_status_t values. Returns the number
 * of blocks stored (>= 0), or a negative code, with nothing stored, when
 * the request was refused (an out-of-range slot: VQKV_ERANGE). Any n: a
 * put larger than one request may carry is sent as several, in order
 * (Limits above); if one of them is refused, the ones before it stand. */
int vqkv_put(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
             const uint8_t (*keys)[VQKV_KEY_BYTES], const uint8_t (*parents)[VQKV_KEY_BYTES],
             const uint32_t *slots, size_t n, vqkv_put_status_t *statuses);

/* Finds how many leading keys of the chain keys[0..n) the daemon holds
 * (*found) and leases them (*lease; 0 when *found is 0), so they are not
 * evicted before vqkv_get reads them. Release the lease (vqkv_release) as
 * soon as the blocks are read; it expires on its own after the daemon's
 * lease time. */
int vqkv_lookup(vqkv_client_t *client, const vqkv_model_t *model,
                const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *found,
                vqkv_lease_t *lease);

/* Decompresses the lease's first n blocks into region: block i into slot
 * slots[i]. Returns the number of blocks written (>= 0), or a negative
 * code (VQKV_ELEASE for an unknown or expired lease, VQKV_ERANGE for a
 * slot outside the region: nothing is then written). The lease stays
 * valid, so a failed get can be retried. */
int vqkv_get(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region, const uint32_t *slots,
             size_t n);

/* ---- GPU ordering ------------------------------------------------------------
 * For CUDA regions (vqkv_register_cuda_region): a worker's interprocess
 * event, so that neither side synchronizes a stream to hand blocks over.
 * Create the event with cudaEventInterprocess | cudaEventDisableTiming and
 * pass cudaIpcGetEventHandle's 64 bytes (PyTorch:
 * torch.cuda.Event(interprocess=True).ipc_handle()); the event stays the
 * worker's. A daemon without GPU events (the cpu backend) refuses both
 * calls with VQKV_EDEVICE. */

#define VQKV_CUDA_EVENT_BYTES 64
typedef struct {
    uint8_t bytes[VQKV_CUDA_EVENT_BYTES];
} vqkv_cuda_event_t;

/* vqkv_put of blocks the worker's stream may still be writing: record
 * event on that stream after the writes, then call; vqkvd's stream waits
 * on it before reading the slots. */
int vqkv_put_after_event(vqkv_client_t *client, const vqkv_model_t *model, vqkv_region_t region,
                         const uint8_t (*keys)[VQKV_KEY_BYTES],
                         const uint8_t (*parents)[VQKV_KEY_BYTES], const uint32_t *slots, size_t n,
                         vqkv_put_status_t *statuses, const vqkv_cuda_event_t *event);

/* vqkv_get that returns as soon as the decode is queued on the GPU, with
 * event recorded on vqkvd's stream after the last write: make the worker's
 * stream wait on event (cudaStreamWaitEvent) before it reads the slots.
 * The lease and the blocks stay held until the writes are done. */
int vqkv_get_with_event(vqkv_client_t *client, vqkv_lease_t lease, vqkv_region_t region,
                        const uint32_t *slots, size_t n, const vqkv_cuda_event_t *event);

/* Ends a lease. 0 is accepted and does nothing. VQKV_ELEASE for a lease
 * taken before the client reconnected: the daemon let it go already. */
int vqkv_release(vqkv_client_t *client, vqkv_lease_t lease);

/* Keeps the blocks keys[0..n) of model from being evicted (a system prompt
 * every request shares, say): for ttl_ms milliseconds, or with ttl_ms 0
 * until vqkv_unpin or until this client closes. Keys the daemon does not
 * hold are skipped; *count (may be NULL) receives how many blocks were
 * pinned. Pinning a pinned block again replaces its time. At most
 * VQKV_KEYS_MAX keys a call (VQKV_EINVAL), and a client may hold at most
 * 65536 blocks pinned with ttl_ms 0 (VQKV_ELIMIT, with nothing of that
 * request pinned). */
int vqkv_pin(vqkv_client_t *client, const vqkv_model_t *model,
             const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, uint32_t ttl_ms, size_t *count);

/* Ends the pins of the blocks keys[0..n) of model, whoever of the tenant
 * pinned them; blocks not pinned are skipped. *count (may be NULL) receives
 * how many blocks were unpinned. */
int vqkv_unpin(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, size_t *count);

/* Removes the blocks keys[0..n) of model now, each with its descendants
 * (a block whose parent is gone could never be looked up); a named block
 * whose subtree holds a leased or pinned block is skipped whole, and keys
 * not held are skipped. With all (keys NULL, n 0) every block of the model
 * that has no leased or pinned block at or below it goes. Only the
 * client's tenant's blocks are touched. *count (may be NULL) receives how
 * many blocks were removed; they count as evictions. At most VQKV_KEYS_MAX
 * keys a call. */
int vqkv_evict(vqkv_client_t *client, const vqkv_model_t *model,
               const uint8_t (*keys)[VQKV_KEY_BYTES], size_t n, int all, size_t *count);

/* The daemon's counters into *stats. */
int vqkv_stats(vqkv_client_t *client, vqkv_stats_t *stats);

/* Writes to the daemon's disk tier every block its memory holds that the
 * tier lacks, and returns once all of them are on disk and synced (a
 * crash after that loses none); *written (may be NULL) receives how many
 * blocks were written. An operator's call: VQKV_EPERM unless the caller
 * is in admin_uids, root or the daemon's own user; VQKV_EINVAL without a
 * disk tier; VQKV_EIO when some blocks could not be written (full disk). */
int vqkv_flush(vqkv_client_t *client, size_t *written);

#ifdef __cplusplus
}
#endif

#endif
