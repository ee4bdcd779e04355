/* test_kernels.c -- the GPU codec kernels, emulated: every body of
 * kernels/cuda/kbody.h run over its whole launch geometry on the CPU
 * (kernel_emu.h) and held to the CPU codecs, for every codec and option,
 * every dtype, the vLLM and the split K/V layout, odd shapes whose codes do
 * not end on a byte, batches of 1 to 500 blocks, and slots that end on the
 * region's last byte. Decode must give the CPU codec's bytes in the whole
 * region (nothing outside the named slots moves); encode must give the CPU
 * codec's bytes (the bodies repeat its float operations one for one), the
 * same whichever order the threads run in.
 */
#include "kernel_cases.h"
#include "kernel_emu.h"

/* Holds the emulated kernels to the CPU codec for one codec, dtype, layout
 * and batch size. */
static void check_against_cpu(size_t ci, vqkv_dtype_t dtype, int split, uint32_t n_blocks,
                              uint32_t num_slots)
{
    vqkv_codec_t *codec = case_codec(ci, dtype);
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    uint64_t bb = vqkv_codec_block_bytes(codec);
    vqkv_kplan_t plan;
    float *books = NULL;
    assert_ok(vqkv_kplan_build(codec, &plan, &books));

    region_t src;
    region_make(&src, l, num_slots, split);
    request_t q;
    request_make(&q, n_blocks, num_slots, bb);

    /* Encode: the CPU's bytes, block by block, in order and in reverse. */
    uint8_t *want = malloc(q.store_bytes), *got = malloc(q.store_bytes);
    uint8_t *got_rev = malloc(q.store_bytes);
    assert_non_null(want);
    assert_non_null(got);
    assert_non_null(got_rev);
    memset(want, 0xa5, q.store_bytes);
    memset(got, 0xa5, q.store_bytes);
    memset(got_rev, 0x3c, q.store_bytes);
    for (uint32_t i = 0; i < n_blocks; i++)
        assert_ok(vqkv_codec_encode(codec, src.mem, &src.view, q.slots[i], want + q.store_at[i]));
    emu_request_t r = {&plan,   books,     got,     q.store_bytes, q.store_at,
                       src.mem, &src.view, q.slots, n_blocks};
    assert_ok(emu_run(&r, 1, 0));
    for (uint32_t i = 0; i < n_blocks; i++) {
        if (memcmp(want + q.store_at[i], got + q.store_at[i], bb) != 0) {
            size_t at = 0;
            while (want[q.store_at[i] + at] == got[q.store_at[i] + at])
                at++;
            fail_msg("%s %d split=%d: block %u encodes differently from byte %zu of %zu",
                     kcases[ci].spec, dtype, split, i, at, (size_t)bb);
        }
    }
    assert_memory_equal(want, got, 8); /* nothing before the first block */
    r.store = got_rev;
    assert_ok(emu_run(&r, 1, 1));
    for (uint32_t i = 0; i < n_blocks; i++)
        assert_memory_equal(got + q.store_at[i], got_rev + q.store_at[i], bb);

    /* Decode the CPU's blocks: the CPU's bytes in the whole region. */
    uint8_t *cpu = region_copy(&src, 0x77), *emu = region_copy(&src, 0x77);
    for (uint32_t i = 0; i < n_blocks; i++)
        assert_ok(vqkv_codec_decode(codec, want + q.store_at[i], cpu, &src.view, q.slots[i]));
    r.store = want;
    r.worker = emu;
    assert_ok(emu_run(&r, 0, 1));
    if (memcmp(cpu, emu, src.view.region_bytes) != 0) {
        size_t at = 0;
        while (cpu[at] == emu[at])
            at++;
        fail_msg("%s dtype %d split=%d: decode differs at region byte %zu", kcases[ci].spec, dtype,
                 split, at);
    }
    test_free_all(want, got, got_rev, cpu, emu, src.mem, books);
    request_free(&q);
    vqkv_codec_free(codec);
}

static void test_every_codec_dtype_layout(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_KCASES; ci++)
        for (size_t di = 0; di < 3; di++)
            for (int split = 0; split < 2; split++)
                check_against_cpu(ci, dtypes[di], split, 3, 5);
}

