/* fastmerge C CPU kernels: the contract of fastmerge/kernel_api.py over raw memory.
 *
 * module.c validates every argument coming from Python and fills these structs; the
 * functions here trust them (pointers valid for N elements of the given dtypes,
 * 1 <= n <= FM_MAX_MODELS) and never allocate more than per-thread scratch.
 */
#ifndef FASTMERGE_KERNELS_H
#define FASTMERGE_KERNELS_H

#include <stdint.h>

#include "convert.h"

/* The hot loops of each kernel are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2)
 * and baseline x86-64 and picked at load time (GCC/Clang target_clones). */
#if defined(FASTMERGE_TARGET_CLONES) && defined(__x86_64__)
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FM_CLONE_NAMES "x86-64-v4,x86-64-v3,x86-64"
#else
#define FM_CLONES
#define FM_CLONE_NAMES "default"
#endif

#define FM_INLINE static inline __attribute__((always_inline))

/* The blocks of a tensor, handed out in chunks of `per` blocks. Threads take chunks from
 * a shared counter (dynamic scheduling): on a busy machine a descheduled thread no longer
 * holds up the whole parallel region. */
typedef struct {
    int64_t nblk, per, next;
} work;

/* Next chunk [*b0, *b1) of blocks; 0 when none is left. */
static inline int take_chunk(work *w, int64_t *b0, int64_t *b1)
{
    int64_t c;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
    c = w->next++;
    *b0 = c * w->per;
    *b1 = *b0 + w->per < w->nblk ? *b0 + w->per : w->nblk;
    return *b0 < w->nblk;
}

#define FM_MAX_MODELS 64
#define FM_NBINS 2048
#define FM_LEVELS 3
#define FM_NCOUNTERS 7

/* kernel_api.DIGIT_BITS / SHIFT, and the COUNTERS order */
extern const int FM_DIGIT_BITS[FM_LEVELS];
extern const int FM_SHIFT[FM_LEVELS];
enum { FM_KEPT, FM_PROTECTED, FM_SELECTED, FM_DROPPED_BY_SIGN, FM_IMPORTANT_DROPPED,
       FM_TIES_IMPORTANT_DROPPED, FM_NONFINITE };

enum { FM_ELECT_NONE = 0, FM_ELECT_SUM = 1, FM_ELECT_COUNT = 2 };   /* KernelConfig.elect */

typedef struct {
    int n;                                /* models, 1..FM_MAX_MODELS */
    int64_t N;                            /* elements per tensor */
    int level;                            /* 0..FM_LEVELS-1 */
    int base_dt, models_dt;               /* FM_F32 / FM_F16 / FM_BF16 */
    const void *base;
    const void *models[FM_MAX_MODELS];
    int64_t prefix[FM_MAX_MODELS][2];     /* -1: slot off */
    int64_t *hist;                        /* out: [n][2][FM_NBINS], overwritten */
    int threads;                          /* 0: fm_get_num_threads() */
} fm_hist_args;

typedef struct {
    int n;                                /* models, 1..FM_MAX_MODELS */
    int64_t N;
    int base_dt, models_dt;
    const void *base;
    const void *models[FM_MAX_MODELS];
    int64_t lo[FM_MAX_MODELS][2];         /* inclusive key range per slot; lo < 0: slot off */
    int64_t hi[FM_MAX_MODELS][2];         /* lo <= hi < 2^32 for a slot that is on */
    int64_t cap;                          /* candidate room per slot */
    int32_t *cand;                        /* out: [n][2][cap], the first min(inside, cap) */
    int64_t *counts;                      /* out: [n][2][2] = (above, inside), overwritten */
    int threads;
} fm_bracket_args;

