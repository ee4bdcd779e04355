/* fuzz.h -- what the fuzz targets, their replay driver and the seed
 * generator share (README.md).
 *
 * Every target is one fuzz_<name>.c defining LLVMFuzzerTestOneInput (and,
 * when it needs set-up done once, LLVMFuzzerInitialize). The same file is
 * linked either with libFuzzer (the fuzz preset) or with fuzz_main.c, a
 * plain main() that replays files, so a crash input kept under
 * regressions/ stays a test in every build. An invariant that fails aborts
 * through FUZZ_CHECK, which libFuzzer reports like a crash.
 *
 * The session target's input format (fuzz_session.c) is defined here, since
 * fuzz_make_seeds.c writes inputs in it: a setup byte, then records
 *   u8 op | u16le len | len bytes
 * where op's low two bits say what the bytes are (FUZZ_OP_*),
 * FUZZ_OP_STRAY_FD adds an fd the request does not take and FUZZ_OP_SYNC
 * waits for every reply first, as a client waits for PutDone before it
 * looks the blocks up (without it, requests pipeline).
 */
#ifndef VQKV_FUZZ_H
#define VQKV_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "vqkv_proto.h"

/* libFuzzer's entry points. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Aborts with the failed invariant when cond is false. */
#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s: ", __FILE__, __LINE__, #cond);           \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Open fds of this process (/proc/self/fd), for leak checks: a target
 * compares the count before and after an input. */
int fuzz_fd_count(void);

/* A sealable memfd holding len bytes of data; aborts when it cannot make one. */
int fuzz_memfd(const char *name, const void *data, size_t len);

/* ---- the session target's model and input format ---------------------------- */

/* The layout of the model the session prelude registers; its region is a
 * vLLM view of FUZZ_REGION_SLOTS slots at the start of a memfd of
 * FUZZ_REGION_MEMFD_BYTES (twice the view, so a request may name more). */
extern const vqkv_layout_t fuzz_layout;
#define FUZZ_REGION_SLOTS 8
#define FUZZ_REGION_MEMFD_BYTES 8192

/* Codecs the prelude may register (the setup byte picks one), the VQ ones
 * small enough to train in milliseconds. */
#define FUZZ_N_CODECS 8
extern const char *const fuzz_codecs[FUZZ_N_CODECS];

/* The VQ specs the codebook target loads files for. */
#define FUZZ_N_VQ_SPECS 8
extern const char *const fuzz_vq_specs[FUZZ_N_VQ_SPECS];

/* Setup byte of a session input. */
#define FUZZ_SETUP_NO_PRELUDE 0x01 /* no Hello, RegisterModel, RegisterRegion first */
#define FUZZ_SETUP_CODEC_SHIFT 1   /* 3 bits: fuzz_codecs[] of the prelude model */
#define FUZZ_SETUP_CODEBOOK 0x10   /* the prelude's RegisterModel sends a codebook file */

/* Record ops of a session input. */
enum {
    FUZZ_OP_FRAME = 0,        /* a packed Envelope, sent as one frame */
    FUZZ_OP_FRAME_REGION = 1, /* the same with the region memfd */
    FUZZ_OP_FRAME_BOOKS = 2,  /* the same with a codebook file for the prelude codec */
    FUZZ_OP_POKE = 3,         /* u32le offset, then bytes written into the region memory */
    FUZZ_OP_STRAY_FD = 4,     /* flag: one more fd (/dev/null) with the frame */
    FUZZ_OP_SYNC = 8,         /* flag: first wait for the replies to all sent frames */
};

/* Appends the prelude records for setup (a setup byte without
 * FUZZ_SETUP_NO_PRELUDE): Hello (request 1), RegisterModel of model "fuzz"
 * with fuzz_layout and the setup's codec (2; with a codebook file when
 * FUZZ_SETUP_CODEBOOK is set and the codec is VQ) and RegisterRegion of
 * the region memfd (3). They leave model handle 1 and region handle 1. */
void fuzz_prelude(uint8_t **buf, size_t *len, int setup);

/* A RegisterRegion of model 1 for view: a memfd region with its one fd. */
void fuzz_region_request(Vqkv__RegisterRegion *rr, const vqkv_kv_view_t *view);

/* Deterministic synthetic KV values (finite, spread like real keys and
 * values): n floats from seed. */
void fuzz_kv_values(uint64_t seed, float *out, size_t n);

/* 1 when spec (on fuzz_layout) is a VQ codec, which takes codebooks. */
int fuzz_codec_needs_books(const char *spec);

/* A codebook file for spec on layout, trained on fuzz_kv_values. VQKV_OK
 * with *buf malloc'd, or an error. Costs a few milliseconds for the specs
 * above. */
int fuzz_codebook_make(const char *spec, const vqkv_layout_t *layout, uint8_t **buf, size_t *len);

/* Appends a record (op, the packed env) to *buf (realloc'd, *len bytes).
 * Aborts when memory runs out or the envelope exceeds a record. */
void fuzz_record_envelope(uint8_t **buf, size_t *len, int op, const Vqkv__Envelope *env);

/* Appends a record of raw bytes. */
void fuzz_record_bytes(uint8_t **buf, size_t *len, int op, const void *data, size_t n);

#endif
