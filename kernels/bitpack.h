/* bitpack.h -- codes packed LSB-first into a little-endian bit stream.
 *
 * Code i of width w occupies bits [i*w, (i+1)*w) of the stream, bit k being
 * bit (k % 8) of byte k / 8. Writers expect the destination zeroed. Byte at
 * a time: simple and layout-independent; codes are at most 16 bits wide.
 * The CPU codecs and the GPU kernel bodies share these (VQKV_HD).
 */
#ifndef VQKV_BITPACK_H
#define VQKV_BITPACK_H

#include "numeric.h"

#include <stdint.h>

VQKV_HD void vqkv__bits_put(uint8_t *buf, uint64_t bitpos, uint32_t width, uint32_t value)
{
    uint32_t first = (uint32_t)(bitpos & 7u);
    if (first + width <= 8u) { /* within one byte: every 1/2/4/8-bit code */
        buf[bitpos >> 3] |= (uint8_t)((value & ((1u << width) - 1u)) << first);
        return;
    }
    while (width > 0) {
        uint32_t off = (uint32_t)(bitpos & 7u);
        uint32_t take = 8u - off < width ? 8u - off : width;
        buf[bitpos >> 3] |= (uint8_t)((value & ((1u << take) - 1u)) << off);
        value >>= take;
        bitpos += take;
        width -= take;
    }
}

VQKV_HD uint32_t vqkv__bits_get(const uint8_t *buf, uint64_t bitpos, uint32_t width)
{
    uint32_t first = (uint32_t)(bitpos & 7u);
    if (first + width <= 8u) /* within one byte: every 1/2/4/8-bit code */
        return (uint32_t)(buf[bitpos >> 3] >> first) & ((1u << width) - 1u);
    uint32_t value = 0, shift = 0;
    while (width > 0) {
        uint32_t off = (uint32_t)(bitpos & 7u);
        uint32_t take = 8u - off < width ? 8u - off : width;
        value |= (uint32_t)((buf[bitpos >> 3] >> off) & ((1u << take) - 1u)) << shift;
        shift += take;
        bitpos += take;
        width -= take;
    }
    return value;
}

/* Bytes that n codes of width bits take, rounded up. */
VQKV_HD uint64_t vqkv__bits_bytes(uint64_t n, uint32_t width)
{
    return (n * width + 7u) / 8u;
}

#endif
