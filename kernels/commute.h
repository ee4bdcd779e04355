/* commute.h -- RoPE-commutative codebooks (CommVQ): expansion and EM training.
 *
 * A commutative codebook codes a sub-vector of d channels that holds d/2
 * whole RoPE pairs, ordered (re, im) pair by pair. It is parameterized by a
 * table c[2^h][d] (h = b/2): row a is, per pair, a complex number x + iy, the
 * 2x2 block [[x, -y], [y, x]] that commutes with every rotation. Codeword
 * (A, B), index A * 2^h + B, is c[A] + J c[B], where J turns every pair by
 * 90 degrees, (x, y) -> (-y, x): the blocks C_A and C_B applied to the unit
 * vectors (1, 0) and (0, 1). Rotating every codeword pair by pair is then the
 * same as rotating the table, so a RoPE-rotated key is coded by the rotated
 * table with the very same codes, and attention can apply the query to the
 * 2^h table rows once instead of to 2^b codewords (the paper's reason). The
 * price: 2^b codewords with only 2^h * d free parameters.
 */
#ifndef VQKV_COMMUTE_H
#define VQKV_COMMUTE_H

#include <stddef.h>
#include <stdint.h>

/* Writes the 2^(2h) codewords[2^(2h)][d] of table[2^h][d]. O(4^h * d). */
void vqkv__commute_expand(const float *table, uint32_t d, uint32_t h, float *words);

/* Trains table[2^h][d] on x[n][d] (d even) by EM: soft assignments to the
 * expanded codewords at a temperature annealed geometrically over
 * `iterations` steps from 1/10 to 1/10^4 of the data's mean squared norm,
 * then the closed-form M-step (per pair, one Hermitian 2^h x 2^h solve), and
 * keeps the table with the lowest hard-assignment error seen. Seeded by
 * k-means++ (kmeans.h), so the same data and seed give the same table. Each
 * step costs O(n * 4^h * d). VQKV_OK or VQKV_ENOMEM. */
int vqkv__commute_em(const float *x, size_t n, uint32_t d, uint32_t h, uint32_t iterations,
                     uint64_t seed, float *table);

#endif
