/* test_faults.c -- vqkv survives crashes of its clients and of itself.
 *
 * Killed clients: hundreds of rounds, each a forked worker that connects,
 * registers a model and a memfd region and runs put, lookup (some leases
 * kept on purpose), get, pin, unpin, evict and stats in a loop until the
 * test kills it with SIGKILL after a random delay (tens of microseconds to
 * tens of milliseconds, so some die connecting and most mid-request). After
 * every round the daemon must come back to what it held before: its open
 * fds and memfd mappings (/proc/PID), clients, regions and leases (Stats),
 * and pool accounting that agrees with the blocks held. Blocks stored by
 * finished Puts may stay; at the end every block still held must read back
 * byte for byte.
 *
 * A killed daemon: workers run traffic on a VQ model while the test kills
 * vqkvd (SIGKILL) and starts it again on the same socket and state dir, a
 * few times. Each worker must see the loss as VQKV_ECLOSED from a get or
 * release (libvqkv retries the other requests on a new connection), a
 * failed reconnect while no daemon listens, or a retried lookup that finds
 * nothing on the new daemon, and nothing else, then go on; the model comes back with the codebooks
 * the first daemon trained and saved (codebooks_ready at registration, blocks stored at the VQ
 * size, decoded bytes identical to before the restarts).
 *
 * The random choices come from one seed, printed; VQKV_FAULT_SEED=N runs the
 * same schedule again (the kernel's timing still differs) and
 * VQKV_FAULT_ROUNDS=N changes the number of killed clients (default 300).
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "libvqkv_harness.h"
#include "vqkv.h"
#include "vqkv_codec.h"

#define TIMEOUT_MS 5000
#define LAYERS 2
#define HEADS 2
#define DIM 64
#define TOKENS 16
#define SLOTS 8
#define BLOCKS 4 /* blocks of a chain */
#define CHAINS 32
#define MODEL "test/faults@main"
#define VQ_SPEC "rvq:d=8,b=4,r=1" /* 16-entry codebooks train in a blink */
#define MEMFD_NAME "test_faults"

static const vqkv_layout_t layout = {LAYERS, HEADS, DIM, TOKENS, VQKV_DTYPE_F16};

/* ---- chains and their bytes ----------------------------------------------- */

/* The chain whose first block chain c shares: the chains below CHAINS
 * come in four families, so the store holds parents with several
 * children; every other block is the chain's own. */
static uint32_t chain_root(uint32_t c)
{
    return c < CHAINS ? c % 4 : c;
}

static void chain_tokens(uint32_t c, uint32_t *tokens)
{
    for (uint32_t t = 0; t < BLOCKS * TOKENS; t++)
        tokens[t] = t < TOKENS ? chain_root(c) * 100 + t : c * 4096 + t;
}

static int chain_keys(const vqkv_model_t *m, uint32_t c, uint8_t (*keys)[VQKV_KEY_BYTES])
{
    uint32_t tokens[BLOCKS * TOKENS];
    chain_tokens(c, tokens);
    size_t n = 0;
    int rc = vqkv_model_block_keys(m, NULL, tokens, BLOCKS * TOKENS, NULL, 0, keys, BLOCKS, &n);
    return rc == VQKV_OK && n == BLOCKS ? VQKV_OK : VQKV_EINVAL;
}

/* A fp16 value of block b of chain c: a hash into [0, 1), so that a block
 * key always names the same bytes whoever puts it. */
static uint16_t block_value(uint32_t c, uint32_t b, size_t i)
{
    uint64_t h = ((uint64_t)(b == 0 ? chain_root(c) : c) << 40) ^ ((uint64_t)b << 32) ^ i;
    h *= UINT64_C(0x9E3779B97F4A7C15);
    h ^= h >> 29;
    return (uint16_t)(h & 0x3bff);
}

typedef struct {
    int fd;
    uint8_t *base;
    vqkv_kv_view_t view;
} region_t;