typedef struct {
    int n;
    int64_t N;
    int on_base;                          /* x_i = τ_i, θ = θ_b + λ·m; 0: x_i = θ_i, θ = m */
    int trim;                             /* no election: kept_i = |x_i| >= t_i (0: all kept) */
    int drop;                             /* DARE (spec 8a): kept_i = r_i(g) < T_i, not t */
    int elect;                            /* FM_ELECT_*; an election compares with t (or drops) */
    int normalize;                        /* m = D / W where W != 0 */
    int base_dt, models_dt, out_dt;
    const void *base;                     /* NULL only when !on_base */
    const void *models[FM_MAX_MODELS];
    void *out;                            /* may be exactly base or a model (same dtype) */
    double w[FM_MAX_MODELS];              /* w_i (W, sign(w_i)) */
    double cw[FM_MAX_MODELS];             /* c_i: x_i's factor in sum votes and D (w_i, or
                                             w_i / d_i with DARE's rescale) */
    float sw[FM_MAX_MODELS];              /* sign(w_i) */
    float t[FM_MAX_MODELS], u[FM_MAX_MODELS];   /* NaN: keep none / protect none */
    float h[FM_MAX_MODELS];               /* breadcrumbs (spec 8b): kept_i also needs
                                             !(|x_i| >= h_i); NaN: no upper bound */
    double scale;                         /* λ */
    double wsum;                          /* Σ w_i in model order (W without an election) */
    uint32_t dthr[FM_MAX_MODELS];         /* drop: keep r < dthr[i] ... */
    uint32_t dall[FM_MAX_MODELS];         /* ... or every entry (1: T_i = 2^32, d_i = 1) */
    uint32_t key[2];                      /* drop: Philox key (k0, k1) */
    const int64_t *keep;                  /* ranked drop (DELLA, spec 8d): [n][N] per-entry
                                             T_i(g) in [0, 2^32] instead of dthr; NULL: DARE */
    const int64_t *rank_keep;             /* DELLA with the rank stage fused (spec 8d): [n][M]
                                             T_i(ρ) per rank ρ of a row, the N entries being
                                             N / M rows of M; kept_i(g) = r_i(g) < T_i(ρ_i(g))
                                             with ρ_i(g) g's rank in its row by ascending
                                             bits(|τ_i|), ties by index. NULL: none */
    int64_t rank_M;                       /* rank_keep: the row length M >= 1, N % M == 0 */
    int keep_rescale;                     /* keep / rank_keep: c_i(g) = (w_i·2^32) / T_i(g)
                                             (0 when T = 0), else w_i */
    int64_t offset;                       /* drop: global index g of entry 0 (chunking) */
    int64_t *counts;                      /* out: [n][FM_NCOUNTERS], overwritten */
    int threads;
} fm_merge_args;

/* 0 on success, -1 when per-thread scratch could not be allocated. */
int fm_histogram(const fm_hist_args *a);
int fm_merge(const fm_merge_args *a);
int fm_bracket(const fm_bracket_args *a);

/* dst[j] = r_model(offset + j), DARE's random words (spec 8a), by the merge's own block
 * generator; for the tests. */
void fm_dare_words(uint32_t *dst, int64_t N, int64_t offset, uint32_t k0, uint32_t k1,
                   uint32_t model);

/* dst (dst_dt) = round(f32(src (src_dt))), N elements; for the conversion tests. */
void fm_convert(void *dst, int dst_dt, const void *src, int src_dt, int64_t N);
/* dst (dst_dt) = fp64 src rounded once to nearest even, N elements; for the tests. */
void fm_convert_f64(void *dst, int dst_dt, const double *src, int64_t N);

void fm_set_num_threads(int n);           /* 0: OpenMP's default */
/* threads for `nblk` blocks of work: `requested` (0: fm_get_num_threads()), at most nblk */
int fm_pick_threads(int requested, int64_t nblk);
int fm_get_num_threads(void);
int fm_have_openmp(void);
const char *fm_isa_clones(void);          /* which SIMD variants were compiled */

#endif /* FASTMERGE_KERNELS_H */
