/* DELLA's rank stage (docs/spec.md §8d): a row's per-rank tables scattered to its entries
 * in the order of (|τ| bits, index).
 *
 * Each entry is packed as v = key·2^32 + index, so the packed values are distinct and
 * ascending v is ascending key with ties by index. Short rows: insertion sort. Longer
 * rows: LSD radix sort on the bits where the row's keys differ (one OR / AND pass finds
 * them; fp16 inputs leave low mantissa bits of τ all zero), in 1–3 digits of equal width
 * <= 12 bits from the bottom (fp16 / bf16 rows: mostly 2). Every pass is stable, so equal
 * keys keep their index order; the histograms of all digits come from one pass over the
 * keys, and the last pass writes each entry's table values at its final position (its
 * rank) instead of moving it again. Measured on fp16 rows of 4096 (bench/README.md):
 * 12-bit digits and one histogram per digit beat 8- to 11-bit digits (three passes), with
 * or without histograms per row segment.
 */
#include "rank.h"

#include <string.h>

#define FM_RANK_SHORT 48   /* rows up to this length: insertion sort */
#define FM_RANK_DIGIT 12   /* widest digit: FM_RANK_BINS = 2^12 bins */

typedef struct {
    int passes, shift[3];
    uint32_t mask[3];     /* the last digit may be narrower: it ends at the top differing bit */
} digits;

/* Digits covering bits lo..hi of the keys (the bits that differ) for a row of M: each
 * <= 12 bits, and no more bins than about 2M (clearing and summing them would outweigh
 * the entries), at most 3 passes. */
static digits plan_digits(uint32_t differ, uint32_t M)
{
    const int lo = __builtin_ctz(differ), hi = 31 - __builtin_clz(differ);
    const int fit = 33 - __builtin_clz(M);               /* 2^fit >= 2M */
    int widest = fit < FM_RANK_DIGIT ? fit : FM_RANK_DIGIT;
    const int bits = hi - lo + 1;
    if (bits > 3 * widest) widest = (bits + 2) / 3;
    const int passes = (bits + widest - 1) / widest;
    const int width = (bits + passes - 1) / passes;
    digits d = {passes, {lo, lo + width, lo + 2 * width}, {0, 0, 0}};
    for (int p = 0; p < passes; p++) {
        const int w = hi + 1 - d.shift[p] < width ? hi + 1 - d.shift[p] : width;
        d.mask[p] = (1u << w) - 1u;
    }
    return d;
}

static void insertion_sort(uint64_t *v, uint32_t M)
{
    for (uint32_t j = 1; j < M; j++) {
        const uint64_t x = v[j];
        uint32_t k = j;
        for (; k > 0 && v[k - 1] > x; k--) v[k] = v[k - 1];
        v[k] = x;
    }
}

/* h[p][k] = how many keys have digit p equal to k, for each of the plan's digits */
static void count_digits(uint32_t *h[3], const uint32_t *restrict key, uint32_t M,
                         const digits *d)
{
    const int s0 = d->shift[0], s1 = d->shift[1], s2 = d->shift[2];
    const uint32_t m0 = d->mask[0], m1 = d->mask[1], m2 = d->mask[2];
    uint32_t *restrict h0 = h[0], *restrict h1 = h[1], *restrict h2 = h[2];
    for (int p = 0; p < d->passes; p++) memset(h[p], 0, (d->mask[p] + 1) * sizeof(uint32_t));
    if (d->passes == 1)
        for (uint32_t j = 0; j < M; j++) h0[(key[j] >> s0) & m0]++;
    else if (d->passes == 2)
        for (uint32_t j = 0; j < M; j++) {
            h0[(key[j] >> s0) & m0]++;
            h1[(key[j] >> s1) & m1]++;
        }
    else
        for (uint32_t j = 0; j < M; j++) {
            h0[(key[j] >> s0) & m0]++;
            h1[(key[j] >> s1) & m1]++;
            h2[(key[j] >> s2) & m2]++;
        }
}

/* h[k] = the number of counts below bin k (an exclusive prefix sum over mask + 1 bins) */
static void starts(uint32_t *h, uint32_t mask)
{
    uint32_t pos = 0;
    for (uint32_t k = 0; k <= mask; k++) {
        const uint32_t c = h[k];
        h[k] = pos;
        pos += c;
    }
}

void fm_row_thresholds(const uint32_t *key, uint32_t M, const int64_t *tab, const double *ctab,
                       int64_t *T, double *cf, const fm_rank_scratch *s)
{
    uint32_t any = 0, all = ~0u;
    for (uint32_t j = 0; j < M; j++) {
        any |= key[j];
        all &= key[j];
    }
    if (any == all) {                         /* one key: the ranks are the indices */
        memcpy(T, tab, (size_t)M * sizeof *T);
        memcpy(cf, ctab, (size_t)M * sizeof *cf);
        return;
    }
    uint64_t *src = s->a, *dst = s->b;
    for (uint32_t j = 0; j < M; j++) src[j] = (uint64_t)key[j] << 32 | j;
    if (M <= FM_RANK_SHORT) {
        insertion_sort(src, M);
        for (uint32_t r = 0; r < M; r++) {
            const uint32_t j = (uint32_t)src[r];
            T[j] = tab[r];
            cf[j] = ctab[r];
        }
        return;
    }
    const digits d = plan_digits(any ^ all, M);
    uint32_t *h[3] = {s->hist, s->hist + FM_RANK_BINS, s->hist + 2 * FM_RANK_BINS};
    count_digits(h, key, M, &d);
    for (int p = 0; p < d.passes; p++) starts(h[p], d.mask[p]);
    for (int p = 0; p + 1 < d.passes; p++) {  /* stable scatter by digit p */
        const int sh = 32 + d.shift[p];
        const uint32_t mask = d.mask[p];
        uint32_t *restrict hp = h[p];
        for (uint32_t j = 0; j < M; j++) {
            const uint64_t v = src[j];
            dst[hp[(uint32_t)(v >> sh) & mask]++] = v;
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    const int sh = 32 + d.shift[d.passes - 1];    /* the last digit: positions are ranks */
    const uint32_t mask = d.mask[d.passes - 1];
    uint32_t *restrict hp = h[d.passes - 1];
    for (uint32_t r = 0; r < M; r++) {
        const uint64_t v = src[r];
        const uint32_t rank = hp[(uint32_t)(v >> sh) & mask]++, j = (uint32_t)v;
        T[j] = tab[rank];
        cf[j] = ctab[rank];
    }
}
