/* calib.h -- codebooks for models registered with a VQ codec: loaded from a
 * file the client sends, from the state dir where an earlier run saved
 * them, or trained online from the model's first blocks (calib.c).
 * Private to the daemon; everything here runs on the loop's thread.
 */
#ifndef VQKVD_CALIB_H
#define VQKVD_CALIB_H

#include "session.h"

/* A codebook file larger than this is refused without reading it. */
#define VQKVD_CODEBOOK_FILE_MAX (256u << 20)

/* Loads the codebook file open on fd (a regular file or memfd, read with
 * pread, so the sender cannot fault the daemon by truncating it) into
 * codec. VQKV_OK, or an error with *why naming what was wrong. One read of
 * the whole file on the loop: files are small (about 1 MiB for an 8B
 * model) and arrive once per model, not worth a thread-pool round trip. */
int vqkvd_calib_load_fd(vqkv_codec_t *codec, int fd, const char **why);

/* Loads m's codebooks saved by an earlier run, if any: true when loaded (m
 * is ready); false when there is no state dir or no file for m, or when the
 * file is unusable (logged; training will replace it). Same cost as above. */
bool vqkvd_calib_load_saved(vqkvd_server_t *s, vqkvd_model_t *m);

/* Starts online calibration of m, whose codec lacks codebooks: an fp16
 * fallback codec and pool class for its Puts, and room for
 * cfg.calib_tokens tokens of samples. VQKV_OK or VQKV_ENOMEM/EINVAL (m
 * unchanged but for pool classes, which cannot be given back). */
int vqkvd_calib_begin(vqkvd_server_t *s, vqkvd_model_t *m);

/* A block m stored with its fallback (fallback_bytes at block): kept as a
 * sample while more are wanted; the one that completes the set starts
 * training on the thread pool. O(fallback_bytes) memcpy on the loop. */
void vqkvd_calib_add(vqkvd_server_t *s, vqkvd_model_t *m, const uint8_t *block);

/* Adopts the codebook file buf[0..len), published by another node under
 * sha256 (remote.h), for m, which is calibrating and not training: loaded
 * into a codec of its own and checked against sha256 first, then m turns
 * ready, the file is saved as a trained one would be, the samples go and
 * the fp16 blocks are re-encoded. VQKV_OK, or an error with *why (m
 * unchanged). O(len) on the loop, once per model. */
int vqkvd_calib_adopt(vqkvd_server_t *s, vqkvd_model_t *m, const uint8_t *buf, size_t len,
                      const uint8_t sha256[32], const char **why);

/* 1 while m's codebooks are being trained on the thread pool. */
int vqkvd_calib_training(const vqkvd_model_t *m);

/* Drops m's samples (m->calib NULL). Not while training. */
void vqkvd_calib_free(vqkvd_model_t *m);

#endif