static int region_new(region_t *r)
{
    vqkv_kv_view_vllm(&r->view, &layout, SLOTS);
    if (vqkv_memfd_create(MEMFD_NAME, r->view.region_bytes, &r->fd) != VQKV_OK)
        return -1;
    r->base = mmap(NULL, r->view.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    return r->base == MAP_FAILED ? -1 : 0;
}

static void region_free(region_t *r)
{
    munmap(r->base, r->view.region_bytes);
    close(r->fd);
}

/* The bytes of one layer's K or V of a slot. */
static uint16_t *slot_part(const region_t *r, uint32_t slot, uint32_t l, uint32_t kv)
{
    return (uint16_t *)(r->base + l * r->view.layer_stride + kv * r->view.kv_stride +
                        slot * r->view.slot_stride);
}

#define PART_VALUES ((size_t)TOKENS * HEADS * DIM)

/* Writes block b of chain c into slot. */
static void block_fill(const region_t *r, uint32_t slot, uint32_t c, uint32_t b)
{
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++) {
            uint16_t *v = slot_part(r, slot, l, kv);
            for (size_t i = 0; i < PART_VALUES; i++)
                v[i] = block_value(c, b, (l * 2 + kv) * PART_VALUES + i);
        }
}

/* 1 when slot holds block b of chain c. */
static int block_check(const region_t *r, uint32_t slot, uint32_t c, uint32_t b)
{
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++) {
            const uint16_t *v = slot_part(r, slot, l, kv);
            for (size_t i = 0; i < PART_VALUES; i++)
                if (v[i] != block_value(c, b, (l * 2 + kv) * PART_VALUES + i))
                    return 0;
        }
    return 1;
}

#define BLOCK_BYTES (LAYERS * 2 * PART_VALUES * sizeof(uint16_t))

/* Copies the whole block in slot (every layer's K and V) to out. */
static void block_copy(const region_t *r, uint32_t slot, uint8_t *out)
{
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t kv = 0; kv < 2; kv++)
            memcpy(out + (l * 2 + kv) * PART_VALUES * sizeof(uint16_t), slot_part(r, slot, l, kv),
                   PART_VALUES * sizeof(uint16_t));
}

/* ---- what the daemon holds ------------------------------------------------- */

/* Entries of /proc/PID/fd, or lines of /proc/PID/maps naming MEMFD_NAME. */
static long proc_count(pid_t pid, int maps)
{
    char path[64];
    long n = 0;
    if (!maps) {
        snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
        DIR *dp = opendir(path);
        assert_non_null(dp);
        for (struct dirent *e; (e = readdir(dp)) != NULL;)
            n += e->d_name[0] != '.';
        closedir(dp);
        return n;
    }
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[512];
    while (fgets(line, sizeof line, f) != NULL)
        n += strstr(line, "memfd:" MEMFD_NAME) != NULL;
    fclose(f);
    return n;
}

typedef struct {
    long fds, maps;
    uint64_t clients, regions, leases;
} census_t;

static void census_take(const daemon_t *d, vqkv_client_t *obs, census_t *c, vqkv_stats_t *st)
{
    assert_vqkv(vqkv_stats(obs, st), VQKV_OK);
    *c = (census_t){proc_count(d->pid, 0), proc_count(d->pid, 1), st->clients, st->regions,
                    st->leases};
}

static int census_equal(const census_t *a, const census_t *b)
{
    return a->fds == b->fds && a->maps == b->maps && a->clients == b->clients &&
           a->regions == b->regions && a->leases == b->leases;
}

/* Waits (the daemon notices a dead peer on its next loop turn, and a job
 * of the peer's may still be running) until the daemon is back to base,
 * then checks that and the pool's accounting against the blocks held. */