/* One block alone, and 500 blocks (more than the slots: the same slot
 * restored several times, as a get may), in one launch each. */
static void test_batches_of_1_and_500(void **state)
{
    (void)state;
    static const char *const specs[] = {"fp16", "kivi2", "rvq", "rvq:esc=2", "commvq"};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
        check_against_cpu(kcase_named(specs[i]), VQKV_DTYPE_F16, 0, 1, 1);
    /* 500 blocks of the three kinds of unit (vector chunks, KIVI key
     * channels, VQ runs); the VQ search makes each costly under ASan. */
    for (size_t i = 0; i < 3; i++)
        check_against_cpu(kcase_named(specs[i]), VQKV_DTYPE_BF16, 1, 500, 61);
}

/* A launch's geometry covers every unit once: grid * block >= units, and
 * less than one block of threads more. */
static void test_geometry_covers_units(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < NUM_KCASES; ci++) {
        vqkv_codec_t *codec = case_codec(ci, VQKV_DTYPE_F16);
        vqkv_kplan_t plan;
        float *books = NULL;
        assert_ok(vqkv_kplan_build(codec, &plan, &books));
        for (int k = VQKV_KERNEL_DECODE; k <= VQKV_KERNEL_ENCODE; k++) {
            vqkv_kbatch_t b = {.n_blocks = 37};
            vqkv_kgeom_t g = vqkv_kbatch_prepare(&b, &plan, (vqkv_kernel_t)k);
            assert_int_equal(g.block, VQKV_KERNEL_THREADS);
            assert_int_equal(g.shared, 0);
            uint64_t threads = (uint64_t)g.grid * g.block;
            assert_true(threads >= b.total);
            assert_true(threads < b.total + g.block);
            assert_int_equal(b.total, 37ull * plan.layout.num_layers * (b.units[0] + b.units[1]));
            if (k == VQKV_KERNEL_DECODE || k == VQKV_KERNEL_ENCODE)
                assert_true(b.units[0] > 0 && b.units[1] > 0);
        }
        free(books);
        vqkv_codec_free(codec);
    }
}

/* Every slot and block offset is checked before a launch: one bad entry
 * anywhere in the batch refuses it whole, and nothing is written. */
static void test_out_of_range_refused_before_launch(void **state)
{
    (void)state;
    size_t ci = kcase_named("rvq:esc=2");
    vqkv_codec_t *codec = case_codec(ci, VQKV_DTYPE_F16);
    const vqkv_layout_t *l = vqkv_codec_layout(codec);
    uint64_t bb = vqkv_codec_block_bytes(codec);
    vqkv_kplan_t plan;
    float *books = NULL;
    assert_ok(vqkv_kplan_build(codec, &plan, &books));
    region_t reg;
    region_make(&reg, l, 4, 0);
    request_t q;
    request_make(&q, 3, 4, bb);
    uint8_t *store = calloc(1, q.store_bytes), *before = region_copy(&reg, 0);
    memcpy(before, reg.mem, reg.view.region_bytes);
    emu_request_t r = {&plan,     books,   store, q.store_bytes, q.store_at, reg.mem,
                       &reg.view, q.slots, q.n};

    q.slots[1] = 4; /* one past the last slot */
    assert_rc(emu_run(&r, 0, 0), VQKV_ERANGE);
    q.slots[1] = UINT32_MAX;
    assert_rc(emu_run(&r, 1, 0), VQKV_ERANGE);
    q.slots[1] = 1;
    q.store_at[2] = q.store_bytes - bb + 1; /* the block's last byte past the store */
    assert_rc(emu_run(&r, 0, 0), VQKV_ERANGE);
    q.store_at[2] = UINT64_MAX - 3;
    assert_rc(emu_run(&r, 0, 0), VQKV_ERANGE);
    q.store_at[2] = 8;
    vqkv_kv_view_t small = reg.view;
    small.region_bytes -= 1; /* the last slot no longer fits */
    r.view = &small;
    q.slots[0] = 3;
    assert_rc(emu_run(&r, 0, 0), VQKV_ERANGE);
    vqkv_kv_view_t odd = reg.view;
    odd.offset += 1; /* f16 elements at odd addresses */
    r.view = &odd;
    q.slots[0] = 0;
    assert_rc(emu_run(&r, 0, 0), VQKV_EINVAL);
    odd = reg.view;
    odd.token_stride += 1;
    assert_rc(emu_run(&r, 1, 0), VQKV_EINVAL);
    uint64_t offsets[2] = {0, reg.view.layer_stride}; /* per-layer offsets: not yet */
    odd = reg.view;
    odd.layer_offsets = offsets;
    assert_rc(emu_run(&r, 0, 0), VQKV_EINVAL);
    r.view = &reg.view;
    r.n_blocks = 0;
    assert_rc(emu_run(&r, 0, 0), VQKV_EINVAL);
    assert_memory_equal(before, reg.mem, reg.view.region_bytes);
    r.n_blocks = q.n;
    assert_ok(emu_run(&r, 1, 0));
    assert_ok(emu_run(&r, 0, 0));
    test_free_all(store, before, reg.mem, books);
    request_free(&q);
    vqkv_codec_free(codec);
}

