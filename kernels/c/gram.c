/* fastmerge C CPU kernels of SLERP, NuSLERP and model stock (docs/spec.md §8c).
 *
 * Statistics pass: the chunk's N entries are pieces of `seg` entries (the last may be
 * shorter), each cut into FM_GRAM_BLOCK blocks from its start. For block q and each pair
 * k <= l (order (0,0), (0,1), .., (1,1), ..):
 *     out[q][kl] = pairwise-tree sum over the block of (double)v_k[j] * (double)v_l[j]
 * with v_k = τ_k = f32(θ_k) − f32(θ_b) (on_base) or f32(θ_k), the block padded with +0.0
 * to FM_GRAM_BLOCK entries and summed level by level, t[m] = t[2m] + t[2m+1]. Every
 * product is exact (fp32 × fp32 fits fp64) and the tree is fixed, so each block's sum is
 * one fp64 value whatever the thread count; the host adds blocks in order.
 *
 * Column statistics (`columns`): the chunk is N / seg rows of seg columns, its rows cut
 * into blocks of FM_GRAM_BLOCK rows from the first (zero rows past the last), and
 *     out[q][c][kl] = the same pairwise tree down block q of column c.
 * A thread takes a tile of ct columns of one block and walks it row pair by row pair:
 * the level-1 values p[m] (the two products of rows 2m, 2m + 1 added) climb a binary
 * counter, stack[h] holding the left operand still waiting at level h + 1, so each
 * addition is the tree's own, left + right, and the tile needs 10 levels of partials
 * instead of the whole block.
 *
 * Combine pass: θ_j = [f32(θ_b) +] Σ_k c[s(j)][k] · v_k[j], fp64 from +0.0 in model
 * order, rounded once (RNE) to the output dtype; s(j) = j / seg, or j mod seg for column
 * segments. No FMA contraction (-ffp-contract=off), as in kernels.c.
 */
#include "gram.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define GB FM_GRAM_BLOCK
#define CB 256                 /* combine: entries per block */

static int64_t blocks_of(int64_t len) { return (len + GB - 1) / GB; }

int64_t fm_gram_blocks(int64_t N, int64_t seg)
{
    return (N / seg) * blocks_of(seg) + blocks_of(N % seg);
}

int64_t fm_gram_items(int64_t N, int64_t seg, int columns, int n)
{
    const int64_t K = (int64_t)n * (n + 1) / 2;
    return columns ? blocks_of(N / seg) * seg * K : fm_gram_blocks(N, seg) * K;
}

/* v_k[0..len) of the entries at off, in fp32 (b: f32(θ_b) when on_base) */
FM_INLINE void load_vectors(float *x, float *b, int n, int on_base, const void *base,
                            int base_dt, const void *const *models, int models_dt, int64_t off,
                            int len, size_t stride)
{
    if (on_base) fm_load(b, base, base_dt, off, len);
    for (int k = 0; k < n; k++) {
        if (on_base) fm_load_sub(x + (size_t)k * stride, models[k], models_dt, off, len, b);
        else fm_load(x + (size_t)k * stride, models[k], models_dt, off, len);
    }
}

/* The pairwise tree of one block for vectors xk, xl (GB fp32 values each, zero past the
 * block's end): level 1 forms the products and adds them in pairs, p[m] = xk[2m]·xl[2m] +
 * xk[2m+1]·xl[2m+1] (each product exact in fp64); levels 2..10 halve p in place. */
FM_INLINE double block_sum(const float *restrict xk, const float *restrict xl,
                           double *restrict p)
{
    for (int m = 0; m < GB / 2; m++)
        p[m] = (double)xk[2 * m] * (double)xl[2 * m] +
               (double)xk[2 * m + 1] * (double)xl[2 * m + 1];
    for (int w = GB / 4; w >= 1; w /= 2)
        for (int m = 0; m < w; m++) p[m] = p[2 * m] + p[2 * m + 1];
    return p[0];
}

FM_CLONES static void gram_range(const fm_gram_args *a, int64_t blk0, int64_t blk1, float *x,
                                 float *b, double *p)
{
    const int n = a->n, K = n * (n + 1) / 2;
    const int64_t bps = blocks_of(a->seg);
    for (int64_t blk = blk0; blk < blk1; blk++) {
        const int64_t within = blk % bps;
        const int64_t off = (blk / bps) * a->seg + within * GB;
        int64_t len = a->seg - within * GB;
        if (len > GB) len = GB;
        if (len > a->N - off) len = a->N - off;
        load_vectors(x, b, n, a->on_base, a->base, a->base_dt, a->models, a->models_dt, off,
                     (int)len, GB);
        if (len < GB)
            for (int k = 0; k < n; k++) memset(x + (size_t)k * GB + len, 0, sizeof(float) * (size_t)(GB - len));
        int kl = 0;
        for (int k = 0; k < n; k++)
            for (int l = k; l < n; l++, kl++)
                a->out[blk * K + kl] = block_sum(x + (size_t)k * GB, x + (size_t)l * GB, p);
    }
}

