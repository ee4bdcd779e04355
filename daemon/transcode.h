/* transcode.h -- a calibrated model's fp16 fallback blocks re-encoded with
 * its codec in the background (transcode.c says how). */
#ifndef VQKVD_TRANSCODE_H
#define VQKVD_TRANSCODE_H

#include "session.h"

/* Blocks one batch takes: enough to keep a pool thread busy for a while,
 * few enough that leases and gets rarely wait on them. */
#define VQKVD_TRANSCODE_BATCH 64

/* Starts a batch for every ready model that still has fallback blocks and
 * none in flight. Called when a model's codebooks become ready and on the
 * session tick. O(models + blocks) per model started. */
void vqkvd_transcode_poll(vqkvd_server_t *s);

#endif
