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

#ifdef _OPENMP
#define FM_TID omp_get_thread_num()
#else
#define FM_TID 0
#endif

int fm_gram(const fm_gram_args *a)
{
    const int n = a->n;
    const int64_t Q = fm_gram_blocks(a->N, a->seg);
    if (Q == 0) return 0;
    const int nt = fm_pick_threads(a->threads, Q);
    work w = {Q, 16, 0};                       /* blocks handed out 16 at a time */
    const size_t xs = GB * ((size_t)n + 1), ps = GB / 2;   /* per-thread scratch */
    float *xall = malloc(sizeof(float) * xs * (size_t)nt);
    double *pall = malloc(sizeof(double) * ps * (size_t)nt);
    if (!xall || !pall) {
        free(xall);
        free(pall);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = FM_TID;
        float *x = xall + xs * (size_t)tid;
        for (int64_t b0, b1; take_chunk(&w, &b0, &b1);)
            gram_range(a, b0, b1, x, x + (size_t)n * GB, pall + ps * (size_t)tid);
    }
    free(xall);
    free(pall);
    return 0;
}

FM_CLONES static void combine_range(const fm_combine_args *a, int64_t blk0, int64_t blk1,
                                    float *x, float *b, double *theta, int64_t *cnt)
{
    const int n = a->n;
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
        if (a->columns) {                 /* s(j) = (off + j) mod seg */
            for (int k = 0; k < n; k++) {
                const float *xk = x + (size_t)k * CB;
                int64_t s = off % a->seg;
                for (int j = 0; j < len; j++) {
                    theta[j] += a->coef[s * n + k] * (double)xk[j];
                    if (++s == a->seg) s = 0;
                }
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
    if (!xall || !tall) {
        free(xall);
        free(tall);
        return -1;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = FM_TID;
        int64_t cnt[FM_MAX_MODELS] = {0};
        float *x = xall + xs * (size_t)tid, *b = x + (size_t)n * CB;
        if (!a->on_base) memset(b, 0, sizeof(float) * CB);
        for (int64_t b0, b1; take_chunk(&w, &b0, &b1);)
            combine_range(a, b0, b1, x, b, tall + (size_t)CB * tid, cnt);
#ifdef _OPENMP
#pragma omp critical(fastmerge_combine_counts)
#endif
        for (int k = 0; k < n; k++) a->nonfinite[k] += cnt[k];
    }
    free(xall);
    free(tall);
    return 0;
}