/* A plan needs codebooks; the books array holds every codeword and norm. */
static void test_plan_needs_codebooks(void **state)
{
    (void)state;
    vqkv_layout_t l = MAIN_LAYOUT;
    vqkv_codec_t *codec = NULL;
    vqkv_kplan_t plan;
    float *books = NULL;
    assert_ok(vqkv_codec_create("rvq", &l, &codec));
    assert_rc(vqkv_kplan_build(codec, &plan, &books), VQKV_ENOCODEBOOK);
    vqkv_codec_free(codec);
    codec = case_codec(kcase_named("rvq"), VQKV_DTYPE_F16);
    assert_ok(vqkv_kplan_build(codec, &plan, &books));
    /* rvq: 2 layers x 2 sides x 8 groups x 2 stages x 256 words of 8 floats,
     * their norms, and the statistics. */
    uint64_t words = 2ull * 2 * 8 * 2 * 256;
    assert_int_equal(plan.norms_at, words * 8);
    assert_int_equal(plan.stats_at, words * 9);
    assert_int_equal(plan.book_floats, words * 9 + 2ull * 2 * 2 * 2 * 64);
    for (uint64_t i = 0; i < words; i++) { /* each norm is its word's */
        float s = 0.0f;
        for (int j = 0; j < 8; j++)
            s += books[i * 8 + j] * books[i * 8 + j];
        assert_true(s == books[plan.norms_at + i]);
    }
    free(books);
    vqkv_codec_free(codec);
    codec = case_codec(kcase_named("kivi2"), VQKV_DTYPE_F16);
    assert_ok(vqkv_kplan_build(codec, &plan, &books));
    assert_null(books);
    assert_int_equal(plan.kind, VQKV_KIND_KIVI);
    vqkv_codec_free(codec);
}

/* Training with the assignment steps in the device body gives the CPU's
 * codebooks, bit for bit, for every trained case (commvq's key tables are
 * EM on the CPU either way; its value codebooks go through k-means). */
static void test_training_with_device_assignment(void **state)
{
    (void)state;
    static const vqkv_assigner_t emulated = {emu_assign, NULL};
    for (size_t ci = 0; ci < NUM_KCASES; ci++) {
        if (books_file[ci] == NULL)
            continue;
        vqkv_codec_t *codec = NULL;
        vqkv_train_opts_t opts = {.seed = 3, .iterations = 3, .threads = 2, .assigner = &emulated};
        assert_ok(vqkv_codec_create(kcases[ci].spec, &kcases[ci].layout, &codec));
        assert_ok(test_train_all(codec, PROFILE, 1026, &opts));
        test_assert_saves_as(codec, books_file[ci], books_file_len[ci]);
        vqkv_codec_free(codec);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_needs_codebooks),
        cmocka_unit_test(test_geometry_covers_units),
        cmocka_unit_test(test_out_of_range_refused_before_launch),
        cmocka_unit_test(test_every_codec_dtype_layout),
        cmocka_unit_test(test_batches_of_1_and_500),
        cmocka_unit_test(test_training_with_device_assignment),
    };
    return cmocka_run_group_tests(tests, train_cases, free_cases);
}
