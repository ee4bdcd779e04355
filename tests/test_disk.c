/* test_disk.c -- vqkvd's disk tier (--disk-dir, --disk-bytes; daemon/disk.h)
 * through the binary on the CPU backend, every byte read back checked
 * against what was put (fp16: the same bytes; kivi4: the library's own
 * encode and decode of them):
 *
 *   - a clean stop (SIGTERM) writes what memory holds; a restart on the same
 *     state and disk dirs finds every chain again and Get returns its bytes,
 *     after a second restart too (fp16 and kivi4);
 *   - blocks evicted from a tiny pool are written in the background and a
 *     Lookup reads them back (its present counts them), fp16 and kivi4;
 *   - Evict forgets the disk too, a first key and a middle one, for blocks
 *     on disk only and in both tiers, `all`, and an Evict that arrives with
 *     the Put that evicts its chain (its blocks still in the write queue);
 *     still forgotten after a restart (tombstones); Ack.count;
 *   - damage: a segment cut in the middle of its last record, a payload byte
 *     flipped (its CRC-32C fails: the chain stops before it, and a Put of
 *     the chain again repairs it), garbage files, a directory and a dangling
 *     link named like segments: the daemon serves, chains are found as a
 *     prefix of what was put, never other bytes;
 *   - a disk dir that cannot be used: "disk tier off", memory serves alone;
 *     a disk that refuses writes (RLIMIT_FSIZE: EFBIG, like a full disk):
 *     the daemon serves and still stops cleanly;
 *   - a disk that fills up for real (ENOSPC): a 2 MiB tmpfs in a user and
 *     mount namespace of the test's own, the daemon run inside it (skipped,
 *     saying why, where the host allows no such namespace): the failed
 *     writes counted and logged, memory serving on, writes going on once
 *     there is room (made outside, or by dropping the oldest segment), a
 *     stop and a start finding every block the files held, writes that
 *     met ENOSPC written again in the room a dropped segment made, an
 *     Evict on a disk full to the last byte still durable (the only
 *     segment goes rather than its tombstones);
 *   - SIGKILL at random points, VQKV_DISK_ROUNDS rounds (default 100) from
 *     one printed seed (VQKV_DISK_SEED=N repeats it): after each restart
 *     every chain put so far reads back as a prefix of what was put, a
 *     prefix found once is found again after every later crash, and after
 *     the rounds that end with a clean stop every chain is found whole;
 *   - compaction: a segment mostly dead goes, its live blocks and needed
 *     tombstones moved on, across restarts; SIGKILL a random few ms after
 *     Evicts that make compactions run (VQKV_DISK_COMPACT_ROUNDS, default
 *     30): every flushed chain never evicted is found whole;
 *   - durability claims (docs/RELIABILITY.md): a put alone is lost to a
 *     SIGKILL; a Flush's Ack means every block is in the files;
 *     disk_flush_ms writes memory down without help.
 *
 * VQKV_DISK_TESTS=PATTERN runs only the tests whose names match. The daemon's stderr goes to
 * vqkvd.log in its temporary directory, which VQKV_DISK_KEEP=1 keeps (its path printed) instead of
 * removing it.
 */
#include <dirent.h>
#include <linux/magic.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/vfs.h>

#include "daemon_harness.h"
#include "test_util.h"
#include "vqkv_codec.h"

#define LAYERS 2
#define HEADS 2
#define DIM 64
#define TOKENS 16
#define SLOTS 8     /* of each region: the longest chain */
#define MAX_CHAIN 8 /* blocks */
#define FP16_BLOCK (2 * LAYERS * TOKENS * HEADS * DIM * 2)

static const vqkv_layout_t layout = {LAYERS, HEADS, DIM, TOKENS, VQKV_DTYPE_F16};

/* ---- keys and bytes ------------------------------------------------------ */

static uint64_t mix64(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

/* Block i of chain `chain` of test `tag`: its key, distinct for each. */
static void chain_key(uint8_t key[32], uint32_t tag, uint32_t chain, uint32_t i)
{
    uint64_t s = ((uint64_t)tag << 40) ^ ((uint64_t)chain << 16) ^ i;
    for (unsigned w = 0; w < 4; w++) {
        uint64_t v = mix64(s * 4 + w + 1);
        memcpy(key + 8 * w, &v, 8);
    }
}

static size_t row_offset(const vqkv_kv_view_t *v, uint32_t l, uint32_t kv, uint32_t slot,
                         uint32_t t, uint32_t h)
{
    return v->offset + l * v->layer_stride + kv * v->kv_stride + slot * v->slot_stride +
           t * v->token_stride + h * v->head_stride;
}

/* Fills slot of the buffer shaped like v with block i of chain's values:
 * fp16 bit patterns of magnitude in [2^-14, 2) (finite, normal), drawn
 * from the block's own sequence. */
static void fill_block(uint8_t *base, const vqkv_kv_view_t *v, uint32_t slot, uint32_t tag,
                       uint32_t chain, uint32_t i)
{
    uint64_t st = mix64(((uint64_t)tag << 40) ^ ((uint64_t)chain << 16) ^ i ^ UINT64_C(0x5eed));
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < TOKENS; t++)
                for (uint32_t h = 0; h < HEADS; h++) {
                    uint16_t row[DIM];
                    for (uint32_t d = 0; d < DIM; d++) {
                        st = mix64(st);
                        uint16_t exp = (uint16_t)(1 + (st >> 16) % 15);
                        row[d] = (uint16_t)((st & 0x8000) | exp << 10 | ((st >> 32) & 0x3ff));
                    }
                    memcpy(base + row_offset(v, l, kv, slot, t, h), row, sizeof row);
                }
}

/* Whether slot a of buffer x and slot b of buffer y (both shaped like v)
 * hold the same block. */
static int block_equal(const uint8_t *x, uint32_t a, const uint8_t *y, uint32_t b,
                       const vqkv_kv_view_t *v)
{
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            for (uint32_t t = 0; t < TOKENS; t++)
                for (uint32_t h = 0; h < HEADS; h++)
                    if (memcmp(x + row_offset(v, l, kv, a, t, h), y + row_offset(v, l, kv, b, t, h),
                               DIM * 2) != 0)
                        return 0;
    return 1;
}

/* ---- a daemon with a disk dir ------------------------------------------- */

typedef struct {
    int fd;
    uint8_t *base;
    vqkv_kv_view_t view;
} region_t;

typedef struct {
    daemon_t d;
    char disk[128]; /* --disk-dir */
    char seen[160]; /* the disk dir as this process reaches it */
    char log[128];  /* the daemon's stderr, every run appended */
    /* fx_tmpfs: the process holding the tmpfs's namespaces (0: none), the
     * tmpfs as this process reaches it, the command the daemon runs under */
    pid_t holder;
    char fs[128];
    char enter[96];
    const char *extra[12];
    region_t src, dst; /* puts read src's slots, gets write dst's */
    uint8_t *want;     /* shaped like the regions: a chain's expected blocks */
} fx_t;

static void region_new(region_t *r)
{
    vqkv_kv_view_vllm(&r->view, &layout, SLOTS);
    r->fd = memfd_create("test_disk", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    assert_true(r->fd >= 0);
    assert_int_equal(ftruncate(r->fd, (off_t)r->view.region_bytes), 0);
    r->base = mmap(NULL, r->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    assert_true(r->base != MAP_FAILED);
}

/* A fixture for a daemon with --disk-dir DIR/disk and the flags given
 * (NULL-terminated); started by fx_spawn. */
static fx_t *fx_new(const char *const *flags)
{
    fx_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    daemon_prepare(&f->d);
    snprintf(f->disk, sizeof f->disk, "%s/disk", f->d.dir);
    snprintf(f->seen, sizeof f->seen, "%s", f->disk);
    snprintf(f->log, sizeof f->log, "%s/vqkvd.log", f->d.dir);
    size_t n = 0;
    f->extra[n++] = "--disk-dir";
    f->extra[n++] = f->disk;
    for (size_t i = 0; flags != NULL && flags[i] != NULL && n < 11; i++)
        f->extra[n++] = flags[i];
    f->extra[n] = NULL;
    region_new(&f->src);
    region_new(&f->dst);
    f->want = malloc(f->src.view.region_bytes);
    assert_non_null(f->want);
    return f;
}

/* daemon_spawn on the fixture's flags; with a tmpfs (fx_tmpfs), in its
 * namespace: the harness runs the daemon under $VQKV_DAEMON_WRAPPER, so
 * nsenter goes in front of the wrapper set, if any, for this one spawn. */
static pid_t fx_daemon_spawn(const fx_t *f)
{
    if (f->holder <= 0)
        return daemon_spawn(&f->d, f->extra);
    const char *was = getenv("VQKV_DAEMON_WRAPPER");
    char *saved = was != NULL && was[0] != '\0' ? strdup(was) : NULL;
    char wrapper[1024];
    snprintf(wrapper, sizeof wrapper, "%s%s%s", f->enter, saved != NULL ? " " : "",
             saved != NULL ? saved : "");
    assert_int_equal(setenv("VQKV_DAEMON_WRAPPER", wrapper, 1), 0);
    pid_t pid = daemon_spawn(&f->d, f->extra);
    if (saved != NULL)
        setenv("VQKV_DAEMON_WRAPPER", saved, 1);
    else
        unsetenv("VQKV_DAEMON_WRAPPER");
    free(saved);
    return pid;
}

/* Starts the daemon on the fixture's dirs, its stderr appended to the log,
 * and waits until it listens. */
static void fx_spawn_limited(fx_t *f, const struct rlimit *fsize)
{
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    int fd = open(f->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    assert_true(saved >= 0 && fd >= 0);
    assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
    /* The child inherits a lower file size limit and SIGXFSZ ignored (so
     * that writes past it fail with EFBIG); this process gets its own back
     * before anything here can fail. */
    struct rlimit old;
    void (*was)(int) = SIG_DFL;
    if (fsize != NULL) {
        getrlimit(RLIMIT_FSIZE, &old);
        was = signal(SIGXFSZ, SIG_IGN);
        setrlimit(RLIMIT_FSIZE, fsize);
    }
    f->d.pid = fx_daemon_spawn(f);
    if (fsize != NULL) {
        setrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, was);
    }
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fd);
    daemon_wait_listening(&f->d);
}

static void fx_spawn(fx_t *f)
{
    fx_spawn_limited(f, NULL);
}

/* A clean stop (exit 0 required) and a start on the same dirs. */
static void fx_restart(fx_t *f)
{
    daemon_stop(&f->d);
    fx_spawn(f);
}

static void fx_kill(fx_t *f)
{
    assert_int_equal(kill(f->d.pid, SIGKILL), 0);
    int status;
    assert_int_equal(waitpid(f->d.pid, &status, 0), f->d.pid);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    f->d.pid = -1;
}

/* A SIGKILL and a start on the same dirs. */
static void fx_crash(fx_t *f)
{
    fx_kill(f);
    fx_spawn(f);
}

/* Runs argv (argv[0] looked up in PATH) with its stdout and stderr into a
 * pipe, whose reading end *out gets; returns its pid. */
static pid_t spawn_piped(const char *const *argv, int *out)
{
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    pid_t parent = getpid(), pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        harness_die_with_parent(parent);
        if (dup2(p[1], STDOUT_FILENO) < 0 || dup2(p[1], STDERR_FILENO) < 0)
            _exit(126);
        execvp(argv[0], (char *const *)argv);
        dprintf(STDERR_FILENO, "cannot run %s: %s", argv[0], strerror(errno));
        _exit(127);
    }
    close(p[1]);
    *out = p[0];
    return pid;
}