static void census_settle(const daemon_t *d, vqkv_client_t *obs, const census_t *base,
                          uint32_t block_bytes, int round)
{
    census_t now;
    vqkv_stats_t st;
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    for (census_take(d, obs, &now, &st); !census_equal(&now, base) && now_ms() < deadline;
         census_take(d, obs, &now, &st))
        sleep_ms(1);
    if (!census_equal(&now, base))
        fail_msg("round %d: vqkvd holds fds %ld, memfd maps %ld, clients %llu, regions %llu, "
                 "leases %llu; before: %ld, %ld, %llu, %llu, %llu",
                 round, now.fds, now.maps, (unsigned long long)now.clients,
                 (unsigned long long)now.regions, (unsigned long long)now.leases, base->fds,
                 base->maps, (unsigned long long)base->clients, (unsigned long long)base->regions,
                 (unsigned long long)base->leases);
    assert_int_equal(st.pool_slots_used, st.blocks);
    assert_int_equal(st.pool_bytes_used, st.bytes_stored);
    assert_int_equal(st.bytes_stored, st.blocks * block_bytes);
    assert_int_equal(st.n_tenants, 1);
    assert_int_equal(st.tenants[0].blocks, st.blocks);
    assert_int_equal(st.tenants[0].bytes_stored, st.bytes_stored);
}

/* ---- killed clients ---------------------------------------------------------- */

/* What a worker was doing; shared with the test, which reads it once the
 * worker is dead. */
enum {
    OP_CONNECT,
    OP_PUT,
    OP_GET,
    OP_KEEP_LEASE,
    OP_PIN,
    OP_PIN_TTL,
    OP_UNPIN,
    OP_EVICT,
    OP_STATS,
    OP_COUNT
};
static const char *const op_names[OP_COUNT] = {"connect/register",
                                               "put",
                                               "lookup+get",
                                               "lookup (lease kept)",
                                               "pin",
                                               "pin ttl",
                                               "unpin",
                                               "evict",
                                               "stats"};

typedef struct {
    volatile int op;
    volatile uint64_t done; /* operations finished */
} progress_t;

#define KEPT_LEASES 4

/* The worker: never returns; any failed call ends it with 10 + the op. */
static void worker_run(const daemon_t *d, progress_t *p, uint64_t seed)
{
    rng_state = seed;
    p->op = OP_CONNECT;
    vqkv_client_t *c = NULL;
    vqkv_model_t *m = NULL;
    region_t r;
    vqkv_region_t h;
    if (vqkv_connect(d->path, "test_faults-worker", TIMEOUT_MS, &c) != VQKV_OK ||
        vqkv_register_model(c, MODEL, &layout, "fp16", &m) != VQKV_OK || region_new(&r) != 0 ||
        vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes, 0, &r.view, &h) != VQKV_OK)
        _exit(10 + OP_CONNECT);
    vqkv_lease_t kept[KEPT_LEASES] = {0};
    for (uint32_t n_kept = 0;; p->done++) {
        uint32_t chain = rng_below(CHAINS);
        uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
        uint32_t slots[BLOCKS] = {0, 1, 2, 3}, into[BLOCKS] = {4, 5, 6, 7};
        size_t found = 0, count = 0;
        vqkv_lease_t lease = 0;
        vqkv_stats_t st;
        int op = 1 + (int)rng_below(OP_COUNT - 1), rc = 0;
        if (chain_keys(m, chain, keys) != VQKV_OK)
            _exit(9);
        p->op = op;
        switch (op) {
        case OP_PUT:
            for (uint32_t b = 0; b < BLOCKS; b++)
                block_fill(&r, slots[b], chain, b);
            rc = vqkv_put(c, m, h, keys, NULL, slots, BLOCKS, NULL);
            break;
        case OP_GET:
            rc = vqkv_lookup(c, m, keys, BLOCKS, &found, &lease);
            if (rc == VQKV_OK && found > 0)
                rc = vqkv_get(c, lease, h, into, found);
            if (rc >= 0)
                rc = vqkv_release(c, lease);
            break;
        case OP_KEEP_LEASE:
            rc = vqkv_release(c, kept[n_kept % KEPT_LEASES]);
            if (rc == VQKV_OK)
                rc = vqkv_lookup(c, m, keys, BLOCKS, &found, &kept[n_kept++ % KEPT_LEASES]);
            break;
        case OP_PIN: rc = vqkv_pin(c, m, keys, BLOCKS, 0, &count); break;
        case OP_PIN_TTL: rc = vqkv_pin(c, m, keys, 1, 20, &count); break;
        case OP_UNPIN: rc = vqkv_unpin(c, m, keys, BLOCKS, &count); break;
        case OP_EVICT: rc = vqkv_evict(c, m, keys + BLOCKS - 1, 1, 0, &count); break;
        case OP_STATS: rc = vqkv_stats(c, &st); break;
        default: break;
        }
        if (rc < 0)
            _exit(10 + op);
    }
}