#define LEVELS 10              /* log2(GB): the tree's levels above the products */

/* Columns per tile: up to 128, fewer with many pairs (the partials stay ~200 KB) */
static int tile_width(int K)
{
    const int ct = 2048 / K / 8 * 8;
    return ct < 8 ? 8 : ct > 128 ? 128 : ct;
}

/* x[k][0..ct) = v_k at row r, columns c0 .. c0 + w of the chunk (zero past w, and the
 * whole row zero when r is past the last row) */
FM_INLINE void load_row(float *x, float *b, const fm_gram_args *a, int64_t rows, int64_t r,
                        int64_t c0, int w, int ct)
{
    const int n = a->n;
    if (r >= rows) {
        memset(x, 0, sizeof(float) * (size_t)n * (size_t)ct);
        return;
    }
    load_vectors(x, b, n, a->on_base, a->base, a->base_dt, a->models, a->models_dt,
                 r * a->seg + c0, w, (size_t)ct);
    if (w < ct)
        for (int k = 0; k < n; k++)
            memset(x + (size_t)k * ct + w, 0, sizeof(float) * (size_t)(ct - w));
}

/* Column statistics of work units [u0, u1): unit u = (block q, tile of ct columns). x:
 * [2][n + 1][ct] fp32; p: [K][ct] and stack: [LEVELS][K][ct] fp64. */
FM_CLONES static void gram_columns_range(const fm_gram_args *a, int64_t u0, int64_t u1,
                                         float *x, double *p, double *stack)
{
    const int n = a->n, K = n * (n + 1) / 2, ct = tile_width(K), kc = K * ct;
    const int64_t cols = a->seg, rows = a->N / cols, tiles = (cols + ct - 1) / ct;
    float *x0 = x, *x1 = x + (size_t)(n + 1) * ct;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t q = u / tiles, c0 = (u % tiles) * ct;
        const int w = (int)(cols - c0 < ct ? cols - c0 : ct);
        for (int m = 0; m < GB / 2; m++) {
            const int64_t r = q * GB + 2 * (int64_t)m;
            load_row(x0, x0 + (size_t)n * ct, a, rows, r, c0, w, ct);
            load_row(x1, x1 + (size_t)n * ct, a, rows, r + 1, c0, w, ct);
            int kl = 0;
            for (int k = 0; k < n; k++)
                for (int l = k; l < n; l++, kl++) {
                    const float *restrict ak = x0 + (size_t)k * ct, *restrict al = x0 + (size_t)l * ct;
                    const float *restrict bk = x1 + (size_t)k * ct, *restrict bl = x1 + (size_t)l * ct;
                    double *restrict pk = p + (size_t)kl * ct;
                    for (int c = 0; c < ct; c++)
                        pk[c] = (double)ak[c] * (double)al[c] + (double)bk[c] * (double)bl[c];
                }
            int h = 0;                              /* carry p up while m has 1 bits */
            for (int idx = m; idx & 1; idx >>= 1, h++) {
                const double *restrict left = stack + (size_t)h * kc;
                for (int e = 0; e < kc; e++) p[e] = left[e] + p[e];
            }
            memcpy(stack + (size_t)h * kc, p, sizeof(double) * (size_t)kc);
        }
        const double *top = stack + (size_t)(LEVELS - 1) * kc;   /* m = GB/2 − 1 ends here */
        for (int c = 0; c < w; c++)
            for (int kl = 0; kl < K; kl++)
                a->out[((size_t)q * (size_t)cols + (size_t)(c0 + c)) * (size_t)K + (size_t)kl] =
                    top[(size_t)kl * ct + (size_t)c];
    }
}

_Static_assert(GB == 1 << LEVELS, "LEVELS is log2(FM_GRAM_BLOCK)");

#ifdef _OPENMP
#define FM_TID omp_get_thread_num()
#else
#define FM_TID 0
#endif

int fm_gram(const fm_gram_args *a)
{
    const int n = a->n, K = n * (n + 1) / 2, ct = tile_width(K), cols = a->columns;
    /* work units: blocks of pieces, or (block of rows, tile of ct columns) */
    const int64_t units = cols ? blocks_of(a->N / a->seg) * ((a->seg + ct - 1) / ct)
                               : fm_gram_blocks(a->N, a->seg);
    if (units == 0) return 0;
    const int nt = fm_pick_threads(a->threads, units);
    work w = {units, cols ? 1 : 16, 0};
    /* per-thread scratch: fp32 vectors (and the base), fp64 partials */
    const size_t xs = cols ? 2 * (size_t)(n + 1) * ct : GB * ((size_t)n + 1);
    const size_t ds = cols ? (size_t)(LEVELS + 1) * K * ct : GB / 2;
    float *xall = malloc(sizeof(float) * xs * (size_t)nt);
    double *dall = malloc(sizeof(double) * ds * (size_t)nt);
    if (!xall || !dall) {
        free(xall);
        free(dall);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = FM_TID;
        float *x = xall + xs * (size_t)tid;
        double *d = dall + ds * (size_t)tid;
        for (int64_t u0, u1; take_chunk(&w, &u0, &u1);) {
            if (cols) gram_columns_range(a, u0, u1, x, d, d + (size_t)K * ct);
            else gram_range(a, u0, u1, x, x + (size_t)n * GB, d);
        }
    }
    free(xall);
    free(dall);
    return 0;
}