/* Reads fd into buf (NUL-terminated) until it holds until, fd ends or 10 s
 * pass; whether until came. */
static int read_until(int fd, const char *until, char *buf, size_t size)
{
    long deadline = now_ms() + 10000L * daemon_slowdown();
    size_t n = 0;
    buf[0] = '\0';
    while (strstr(buf, until) == NULL && n + 1 < size) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        long left = deadline - now_ms();
        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            break;
        ssize_t got = read(fd, buf + n, size - 1 - n);
        if (got <= 0)
            break;
        n += (size_t)got;
        buf[n] = '\0';
    }
    return strstr(buf, until) != NULL;
}

/* Puts f's disk dir on a tmpfs of size bytes (mount's size=, e.g. "2m"),
 * without root on the host: a child (f->holder, killed at teardown) holds
 * a user and mount namespace of its own with the tmpfs mounted on DIR/tmpfs,
 * the daemon runs in that namespace (nsenter), so a restart sees the same
 * files, and this process reaches them through /proc/HOLDER/root. The
 * socket and the log stay in DIR, outside. Before the daemon's first start.
 * Returns 0, or -1 with why filled where the host allows no such namespace
 * (no unshare or nsenter, user namespaces off): the caller skips. */
static int fx_tmpfs(fx_t *f, const char *size, char *why, size_t why_size)
{
    char mnt[96], said[512];
    snprintf(mnt, sizeof mnt, "%s/tmpfs", f->d.dir);
    assert_int_equal(mkdir(mnt, 0700), 0);
    static const char script[] =
        "mount -t tmpfs -o size=\"$1\" tmpfs \"$2\" && echo ready && exec sleep 1000000";
    const char *const hold[] = {
        "unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", size,
        mnt,       NULL};
    int fd;
    pid_t pid = spawn_piped(hold, &fd);
    int ready = read_until(fd, "ready\n", said, sizeof said);
    close(fd);
    if (!ready) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        snprintf(why, why_size, "unshare: %s", said[0] != '\0' ? said : "no answer in time");
        return -1;
    }
    f->holder = pid;
    char holder[16];
    snprintf(holder, sizeof holder, "%d", (int)pid);
    snprintf(f->enter, sizeof f->enter, "nsenter -t %s -U -m --preserve-credentials", holder);
    /* The daemon's view: nsenter works and finds the tmpfs. */
    const char *const look[] = {"nsenter", "-t", holder, "-U", "-m", "--preserve-credentials",
                                "stat",    "-f", "-c",   "%T", mnt,  NULL};
    pid_t looker = spawn_piped(look, &fd);
    int entered = read_until(fd, "tmpfs\n", said, sizeof said);
    close(fd);
    kill(looker, SIGKILL);
    waitpid(looker, NULL, 0);
    if (!entered) {
        snprintf(why, why_size, "nsenter: %s", said[0] != '\0' ? said : "no answer in time");
        return -1;
    }
    /* This process's view. */
    snprintf(f->fs, sizeof f->fs, "/proc/%s/root%s", holder, mnt);
    struct statfs st;
    int rc = statfs(f->fs, &st);
    if (rc != 0 || st.f_type != TMPFS_MAGIC) {
        snprintf(why, why_size, "%s: %s", f->fs, rc != 0 ? strerror(errno) : "not a tmpfs");
        return -1;
    }
    snprintf(f->disk, sizeof f->disk, "%s/disk", mnt);
    snprintf(f->seen, sizeof f->seen, "%s/disk", f->fs);
    return 0;
}

static int fx_setup(void **state, const char *const *flags)
{
    fx_t *f = fx_new(flags);
    *state = f;
    fx_spawn(f);
    return 0;
}

static int setup_disk(void **state)
{
    static const char *const flags[] = {"--pool-bytes", "4M", NULL};
    return fx_setup(state, flags);
}

static int setup_tiny_pool(void **state)
{
    /* 256 KiB: 4 chunks of 64 KiB, 16 fp16 blocks of 16 KiB. */
    static const char *const flags[] = {"--pool-bytes", "256K", NULL};
    return fx_setup(state, flags);
}

static int fx_teardown(void **state)
{
    fx_t *f = *state;
    if (f->d.pid > 0)
        daemon_stop(&f->d);
    munmap(f->src.base, f->src.view.region_bytes);
    munmap(f->dst.base, f->dst.view.region_bytes);
    close(f->src.fd);
    close(f->dst.fd);
    free(f->want);
    if (f->holder > 0) { /* the tmpfs goes with its namespace */
        kill(f->holder, SIGKILL);
        waitpid(f->holder, NULL, 0);
    }
    if (getenv("VQKV_DISK_KEEP") != NULL)
        printf("test_disk: kept %s%s\n", f->d.dir,
               f->holder > 0 ? " (the tmpfs's files went with its namespace)" : "");
    else
        test_remove_tree(f->d.dir);
    free(f);
    return 0;
}

/* Lines of the daemon's log holding text. */
static uint32_t log_count(const fx_t *f, const char *text)
{
    FILE *in = fopen(f->log, "r");
    assert_non_null(in);
    char line[1024];
    uint32_t n = 0;
    while (fgets(line, sizeof line, in) != NULL)
        n += strstr(line, text) != NULL;
    fclose(in);
    return n;
}

static int log_says(const fx_t *f, const char *text)
{
    return log_count(f, text) > 0;
}

/* ---- requests ------------------------------------------------------------ */

/* A request's reply, or NULL when the connection failed (a killed daemon). */
static Vqkv__Envelope *try_call(client_t *c, Vqkv__Envelope *env, const int *fds, size_t n_fds)
{
    env->request_id = c->next_id++;
    if (vqkv_frame_send(c->fd, env, fds, n_fds, VQKV_FRAME_DEFAULT_MAX) != VQKV_OK)
        return NULL;
    vqkv_frame_t frame;
    if (vqkv_frame_recv(c->fd, &c->reader, &frame) != VQKV_OK)
        return NULL;
    Vqkv__Envelope *r = NULL;
    assert_prc(vqkv_frame_unpack(frame.data, frame.len, &r), VQKV_OK);
    vqkv_frame_clear(&frame);
    assert_prc(vqkv_frame_check(r), VQKV_OK);
    assert_int_equal(r->request_id, env->request_id);
    return r;
}

/* A connection with one model and the fixture's two regions. */
typedef struct {
    client_t c;
    const char *codec;
    uint64_t m, src, dst;
} sess_t;

static uint64_t region_ok(sess_t *s, const region_t *r)
{
    Vqkv__RegisterRegion rr = VQKV__REGISTER_REGION__INIT;
    rr.model_handle = s->m;
    rr.kind = VQKV__REGION_KIND__REGION_KIND_MEMFD;
    rr.region_bytes = r->view.region_bytes;
    rr.layer_stride = r->view.layer_stride;
    rr.kv_stride = r->view.kv_stride;
    rr.slot_stride = r->view.slot_stride;
    rr.token_stride = r->view.token_stride;
    rr.head_stride = r->view.head_stride;
    rr.num_slots = r->view.num_slots;
    rr.num_fds = 1;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_REGISTER_REGION;
    env.register_region = &rr;
    Vqkv__Envelope *e = call(&s->c, &env, &r->fd, 1);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("RegisterRegion: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_REGION_REGISTERED);
    uint64_t h = e->region_registered->region_handle;
    vqkv_frame_envelope_free(e);
    return h;
}

/* Connects, says Hello, registers model (codec) and both regions. */
static void sess_open(sess_t *s, fx_t *f, const char *model, const char *codec)
{
    client_open(&s->c, &f->d);
    s->codec = codec;
    hello(&s->c, "test_disk");
    Vqkv__Envelope *r = register_model(&s->c, &layout, model, codec);
    if (r->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("RegisterModel: %s", r->error->message);
    assert_int_equal(r->body_case, VQKV__ENVELOPE__BODY_MODEL_REGISTERED);
    s->m = r->model_registered->model_handle;
    vqkv_frame_envelope_free(r);
    s->src = region_ok(s, &f->src);
    s->dst = region_ok(s, &f->dst);
}

static void sess_close(sess_t *s)
{
    client_close(&s->c);
}

/* The Put of blocks [0, n) of chain, one request, from src slots 0..n-1
 * (filled with the chain's values first), in env; keys and parents are
 * the caller's storage. */
typedef struct {
    uint8_t keys[MAX_CHAIN][32];
    ProtobufCBinaryData k[MAX_CHAIN], p[MAX_CHAIN];
    uint32_t slots[MAX_CHAIN];
    Vqkv__Put put;
    Vqkv__Envelope env;
} put_req_t;

static void put_request(put_req_t *q, fx_t *f, const sess_t *s, uint32_t tag, uint32_t chain,
                        uint32_t n)
{
    assert_true(n >= 1 && n <= MAX_CHAIN);
    for (uint32_t i = 0; i < n; i++) {
        fill_block(f->src.base, &f->src.view, i, tag, chain, i);
        chain_key(q->keys[i], tag, chain, i);
        q->k[i] = (ProtobufCBinaryData){32, q->keys[i]};
        q->p[i] = i > 0 ? (ProtobufCBinaryData){32, q->keys[i - 1]} : (ProtobufCBinaryData){0};
        q->slots[i] = i;
    }
    q->put = (Vqkv__Put)VQKV__PUT__INIT;
    q->put.model_handle = s->m;
    q->put.region_handle = s->src;
    q->put.n_keys = q->put.n_parent_keys = q->put.n_slots = n;
    q->put.keys = q->k;
    q->put.parent_keys = q->p;
    q->put.slots = q->slots;
    q->env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    q->env.body_case = VQKV__ENVELOPE__BODY_PUT;
    q->env.put = &q->put;
}

/* Checks a PutDone for n blocks (each stored or present); returns stored. */
static uint32_t put_done(Vqkv__Envelope *e, uint32_t n)
{
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Put: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_PUT_DONE);
    assert_int_equal(e->put_done->n_status, n);
    for (uint32_t i = 0; i < n; i++)
        if (e->put_done->status[i] != VQKV__PUT_STATUS__PUT_STORED &&
            e->put_done->status[i] != VQKV__PUT_STATUS__PUT_PRESENT)
            fail_msg("Put: block %u has status %d", i, (int)e->put_done->status[i]);
    uint32_t stored = e->put_done->stored;
    vqkv_frame_envelope_free(e);
    return stored;
}

static uint32_t put_chain(sess_t *s, fx_t *f, uint32_t tag, uint32_t chain, uint32_t n)
{
    put_req_t q;
    put_request(&q, f, s, tag, chain, n);
    return put_done(call(&s->c, &q.env, NULL, 0), n);
}

/* Lookup of blocks [0, n) of chain; returns present and the lease. */
static uint32_t lookup_chain(sess_t *s, uint32_t tag, uint32_t chain, uint32_t n, uint64_t *lease)
{
    uint8_t keys[MAX_CHAIN][32];
    ProtobufCBinaryData k[MAX_CHAIN];
    for (uint32_t i = 0; i < n; i++) {
        chain_key(keys[i], tag, chain, i);
        k[i] = (ProtobufCBinaryData){32, keys[i]};
    }
    Vqkv__Lookup lk = VQKV__LOOKUP__INIT;
    lk.model_handle = s->m;
    lk.n_keys = n;
    lk.keys = k;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_LOOKUP;
    env.lookup = &lk;
    Vqkv__Envelope *e = call(&s->c, &env, NULL, 0);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Lookup: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_LOOKUP_RESULT);
    uint32_t present = e->lookup_result->present;
    *lease = e->lookup_result->lease_id;
    vqkv_frame_envelope_free(e);
    assert_true(present <= n);
    assert_true((present == 0) == (*lease == 0));
    return present;
}