/* The delay before the kill: log-uniform from 50 us to 50 ms, so that as
 * many kills land in the first connect as in the thousandth request. */
static long kill_delay_us(void)
{
    double u = (double)rng_below(1u << 20) / (double)(1u << 20);
    return (long)(50.0 * exp(u * log(1000.0)));
}

static int rounds_wanted(void)
{
    const char *env = getenv("VQKV_FAULT_ROUNDS");
    int n = env != NULL ? atoi(env) : 300;
    return n > 0 ? n : 300;
}

static void test_killed_clients(void **state)
{
    daemon_t *d = *state;
    progress_t *p =
        mmap(NULL, sizeof *p, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    vqkv_client_t *obs = NULL;
    assert_vqkv(vqkv_connect(d->path, "test_faults-observer", TIMEOUT_MS, &obs), VQKV_OK);
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(obs, MODEL, &layout, "fp16", &m), VQKV_OK);
    census_t base;
    vqkv_stats_t st;
    census_take(d, obs, &base, &st);
    assert_int_equal(base.maps, 0);

    int rounds = rounds_wanted();
    long at_op[OP_COUNT] = {0};
    uint64_t ops = 0;
    for (int round = 0; round < rounds; round++) {
        uint64_t seed = rng_next() | 1;
        long delay = kill_delay_us();
        p->op = OP_CONNECT;
        p->done = 0;
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL); /* no worker outlives a failed test */
            worker_run(d, p, seed);
        }
        struct timespec ts = {delay / 1000000, (delay % 1000000) * 1000};
        nanosleep(&ts, NULL);
        assert_int_equal(kill(pid, SIGKILL), 0);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (WIFEXITED(status)) {
            int op = WEXITSTATUS(status) - 10;
            fail_msg("round %d: a call of the worker's %s failed (exit status %d)", round,
                     op >= 0 && op < OP_COUNT ? op_names[op] : "key computation",
                     WEXITSTATUS(status));
        }
        assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        at_op[p->op]++;
        ops += p->done;
        census_settle(d, obs, &base, vqkv_model_block_bytes(m), round);
    }

    /* Every block still held reads back as put. */
    region_t r;
    assert_int_equal(region_new(&r), 0);
    vqkv_region_t h;
    assert_vqkv(vqkv_register_memfd_region(obs, m, r.fd, r.view.region_bytes, 0, &r.view, &h),
                VQKV_OK);
    size_t verified = 0;
    for (uint32_t c = 0; c < CHAINS; c++) {
        uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
        uint32_t slots[BLOCKS] = {0, 1, 2, 3};
        assert_vqkv(chain_keys(m, c, keys), VQKV_OK);
        size_t found = 0;
        vqkv_lease_t lease = 0;
        assert_vqkv(vqkv_lookup(obs, m, keys, BLOCKS, &found, &lease), VQKV_OK);
        memset(r.base, 0, r.view.region_bytes);
        if (found > 0)
            assert_vqkv(vqkv_get(obs, lease, h, slots, found), (int)found);
        assert_vqkv(vqkv_release(obs, lease), VQKV_OK);
        for (uint32_t b = 0; b < found; b++)
            if (!block_check(&r, slots[b], c, b))
                fail_msg("chain %u block %u does not read back as put", c, b);
        verified += found;
    }
    printf("test_faults: %d workers killed after %llu finished operations; the op in progress "
           "at the kill:\n",
           rounds, (unsigned long long)ops);
    for (int i = 0; i < OP_COUNT; i++)
        printf("  %-20s %ld\n", op_names[i], at_op[i]);
    printf("test_faults: daemon back to %ld fds and %llu clients after every round; %zu blocks "
           "held, all read back as put\n",
           base.fds, (unsigned long long)base.clients, verified);
    vqkv_close(obs);
    region_free(&r);
    munmap(p, sizeof *p);
}

