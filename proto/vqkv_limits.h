/* vqkv_limits.h -- limits vqkvd and libvqkv both hold a peer to that the
 * message schema cannot say, in a header of its own so that code built
 * without the generated protocol (libvqkv's CUDA driver door, and its tests
 * in the kernels-only build) can use them too. vqkv_proto.h includes it.
 */
#ifndef VQKV_LIMITS_H
#define VQKV_LIMITS_H

/* Physical allocations one CUDA_VMM_FD region may span (RegisterRegion.
 * piece_bytes): 8192 of PyTorch's 20 MiB expandable-segment pages is
 * 160 GiB, more than one GPU holds. */
#define VQKV_REGION_MAX_PIECES 8192

#endif