static void release(sess_t *s, uint64_t lease)
{
    Vqkv__Release rl = VQKV__RELEASE__INIT;
    rl.lease_id = lease;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_RELEASE;
    env.release = &rl;
    Vqkv__Envelope *e = call(&s->c, &env, NULL, 0);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
    vqkv_frame_envelope_free(e);
}

/* f->want's slots [0, n) get blocks [0, n) of chain as s's codec stores
 * them: the values put, through the library's own encode and decode. */
static void expected(fx_t *f, const sess_t *s, uint32_t tag, uint32_t chain, uint32_t n)
{
    const vqkv_kv_view_t *v = &f->src.view;
    for (uint32_t i = 0; i < n; i++)
        fill_block(f->want, v, i, tag, chain, i);
    if (strcmp(s->codec, "fp16") == 0)
        return; /* exact */
    vqkv_codec_t *codec = NULL;
    assert_int_equal(vqkv_codec_create(s->codec, &layout, &codec), VQKV_OK);
    uint8_t *block = malloc(vqkv_codec_block_bytes(codec));
    assert_non_null(block);
    for (uint32_t i = 0; i < n; i++) {
        assert_int_equal(vqkv_codec_encode(codec, f->want, v, i, block), VQKV_OK);
        assert_int_equal(vqkv_codec_decode(codec, block, f->want, v, i), VQKV_OK);
    }
    free(block);
    vqkv_codec_free(codec);
}

/* Looks chain (n blocks) up, gets what was found into dst and checks it
 * block by block against what was put; releases the lease. Returns how
 * many blocks were found. */
static uint32_t check_chain(sess_t *s, fx_t *f, uint32_t tag, uint32_t chain, uint32_t n)
{
    uint64_t lease;
    uint32_t found = lookup_chain(s, tag, chain, n, &lease);
    if (found == 0)
        return 0;
    memset(f->dst.base, 0, f->dst.view.region_bytes);
    uint32_t slots[MAX_CHAIN];
    for (uint32_t i = 0; i < found; i++)
        slots[i] = i;
    Vqkv__Get g = VQKV__GET__INIT;
    g.lease_id = lease;
    g.region_handle = s->dst;
    g.n_slots = found;
    g.slots = slots;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_GET;
    env.get = &g;
    Vqkv__Envelope *e = call(&s->c, &env, NULL, 0);
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Get of chain %u (%u of %u blocks found): %s", chain, found, n, e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_GET_DONE);
    assert_int_equal(e->get_done->written, found);
    vqkv_frame_envelope_free(e);
    expected(f, s, tag, chain, found);
    for (uint32_t i = 0; i < found; i++)
        if (!block_equal(f->dst.base, i, f->want, i, &f->dst.view))
            fail_msg("chain %u block %u (%s): Get returned other bytes than were put", chain, i,
                     s->codec);
    release(s, lease);
    return found;
}

/* Chains [0, n) of tag, blocks long each, found as far as want[c] says,
 * with their bytes. */
static void check_chains(sess_t *s, fx_t *f, uint32_t tag, uint32_t n, uint32_t blocks,
                         const uint32_t *want)
{
    for (uint32_t c = 0; c < n; c++) {
        uint32_t found = check_chain(s, f, tag, c, blocks);
        if (found != want[c])
            fail_msg("chain %u: %u blocks found, %u expected", c, found, want[c]);
    }
}

/* check_chain until the whole chain is found, for at most 10 s (writes to
 * disk are asynchronous); returns the last count found. */
static uint32_t await_chain(sess_t *s, fx_t *f, uint32_t tag, uint32_t chain, uint32_t n)
{
    long deadline = now_ms() + 10000L * daemon_slowdown();
    uint32_t found;
    while ((found = check_chain(s, f, tag, chain, n)) < n && now_ms() < deadline)
        sleep_ms(5);
    return found;
}

/* An Evict of block i of chain, or of everything with all; the request in
 * q's storage. */
typedef struct {
    uint8_t key[32];
    ProtobufCBinaryData k;
    Vqkv__Evict ev;
    Vqkv__Envelope env;
} evict_req_t;

static void evict_request(evict_req_t *q, const sess_t *s, uint32_t tag, uint32_t chain, uint32_t i,
                          int all)
{
    chain_key(q->key, tag, chain, i);
    q->k = (ProtobufCBinaryData){32, q->key};
    q->ev = (Vqkv__Evict)VQKV__EVICT__INIT;
    q->ev.model_handle = s->m;
    q->ev.n_keys = all ? 0 : 1;
    q->ev.keys = all ? NULL : &q->k;
    q->ev.all = all;
    q->env = (Vqkv__Envelope)VQKV__ENVELOPE__INIT;
    q->env.body_case = VQKV__ENVELOPE__BODY_EVICT;
    q->env.evict = &q->ev;
}

static uint32_t evict_done(Vqkv__Envelope *e)
{
    if (e->body_case == VQKV__ENVELOPE__BODY_ERROR)
        fail_msg("Evict: %s", e->error->message);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_ACK);
    uint32_t n = e->ack->count;
    vqkv_frame_envelope_free(e);
    return n;
}

static uint32_t evict(sess_t *s, uint32_t tag, uint32_t chain, uint32_t i, int all)
{
    evict_req_t q;
    evict_request(&q, s, tag, chain, i, all);
    return evict_done(call(&s->c, &q.env, NULL, 0));
}

/* A Flush: its Ack's count, or the Error's code (negative). */
static int64_t flush(sess_t *s)
{
    Vqkv__Flush fl = VQKV__FLUSH__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_FLUSH;
    env.flush = &fl;
    Vqkv__Envelope *e = call(&s->c, &env, NULL, 0);
    assert_true(e->body_case == VQKV__ENVELOPE__BODY_ACK ||
                e->body_case == VQKV__ENVELOPE__BODY_ERROR);
    int64_t n =
        e->body_case == VQKV__ENVELOPE__BODY_ACK ? (int64_t)e->ack->count : (int64_t)e->error->code;
    vqkv_frame_envelope_free(e);
    return n;
}

/* What Stats says of the tiers: blocks (in memory) and disk_blocks now,
 * the rest counted since the daemon started. */
typedef struct {
    uint64_t blocks, evictions, disk_blocks, disk_writes, disk_reads, disk_write_errors,
        disk_bad_records, disk_dropped, disk_bytes;
} tier_stats_t;

static tier_stats_t tier_stats(sess_t *s)
{
    Vqkv__Stats st = VQKV__STATS__INIT;
    Vqkv__Envelope env = VQKV__ENVELOPE__INIT;
    env.body_case = VQKV__ENVELOPE__BODY_STATS;
    env.stats = &st;
    Vqkv__Envelope *e = call(&s->c, &env, NULL, 0);
    assert_int_equal(e->body_case, VQKV__ENVELOPE__BODY_STATS_REPLY);
    const Vqkv__StatsReply *r = e->stats_reply;
    tier_stats_t t = {r->blocks,           r->evictions,    r->disk_blocks,
                      r->disk_writes,      r->disk_reads,   r->disk_write_errors,
                      r->disk_bad_records, r->disk_dropped, r->disk_bytes};
    vqkv_frame_envelope_free(e);
    return t;
}

/* ---- segment files ------------------------------------------------------- */

#define FILE_HEADER 32
#define RECORD_HEADER 208

typedef struct {
    char path[192];
    uint64_t off; /* the record's header */
    uint32_t flags, len;
    uint8_t key[32];
} rec_t;

static uint8_t *read_file(const char *path, size_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    assert_non_null(buf);
    assert_int_equal(pread(fd, buf, (size_t)st.st_size, 0), st.st_size);
    close(fd);
    *size = (size_t)st.st_size;
    return buf;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* The segment files of f's disk dir, ascending (the names sort as their
 * numbers do); returns how many, at most max. */
static size_t seg_files(const fx_t *f, char (*paths)[192], size_t max)
{
    DIR *dir = opendir(f->seen);
    assert_non_null(dir);
    size_t n = 0;
    for (struct dirent *de; (de = readdir(dir)) != NULL;)
        if (strncmp(de->d_name, "seg-", 4) == 0 && strlen(de->d_name) == 24 && n < max) {
            struct stat st;
            snprintf(paths[n], 192, "%s/%.24s", f->seen, de->d_name);
            n += lstat(paths[n], &st) == 0 && S_ISREG(st.st_mode); /* regular files only */
        }
    closedir(dir);
    qsort(paths, n, 192, by_name);
    return n;
}

/* The whole records of every segment file, in order, walked by their
 * headers' lengths (a magic checked, nothing more); returns how many, at
 * most max. */
static size_t seg_records(const fx_t *f, rec_t *out, size_t max)
{
    char paths[32][192];
    size_t files = seg_files(f, paths, 32), n = 0;
    for (size_t i = 0; i < files; i++) {
        size_t size;
        uint8_t *buf = read_file(paths[i], &size);
        for (uint64_t off = FILE_HEADER;
             off + RECORD_HEADER <= size && memcmp(buf + off, "VQKR", 4) == 0 && n < max;) {
            uint32_t len = test_get_u32(buf + off + 32);
            if (off + RECORD_HEADER + len > size)
                break;
            rec_t *r = &out[n++];
            memcpy(r->path, paths[i], sizeof r->path);
            r->off = off;
            r->flags = test_get_u32(buf + off + 8);
            r->len = len;
            memcpy(r->key, buf + off + 40, 32);
            off += RECORD_HEADER + len;
        }
        free(buf);
    }
    return n;
}

/* Whether the segment files hold a block record of key (not a tombstone). */
static int on_disk(const fx_t *f, const uint8_t *key)
{
    static rec_t recs[4096];
    size_t n = seg_records(f, recs, 4096);
    int found = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(recs[i].key, key, 32) == 0)
            found = !(recs[i].flags & 1);
    return found;
}

/* Waits (10 s at most) until every block of chain is in a segment file. */
static void await_on_disk(const fx_t *f, uint32_t tag, uint32_t chain, uint32_t n)
{
    long deadline = now_ms() + 10000L * daemon_slowdown();
    for (uint32_t i = 0; i < n; i++) {
        uint8_t key[32];
        chain_key(key, tag, chain, i);
        while (!on_disk(f, key)) {
            if (now_ms() > deadline)
                fail_msg("block %u of chain %u never reached the disk", i, chain);
            sleep_ms(5);
        }
    }
}