FM_CLONES static void combine_range(const fm_combine_args *a, const double *colc, int64_t blk0,
                                    int64_t blk1, float *x, float *b, double *theta,
                                    int64_t *cnt)
{
    const int n = a->n;
    const int64_t S = a->seg < a->N ? a->seg : a->N;
    for (int64_t blk = blk0; blk < blk1; blk++) {
        const int64_t off = blk * CB;
        const int len = (int)(a->N - off < CB ? a->N - off : CB);
        load_vectors(x, b, n, a->on_base, a->base, a->base_dt, a->models, a->models_dt, off,
                     len, CB);
        for (int k = 0; k < n; k++) {
            const float *xk = x + (size_t)k * CB;
            int c = 0;
            for (int j = 0; j < len; j++) c += !(fabsf(xk[j]) <= FLT_MAX);
            cnt[k] += c;
        }
        for (int j = 0; j < len; j++) theta[j] = 0.0;
        if (a->columns) {                 /* s(j) = (off + j) mod seg: runs of consecutive s */
            for (int j0 = 0; j0 < len;) {
                const int64_t s0 = (off + j0) % a->seg;
                const int j1 = a->seg - s0 < len - j0 ? j0 + (int)(a->seg - s0) : len;
                for (int k = 0; k < n; k++) {
                    const float *restrict xk = x + (size_t)k * CB;
                    const double *restrict ck = colc + (size_t)k * (size_t)S + s0 - j0;
                    for (int j = j0; j < j1; j++) theta[j] += ck[j] * (double)xk[j];
                }
                j0 = j1;
            }
        } else {                          /* runs of one segment: c constant */
            for (int j0 = 0; j0 < len;) {
                const int64_t s = (off + j0) / a->seg;
                const int64_t run = (s + 1) * a->seg - (off + j0);
                const int j1 = run < len - j0 ? j0 + (int)run : len;
                for (int k = 0; k < n; k++) {
                    const float *restrict xk = x + (size_t)k * CB;
                    const double ck = a->coef[s * n + k];
                    for (int j = j0; j < j1; j++) theta[j] += ck * (double)xk[j];
                }
                j0 = j1;
            }
        }
        if (a->on_base)
            for (int j = 0; j < len; j++) theta[j] = (double)b[j] + theta[j];
        fm_store_f64(a->out, a->out_dt, off, theta, len);
    }
}

int fm_combine(const fm_combine_args *a)
{
    const int n = a->n;
    const int64_t nblk = (a->N + CB - 1) / CB;
    memset(a->nonfinite, 0, (size_t)n * sizeof(int64_t));
    if (nblk == 0) return 0;
    const int nt = fm_pick_threads(a->threads, nblk);
    work w = {nblk, 64, 0};
    const size_t xs = CB * ((size_t)n + 1);   /* per-thread scratch */
    float *xall = malloc(sizeof(float) * xs * (size_t)nt);
    double *tall = malloc(sizeof(double) * CB * (size_t)nt);
    const int64_t S = a->seg < a->N ? a->seg : a->N;   /* columns: the segments touched */
    double *colc = a->columns ? malloc(sizeof(double) * (size_t)n * (size_t)S) : NULL;
    if (!xall || !tall || (a->columns && !colc)) {
        free(xall);
        free(tall);
        free(colc);
        return -1;
    }
    if (a->columns)
        for (int64_t s = 0; s < S; s++)
            for (int k = 0; k < n; k++) colc[(size_t)k * (size_t)S + s] = a->coef[s * n + k];
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = FM_TID;
        int64_t cnt[FM_MAX_MODELS] = {0};
        float *x = xall + xs * (size_t)tid, *b = x + (size_t)n * CB;
        if (!a->on_base) memset(b, 0, sizeof(float) * CB);
        for (int64_t b0, b1; take_chunk(&w, &b0, &b1);)
            combine_range(a, colc, b0, b1, x, b, tall + (size_t)CB * tid, cnt);
#ifdef _OPENMP
#pragma omp critical(fastmerge_combine_counts)
#endif
        for (int k = 0; k < n; k++) a->nonfinite[k] += cnt[k];
    }
    free(xall);
    free(tall);
    free(colc);
    return 0;
}
