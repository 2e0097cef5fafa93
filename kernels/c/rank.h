/* DELLA's rank stage (docs/spec.md §8d) for one row of the fused pass. */
#ifndef FASTMERGE_RANK_H
#define FASTMERGE_RANK_H

#include <stdint.h>

#define FM_RANK_BINS 4096      /* radix digits of at most 12 bits */

typedef struct {
    uint64_t *a, *b;           /* [M] each: packed keys key·2^32 + index */
    uint32_t *hist;            /* [3][FM_RANK_BINS] */
} fm_rank_scratch;

/* T[j] = tab[ρ(j)], cf[j] = ctab[ρ(j)] for j < M, with ρ(j) the rank of entry j of the row
 * by ascending (key, index): key[j] < 2^31 (the bits of |τ|). */
void fm_row_thresholds(const uint32_t *key, uint32_t M, const int64_t *tab, const double *ctab,
                       int64_t *T, double *cf, const fm_rank_scratch *s);

#endif /* FASTMERGE_RANK_H */