/* CRC-32C (Castagnoli), bit by bit, as segment.h's headers carry it. */
static uint32_t crc32c(const uint8_t *p, size_t len)
{
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < len; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++)
            crc = crc & 1 ? crc >> 1 ^ 0x82f63b78u : crc >> 1;
    }
    return ~crc;
}

static void write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
}

/* ---- 1. a restart keeps hits --------------------------------------------- */

#define TAG_RESTART 1

/* Chains put in memory only, a clean stop, a restart: every chain found
 * whole (read back from disk) with its bytes, and again after a second
 * restart (blocks read back keep their place on disk). */
static void test_restart_keeps_hits(void **state)
{
    fx_t *f = *state;
    static const char *const codecs[2] = {"fp16", "kivi4"};
    static const char *const models[2] = {"test/disk-fp16", "test/disk-kivi4"};
    const uint32_t chains = 6;
    sess_t s[2];
    for (int k = 0; k < 2; k++) {
        sess_open(&s[k], f, models[k], codecs[k]);
        for (uint32_t c = 0; c < chains; c++)
            assert_int_equal(put_chain(&s[k], f, TAG_RESTART + k, c, 3 + c % 6), 3 + c % 6);
        sess_close(&s[k]);
    }
    for (int round = 0; round < 2; round++) {
        fx_restart(f);
        for (int k = 0; k < 2; k++) {
            sess_open(&s[k], f, models[k], codecs[k]);
            for (uint32_t c = 0; c < chains; c++)
                assert_int_equal(check_chain(&s[k], f, TAG_RESTART + k, c, 3 + c % 6), 3 + c % 6);
            /* The blocks are in memory now too: found again at once. */
            uint64_t reads = tier_stats(&s[k]).disk_reads;
            assert_int_equal(check_chain(&s[k], f, TAG_RESTART + k, 0, 3), 3);
            assert_int_equal(tier_stats(&s[k]).disk_reads, reads);
            sess_close(&s[k]);
        }
    }
    assert_true(log_says(f, "disk: "));
}

/* ---- 2. eviction to disk and back ---------------------------------------- */

#define TAG_EVICTED 3

/* Many more blocks than the tiny pool holds, in chains of one Put each:
 * every chain is found whole (read back from disk as the lookup needs it)
 * with its bytes, then again after a clean stop and a restart. */
static void evicted_and_back(fx_t *f, const char *codec, uint32_t chains, uint32_t n)
{
    sess_t s;
    sess_open(&s, f, "test/disk-evicted", codec);
    for (uint32_t c = 0; c < chains; c++)
        assert_int_equal(put_chain(&s, f, TAG_EVICTED, c, n), n);
    for (uint32_t c = 0; c < chains; c++) {
        uint32_t found = await_chain(&s, f, TAG_EVICTED, c, n);
        if (found != n)
            fail_msg("%s chain %u of %u: %u of %u blocks found after 10 s", codec, c, chains, found,
                     n);
    }
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-evicted", codec);
    for (uint32_t c = 0; c < chains; c++)
        assert_int_equal(check_chain(&s, f, TAG_EVICTED, c, n), n);
    sess_close(&s);
    daemon_stop(&f->d); /* exit 0: nothing leaked under ASan */
}

static void test_evicted_fp16(void **state)
{
    evicted_and_back(*state, "fp16", 12, 6); /* 72 blocks, 16 fit */
}

static void test_evicted_kivi4(void **state)
{
    evicted_and_back(*state, "kivi4", 32, 8); /* 256 blocks of ~4.5 KiB */
}

/* ---- 3. Evict forgets the disk ------------------------------------------- */

#define TAG_FORGET 4

/* Chains on disk only (after a restart) and in both tiers (read back):
 * an Evict of the first key forgets the chain, of a middle key its tail,
 * `all` everything, and a restart brings none of it back. */
static void test_evict_forgets_disk(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-forget", "fp16");
    for (uint32_t c = 0; c < 5; c++)
        assert_int_equal(put_chain(&s, f, TAG_FORGET, c, 6), 6);
    sess_close(&s);
    fx_restart(f);

    sess_open(&s, f, "test/disk-forget", "fp16");
    /* Chain 3 read back: in memory and on disk. */
    assert_int_equal(check_chain(&s, f, TAG_FORGET, 3, 6), 6);
    /* On disk only: chain 0 whole, chain 1 from block 2. */
    assert_int_equal(evict(&s, TAG_FORGET, 0, 0, 0), 6);
    assert_int_equal(evict(&s, TAG_FORGET, 1, 2, 0), 4);
    /* In both tiers: each block counted once. */
    assert_int_equal(evict(&s, TAG_FORGET, 3, 0, 0), 6);
    static const uint32_t left[5] = {0, 2, 6, 0, 6}, none[5] = {0};
    check_chains(&s, f, TAG_FORGET, 5, 6, left);
    sess_close(&s);

    for (int round = 0; round < 2; round++) {
        fx_restart(f);
        sess_open(&s, f, "test/disk-forget", "fp16");
        check_chains(&s, f, TAG_FORGET, 5, 6, left);
        sess_close(&s);
    }

    /* `all`: chain 2 in memory (just read back) and on disk, chains 1 and
     * 4 too; nothing of the model is left, now or after a restart. */
    sess_open(&s, f, "test/disk-forget", "fp16");
    assert_int_equal(evict(&s, TAG_FORGET, 0, 0, 1), 2 + 6 + 6);
    check_chains(&s, f, TAG_FORGET, 5, 6, none);
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-forget", "fp16");
    check_chains(&s, f, TAG_FORGET, 5, 6, none);
    sess_close(&s);
}

/* Ack.count of an Evict is the blocks removed (vqkv.proto): a chain held
 * in both tiers (read back from disk) counts each block once, as does
 * `all`. */
static void test_evict_count(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-count", "fp16");
    for (uint32_t c = 20; c < 23; c++)
        assert_int_equal(put_chain(&s, f, TAG_FORGET, c, 6), 6);
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-count", "fp16");
    for (uint32_t c = 20; c < 23; c++)
        assert_int_equal(check_chain(&s, f, TAG_FORGET, c, 6), 6);
    assert_int_equal(evict(&s, TAG_FORGET, 20, 0, 0), 6);
    assert_int_equal(evict(&s, TAG_FORGET, 21, 3, 0), 3);
    assert_int_equal(evict(&s, TAG_FORGET, 0, 0, 1), 3 + 6);
    sess_close(&s);
}

/* A chain forced to disk by eviction from the tiny pool (waited for in the
 * segment files, never looked up), then evicted: forgotten, after a
 * restart too. */
static void test_evict_after_eviction(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-forget", "fp16");
    assert_int_equal(put_chain(&s, f, TAG_FORGET, 10, 6), 6);
    for (uint32_t c = 11; c < 15; c++) /* 24 more blocks: chain 10 goes to disk */
        assert_int_equal(put_chain(&s, f, TAG_FORGET, c, 6), 6);
    await_on_disk(f, TAG_FORGET, 10, 6);
    assert_int_equal(evict(&s, TAG_FORGET, 10, 0, 0), 6);
    assert_int_equal(check_chain(&s, f, TAG_FORGET, 10, 6), 0);
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-forget", "fp16");
    assert_int_equal(check_chain(&s, f, TAG_FORGET, 10, 6), 0);
    for (uint32_t c = 11; c < 15; c++)
        assert_int_equal(check_chain(&s, f, TAG_FORGET, c, 6), 6);
    sess_close(&s);
}

/* Sends a and b in one write, so that the daemon reads them together. */
static void send_both(client_t *c, Vqkv__Envelope *a, Vqkv__Envelope *b)
{
    uint8_t *fa, *fb;
    size_t la, lb;
    a->request_id = c->next_id++;
    b->request_id = c->next_id++;
    assert_prc(vqkv_frame_encode(a, VQKV_FRAME_DEFAULT_MAX, &fa, &la), VQKV_OK);
    assert_prc(vqkv_frame_encode(b, VQKV_FRAME_DEFAULT_MAX, &fb, &lb), VQKV_OK);
    uint8_t *both = malloc(la + lb);
    assert_non_null(both);
    memcpy(both, fa, la);
    memcpy(both + la, fb, lb);
    for (size_t off = 0; off < la + lb;) {
        ssize_t w = send(c->fd, both + off, la + lb - off, MSG_NOSIGNAL);
        assert_true(w > 0);
        off += (size_t)w;
    }
    free(fa);
    free(fb);
    free(both);
}

/* An Evict sent right behind the Put that evicts its whole chain from the
 * tiny pool, in the same write, so that it reaches the daemon while the
 * chain's blocks wait in the write queue: once written they must not come
 * back, now or after a restart. */
static void test_evict_races_write(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-race", "fp16");
    for (uint32_t round = 0; round < 4; round++) {
        uint32_t victim = 100 + round * 10;
        /* 4 + 8 blocks: under the pool's low watermark (80% of 16), so
         * nothing is evicted before the Put below. */
        assert_int_equal(put_chain(&s, f, TAG_FORGET, victim, 4), 4);
        assert_int_equal(put_chain(&s, f, TAG_FORGET, victim + 1, 8), 8);
        sleep_ms(50); /* their encodes (staging) done */
        /* 8 more evict the 4 least recently used, the victim's, and the
         * Evict is read with the Put. */
        put_req_t q;
        evict_req_t ev;
        put_request(&q, f, &s, TAG_FORGET, victim + 2, 8);
        evict_request(&ev, &s, TAG_FORGET, victim, 0, 0);
        send_both(&s.c, &q.env, &ev.env);
        /* Replies come as requests end: the Evict's first, as a rule. */
        Vqkv__Envelope *r1 = recv_env(&s.c), *r2 = recv_env(&s.c);
        if (r1->request_id == ev.env.request_id) {
            Vqkv__Envelope *t = r1;
            r1 = r2;
            r2 = t;
        }
        assert_int_equal(r1->request_id, q.env.request_id);
        assert_int_equal(r2->request_id, ev.env.request_id);
        assert_int_equal(put_done(r1, 8), 8);
        assert_int_equal(evict_done(r2), 4); /* in memory or queued: each block once */
        /* The next chain's blocks are written after the victim's: once they
         * are in a segment (and a moment later in the index), so is every
         * write of the victim. */
        for (uint32_t c = victim + 3; c < victim + 5; c++)
            assert_int_equal(put_chain(&s, f, TAG_FORGET, c, 8), 8);
        await_on_disk(f, TAG_FORGET, victim + 1, 8);
        sleep_ms(100);
        uint32_t found = check_chain(&s, f, TAG_FORGET, victim, 4);
        if (found != 0)
            fail_msg("round %u: %u blocks of an evicted chain came back from disk", round, found);
    }
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-race", "fp16");
    for (uint32_t round = 0; round < 4; round++) {
        uint32_t found = check_chain(&s, f, TAG_FORGET, 100 + round * 10, 4);
        if (found != 0)
            fail_msg("round %u: %u blocks of an evicted chain came back after a restart", round,
                     found);
    }
    sess_close(&s);
}

/* ---- 4. damaged segments -------------------------------------------------- */

#define TAG_DAMAGE 5
#define DAMAGE_CHAINS 6
#define DAMAGE_BLOCKS 5

/* Chains put and written by a clean stop; the daemon left stopped. */
static void damage_prepare(fx_t *f)
{
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    for (uint32_t c = 0; c < DAMAGE_CHAINS; c++)
        assert_int_equal(put_chain(&s, f, TAG_DAMAGE, c, DAMAGE_BLOCKS), DAMAGE_BLOCKS);
    sess_close(&s);
    daemon_stop(&f->d);
}

