/* fastmerge C CPU kernels of the interpolation methods (docs/spec.md §8c): the
 * statistics pass (Gram entries per block) and the combine pass (per-segment
 * coefficients). Same conventions as kernels.h: module.c validates, these trust. */
#ifndef FASTMERGE_GRAM_H
#define FASTMERGE_GRAM_H

#include <stdint.h>

#include "kernels.h"

#define FM_GRAM_BLOCK 1024   /* kernel_api.GRAM_BLOCK, a power of two */

typedef struct {
    int n;                                /* vectors, 1..FM_MAX_MODELS */
    int64_t N;                            /* entries of the chunk */
    int on_base;                          /* v_k = τ_k; 0: v_k = f32(θ_k) */
    int base_dt, models_dt;
    const void *base;                     /* NULL only when !on_base */
    const void *models[FM_MAX_MODELS];
    int64_t seg;                          /* entries per piece (>= 1); columns: per row */
    int columns;                          /* N / seg rows of seg columns (N % seg == 0) */
    double *out;                          /* out: [Q][n(n+1)/2], Q = fm_gram_blocks(N, seg);
                                             columns: [Q][seg][n(n+1)/2], Q = row blocks */
    int threads;
} fm_gram_args;

typedef struct {
    int n;
    int64_t N;
    int on_base;                          /* θ = f32(θ_b) + D; 0: θ = D */
    int columns;                          /* segment of entry j: j mod seg; 0: j / seg */
    int base_dt, models_dt, out_dt;
    const void *base;
    const void *models[FM_MAX_MODELS];
    void *out;
    const double *coef;                   /* [S][n], S = segments the chunk touches */
    int64_t seg;                          /* >= 1 */
    int64_t *nonfinite;                   /* out: [n], overwritten */
    int threads;
} fm_combine_args;

int64_t fm_gram_blocks(int64_t N, int64_t seg);
/* Items of fm_gram_args.out: Q·[seg·]n(n+1)/2 */
int64_t fm_gram_items(int64_t N, int64_t seg, int columns, int n);
/* 0 on success, -1 when per-thread scratch could not be allocated. */
int fm_gram(const fm_gram_args *a);
int fm_combine(const fm_combine_args *a);

#endif /* FASTMERGE_GRAM_H */