/* ---- a killed daemon --------------------------------------------------------- */

#define WORKERS 3
#define RESTARTS 4

/* Shared between the test and its workers. */
typedef struct {
    volatile int epoch; /* daemons started so far, minus one */
    volatile int stop;
    volatile int ok_epoch[WORKERS]; /* the epoch of a worker's last full round */
    volatile long closed[WORKERS];  /* VQKV_ECLOSED seen */
    volatile long refused[WORKERS]; /* reconnects that found no daemon */
    volatile int bad_code[WORKERS]; /* another code: the worker stops */
} traffic_t;

/* Whether rc is how a restart shows, counting it; anything else is not. */
static int restart_error(vqkv_client_t *c, traffic_t *t, int w, int rc)
{
    if (rc == VQKV_ECLOSED && strstr(vqkv_last_error(c), "the next call reconnects") != NULL) {
        t->closed[w]++;
        return 1;
    }
    if (rc == VQKV_EIO && strstr(vqkv_last_error(c), "reconnecting") != NULL) {
        t->refused[w]++;
        sleep_ms(1);
        return 1;
    }
    t->bad_code[w] = rc;
    return 0;
}

/* A worker: puts a chain, looks it up, gets it back and checks the bytes
 * against what the first daemon's codebooks gave, round after round. Exit
 * status 0, or the step that failed. */
static int traffic_worker(const daemon_t *d, traffic_t *t, int w)
{
    vqkv_client_t *c = NULL;
    vqkv_model_t *m = NULL;
    region_t r;
    vqkv_region_t h;
    if (vqkv_connect(d->path, "test_faults-traffic", TIMEOUT_MS, &c) != VQKV_OK ||
        vqkv_register_model(c, MODEL, &layout, VQ_SPEC, &m) != VQKV_OK || region_new(&r) != 0 ||
        vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes, 0, &r.view, &h) != VQKV_OK)
        return 1;
    if (!vqkv_model_codebooks_ready(m))
        return 2;
    /* The decoded bytes of each chain as the first daemon gave them. */
    uint8_t *want = calloc(CHAINS * BLOCKS, BLOCK_BYTES), got[BLOCKS][BLOCK_BYTES];
    uint8_t seen[CHAINS] = {0};
    if (want == NULL)
        return 3;
    uint32_t slots[BLOCKS] = {0, 1, 2, 3}, into[BLOCKS] = {4, 5, 6, 7};
    for (uint32_t chain = (uint32_t)w; !t->stop; chain = (chain + 1) % 4) {
        uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
        size_t found = 0;
        vqkv_lease_t lease = 0;
        int epoch = t->epoch;
        /* Computed every round: a restarted daemon draws new salts. */
        if (chain_keys(m, chain, keys) != VQKV_OK)
            return 4;
        for (uint32_t b = 0; b < BLOCKS; b++)
            block_fill(&r, slots[b], chain, b);
        int rc = vqkv_put(c, m, h, keys, NULL, slots, BLOCKS, NULL);
        if (rc >= 0)
            rc = vqkv_lookup(c, m, keys, BLOCKS, &found, &lease);
        /* Put and lookup on one daemon: all there. A lookup retried on a
         * restarted daemon finds nothing, which counts as the restart. */
        if (rc >= 0 && found != BLOCKS) {
            if (t->epoch == epoch)
                return 5;
            if (lease != 0)
                (void)vqkv_release(c, lease); /* the new daemon's; it would expire anyway */
            t->closed[w]++;
            continue;
        }
        if (rc >= 0)
            rc = vqkv_get(c, lease, h, into, BLOCKS);
        if (rc >= 0)
            rc = vqkv_release(c, lease);
        if (rc < 0) {
            if (!restart_error(c, t, w, rc))
                return 6;
            continue;
        }
        if (!vqkv_model_codebooks_ready(m))
            return 7; /* the daemon calibrates again */
        for (uint32_t b = 0; b < BLOCKS; b++)
            block_copy(&r, into[b], got[b]);
        uint8_t *ref = want + chain * BLOCKS * BLOCK_BYTES;
        if (!seen[chain]) {
            memcpy(ref, got, sizeof got);
            seen[chain] = 1;
        } else if (memcmp(ref, got, sizeof got) != 0) {
            return 8; /* other codebooks, or other bytes */
        }
        t->ok_epoch[w] = epoch;
    }
    vqkv_close(c);
    region_free(&r);
    free(want);
    return 0;
}