/* Which block (chain, i) of chains [0, chains) of tag, blocks long, key
 * names: 1, or 0 when none. */
static int block_of(const uint8_t *key, uint32_t tag, uint32_t chains, uint32_t blocks,
                    uint32_t *chain, uint32_t *i)
{
    for (uint32_t c = 0; c < chains; c++)
        for (uint32_t b = 0; b < blocks; b++) {
            uint8_t k[32];
            chain_key(k, tag, c, b);
            if (memcmp(k, key, 32) == 0) {
                *chain = c;
                *i = b;
                return 1;
            }
        }
    return 0;
}

/* Which block (chain, i) of the damage chains key names; fails when none. */
static void damage_block(const uint8_t *key, uint32_t *chain, uint32_t *i)
{
    if (!block_of(key, TAG_DAMAGE, DAMAGE_CHAINS, DAMAGE_BLOCKS, chain, i))
        fail_msg("a record of a key no test put");
}

/* Every damage chain found as far as want says (want[c]), bytes checked. */
static void damage_check(fx_t *f, const uint32_t *want)
{
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    check_chains(&s, f, TAG_DAMAGE, DAMAGE_CHAINS, DAMAGE_BLOCKS, want);
    sess_close(&s);
}

/* The damaged chain put again: exactly the lost blocks are stored anew,
 * and after another restart it is whole, as is everything else. */
static void damage_repair(fx_t *f, uint32_t chain, uint32_t lost, uint32_t *want)
{
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(put_chain(&s, f, TAG_DAMAGE, chain, DAMAGE_BLOCKS), lost);
    sess_close(&s);
    fx_restart(f);
    want[chain] = DAMAGE_BLOCKS;
    damage_check(f, want);
}

/* The newest segment cut in the middle of its last record's payload: that
 * block is lost, nothing else; the daemon writes on in a new segment. */
static void test_torn_tail(void **state)
{
    fx_t *f = *state;
    damage_prepare(f);
    static rec_t recs[256];
    size_t n = seg_records(f, recs, 256);
    assert_int_equal(n, DAMAGE_CHAINS * DAMAGE_BLOCKS);
    const rec_t *last = &recs[n - 1];
    uint32_t chain = 0, i = 0;
    damage_block(last->key, &chain, &i);
    assert_int_equal(truncate(last->path, (off_t)(last->off + RECORD_HEADER + last->len / 2)), 0);

    fx_spawn(f);
    uint32_t want[DAMAGE_CHAINS];
    for (uint32_t c = 0; c < DAMAGE_CHAINS; c++)
        want[c] = c == chain ? i : DAMAGE_BLOCKS;
    damage_check(f, want);
    assert_true(log_says(f, "damaged or cut short"));

    /* The chain put again is whole after another restart, and so is
     * everything else. */
    damage_repair(f, chain, DAMAGE_BLOCKS - i, want);
}

/* A byte flipped in one block's payload: the scan (headers only) keeps
 * it, the read fails its CRC-32C, the chain stops before it, and the block
 * is dropped; a Put of the chain again writes it anew. */
static void test_flipped_payload(void **state)
{
    fx_t *f = *state;
    damage_prepare(f);
    static rec_t recs[256];
    size_t n = seg_records(f, recs, 256);
    assert_int_equal(n, DAMAGE_CHAINS * DAMAGE_BLOCKS);
    const uint32_t chain = 3, i = 2;
    uint8_t key[32];
    chain_key(key, TAG_DAMAGE, chain, i);
    int flipped = 0;
    for (size_t r = 0; r < n; r++) {
        if (memcmp(recs[r].key, key, 32) != 0)
            continue;
        int fd = open(recs[r].path, O_RDWR | O_CLOEXEC);
        assert_true(fd >= 0);
        off_t at = (off_t)(recs[r].off + RECORD_HEADER + recs[r].len / 3);
        uint8_t b;
        assert_int_equal(pread(fd, &b, 1, at), 1);
        b ^= 0x40;
        assert_int_equal(pwrite(fd, &b, 1, at), 1);
        close(fd);
        flipped++;
    }
    assert_int_equal(flipped, 1);

    fx_spawn(f);
    uint32_t want[DAMAGE_CHAINS];
    for (uint32_t c = 0; c < DAMAGE_CHAINS; c++)
        want[c] = c == chain ? i : DAMAGE_BLOCKS;
    damage_check(f, want);
    damage_check(f, want); /* dropped: found no further the second time */
    assert_true(log_says(f, "fails its checksum"));
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(tier_stats(&s).disk_bad_records, 1); /* read once: dropped, counted */
    sess_close(&s);
    fx_restart(f);
    damage_check(f, want); /* the damaged record is still there; still refused */
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(tier_stats(&s).disk_bad_records, 1);
    sess_close(&s);

    damage_repair(f, chain, DAMAGE_BLOCKS - i, want);
}

/* Files named like segments that are not: random bytes, a stub shorter
 * than a file header, a valid file header then a garbage record, a file
 * header of another version. The daemon starts, serves what the real
 * segments hold and writes new ones. */
static void test_garbage_segments(void **state)
{
    fx_t *f = *state;
    damage_prepare(f);
    /* The test's CRC-32C is the daemon's: a real segment's file header. */
    char paths[4][192];
    assert_int_equal(seg_files(f, paths, 4), 1);
    size_t size;
    uint8_t *real = read_file(paths[0], &size);
    assert_true(size > FILE_HEADER);
    assert_int_equal(crc32c(real, 28), test_get_u32(real + 28));
    free(real);

    uint8_t junk[4096];
    uint64_t st = 42;
    for (size_t i = 0; i < sizeof junk; i += 8) {
        st = mix64(st);
        memcpy(junk + i, &st, 8);
    }
    char path[192];
    snprintf(path, sizeof path, "%s/seg-00000000000000f0.vqs", f->disk);
    write_file(path, junk, sizeof junk);
    snprintf(path, sizeof path, "%s/seg-00000000000000f1.vqs", f->disk);
    write_file(path, "VQKVSEG", 7);
    uint8_t head[FILE_HEADER + RECORD_HEADER] = "VQKVSEG";
    head[8] = 1;            /* version */
    head[10] = FILE_HEADER; /* header length */
    head[16] = 0xf2;        /* segment number */
    uint32_t crc = crc32c(head, 28);
    memcpy(head + 28, &crc, 4); /* little-endian hosts only, like the daemon's tests */
    memcpy(head + FILE_HEADER, junk, RECORD_HEADER);
    memcpy(head + FILE_HEADER, "VQKR", 4);
    snprintf(path, sizeof path, "%s/seg-00000000000000f2.vqs", f->disk);
    write_file(path, head, sizeof head);
    head[8] = 2; /* a later format */
    crc = crc32c(head, 28);
    memcpy(head + 28, &crc, 4);
    snprintf(path, sizeof path, "%s/seg-00000000000000f3.vqs", f->disk);
    write_file(path, head, FILE_HEADER);

    fx_spawn(f);
    uint32_t want[DAMAGE_CHAINS];
    for (uint32_t c = 0; c < DAMAGE_CHAINS; c++)
        want[c] = DAMAGE_BLOCKS;
    damage_check(f, want);
    /* The files whose file header is not this version's (f0, f3) are left
     * alone: not counted as the tier's bytes. */
    char files[8][192];
    size_t n_files = seg_files(f, files, 8);
    uint64_t counted = 0;
    for (size_t i = 0; i < n_files; i++) {
        struct stat fs;
        assert_int_equal(stat(files[i], &fs), 0);
        counted += (uint64_t)fs.st_size;
    }
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(tier_stats(&s).disk_bytes, counted - sizeof junk - FILE_HEADER);
    sess_close(&s);
    /* New blocks go to a new segment and come back after a restart. */
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(put_chain(&s, f, TAG_DAMAGE + 1, 0, 4), 4);
    sess_close(&s);
    fx_restart(f);
    damage_check(f, want);
    sess_open(&s, f, "test/disk-damage", "fp16");
    assert_int_equal(check_chain(&s, f, TAG_DAMAGE + 1, 0, 4), 4);
    sess_close(&s);
}

/* A directory named like a segment, and a dangling symlink with the number
 * the next segment would take: the daemon starts, serves, and blocks
 * evicted from the tiny pool after the start still reach the disk. */
static void test_unreadable_segments(void **state)
{
    fx_t *f = *state;
    damage_prepare(f);
    char paths[4][192], path[192];
    assert_int_equal(seg_files(f, paths, 4), 1);
    assert_non_null(strstr(paths[0], "/seg-0000000000000000.vqs"));
    snprintf(path, sizeof path, "%s/seg-00000000000000f0.vqs", f->disk);
    assert_int_equal(mkdir(path, 0700), 0);
    snprintf(path, sizeof path, "%s/seg-0000000000000001.vqs", f->disk);
    assert_int_equal(symlink("/nonexistent/vqkv-segment", path), 0);

    fx_spawn(f);
    uint32_t want[DAMAGE_CHAINS];
    for (uint32_t c = 0; c < DAMAGE_CHAINS; c++)
        want[c] = DAMAGE_BLOCKS;
    damage_check(f, want);
    /* 48 blocks through the 16-block pool: the first chains go to disk
     * while the daemon runs. */
    sess_t s;
    sess_open(&s, f, "test/disk-damage", "fp16");
    for (uint32_t c = 0; c < 8; c++)
        assert_int_equal(put_chain(&s, f, TAG_DAMAGE + 2, c, 6), 6);
    for (uint32_t c = 0; c < 2; c++)
        await_on_disk(f, TAG_DAMAGE + 2, c, 6);
    sess_close(&s);
    fx_kill(f); /* nothing written at stop: the runtime writes alone */
    fx_spawn(f);
    sess_open(&s, f, "test/disk-damage", "fp16");
    for (uint32_t c = 0; c < 2; c++)
        assert_int_equal(check_chain(&s, f, TAG_DAMAGE + 2, c, 6), 6);
    sess_close(&s);
}

/* ---- 5. a disk that cannot be used ---------------------------------------- */

#define TAG_OFF 6

/* --disk-dir names a regular file, or a path below one: the daemon says
 * "disk tier off" and serves from memory, and stops cleanly. */
static void test_disk_dir_unusable(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        fx_t *f = fx_new(NULL);
        char file[100];
        snprintf(file, sizeof file, "%s/not-a-dir", f->d.dir);
        write_file(file, "x", 1);
        snprintf(f->disk, sizeof f->disk, "%s%s", file, k == 0 ? "" : "/below");
        fx_spawn(f);
        assert_true(log_says(f, "disk tier off"));
        sess_t s;
        sess_open(&s, f, "test/disk-off", "fp16");
        assert_int_equal(put_chain(&s, f, TAG_OFF, 0, 4), 4);
        assert_int_equal(check_chain(&s, f, TAG_OFF, 0, 4), 4);
        sess_close(&s);
        void *st = f;
        fx_teardown(&st);
    }
}

/* A disk that takes no more than a few blocks (RLIMIT_FSIZE, inherited by
 * the daemon with SIGXFSZ ignored: writes past it fail with EFBIG, much as
 * on a full disk): the daemon serves every block it holds in memory, and a
 * SIGTERM with blocks the disk cannot take still ends in exit 0, in time. */
