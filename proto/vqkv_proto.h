/* vqkv_proto.h -- what vqkvd and libvqkv must agree on besides the message
 * schema: the protocol version, the key size and the error codes.
 *
 * Error codes are negative ints in one space with the VQKV_E* codes of
 * kernels/vqkv_codec.h (which keep -1 to -99); the protocol's own start at
 * -100. They travel in Error.code, so a value never changes meaning once
 * released. vqkv_proto_strerror() names every code of both headers.
 *
 * The generated message types (Vqkv__Envelope and friends, from vqkv.proto)
 * come with this header.
 */
#ifndef VQKV_PROTO_H
#define VQKV_PROTO_H

#include "vqkv.pb-c.h"
#include "vqkv_codec.h"
#include "vqkv_errors.h"
#include "vqkv_limits.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Hello.protocol_version. Bumped for any change an older peer would
 * misread; adding a message type or field counts, since peers refuse
 * unknown fields. */
#define VQKV_PROTO_VERSION 3

/* Bytes of a block key (SHA-256). */
#define VQKV_PROTO_KEY_BYTES 32

/* A static string naming err, for the codes here and those of
 * kernels/vqkv_codec.h; never NULL. */
const char *vqkv_proto_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif
