/* DARE's random words (docs/spec.md §8a): Philox4x32-10 over runs of counters, with SIMD
 * variants picked at load time. */
#ifndef FASTMERGE_PHILOX_H
#define FASTMERGE_PHILOX_H

#include <stdint.h>

#define FM_PHILOX_BATCH 16     /* counters per step: callers give r room for ng rounded up */

/* r[8q + h] = 16-bit half h of Philox4x32-10(c, (k0, k1)) (half 2k: the low 16 bits of
 * word k; half 2k + 1: its high 16 bits) with counter
 * c = ((q0 + q) mod 2^32, (q0 + q) >> 32, model, stream), for q < ng rounded up to a
 * multiple of FM_PHILOX_BATCH. */
void fm_philox_halves(uint16_t *r, uint64_t q0, int ng, uint32_t k0, uint32_t k1,
                      uint32_t model, uint32_t stream);

/* Philox4x32-10 (Random123's philox4x32_R(10, ctr, key)) of one counter, in place. */
void fm_philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1);

/* Which variant fm_philox_groups runs: "avx512", "avx2" or "scalar" (the best the CPU
 * has, chosen by fm_philox_init). fm_philox_use picks one by name (tests: every variant
 * the CPU has gives the same words); 0 on success, -1 when the CPU lacks it. */
void fm_philox_init(void);
const char *fm_philox_variant(void);
int fm_philox_use(const char *name);

#endif /* FASTMERGE_PHILOX_H */