static void test_disk_refuses_writes(void **state)
{
    (void)state;
    static const char *const flags[] = {"--pool-bytes", "256K", NULL};
    fx_t *f = fx_new(flags);
    /* The pool's memfd (256 KiB) is a file too: the limit lets it be, and
     * a segment file of 16 blocks. */
    struct rlimit small;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &small), 0);
    small.rlim_cur = (256 << 10) + 4096;
    fx_spawn_limited(f, &small);

    sess_t s;
    sess_open(&s, f, "test/disk-full", "fp16");
    for (uint32_t c = 0; c < 10; c++)
        assert_int_equal(put_chain(&s, f, TAG_OFF, 10 + c, 4), 4);
    /* Whatever a chain finds is its own bytes; the last ones are whole,
     * in memory whatever the disk did. */
    for (uint32_t c = 9; c >= 8; c--)
        assert_int_equal(check_chain(&s, f, TAG_OFF, 10 + c, 4), 4);
    for (uint32_t c = 0; c < 8; c++)
        check_chain(&s, f, TAG_OFF, 10 + c, 4);
    /* Blocks the disk lacks, for the stop to write (and fail to). */
    for (uint32_t c = 10; c < 13; c++)
        assert_int_equal(put_chain(&s, f, TAG_OFF, 10 + c, 4), 4);
    sess_close(&s);
    assert_true(log_says(f, "File too large"));
    long t0 = now_ms();
    daemon_stop(&f->d);
    printf("test_disk: a daemon whose disk refuses writes stopped in %ld ms\n", now_ms() - t0);
    void *st = f;
    fx_teardown(&st);
}

/* ---- 6. a full disk ------------------------------------------------------ */

#define TAG_FULL 8
#define FULL_MAX 512 /* chains, of one block each: a block's fate is its chain's */

/* Which of chains [0, n) the segment files hold (held[c]), and how many
 * block records they hold in all. */
static uint32_t full_held(const fx_t *f, uint32_t n, uint8_t *held)
{
    static rec_t recs[FULL_MAX];
    size_t records = seg_records(f, recs, FULL_MAX);
    uint32_t blocks = 0;
    memset(held, 0, n);
    for (size_t r = 0; r < records; r++) {
        if (recs[r].flags & 1)
            continue; /* a tombstone */
        blocks++;
        for (uint32_t c = 0; c < n; c++) {
            uint8_t key[32];
            chain_key(key, TAG_FULL, c, 0);
            if (memcmp(key, recs[r].key, 32) == 0)
                held[c] = 1;
        }
    }
    return blocks;
}

/* Waits (10 s at most) until the disk tier is at rest: every block evicted
 * so far written or failed, and the segment files holding just the blocks
 * the index counts (a dropped segment's file deleted). For a run that has
 * read nothing back (a block read back and evicted again is not written
 * again). Returns the stats then. */
static tier_stats_t await_at_rest(const fx_t *f, sess_t *s, uint32_t n, uint8_t *held)
{
    long deadline = now_ms() + 10000L * daemon_slowdown();
    for (;;) {
        tier_stats_t st = tier_stats(s);
        uint32_t blocks = full_held(f, n, held);
        if (st.disk_writes + st.disk_write_errors == st.evictions && blocks == st.disk_blocks)
            return st;
        if (now_ms() > deadline)
            fail_msg("the disk tier never came to rest: %llu blocks evicted, %llu written, %llu "
                     "failed; the index counts %llu blocks, the segment files hold %u",
                     (unsigned long long)st.evictions, (unsigned long long)st.disk_writes,
                     (unsigned long long)st.disk_write_errors, (unsigned long long)st.disk_blocks,
                     blocks);
        sleep_ms(5);
    }
}

/* Bytes the tmpfs has free. */
static uint64_t full_room(const fx_t *f)
{
    struct statfs st;
    assert_int_equal(statfs(f->fs, &st), 0);
    return (uint64_t)st.f_bavail * (uint64_t)st.f_bsize;
}

/* Chains [from, to) of TAG_FULL put, each evicting a block of the tiny pool
 * once it is full. */
static void full_put(sess_t *s, fx_t *f, uint32_t from, uint32_t to)
{
    assert_true(to <= FULL_MAX);
    for (uint32_t c = from; c < to; c++)
        assert_int_equal(put_chain(s, f, TAG_FULL, c, 1), 1);
}

/* Whether the log has the line a write job that met ENOSPC writes. */
static int full_said(const fx_t *f)
{
    char line[200];
    snprintf(line, sizeof line, "blocks not written to %s: No space left on device", f->disk);
    return log_says(f, line);
}

/* After a start, chains [0, n): each one whose block the segment files
 * held (held) is found with its bytes, and so is every block the index
 * counts (memory starts empty: all read from disk), no record damaged.
 * Returns how many were found. */
static uint32_t full_found(fx_t *f, uint32_t n, const uint8_t *held)
{
    sess_t s;
    sess_open(&s, f, "test/disk-full", "fp16");
    tier_stats_t st = tier_stats(&s);
    uint32_t found = 0;
    for (uint32_t c = 0; c < n; c++) {
        uint32_t got = check_chain(&s, f, TAG_FULL, c, 1);
        if (held[c] && got != 1)
            fail_msg("chain %u: on disk before the stop, not found after the start", c);
        found += got;
    }
    tier_stats_t end = tier_stats(&s);
    sess_close(&s);
    if (end.disk_bad_records > 0)
        fail_msg("%llu damaged records found after the start (a failed append not cut back?)",
                 (unsigned long long)end.disk_bad_records);
    assert_int_equal(found, st.disk_blocks);
    assert_int_equal(end.disk_reads, found);
    return found;
}

static int setup_full(void **state)
{
    /* The tiny pool; disk_bytes far past the 2 MiB tmpfs: one 16 MiB
     * segment (a quarter of disk_bytes) would take all of it. */
    static const char *const flags[] = {"--pool-bytes", "256K", "--disk-bytes", "64M", NULL};
    *state = fx_new(flags);
    return 0;
}

static int setup_full_fifo(void **state)
{
    /* Segments of 1 MiB: the tmpfs holds two, less what records and pages
     * cost, so the second meets ENOSPC with an older one to drop. */
    static const char *const flags[] = {"--pool-bytes", "256K", "--disk-bytes", "4M", NULL};
    *state = fx_new(flags);
    return 0;
}

/* The daemon's disk dir on a 2 MiB tmpfs, or the test skipped, saying why. */
static void full_tmpfs(fx_t *f, const char *test)
{
    char why[600];
    if (fx_tmpfs(f, "2m", why, sizeof why) != 0) {
        fprintf(stderr, "%s: SKIPPED: no small tmpfs to fill: %s\n", test, why);
        skip();
    }
}

/* A disk that fills up for real (ENOSPC) with disk_bytes far past it, so
 * the tier's one segment holds all of it and nothing of its own can free
 * room: the failed writes are counted and logged with the system's words,
 * the memory tier serves on, room that appears (a file of someone else's
 * deleted) is written on in the same segment, past the failed appends cut
 * back; a stop on the full disk exits cleanly and the start finds every
 * block the files held, bytes checked, nothing damaged. */
static void test_disk_full(void **state)
{
    fx_t *f = *state;
    full_tmpfs(f, "test_disk_full");
    /* 512 KiB of the 2 MiB taken by someone else, deleted later. */
    char ballast[160];
    snprintf(ballast, sizeof ballast, "%s/ballast", f->fs);
    uint8_t *zero = calloc(1, 512 << 10);
    assert_non_null(zero);
    write_file(ballast, zero, 512 << 10);
    free(zero);
    fx_spawn(f);

    /* 160 blocks of 16 KiB through the 16-block pool: 2.2 MiB or more
     * evicted to the 1.5 MiB left. */
    static uint8_t held[FULL_MAX];
    sess_t s;
    sess_open(&s, f, "test/disk-full", "fp16");
    full_put(&s, f, 0, 160);
    tier_stats_t full = await_at_rest(f, &s, 160, held);
    if (full.disk_write_errors == 0)
        fail_msg("no write failed: %llu blocks written to a 2 MiB tmpfs",
                 (unsigned long long)full.disk_writes);
    assert_true(full.disk_writes > 0);
    assert_true(full_said(f));
    assert_false(log_says(f, "writes nothing more")); /* a full disk leaves the tier on */

    /* The memory tier serves on: Puts stored, the newest chains read back
     * from memory (no disk read) with their bytes; the blocks they evict
     * fail too, none written. */
    full_put(&s, f, 160, 168);
    for (uint32_t c = 164; c < 168; c++)
        assert_int_equal(check_chain(&s, f, TAG_FULL, c, 1), 1);
    tier_stats_t still = await_at_rest(f, &s, 168, held);
    assert_int_equal(still.disk_reads, 0);
    assert_true(still.disk_write_errors > full.disk_write_errors);
    assert_int_equal(still.disk_writes, full.disk_writes);

    /* Room again: the next evictions are written (about 30 fit in the
     * 512 KiB freed; 48 go, so the disk is full again for the stop). */
    assert_int_equal(unlink(ballast), 0);
    full_put(&s, f, 168, 216);
    tier_stats_t after = await_at_rest(f, &s, 216, held);
    if (after.disk_writes <= still.disk_writes)
        fail_msg("no write after room was made: %llu blocks written, %llu failed",
                 (unsigned long long)after.disk_writes,
                 (unsigned long long)after.disk_write_errors);
    assert_true(after.disk_write_errors > still.disk_write_errors);
    uint32_t later = 0;
    for (uint32_t c = 168; c < 216; c++)
        later += held[c];
    assert_true(later > 0);
    sess_close(&s);

    /* A stop on the full disk (its writes fail too, and it still exits 0)
     * and a start: every block held before the stop is found. */
    long t0 = now_ms();
    daemon_stop(&f->d);
    long stop_ms = now_ms() - t0;
    fx_spawn(f);
    uint32_t found = full_found(f, 216, held);
    printf("test_disk: a full disk: %llu blocks written, %llu writes failed; stopped in %ld ms; "
           "%u blocks found after the start, %llu held before the stop\n",
           (unsigned long long)after.disk_writes, (unsigned long long)after.disk_write_errors,
           stop_ms, found, (unsigned long long)after.disk_blocks);
    assert_true(found >= after.disk_blocks);
}

/* The same with disk_bytes that lets the tier drop its oldest segment: a
 * write that meets ENOSPC drops it (said in the log) and is written again
 * in the room made, and the writes after go on without help; a stop and a
 * start find every block the files held. A stop that must drop a segment
 * for memory's blocks writes them in the room it made. */