/* Waits until worker w (process pid) has done a full round on the daemon
 * of epoch; fails the test when it exits or takes too long. */
static void traffic_wait(traffic_t *t, int w, pid_t pid, int epoch)
{
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (t->ok_epoch[w] != epoch) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            fail_msg("worker %d ended with status %#x before a round on daemon %d (last code %d)",
                     w, status, epoch, t->bad_code[w]);
        if (now_ms() > deadline)
            fail_msg("worker %d did no round on daemon %d (last code %d)", w, epoch,
                     t->bad_code[w]);
        sleep_ms(1);
    }
}

/* The one codebook file under state_dir/codebooks goes, then the folder. */
static void remove_codebooks(const char *state_dir)
{
    char dir[256], path[512];
    snprintf(dir, sizeof dir, "%s/codebooks", state_dir);
    DIR *dp = opendir(dir);
    assert_non_null(dp);
    for (struct dirent *e; (e = readdir(dp)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        assert_int_equal(unlink(path), 0);
    }
    closedir(dp);
    assert_int_equal(rmdir(dir), 0);
}

/* Calibrates VQ_SPEC on this daemon through c: puts BLOCKS blocks (the
 * daemon's calibration budget) of a chain no worker puts, since these
 * stay fp16, and registers again until ready. */
static vqkv_model_t *calibrate(vqkv_client_t *c)
{
    vqkv_model_t *m;
    assert_vqkv(vqkv_register_model(c, MODEL, &layout, VQ_SPEC, &m), VQKV_OK);
    region_t r;
    assert_int_equal(region_new(&r), 0);
    vqkv_region_t h;
    assert_vqkv(vqkv_register_memfd_region(c, m, r.fd, r.view.region_bytes, 0, &r.view, &h),
                VQKV_OK);
    uint8_t keys[BLOCKS][VQKV_KEY_BYTES];
    uint32_t slots[BLOCKS] = {0, 1, 2, 3};
    assert_vqkv(chain_keys(m, CHAINS, keys), VQKV_OK);
    for (uint32_t b = 0; b < BLOCKS; b++)
        block_fill(&r, slots[b], CHAINS, b);
    assert_vqkv(vqkv_put(c, m, h, keys, NULL, slots, BLOCKS, NULL), BLOCKS);
    long deadline = now_ms() + DAEMON_DEADLINE_MS;
    while (!vqkv_model_codebooks_ready(m)) {
        if (now_ms() > deadline)
            fail_msg("codebooks not trained after %d blocks", BLOCKS);
        sleep_ms(10);
        assert_vqkv(vqkv_register_model(c, MODEL, &layout, VQ_SPEC, &m), VQKV_OK);
    }
    region_free(&r);
    return m;
}

static void test_killed_daemon(void **state)
{
    (void)state;
    char tokens_arg[16];
    snprintf(tokens_arg, sizeof tokens_arg, "%d", BLOCKS * TOKENS);
    const char *extra[] = {"--calibration-tokens", tokens_arg, NULL};
    daemon_t d;
    daemon_start(&d, extra);
    vqkv_client_t *c = NULL;
    assert_vqkv(vqkv_connect(d.path, "test_faults-admin", TIMEOUT_MS, &c), VQKV_OK);
    vqkv_model_t *m = calibrate(c);
    uint32_t vq_bytes = vqkv_model_block_bytes(m);

    traffic_t *t = mmap(NULL, sizeof *t, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(t != MAP_FAILED);
    memset((void *)t, 0, sizeof *t);
    for (int w = 0; w < WORKERS; w++)
        t->ok_epoch[w] = -1;
    pid_t workers[WORKERS];
    for (int w = 0; w < WORKERS; w++) {
        workers[w] = fork();
        assert_true(workers[w] >= 0);
        if (workers[w] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            _exit(traffic_worker(&d, t, w));
        }
    }

    for (int k = 1; k <= RESTARTS; k++) {
        /* Every worker has done a full round on this daemon... */
        for (int w = 0; w < WORKERS; w++)
            traffic_wait(t, w, workers[w], k - 1);
        /* ... and goes on while it dies. */
        sleep_ms(5 + (long)rng_below(50));
        assert_int_equal(kill(d.pid, SIGKILL), 0);
        assert_int_equal(waitpid(d.pid, NULL, 0), d.pid);
        sleep_ms((long)rng_below(20));
        t->epoch = k;
        d.pid = daemon_spawn(&d, extra);
        daemon_wait_listening(&d);

        /* The admin client's next call goes through (libvqkv retries it on
         * a new connection) and finds the model ready: the codebooks came
         * back from the state dir. */
        vqkv_stats_t st;
        assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
        assert_true(vqkv_model_codebooks_ready(m));
        assert_int_equal(st.bytes_stored, st.blocks * vq_bytes);
    }
    for (int w = 0; w < WORKERS; w++)
        traffic_wait(t, w, workers[w], RESTARTS);
    t->stop = 1;
    long closed = 0, refused = 0;
    for (int w = 0; w < WORKERS; w++) {
        int status;
        assert_int_equal(waitpid(workers[w], &status, 0), workers[w]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail_msg("worker %d failed: status %#x, code %d (%s)", w, status, t->bad_code[w],
                     vqkv_client_strerror(t->bad_code[w]));
        /* A full round after the last restart. Retried requests hide some
         * restarts from a worker altogether, so it need not have seen
         * each one as an error. */
        assert_int_equal(t->ok_epoch[w], RESTARTS);
        closed += t->closed[w];
        refused += t->refused[w];
    }
    assert_true(closed + refused > 0); /* the kills met traffic */
    vqkv_stats_t st;
    assert_vqkv(vqkv_stats(c, &st), VQKV_OK);
    assert_true(st.blocks > 0);
    assert_int_equal(st.bytes_stored, st.blocks * vq_bytes);
    printf("test_faults: vqkvd killed %d times under %d workers: %ld VQKV_ECLOSED, %ld reconnects "
           "that found no daemon, no other error; codebooks ready after every restart\n",
           RESTARTS, WORKERS, closed, refused);
    vqkv_close(c);
    munmap((void *)t, sizeof *t);
    daemon_stop(&d);
    remove_codebooks(d.state);
    daemon_cleanup(&d);
}

/* A daemon whose leases never expire during the test, so only the
 * daemon's handling of a dead peer can bring them back to zero. */
static int setup_long_leases(void **state)
{
    daemon_t *d = calloc(1, sizeof *d);
    assert_non_null(d);
    *state = d;
    const char *extra[] = {"--lease-ms", "3600000", NULL};
    daemon_start(d, extra);
    return 0;
}

int main(void)
{
    rng_state = rng_seed_from("VQKV_FAULT_SEED", "test_faults");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_killed_clients, setup_long_leases, teardown),
        cmocka_unit_test(test_killed_daemon),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
