/* DELLA's rank stage (docs/spec.md §8d): a row's per-rank tables scattered to its entries
 * in the order of (|τ| bits, index).
 *
 * Each entry is packed as v = key·2^32 + index, so the packed values are distinct and
 * ascending v is ascending key with ties by index. Short rows: insertion sort. Longer
 * rows: LSD radix sort on the bits where the row's keys differ (one OR / AND pass finds
 * them; fp16 differences leave the low mantissa bits all zero), in 1–3 digits of equal
 * width <= 11 bits from the bottom. Every pass is stable, so equal keys keep their index
 * order; the histograms of all digits come from one pass, and the last pass writes each
 * entry's table values at its final position (its rank) instead of moving it again.
 */
#include "rank.h"

#include <string.h>

#define FM_RANK_SHORT 48   /* rows up to this length: insertion sort */

typedef struct {
    int passes, shift[3];
    uint32_t mask;
} digits;

/* Digits covering bits lo..hi of the keys (the bits that differ), each <= 11 bits. */
static digits plan_digits(uint32_t differ)
{
    const int lo = __builtin_ctz(differ), hi = 31 - __builtin_clz(differ);
    const int bits = hi - lo + 1, passes = (bits + 10) / 11, width = (bits + passes - 1) / passes;
    digits d = {passes, {lo, lo + width, lo + 2 * width}, (1u << width) - 1u};
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

/* The row cut into FM_RANK_SEGS segments, handled side by side: each keeps its own
 * histogram, so the increments of one bin (frequent in the exponent digit) form
 * FM_RANK_SEGS independent chains instead of one. Segment k is [k·L, (k + 1)·L), the last
 * one also [FM_RANK_SEGS·L, M). */
typedef struct {
    uint32_t L, M;
    uint32_t *h[FM_RANK_SEGS];
} segments;

#define FM_SEG_LOOP(seg, ...)                                                         \
    do {                                                                              \
        for (uint32_t i_ = 0; i_ < (seg).L; i_++)                                     \
            for (int k_ = 0; k_ < FM_RANK_SEGS; k_++) {                               \
                const uint32_t at = k_ * (seg).L + i_;                                \
                uint32_t *restrict hk = (seg).h[k_];                                  \
                __VA_ARGS__                                                           \
            }                                                                         \
        for (uint32_t at = FM_RANK_SEGS * (seg).L; at < (seg).M; at++) {              \
            uint32_t *restrict hk = (seg).h[FM_RANK_SEGS - 1];                        \
            __VA_ARGS__                                                               \
        }                                                                             \
    } while (0)

/* Each segment's histogram of digit (v >> sh) & mask of the values v = src[at] turned into
 * the positions its values go to: bins in order, within a bin the segments in order, so
 * a pass that follows src's order segment by segment is stable. */
static void positions(segments *sg, const uint64_t *restrict src, int sh, uint32_t mask)
{
    for (int k = 0; k < FM_RANK_SEGS; k++) memset(sg->h[k], 0, (mask + 1) * sizeof(uint32_t));
    FM_SEG_LOOP(*sg, { hk[(uint32_t)(src[at] >> sh) & mask]++; });
    uint32_t pos = 0;
    for (uint32_t b = 0; b <= mask; b++)
        for (int k = 0; k < FM_RANK_SEGS; k++) {
            const uint32_t c = sg->h[k][b];
            sg->h[k][b] = pos;
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
    const digits d = plan_digits(any ^ all);
    const uint32_t mask = d.mask;
    segments sg = {M / FM_RANK_SEGS, M, {0}};
    for (int k = 0; k < FM_RANK_SEGS; k++) sg.h[k] = s->hist + (size_t)k * FM_RANK_BINS;
    for (int p = 0; p + 1 < d.passes; p++) {  /* stable scatter by digit p */
        const int sh = 32 + d.shift[p];
        positions(&sg, src, sh, mask);
        FM_SEG_LOOP(sg, {
            const uint64_t v = src[at];
            dst[hk[(uint32_t)(v >> sh) & mask]++] = v;
        });
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    const int sh = 32 + d.shift[d.passes - 1];    /* the last digit: positions are ranks */
    positions(&sg, src, sh, mask);
    FM_SEG_LOOP(sg, {
        const uint64_t v = src[at];
        const uint32_t rank = hk[(uint32_t)(v >> sh) & mask]++, j = (uint32_t)v;
        T[j] = tab[rank];
        cf[j] = ctab[rank];
    });
}