static void test_disk_full_fifo(void **state)
{
    fx_t *f = *state;
    full_tmpfs(f, "test_disk_full_fifo");
    fx_spawn(f);
    static uint8_t held[FULL_MAX];
    sess_t s;
    sess_open(&s, f, "test/disk-full", "fp16");
    /* 200 blocks: 3 MiB or more evicted to the 2 MiB. */
    full_put(&s, f, 0, 200);
    tier_stats_t full = await_at_rest(f, &s, 200, held);
    if (full.disk_dropped == 0)
        fail_msg("no block dropped with the oldest segment: expected on a 2 MiB tmpfs");
    char line[200];
    snprintf(line, sizeof line, "disk: %s: No space left on device; the oldest segment goes",
             f->disk);
    assert_true(log_says(f, line));
    /* Later evictions are written, in the room the drops made. */
    full_put(&s, f, 200, 264);
    tier_stats_t after = await_at_rest(f, &s, 264, held);
    assert_true(after.disk_writes > full.disk_writes);
    uint32_t later = 0;
    for (uint32_t c = 200; c < 264; c++)
        later += held[c];
    assert_true(later > 0);

    /* Filled on till the room left is less than memory's blocks take: the
     * stop, which writes them down, must drop the oldest segment. Memory
     * holds the newest chains (nothing was looked up), none on disk. */
    uint32_t n = 264;
    tier_stats_t st = after;
    while (full_room(f) >= st.blocks * (RECORD_HEADER + FP16_BLOCK)) {
        full_put(&s, f, n, n + 1);
        st = await_at_rest(f, &s, ++n, held);
    }
    static uint8_t before[FULL_MAX];
    memcpy(before, held, n);
    const uint32_t memory = (uint32_t)st.blocks;
    assert_true(memory > 0 && memory <= 16);
    for (uint32_t c = n - memory; c < n; c++)
        assert_false(before[c]);
    sess_close(&s);

    /* What the files hold once the stop is done is what the start must
     * find. */
    daemon_stop(&f->d);
    uint32_t blocks = full_held(f, n, held), dropped = 0, written = 0;
    for (uint32_t c = 0; c < n; c++)
        dropped += before[c] && !held[c];
    for (uint32_t c = n - memory; c < n; c++)
        written += held[c];
    assert_true(dropped > 0);
    fx_spawn(f);
    assert_int_equal(full_found(f, n, held), blocks);
    printf("test_disk: a full disk, oldest segments dropped: %llu blocks written, %llu writes "
           "failed, %llu dropped; the stop dropped %u blocks on disk and wrote %u of the %u in "
           "memory; %u blocks found after the start\n",
           (unsigned long long)st.disk_writes, (unsigned long long)st.disk_write_errors,
           (unsigned long long)st.disk_dropped, dropped, written, memory, blocks);
    /* The writes of the stop that met ENOSPC went again into the room
     * the drop made. */
    if (written != memory)
        fail_msg("the stop dropped %u blocks on disk to make room, yet wrote only "
                 "%u of the %u blocks memory held",
                 dropped, written, memory);
}

/* Evict `all` on a full disk: a tombstone for each block on disk, 208
 * bytes each, more in all than the room left. Every block is gone at once
 * and, an Evict being durable (docs/RELIABILITY.md), after a stop and a
 * start too. */
static void test_disk_full_evict(void **state)
{
    fx_t *f = *state;
    full_tmpfs(f, "test_disk_full_evict");
    fx_spawn(f);
    static uint8_t held[FULL_MAX];
    sess_t s;
    sess_open(&s, f, "test/disk-full", "fp16");
    full_put(&s, f, 0, 160);
    tier_stats_t full = await_at_rest(f, &s, 160, held);
    assert_true(full.disk_write_errors > 0);
    /* The room left, and the rest of the page the segment ends in, take
     * fewer tombstones than there are blocks on disk. */
    assert_true(full_room(f) + (uint64_t)sysconf(_SC_PAGESIZE) < full.disk_blocks * RECORD_HEADER);
    assert_int_equal(evict(&s, TAG_FULL, 0, 0, 1), full.blocks + full.disk_blocks);
    for (uint32_t c = 0; c < 160; c++)
        assert_int_equal(check_chain(&s, f, TAG_FULL, c, 1), 0);
    sess_close(&s);
    fx_restart(f);
    sess_open(&s, f, "test/disk-full", "fp16");
    uint32_t back = 0;
    for (uint32_t c = 0; c < 160; c++)
        back += check_chain(&s, f, TAG_FULL, c, 1);
    sess_close(&s);
    printf("test_disk: Evict all on a full disk: %llu blocks evicted from disk; %u blocks back "
           "after a stop and a start\n",
           (unsigned long long)full.disk_blocks, back);
    /* The tombstones that met ENOSPC made the tier drop its only segment
     * (the records they hide with it) and were written in the room made. */
    if (back > 0)
        fail_msg("%u of %llu evicted blocks are back after a stop and a start: their "
                 "tombstones did not fit on the full disk",
                 back, (unsigned long long)full.disk_blocks);
}

/* ---- 7. SIGKILL at random points ------------------------------------------ */

#define TAG_KILL 7
#define KILL_MAX_CHAINS 2048

static uint64_t kill_seed;

/* Rounds of: a daemon on the same dirs with the tiny pool, every chain put
 * so far checked (a prefix of what was put; a prefix seen after an earlier
 * crash seen again whole), then a few chains of random lengths put, and the
 * daemon SIGKILLed after a random number of Puts or by a child after a
 * random few milliseconds while Puts run; one round in eight ends with a
 * clean stop instead, after which its chains must be found whole. */
static void test_sigkill_loop(void **state)
{
    fx_t *f = *state;
    const char *env = getenv("VQKV_DISK_ROUNDS");
    const uint32_t rounds = env != NULL ? (uint32_t)strtoul(env, NULL, 10) : 100;
    rng_state = kill_seed;
    static uint32_t len[KILL_MAX_CHAINS];
    static int32_t known[KILL_MAX_CHAINS]; /* found after a restart; -1 before */
    uint32_t chains = 0, kills = 0, stops = 0;
    uint64_t blocks_put = 0;
    long t0 = now_ms();
    for (uint32_t round = 0; round <= rounds; round++) {
        sess_t s;
        sess_open(&s, f, "test/disk-kill", "fp16");
        for (uint32_t c = 0; c < chains; c++) {
            uint32_t found = check_chain(&s, f, TAG_KILL, c, len[c]);
            if (known[c] >= 0 && found != (uint32_t)known[c])
                fail_msg("seed %llu, round %u: chain %u had %d of %u blocks after an earlier "
                         "restart, now %u",
                         (unsigned long long)kill_seed, round, c, known[c], len[c], found);
            if (known[c] == -2 && found != len[c])
                fail_msg("seed %llu, round %u: chain %u was put whole before a clean stop, "
                         "%u of %u blocks found",
                         (unsigned long long)kill_seed, round, c, found, len[c]);
            known[c] = (int32_t)found;
        }
        if (round == rounds) {
            sess_close(&s);
            break;
        }
        uint32_t n = 2 + rng_below(7), mode = rng_below(8);
        assert_true(chains + n <= KILL_MAX_CHAINS);
        if (mode == 0) {
            /* A clean stop: every chain whole afterwards. */
            for (uint32_t c = 0; c < n; c++, chains++) {
                len[chains] = 1 + rng_below(MAX_CHAIN);
                known[chains] = -2;
                assert_int_equal(put_chain(&s, f, TAG_KILL, chains, len[chains]), len[chains]);
                blocks_put += len[chains];
            }
            sess_close(&s);
            daemon_stop(&f->d);
            stops++;
        } else if (mode < 4) {
            /* Killed between Puts. */
            uint32_t before = rng_below(n + 1);
            for (uint32_t c = 0; c < n; c++, chains++) {
                len[chains] = 1 + rng_below(MAX_CHAIN);
                known[chains] = -1;
                if (c < before) {
                    assert_int_equal(put_chain(&s, f, TAG_KILL, chains, len[chains]), len[chains]);
                    blocks_put += len[chains];
                }
            }
            sess_close(&s);
            fx_kill(f);
            kills++;
        } else {
            /* Killed by a child while Puts run. */
            long delay_us = (long)rng_below(3000);
            pid_t daemon = f->d.pid, killer = fork();
            assert_true(killer >= 0);
            if (killer == 0) {
                struct timespec ts = {0, delay_us * 1000};
                nanosleep(&ts, NULL);
                kill(daemon, SIGKILL);
                _exit(0);
            }
            int alive = 1;
            for (uint32_t c = 0; c < n; c++, chains++) {
                len[chains] = 1 + rng_below(MAX_CHAIN);
                known[chains] = -1;
                if (!alive)
                    continue;
                put_req_t q;
                put_request(&q, f, &s, TAG_KILL, chains, len[chains]);
                Vqkv__Envelope *e = try_call(&s.c, &q.env, NULL, 0);
                if (e == NULL)
                    alive = 0;
                else
                    put_done(e, len[chains]);
                blocks_put += len[chains];
            }
            sess_close(&s);
            int status;
            assert_int_equal(waitpid(killer, &status, 0), killer);
            fx_kill(f);
            kills++;
        }
        fx_spawn(f);
    }
    uint64_t found = 0;
    uint32_t whole = 0;
    for (uint32_t c = 0; c < chains; c++) {
        found += (uint64_t)known[c];
        whole += (uint32_t)known[c] == len[c];
    }
    printf("test_disk: seed %llu: %u rounds (%u SIGKILLs, %u clean stops), %u chains, %llu "
           "blocks put, %llu found at the end, %u chains whole (%.1f s)\n",
           (unsigned long long)kill_seed, rounds, kills, stops, chains,
           (unsigned long long)blocks_put, (unsigned long long)found, whole,
           (double)(now_ms() - t0) / 1000.0);
    assert_true(whole > 0);
    daemon_stop(&f->d);
}

/* ---- 7. compaction --------------------------------------------------------- */

#define TAG_COMPACT 10
#define COMPACT_CHAINS 24
#define COMPACT_BLOCKS 6
#define COMPACT_KILL_CHAINS 512

static int setup_compact(void **state)
{
    /* 16 fp16 blocks in memory; segments of 512 KiB, 31 blocks each. */
    static const char *const flags[] = {"--pool-bytes", "256K", "--disk-bytes", "2M", NULL};
    return fx_setup(state, flags);
}

static int setup_compact_kill(void **state)
{
    /* Segments of 1 MiB (62 blocks), the limit far above what stays live. */
    static const char *const flags[] = {"--pool-bytes", "256K", "--disk-bytes", "4M", NULL};
    return fx_setup(state, flags);
}

/* Whether path names a file. */
static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The file holding the record (flags: 1 a tombstone, 0 a block) of key
 * last, into path; 0 when no file has one. */
static int record_file(const fx_t *f, const uint8_t *key, uint32_t flags, char path[192])
{
    static rec_t recs[1024];
    size_t n = seg_records(f, recs, 1024);
    int found = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(recs[i].key, key, 32) == 0 && (recs[i].flags & 1) == flags) {
            memcpy(path, recs[i].path, 192);
            found = 1;
        }
    return found;
}

/* Puts chains from *next on until the disk dir has at least files
 * segment files. */
static void put_until_files(sess_t *s, fx_t *f, uint32_t *next, size_t files)
{
    char paths[32][192];
    while (seg_files(f, paths, 32) < files) {
        assert_true(*next < COMPACT_CHAINS);
        assert_int_equal(put_chain(s, f, TAG_COMPACT, *next, COMPACT_BLOCKS), COMPACT_BLOCKS);
        (*next)++;
        sleep_ms(20); /* the write job runs behind the Puts */
    }
}

/* A segment left with mostly dead records (its blocks' chains evicted) is
 * compacted away: its file goes, its live blocks and the tombstones in it
 * that still hide blocks of an older segment move on, and neither this run
 * nor a restart brings the evicted chains back; every other chain reads
 * back whole. */
static void test_compaction(void **state)
{
    fx_t *f = *state;
    sess_t s;
    uint32_t next = 0;
    uint8_t key0[32];
    chain_key(key0, TAG_COMPACT, 0, 0);
    sess_open(&s, f, "test/disk-compact", "fp16");
    /* Chain 0 on disk in the oldest segment, then evicted: its tombstones
     * go to a later segment, which more puts make not the newest. */
    put_until_files(&s, f, &next, 2);
    await_on_disk(f, TAG_COMPACT, 0, COMPACT_BLOCKS);
    assert_int_equal(evict(&s, TAG_COMPACT, 0, 0, 0), COMPACT_BLOCKS);
    char block0[192], tomb0[192];
    long deadline = now_ms() + 10000L * daemon_slowdown();
    while (!record_file(f, key0, 1, tomb0)) {
        assert_true(now_ms() < deadline);
        sleep_ms(5);
    }
    assert_true(record_file(f, key0, 0, block0));
    assert_true(strcmp(block0, tomb0) < 0);
    size_t files_before = 0;
    {
        char paths[32][192];
        files_before = seg_files(f, paths, 32);
        while (strcmp(paths[files_before - 1], tomb0) == 0) {
            put_until_files(&s, f, &next, files_before + 1);
            files_before = seg_files(f, paths, 32);
        }
    }

    /* Every chain with a block in the tombstones' segment evicted but the
     * first: it holds dead records only, but for chain 0's tombstones and
     * at most a chain's blocks, which move. */
    static rec_t recs[1024];
    size_t n = seg_records(f, recs, 1024);
    uint32_t evicted[COMPACT_CHAINS] = {0}, kept = 0;
    evicted[0] = 1;
    for (size_t r = 0; r < n; r++) {
        uint32_t c, i;
        if (strcmp(recs[r].path, tomb0) != 0 || (recs[r].flags & 1) ||
            !block_of(recs[r].key, TAG_COMPACT, next, COMPACT_BLOCKS, &c, &i) || evicted[c] ||
            c == kept)
            continue;
        if (kept == 0) {
            kept = c;
            continue;
        }
        assert_int_equal(evict(&s, TAG_COMPACT, c, 0, 0), COMPACT_BLOCKS);
        evicted[c] = 1;
    }
    assert_true(kept > 0);
    deadline = now_ms() + 10000L * daemon_slowdown();
    while (file_exists(tomb0)) {
        if (now_ms() > deadline)
            fail_msg("%s (dead records only) was never compacted", tomb0);
        sleep_ms(10);
    }
    assert_true(log_says(f, "compacted"));
    /* Chain 0's blocks are still in the older segment; its tombstones
     * moved on and keep them hidden. */
    assert_true(file_exists(block0));
    char moved[192];
    assert_true(record_file(f, key0, 1, moved));
    assert_true(strcmp(moved, tomb0) > 0);

    for (int round = 0; round < 2; round++) {
        for (uint32_t c = 0; c < next; c++) {
            uint32_t found = check_chain(&s, f, TAG_COMPACT, c, COMPACT_BLOCKS);
            if (found != (evicted[c] ? 0 : COMPACT_BLOCKS))
                fail_msg("round %d: chain %u (%s): %u blocks found", round, c,
                         evicted[c] ? "evicted" : "kept", found);
        }
        sess_close(&s);
        fx_restart(f);
        sess_open(&s, f, "test/disk-compact", "fp16");
    }
    /* The kept chain's blocks of the compacted segment were moved. */
    uint8_t key[32];
    chain_key(key, TAG_COMPACT, kept, 0);
    assert_true(record_file(f, key, 0, moved) && strcmp(moved, tomb0) > 0);
    sess_close(&s);
}

/* ---- 8. durability: flush, flush interval ---------------------------------- */

#define TAG_FLUSH 11

/* What a put guarantees (docs/RELIABILITY.md), claim by claim: a put
 * alone is in memory only (a SIGKILL loses it); once a Flush is
 * acknowledged every block memory held is in the segment files, and a
 * SIGKILL right after loses none (staged blocks included: staging is on
 * by default, so the Flush waits for their encodes). A second Flush has
 * nothing left to write. */
static void test_flush(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-flush", "fp16");
    for (uint32_t c = 0; c < 4; c++)
        assert_int_equal(put_chain(&s, f, TAG_FLUSH, c, 6), 6);
    assert_int_equal(flush(&s), 4 * 6);
    for (uint32_t c = 0; c < 4; c++)
        for (uint32_t i = 0; i < 6; i++) {
            uint8_t key[32];
            chain_key(key, TAG_FLUSH, c, i);
            assert_true(on_disk(f, key)); /* at the Ack, not later */
        }
    assert_int_equal(flush(&s), 0);
    assert_int_equal(put_chain(&s, f, TAG_FLUSH, 4, 6), 6); /* in memory only */
    sess_close(&s);
    fx_crash(f);
    sess_open(&s, f, "test/disk-flush", "fp16");
    for (uint32_t c = 0; c < 4; c++)
        assert_int_equal(check_chain(&s, f, TAG_FLUSH, c, 6), 6);
    assert_int_equal(check_chain(&s, f, TAG_FLUSH, 4, 6), 0);
    /* Blocks read back from disk are on disk: nothing to write. */
    assert_int_equal(flush(&s), 0);
    sess_close(&s);
}

static int setup_flush_interval(void **state)
{
    static const char *const flags[] = {"--pool-bytes", "4M", "--disk-flush-ms", "50", NULL};
    return fx_setup(state, flags);
}

/* With disk_flush_ms, blocks reach disk without an eviction or a Flush
 * (waited for in the files, no time asserted), and a SIGKILL after that
 * loses none of them. */
static void test_flush_interval(void **state)
{
    fx_t *f = *state;
    sess_t s;
    sess_open(&s, f, "test/disk-flush", "fp16");
    for (uint32_t c = 0; c < 3; c++)
        assert_int_equal(put_chain(&s, f, TAG_FLUSH, c, 6), 6);
    for (uint32_t c = 0; c < 3; c++)
        await_on_disk(f, TAG_FLUSH, c, 6);
    sess_close(&s);
    fx_crash(f);
    sess_open(&s, f, "test/disk-flush", "fp16");
    for (uint32_t c = 0; c < 3; c++)
        assert_int_equal(check_chain(&s, f, TAG_FLUSH, c, 6), 6);
    sess_close(&s);
}

/* SIGKILL while compactions run, VQKV_DISK_COMPACT_ROUNDS rounds (default
 * 30) from the printed seed: each round puts chains, makes them durable
 * with a Flush, evicts random ones (dead records, so segments become worth
 * compacting, their live blocks moved, which the daemon does as soon as it
 * is idle), and kills the daemon a random few milliseconds later. After every restart each chain
 * flushed and never evicted is found whole with its bytes; an evicted one
 * may be found (its tombstones perhaps not synced), never with wrong
 * bytes. No segment may go for room (the limit is far), so a block lost
 * is one the compaction lost. */
static void test_compaction_sigkill(void **state)
{
    fx_t *f = *state;
    const char *env = getenv("VQKV_DISK_COMPACT_ROUNDS");
    const uint32_t rounds = env != NULL ? (uint32_t)strtoul(env, NULL, 10) : 30;
    rng_state = kill_seed;
    enum { LIVE = 1, EVICTED = 2 };
    static uint8_t fate[COMPACT_KILL_CHAINS];
    uint32_t chains = 0, live = 0;
    for (uint32_t round = 0; round <= rounds; round++) {
        sess_t s;
        sess_open(&s, f, "test/disk-compact-kill", "fp16");
        for (uint32_t c = 0; c < chains; c++) {
            uint32_t found = check_chain(&s, f, TAG_COMPACT, c, COMPACT_BLOCKS);
            if (fate[c] == LIVE && found != COMPACT_BLOCKS)
                fail_msg("seed %llu, round %u: chain %u, flushed and never evicted, has %u of "
                         "%u blocks",
                         (unsigned long long)kill_seed, round, c, found, COMPACT_BLOCKS);
        }
        /* No segment went for room (bad records may: a SIGKILL mid-append
         * leaves a torn tail, which the scan counts; check_chain holds the
         * bytes). */
        assert_int_equal(tier_stats(&s).disk_dropped, 0);
        if (round == rounds) {
            sess_close(&s);
            break;
        }
        for (uint32_t n = 0; n < 3 && chains < COMPACT_KILL_CHAINS; n++, chains++, live++) {
            assert_int_equal(put_chain(&s, f, TAG_COMPACT, chains, COMPACT_BLOCKS), COMPACT_BLOCKS);
            fate[chains] = LIVE;
        }
        assert_true(flush(&s) >= 0);
        while (live > 12) { /* live chains go at random: segments die in part */
            uint32_t c = rng_below(chains);
            while (fate[c] != LIVE)
                c = (c + 1) % chains;
            /* More when pieces of chains evicted before a kill (their
             * tombstones not all synced) go with it: orphans. */
            assert_true(evict(&s, TAG_COMPACT, c, 0, 0) >= COMPACT_BLOCKS);
            fate[c] = EVICTED;
            live--;
        }
        sess_close(&s);
        sleep_ms((long)rng_below(25));
        fx_crash(f);
    }
    uint32_t compactions = log_count(f, "compacted:");
    printf("test_disk: seed %llu: %u rounds, %u chains, %u compactions logged\n",
           (unsigned long long)kill_seed, rounds, chains, compactions);
    assert_true(compactions > 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a Put to a killed daemon fails, not the test */
    kill_seed = rng_seed_from("VQKV_DISK_SEED", "test_disk");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_restart_keeps_hits, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evicted_fp16, setup_tiny_pool, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evicted_kivi4, setup_tiny_pool, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evict_forgets_disk, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evict_count, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evict_after_eviction, setup_tiny_pool, fx_teardown),
        cmocka_unit_test_setup_teardown(test_evict_races_write, setup_tiny_pool, fx_teardown),
        cmocka_unit_test_setup_teardown(test_torn_tail, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flipped_payload, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_garbage_segments, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unreadable_segments, setup_tiny_pool, fx_teardown),
        cmocka_unit_test(test_disk_dir_unusable),
        cmocka_unit_test(test_disk_refuses_writes),
        cmocka_unit_test_setup_teardown(test_disk_full, setup_full, fx_teardown),
        cmocka_unit_test_setup_teardown(test_disk_full_fifo, setup_full_fifo, fx_teardown),
        cmocka_unit_test_setup_teardown(test_disk_full_evict, setup_full, fx_teardown),
        cmocka_unit_test_setup_teardown(test_sigkill_loop, setup_tiny_pool, fx_teardown),
        cmocka_unit_test_setup_teardown(test_compaction, setup_compact, fx_teardown),
        cmocka_unit_test_setup_teardown(test_compaction_sigkill, setup_compact_kill, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flush, setup_disk, fx_teardown),
        cmocka_unit_test_setup_teardown(test_flush_interval, setup_flush_interval, fx_teardown),
    };
    if (getenv("VQKV_DISK_TESTS") != NULL)
        cmocka_set_test_filter(getenv("VQKV_DISK_TESTS"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
