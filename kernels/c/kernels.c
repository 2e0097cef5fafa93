/* fastmerge C CPU kernels: threshold selection (bracket counting pass, radix-select
 * histograms) and the fused TIES / TIES-SV merge.
 *
 * Math (docs/spec.md §1-§9, one tensor, models i = 1..n, entry j):
 *   τ_i = f32(θ_i) − f32(θ_b)                      (fp32 subtraction)
 *   key = bits(|τ_i|)                               (histogram: digits of the key;
 *                                                    bracket: above = #{key > hi},
 *                                                    inside = the keys in [lo, hi])
 *   x_i = τ_i (or θ_i without a base);  kept_i = |x_i| >= t_i,  prot_i = |x_i| >= u_i
 *   (breadcrumbs, spec §8b: kept_i = |x_i| >= t_i ∧ ¬(|x_i| >= h_i))
 *   slack (spec §4a): kept_i ← kept_i ∨ prot_i (a protected entry is never dropped)
 *   vote_i = w_i·x_i   (elect="count": sign(w_i)·sign(x_i))
 *   G = Σ prot_i·vote_i if any prot_i else Σ kept_i·vote_i;   γ = +1 if G >= 0 else −1
 *   sel_i = kept_i ∧ sign(w_i·x_i) = γ (no election: kept_i);  D = Σ w_i·sel_i·x_i,
 *   W = Σ w_i·sel_i (no election: Σ w_i);  m = D / W (normalize, W != 0) or D;
 *   θ = f32(θ_b) + λ·m (or m), rounded once to the output dtype (RNE).
 * DARE (spec §8a) replaces the trim by a random drop: kept_i = r_i(g) < T_i, r_i(g) =
 * hi·2^16 + lo, the 16-bit halves g & 7 of Philox4x32-10(key, (g >> 3 low, high, i, s))
 * for s = 0, 1, for the entry's global index g = offset + j (lo computed only where hi
 * ties with T_i >> 16); sum votes and D then weigh x_i by c_i (w_i, or w_i / d_i with
 * rescale), a protected entry by w_i. DELLA (spec §8d) is the same drop with per-entry thresholds
 * T_i(g) and c_i(g) = (w_i·2^32) / T_i(g) with rescale: given (a->keep, from the torch
 * rank stage), or ranked here (a->rank_keep: the per-rank table; threads take whole rows,
 * rank each (rank.c) into per-thread buffers, then merge it).
 * Keys, thresholds and comparisons are fp32 (exact); votes, sums, m and θ are fp64
 * (docs/spec.md §7), the models summed in order i = 1..n from +0.0, so every backend
 * evaluates the same fp64 expression. Thresholds of +inf arrive as NaN (no comparison
 * holds: keep / protect none, even |x| = inf).
 *
 * Layout: the tensor is cut into blocks of FM_BLOCK entries. A block is widened into
 * fp32 scratch arrays (base once, τ of every model), then a few branch-free elementwise
 * loops over the block (one model at a time, so any n vectorises) do the rest, and the
 * result is narrowed into `out`. Threads (OpenMP) take contiguous ranges of blocks, keep
 * private counters / histograms and add them up at the end: integer sums, so the result
 * is the same for any thread count. Outputs are elementwise, hence also deterministic.
 *
 * Specialisation: the stage flags (election none/sum/count, slack on/off, normalize) are
 * constant arguments of always-inline functions, so each combination compiles to its own
 * loops without per-element branches.
 *
 * SIMD: with FASTMERGE_TARGET_CLONES the per-range functions are compiled for x86-64-v4
 * (AVX-512), x86-64-v3 (AVX2) and baseline x86-64, and picked at load time (ifunc), so
 * one portable binary uses the CPU it runs on. -ffp-contract=off keeps every variant
 * bit-identical (no FMA contraction).
 */
#include "kernels.h"
#include "philox.h"
#include "rank.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

const int FM_DIGIT_BITS[FM_LEVELS] = {11, 11, 9};
const int FM_SHIFT[FM_LEVELS] = {20, 9, 0};

#define FM_BLOCK 256
/* uint32 histogram bins are flushed to int64 after at most this many blocks per thread */
#define FM_FLUSH_BLOCKS ((int64_t)1024)
#define FM_MERGE_CHUNK_BLOCKS ((int64_t)64)


static work work_for(int64_t N, int64_t per)
{
    work w = {(N + FM_BLOCK - 1) / FM_BLOCK, per, 0};
    return w;
}



/* ------------------------------------------------------------------------------------ */
/* threads and scratch                                                                  */

static int g_threads = 0;   /* 0: OpenMP's default */

void fm_set_num_threads(int n) { g_threads = n > 0 ? n : 0; }

int fm_get_num_threads(void)
{
#ifdef _OPENMP
    return g_threads > 0 ? g_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int fm_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

const char *fm_isa_clones(void) { return FM_CLONE_NAMES; }

int fm_pick_threads(int requested, int64_t nblk)
{
#ifdef _OPENMP
    int64_t nt = requested > 0 ? requested : fm_get_num_threads();
    if (nt > nblk) nt = nblk;
    return nt < 1 ? 1 : (int)nt;
#else
    (void)requested; (void)nblk;
    return 1;
#endif
}

/* One allocation, carved into 64-byte aligned arrays. */
typedef struct {
    void *mem;
    char *next;
} arena;

static int arena_init(arena *ar, size_t bytes)
{
    ar->mem = malloc(bytes + 64);
    if (!ar->mem) return -1;
    ar->next = (char *)(((uintptr_t)ar->mem + 63) & ~(uintptr_t)63);
    return 0;
}

static void *arena_take(arena *ar, size_t bytes)
{
    void *p = ar->next;
    ar->next += (bytes + 63) & ~(size_t)63;
    return p;
}

static size_t rounded(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static inline int block_len(int64_t N, int64_t blk)
{
    int64_t rest = N - blk * FM_BLOCK;
    return (int)(rest < FM_BLOCK ? rest : FM_BLOCK);
}

/* Ask for the next block of base and models while this one is computed: the loops
 * alternate between loading and scatter / arithmetic, which leaves the hardware
 * prefetchers idle for long stretches. */
FM_INLINE void prefetch_at(const void *base, int base_dt, const void *const *models, int n,
                           int models_dt, int64_t N, int64_t off)
{
    if (off >= N) return;
    const int len = (int)(N - off < FM_BLOCK ? N - off : FM_BLOCK);
    if (base) {
        const char *p = (const char *)base + off * fm_dtype_size(base_dt);
        for (int o = 0; o < len * fm_dtype_size(base_dt); o += 64) __builtin_prefetch(p + o, 0, 0);
    }
    for (int i = 0; i < n; i++) {
        const char *p = (const char *)models[i] + off * fm_dtype_size(models_dt);
        for (int o = 0; o < len * fm_dtype_size(models_dt); o += 64) __builtin_prefetch(p + o, 0, 0);
    }
}

FM_INLINE void prefetch_block(const void *base, int base_dt, const void *const *models, int n,
                              int models_dt, int64_t N, int64_t blk)
{
    prefetch_at(base, base_dt, models, n, models_dt, N, blk * FM_BLOCK);
}

/* number of non-finite entries of x[0..len) */
FM_INLINE int count_nonfinite(const float *restrict x, int len)
{
    int c = 0;
    for (int j = 0; j < len; j++) c += !(fabsf(x[j]) <= FLT_MAX);
    return c;
}

/* ------------------------------------------------------------------------------------ */
/* histogram                                                                            */

typedef struct {
    float *b;
    uint32_t *key;
    uint8_t *flag;    /* FM_BLOCK + 8: which slots a key's prefix matches (bit 0, bit 1) */
    uint32_t *loc;    /* [n][4][NBINS]: level 0 uses 4 interleaved copies of slot 0 */
} hist_scratch;

typedef struct {
    int all;                          /* level 0: some slot has prefix 0 (matches every key) */
    uint32_t p[2];                    /* levels 1, 2: prefix per slot, UINT32_MAX when off */
    int copy1;                        /* slot 1 equals slot 0: computed once, copied */
} hist_plan;

/* key[j] = bits(|f32(src[off+j]) − b[j]|) */
FM_INLINE void load_keys(uint32_t *restrict key, const void *restrict src, int dt,
                         int64_t off, int len, const float *restrict b)
{
    if (dt == FM_F32) {
        const float *s = (const float *)src + off;
        for (int j = 0; j < len; j++) key[j] = fm_f2u(s[j] - b[j]) & 0x7fffffffu;
    } else if (dt == FM_F16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) key[j] = fm_f2u(fm_f16_to_f32(s[j]) - b[j]) & 0x7fffffffu;
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) key[j] = fm_f2u(fm_bf16_to_f32(s[j]) - b[j]) & 0x7fffffffu;
    }
}

/* Count blocks [blk0, blk1) into s->loc. */
FM_CLONES static void hist_range(const fm_hist_args *a, const hist_plan *plan,
                                 hist_scratch *s, int64_t blk0, int64_t blk1)
{
    const int level = a->level;
    const int sh = FM_SHIFT[level], hs = FM_SHIFT[level] + FM_DIGIT_BITS[level];
    const uint32_t mask = (1u << FM_DIGIT_BITS[level]) - 1u;
    uint32_t *restrict key = s->key;

    for (int64_t blk = blk0; blk < blk1; blk++) {
        const int64_t off = blk * FM_BLOCK;
        const int len = block_len(a->N, blk);
        prefetch_block(a->base, a->base_dt, a->models, a->n, a->models_dt, a->N, blk + 1);
        fm_load(s->b, a->base, a->base_dt, off, len);   /* one read of base for all models */
        for (int i = 0; i < a->n; i++) {
            const hist_plan *pl = &plan[i];
            uint32_t *restrict h = s->loc + (size_t)i * 4 * FM_NBINS;
            if (level == 0) {
                if (!pl->all) continue;
                load_keys(key, a->models[i], a->models_dt, off, len, s->b);
                /* four copies break the store-to-load chains of a skewed histogram */
                int j = 0;
                for (; j + 4 <= len; j += 4) {
                    h[(key[j] >> sh) & mask]++;
                    h[FM_NBINS + ((key[j + 1] >> sh) & mask)]++;
                    h[2 * FM_NBINS + ((key[j + 2] >> sh) & mask)]++;
                    h[3 * FM_NBINS + ((key[j + 3] >> sh) & mask)]++;
                }
                for (; j < len; j++) h[(key[j] >> sh) & mask]++;
            } else {
                /* few keys match a prefix (those in the threshold's bin one level up):
                 * flag matches with SIMD compares, then visit only the set flags */
                const uint32_t p0 = pl->p[0], p1 = pl->p[1];
                if (p0 == UINT32_MAX && p1 == UINT32_MAX) continue;
                load_keys(key, a->models[i], a->models_dt, off, len, s->b);
                uint8_t *restrict flag = s->flag;
                for (int j = 0; j < len; j++) {
                    const uint32_t hi = key[j] >> hs;
                    flag[j] = (uint8_t)((hi == p0) | ((hi == p1) << 1));
                }
                for (int j = len; j < ((len + 7) & ~7); j++) flag[j] = 0;
                uint32_t *restrict h1 = h + FM_NBINS;
                for (int j0 = 0; j0 < len; j0 += 8) {
                    uint64_t w;
                    memcpy(&w, flag + j0, sizeof w);
                    if (!w) continue;
                    /* flag byte k of w -> bit k of m0 (its bit 0: slot 0) and of m1 (its bit 1: slot 1) */
                    uint64_t m0 = ((w & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
                    uint64_t m1 = (((w >> 1) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
                    for (; m0; m0 &= m0 - 1) h[(key[j0 + __builtin_ctzll(m0)] >> sh) & mask]++;
                    for (; m1; m1 &= m1 - 1) h1[(key[j0 + __builtin_ctzll(m1)] >> sh) & mask]++;
                }
            }
        }
    }
}

static void hist_flush(const fm_hist_args *a, const hist_plan *plan, uint32_t *loc)
{
    for (int i = 0; i < a->n; i++) {
        uint32_t *h = loc + (size_t)i * 4 * FM_NBINS;
        int64_t *out = a->hist + (size_t)i * 2 * FM_NBINS;
        if (a->level == 0) {
            if (!plan[i].all) continue;
            for (int d = 0; d < FM_NBINS; d++)
                out[d] += (int64_t)h[d] + h[FM_NBINS + d] + h[2 * FM_NBINS + d] + h[3 * FM_NBINS + d];
        } else {
            for (int sl = 0; sl < 2; sl++)
                if (plan[i].p[sl] != UINT32_MAX)
                    for (int d = 0; d < FM_NBINS; d++) out[sl * FM_NBINS + d] += h[sl * FM_NBINS + d];
        }
        memset(h, 0, 4 * FM_NBINS * sizeof(uint32_t));
    }
}

int fm_histogram(const fm_hist_args *a)
{
    const int n = a->n, level = a->level;
    hist_plan plan[FM_MAX_MODELS];
    const int hs = FM_SHIFT[level] + FM_DIGIT_BITS[level];
    const int64_t limit = (int64_t)1 << (31 - hs);   /* prefixes are below 2^(31 - hs) */

    memset(a->hist, 0, (size_t)n * 2 * FM_NBINS * sizeof(int64_t));
    for (int i = 0; i < n; i++) {
        hist_plan *pl = &plan[i];
        pl->all = 0;
        pl->copy1 = 0;
        for (int sl = 0; sl < 2; sl++) {
            const int64_t p = a->prefix[i][sl];
            pl->p[sl] = (p >= 0 && p < limit) ? (uint32_t)p : UINT32_MAX;
        }
        if (level == 0) {
            /* key >> 31 is 0 for every |τ|: prefix 0 matches all, others match nothing */
            pl->all = pl->p[0] == 0 || pl->p[1] == 0;
        } else if (pl->p[1] != UINT32_MAX && pl->p[1] == pl->p[0]) {
            pl->copy1 = 1;
            pl->p[1] = UINT32_MAX;
        }
    }
    if (a->N == 0) return 0;

    work w = work_for(a->N, FM_FLUSH_BLOCKS);
    const int nt = fm_pick_threads(a->threads, w.nblk);
    int failed = 0;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
#endif
    {
        arena ar;
        const size_t loc_bytes = (size_t)n * 4 * FM_NBINS * sizeof(uint32_t);
        if (arena_init(&ar, rounded(FM_BLOCK * sizeof(float)) + rounded(FM_BLOCK * sizeof(uint32_t)) +
                                rounded(FM_BLOCK + 8) + rounded(loc_bytes)) != 0) {
            failed = 1;
        } else {
            hist_scratch s;
            s.b = arena_take(&ar, FM_BLOCK * sizeof(float));
            s.key = arena_take(&ar, FM_BLOCK * sizeof(uint32_t));
            s.flag = arena_take(&ar, FM_BLOCK + 8);
            s.loc = arena_take(&ar, loc_bytes);
            memset(s.loc, 0, loc_bytes);
            for (int64_t c0, c1; take_chunk(&w, &c0, &c1);) {
                hist_range(a, plan, &s, c0, c1);
#ifdef _OPENMP
#pragma omp critical(fastmerge_hist)
#endif
                hist_flush(a, plan, s.loc);
            }
            free(ar.mem);
        }
    }
    for (int i = 0; i < n; i++) {
        int64_t *out = a->hist + (size_t)i * 2 * FM_NBINS;
        const int dup = level == 0 ? (plan[i].all && a->prefix[i][1] == 0) : plan[i].copy1;
        if (level == 0 && plan[i].all && a->prefix[i][0] != 0) {
            memcpy(out + FM_NBINS, out, FM_NBINS * sizeof(int64_t));   /* only slot 1 asked */
            memset(out, 0, FM_NBINS * sizeof(int64_t));
        } else if (dup) {
            memcpy(out + FM_NBINS, out, FM_NBINS * sizeof(int64_t));
        }
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------ */
/* bracket: the one counting pass of sample-bracketed selection (fastmerge/select.py)   */

/* keys inside a bracket are gathered per thread and published in batches */
#define FM_BRACKET_LOCAL (2 * FM_BLOCK)

typedef struct {
    int on;                            /* some slot of this model is on */
    uint32_t lo[2], span[2], hi[2];    /* inside: key - lo <= span (unsigned); above: key > hi */
} bracket_plan;

typedef struct {
    float *b;
    uint32_t *key;
    uint8_t *flag;     /* FM_BLOCK + 64: inside slot 0 (bit 0), slot 1 (bit 1) */
    uint32_t *local;   /* [n][2][FM_BRACKET_LOCAL]: gathered keys not yet published */
    int *fill;         /* [n][2] */
    int64_t *above;    /* [n][2] */
} bracket_scratch;

/* Publish the keys this thread gathered for slot ij = 2i + j: one atomic add on its
 * `inside` count reserves their place; what fits under cap is copied there. */
static void bracket_publish(const fm_bracket_args *a, bracket_scratch *s, int ij)
{
    const int m = s->fill[ij];
    int64_t *inside = a->counts + 2 * (size_t)ij + 1;
    int64_t pos;
    if (!m) return;
#ifdef _OPENMP
#pragma omp atomic capture
#endif
    { pos = *inside; *inside += m; }
    if (pos < a->cap) {
        const int64_t room = a->cap - pos, take = m < room ? m : room;
        memcpy(a->cand + (size_t)ij * a->cap + pos, s->local + (size_t)ij * FM_BRACKET_LOCAL,
               (size_t)take * sizeof(int32_t));
    }
    s->fill[ij] = 0;
}

FM_CLONES static void bracket_range(const fm_bracket_args *a, const bracket_plan *plan,
                                    bracket_scratch *s, int64_t blk0, int64_t blk1)
{
    uint32_t *restrict key = s->key;
    uint8_t *restrict flag = s->flag;

    for (int64_t blk = blk0; blk < blk1; blk++) {
        const int64_t off = blk * FM_BLOCK;
        const int len = block_len(a->N, blk);
        prefetch_block(a->base, a->base_dt, a->models, a->n, a->models_dt, a->N, blk + 1);
        fm_load(s->b, a->base, a->base_dt, off, len);
        for (int i = 0; i < a->n; i++) {
            const bracket_plan *pl = &plan[i];
            if (!pl->on) continue;
            load_keys(key, a->models[i], a->models_dt, off, len, s->b);
            const uint32_t lo0 = pl->lo[0], lo1 = pl->lo[1], sp0 = pl->span[0], sp1 = pl->span[1];
            const uint32_t hi0 = pl->hi[0], hi1 = pl->hi[1];
            uint32_t c0 = 0, c1 = 0;
            for (int j = 0; j < len; j++) {
                const uint32_t k = key[j];
                c0 += k > hi0;
                c1 += k > hi1;
                flag[j] = (uint8_t)((k - lo0 <= sp0) | ((k - lo1 <= sp1) << 1));
            }
            for (int j = len; j < ((len + 63) & ~63); j++) flag[j] = 0;
            s->above[2 * i] += c0;
            s->above[2 * i + 1] += c1;
            /* few keys fall inside a bracket: visit only the set flags (as in hist_range) */
            uint32_t *restrict l0 = s->local + (size_t)(2 * i) * FM_BRACKET_LOCAL;
            uint32_t *restrict l1 = l0 + FM_BRACKET_LOCAL;
            int f0 = s->fill[2 * i], f1 = s->fill[2 * i + 1];
            for (int j0 = 0; j0 < len; j0 += 64) {
                /* 64 flags -> one bit mask per slot, from 8 flag bytes at a time */
                uint64_t m0 = 0, m1 = 0;
                for (int q = 0; q < 8; q++) {
                    uint64_t w;
                    memcpy(&w, flag + j0 + 8 * q, sizeof w);
                    m0 |= (((w & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56) << (8 * q);
                    m1 |= ((((w >> 1) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56) << (8 * q);
                }
                for (; m0; m0 &= m0 - 1) l0[f0++] = key[j0 + __builtin_ctzll(m0)];
                for (; m1; m1 &= m1 - 1) l1[f1++] = key[j0 + __builtin_ctzll(m1)];
            }
            s->fill[2 * i] = f0;
            s->fill[2 * i + 1] = f1;
            /* at most FM_BLOCK more per block: keep that much room */
            if (f0 > FM_BRACKET_LOCAL - FM_BLOCK) bracket_publish(a, s, 2 * i);
            if (f1 > FM_BRACKET_LOCAL - FM_BLOCK) bracket_publish(a, s, 2 * i + 1);
        }
    }
}

int fm_bracket(const fm_bracket_args *a)
{
    const int n = a->n;
    bracket_plan plan[FM_MAX_MODELS];

    memset(a->counts, 0, (size_t)n * 4 * sizeof(int64_t));
    for (int i = 0; i < n; i++) {
        bracket_plan *pl = &plan[i];
        pl->on = 0;
        for (int j = 0; j < 2; j++) {
            if (a->lo[i][j] >= 0) {
                pl->on = 1;
                pl->lo[j] = (uint32_t)a->lo[i][j];
                pl->span[j] = (uint32_t)(a->hi[i][j] - a->lo[i][j]);
                pl->hi[j] = (uint32_t)a->hi[i][j];
            } else {   /* off: keys are below 2^31, so nothing is inside or above */
                pl->lo[j] = UINT32_MAX;
                pl->span[j] = 0;
                pl->hi[j] = UINT32_MAX;
            }
        }
    }
    if (a->N == 0) return 0;

    work w = work_for(a->N, FM_MERGE_CHUNK_BLOCKS);
    const int nt = fm_pick_threads(a->threads, w.nblk);
    int failed = 0;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
#endif
    {
        arena ar;
        const size_t local_bytes = (size_t)n * 2 * FM_BRACKET_LOCAL * sizeof(uint32_t);
        if (arena_init(&ar, rounded(FM_BLOCK * sizeof(float)) + rounded(FM_BLOCK * sizeof(uint32_t)) +
                                rounded(FM_BLOCK + 64) + rounded(local_bytes) +
                                rounded((size_t)n * 2 * sizeof(int)) +
                                rounded((size_t)n * 2 * sizeof(int64_t))) != 0) {
            failed = 1;
        } else {
            bracket_scratch s;
            s.b = arena_take(&ar, FM_BLOCK * sizeof(float));
            s.key = arena_take(&ar, FM_BLOCK * sizeof(uint32_t));
            s.flag = arena_take(&ar, FM_BLOCK + 64);
            s.local = arena_take(&ar, local_bytes);
            s.fill = arena_take(&ar, (size_t)n * 2 * sizeof(int));
            s.above = arena_take(&ar, (size_t)n * 2 * sizeof(int64_t));
            memset(s.fill, 0, (size_t)n * 2 * sizeof(int));
            memset(s.above, 0, (size_t)n * 2 * sizeof(int64_t));
            for (int64_t b0, b1; take_chunk(&w, &b0, &b1);) {
                bracket_range(a, plan, &s, b0, b1);
            }
            for (int ij = 0; ij < 2 * n; ij++) bracket_publish(a, &s, ij);
#ifdef _OPENMP
#pragma omp critical(fastmerge_bracket)
#endif
            for (int ij = 0; ij < 2 * n; ij++) a->counts[2 * ij] += s.above[ij];
            free(ar.mem);
        }
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------ */
/* DARE's random drop (docs/spec.md §8a): Philox4x32-10                                 */

/* r_i(g) = hi·2^16 + lo (spec 8a): hi from the halves of stream 0, one Philox call per
 * eight entries; lo from stream 1, needed only where hi alone does not decide r < T. */

/* room for a block's Philox calls (<= (FM_BLOCK + 14) / 8), rounded up to whole batches */
#define FM_RGROUPS ((FM_BLOCK / 8 + 2 + FM_PHILOX_BATCH - 1) / FM_PHILOX_BATCH * FM_PHILOX_BATCH)

/* Half g mod 8 of stream s's call for q = g >> 3, for g = g0 + j, j < len (len <=
 * FM_BLOCK): returned at r + (g0 & 7), r holding the whole groups from 8·(g0 >> 3) (room
 * for 8·FM_RGROUPS). Stream 0 gives the high halves of r_model(g), stream 1 the low. */
FM_INLINE const uint16_t *dare_halves(uint16_t *restrict r, uint64_t g0, int len, uint32_t k0,
                                      uint32_t k1, uint32_t model, uint32_t s)
{
    fm_philox_halves(r, g0 >> 3, ((int)(g0 & 7) + len + 7) >> 3, k0, k1, model, s);
    return r + (g0 & 7);
}

/* The low half lo_model(g): half g mod 8 of stream 1's call for q = g >> 3. */
static uint32_t dare_low(uint64_t g, uint32_t k0, uint32_t k1, uint32_t model)
{
    uint32_t c[4] = {(uint32_t)(g >> 3), (uint32_t)(g >> 35), model, 1};
    fm_philox4x32_10(c, k0, k1);
    return (c[(g & 7) >> 1] >> (16 * (g & 1))) & 0xFFFFu;
}

/* The ties: where hi = T >> 16, hi alone left keep[j] = 0; r < T is lo < T mod 2^16.
 * T per entry (T != NULL) or thr for all. About 2^-16 of the entries. */
static void settle_ties(int32_t *restrict keep, const uint16_t *restrict h, uint64_t g0,
                        int len, uint32_t k0, uint32_t k1, uint32_t model,
                        const int64_t *restrict T, uint32_t thr)
{
    for (int j = 0; j < len; j++) {
        const int64_t t = T ? T[j] : (int64_t)thr;
        if (h[j] == t >> 16) keep[j] = dare_low(g0 + (uint64_t)j, k0, k1, model) < (t & 0xFFFF);
    }
}

/* keep[j] = kept_model(g0 + j) = r_model(g0 + j) < T (T = thr, or 2^32 when all): the
 * drop mask of one model over one block. Density 1 or 0 needs no random words. */
FM_INLINE void dare_keep(int32_t *restrict keep, uint16_t *restrict r, uint64_t g0, int len,
                         uint32_t k0, uint32_t k1, uint32_t model, uint32_t thr, uint32_t all)
{
    if (all || thr == 0) {
        for (int j = 0; j < len; j++) keep[j] = (int32_t)all;
        return;
    }
    const uint16_t *restrict h = dare_halves(r, g0, len, k0, k1, model, 0);
    const uint32_t hi = thr >> 16;
    int32_t tie = 0;
    for (int j = 0; j < len; j++) {
        keep[j] = h[j] < hi;
        tie |= h[j] == hi;
    }
    if (tie && (thr & 0xFFFF)) settle_ties(keep, h, g0, len, k0, k1, model, NULL, thr);
}

/* keep[j] = r_model(g0 + j) < T[j] for per-entry thresholds T in [0, 2^32] (DELLA, spec
 * 8d): the high halves decide, the ties are settled by the low ones. */
FM_INLINE void per_entry_keep(int32_t *restrict keep, uint16_t *restrict r, uint64_t g0,
                              int len, uint32_t k0, uint32_t k1, uint32_t model,
                              const int64_t *restrict T)
{
    const uint16_t *restrict h = dare_halves(r, g0, len, k0, k1, model, 0);
    int32_t tie = 0;
    for (int j = 0; j < len; j++) {
        const int64_t hi = T[j] >> 16;
        keep[j] = h[j] < hi;
        tie |= h[j] == hi;
    }
    if (tie) settle_ties(keep, h, g0, len, k0, k1, model, T, 0);
}

/* DELLA (spec 8d) with T from the torch rank stage: keep[j] as per_entry_keep, and
 * cf[j] = (w·2^32) / T[j] with rescale (0 when T = 0; w when T = 2^32), else w. */
FM_INLINE void ranked_keep(int32_t *restrict keep, double *restrict cf, uint16_t *restrict r,
                           uint64_t g0, int len, uint32_t k0, uint32_t k1, uint32_t model,
                           const int64_t *restrict T, double w, int rescale)
{
    per_entry_keep(keep, r, g0, len, k0, k1, model, T);
    const double w32 = w * 4294967296.0;                /* exact: a power-of-two scaling */
    for (int j = 0; j < len; j++)
        cf[j] = rescale ? (T[j] != 0 ? w32 / (double)T[j] : 0.0) : w;
}

/* DELLA with the fused rank stage: keep[j] as per_entry_keep and cf[j] = C[j], with T and
 * C the row's per-entry thresholds and factors (rank_row). */
FM_INLINE void row_keep(int32_t *restrict keep, double *restrict cf, uint16_t *restrict r,
                        uint64_t g0, int len, uint32_t k0, uint32_t k1,
                        uint32_t model, const int64_t *restrict T, const double *restrict C)
{
    per_entry_keep(keep, r, g0, len, k0, k1, model, T);
    memcpy(cf, C, (size_t)len * sizeof *cf);
}

FM_CLONES void fm_dare_words(uint32_t *dst, int64_t N, int64_t offset, uint32_t k0, uint32_t k1,
                             uint32_t model)
{
    uint16_t rh[8 * FM_RGROUPS], rl[8 * FM_RGROUPS];
    for (int64_t off = 0; off < N; off += FM_BLOCK) {
        const int len = (int)(N - off < FM_BLOCK ? N - off : FM_BLOCK);
        const uint64_t g0 = (uint64_t)(offset + off);
        const uint16_t *hi = dare_halves(rh, g0, len, k0, k1, model, 0);
        const uint16_t *lo = dare_halves(rl, g0, len, k0, k1, model, 1);
        for (int j = 0; j < len; j++) dst[off + j] = (uint32_t)hi[j] << 16 | lo[j];
    }
}

/* ------------------------------------------------------------------------------------ */
/* merge                                                                                */

typedef struct {
    float *b;       /* f32(θ_b) */
    float *x;       /* [n][FM_BLOCK]: x_i = τ_i (on_base) or θ_i */
    double *g;      /* G over kept votes */
    double *gp;     /* G over protected votes */
    int32_t *ap;    /* any model protects */
    float *gam;     /* γ */
    float *gamt;    /* γ of plain TIES (for ties_important_dropped) */
    double *d;      /* D */
    double *ws;     /* W */
    double *theta;  /* θ before its one rounding */
    int32_t *km;    /* drop: [n][FM_BLOCK] kept_i */
    double *cf;     /* DELLA: [n][FM_BLOCK] c_i of each entry (DARE: a->cw[i]) */
    uint16_t *rb;   /* drop: [8 * FM_RGROUPS] one model's high halves */
    /* the fused rank stage (a->rank_keep), for the row being merged: */
    int64_t r0;     /* the row's first entry (chunk index) */
    int64_t *rT;    /* [n][M] T_i of the row's entries */
    double *rcf;    /* [n][M] c_i of the row's entries */
    float *rowb;    /* [M] f32(θ_b) of the row */
    uint32_t *rkey; /* [M] one model's keys bits(|τ_i|) */
    fm_rank_scratch sort;
} merge_scratch;

/* m = D / W (normalize, W != 0) or D;  θ = f32(θ_b) + λ·m (on_base) or m  -- §7, fp64.
 * Branch-free (the loops calling it vectorise): D / 1.0 is exactly D. */
FM_INLINE double combine(double d, double w, float b, double lam, int on_base, const int NORM)
{
    const double m = NORM ? d / (w != 0.0 ? w : 1.0) : d;
    const double theta = (double)b + lam * m;
    return on_base ? theta : m;
}

/* Election (§5), selection and combine (§6, §7) for one block whose x_i are in s->x.
 * θ lands in s->theta; counters of model i are added to cnt[i][...]. DROP: kept_i comes
 * from s->km instead of |x_i| >= t_i, with c_i = a->cw[i] (1, DARE §8a) or s->cf per
 * entry (2, DELLA §8d). */
FM_INLINE void elect_block(const fm_merge_args *a, merge_scratch *s, int len, int64_t *cnt,
                           const int SLACK, const int COUNT, const int NORM, const int DROP)
{
    const int n = a->n;
    double *restrict g = s->g, *restrict gp = s->gp, *restrict d = s->d, *restrict ws = s->ws;
    float *restrict gam = s->gam, *restrict gamt = s->gamt;
    int32_t *restrict ap = s->ap;

    for (int j = 0; j < len; j++) g[j] = 0.0;
    if (SLACK)
        for (int j = 0; j < len; j++) { gp[j] = 0.0; ap[j] = 0; }
    for (int i = 0; i < n; i++) {
        const float *restrict x = s->x + (size_t)i * FM_BLOCK;
        const int32_t *restrict km = s->km + (size_t)i * FM_BLOCK;
        const double *restrict cfa = s->cf + (size_t)i * FM_BLOCK;
        const float ti = a->t[i], ui = a->u[i], hi = a->h[i], swi = a->sw[i];
        const double wi = a->w[i], ci = a->cw[i];
        for (int j = 0; j < len; j++) {
            const float ax = fabsf(x[j]);
            const int p = SLACK ? ax >= ui : 0;                 /* §4a: protected, kept */
            const int k = (DROP ? km[j] != 0 : (ax >= ti) & !(ax >= hi)) | p;
            const double cf = DROP && SLACK && p ? wi : DROP == 2 ? cfa[j] : ci;  /* prot.: w_i */
            const double vote = COUNT ? (double)(swi * (float)((x[j] > 0.f) - (x[j] < 0.f)))
                                      : cf * (double)x[j];
            g[j] += k ? vote : 0.0;
            if (SLACK) {
                gp[j] += p ? vote : 0.0;
                ap[j] |= p;
            }
        }
    }
    for (int j = 0; j < len; j++) {
        const float gt = g[j] >= 0.0 ? 1.f : -1.f;
        gam[j] = SLACK && ap[j] ? (gp[j] >= 0.0 ? 1.f : -1.f) : gt;
        gamt[j] = gt;
    }

    for (int j = 0; j < len; j++) { d[j] = 0.0; ws[j] = 0.0; }
    for (int i = 0; i < n; i++) {
        const float *restrict x = s->x + (size_t)i * FM_BLOCK;
        const int32_t *restrict km = s->km + (size_t)i * FM_BLOCK;
        const double *restrict cfa = s->cf + (size_t)i * FM_BLOCK;
        const float ti = a->t[i], ui = a->u[i], hi = a->h[i], swi = a->sw[i];
        const double wi = a->w[i], ci = a->cw[i];
        int c_kept = 0, c_sel = 0, c_drop = 0, c_prot = 0, c_imp = 0, c_timp = 0;
        for (int j = 0; j < len; j++) {
            const float ax = fabsf(x[j]), sx = swi * x[j];      /* sign(w_i·x_i) = sign(sx) */
            const int p = SLACK ? ax >= ui : 0;
            const int k = (DROP ? km[j] != 0 : (ax >= ti) & !(ax >= hi)) | p;
            const int sel = k & (sx * gam[j] > 0.f);             /* a zero never matches */
            const double cf = DROP && SLACK && p ? wi : DROP == 2 ? cfa[j] : ci;
            d[j] += sel ? cf * (double)x[j] : 0.0;
            ws[j] += sel ? wi : 0.0;
            c_kept += k;
            c_sel += sel;
            c_drop += k & !sel & (x[j] != 0.f);
            if (SLACK) {
                c_prot += p;
                c_imp += p & !sel;
                c_timp += p & !(k & (sx * gamt[j] > 0.f));
            }
        }
        int64_t *c = cnt + (size_t)i * FM_NCOUNTERS;
        c[FM_KEPT] += c_kept;
        c[FM_SELECTED] += c_sel;
        c[FM_DROPPED_BY_SIGN] += c_drop;
        if (SLACK) {
            c[FM_PROTECTED] += c_prot;
            c[FM_IMPORTANT_DROPPED] += c_imp;
            c[FM_TIES_IMPORTANT_DROPPED] += c_timp;
        }
    }
    const double lam = a->scale;
    const int on_base = a->on_base;
    double *restrict theta = s->theta;
    const float *restrict b = s->b;
    for (int j = 0; j < len; j++) theta[j] = combine(d[j], ws[j], b[j], lam, on_base, NORM);
}

/* elect_block for a compile-time number of models NC: the same operations in the same
 * order in one loop over the block, so every intermediate stays in registers (the
 * scratch arrays of elect_block make six round trips through L1 per entry). Bit-identical
 * to elect_block. */
FM_INLINE void elect_block_fused(const fm_merge_args *a, merge_scratch *s, int len,
                                 int64_t *cnt, const int NC, const int SLACK, const int COUNT,
                                 const int NORM, const int DROP)
{
    const float *restrict x = s->x, *restrict b = s->b;
    const int32_t *restrict km = s->km;
    const double *restrict cfa = s->cf;
    double *restrict theta = s->theta;
    const double lam = a->scale;
    const int on_base = a->on_base;
    double w[FM_MAX_MODELS], cw[FM_MAX_MODELS];
    float t[FM_MAX_MODELS], u[FM_MAX_MODELS], h[FM_MAX_MODELS], sw[FM_MAX_MODELS];
    int c_kept[FM_MAX_MODELS], c_sel[FM_MAX_MODELS], c_drop[FM_MAX_MODELS];
    int c_prot[FM_MAX_MODELS], c_imp[FM_MAX_MODELS], c_timp[FM_MAX_MODELS];
    for (int i = 0; i < NC; i++) {
        t[i] = a->t[i]; u[i] = a->u[i]; h[i] = a->h[i]; w[i] = a->w[i]; cw[i] = a->cw[i]; sw[i] = a->sw[i];
        c_kept[i] = c_sel[i] = c_drop[i] = c_prot[i] = c_imp[i] = c_timp[i] = 0;
    }
    for (int j = 0; j < len; j++) {
        double g = 0.0, gp = 0.0;
        int ap = 0;
        for (int i = 0; i < NC; i++) {                      /* §5 elect */
            const float xi = x[(size_t)i * FM_BLOCK + j], ax = fabsf(xi);
            const int p = SLACK ? ax >= u[i] : 0;
            const int k = (DROP ? km[(size_t)i * FM_BLOCK + j] != 0
                                : (ax >= t[i]) & !(ax >= h[i])) | p;
            const double cf = DROP && SLACK && p ? w[i]
                              : DROP == 2 ? cfa[(size_t)i * FM_BLOCK + j] : cw[i];
            const double vote = COUNT ? (double)(sw[i] * (float)((xi > 0.f) - (xi < 0.f)))
                                      : cf * (double)xi;
            g += k ? vote : 0.0;
            if (SLACK) {
                gp += p ? vote : 0.0;
                ap |= p;
            }
        }
        const float gt = g >= 0.0 ? 1.f : -1.f;
        const float gam = SLACK && ap ? (gp >= 0.0 ? 1.f : -1.f) : gt;
        double d = 0.0, ws = 0.0;
        for (int i = 0; i < NC; i++) {                      /* §6 select; §9 counters */
            const float xi = x[(size_t)i * FM_BLOCK + j], ax = fabsf(xi), sx = sw[i] * xi;
            const int p = SLACK ? ax >= u[i] : 0;
            const int k = (DROP ? km[(size_t)i * FM_BLOCK + j] != 0
                                : (ax >= t[i]) & !(ax >= h[i])) | p;
            const int sel = k & (sx * gam > 0.f);
            const double cf = DROP && SLACK && p ? w[i]
                              : DROP == 2 ? cfa[(size_t)i * FM_BLOCK + j] : cw[i];
            d += sel ? cf * (double)xi : 0.0;
            ws += sel ? w[i] : 0.0;
            c_kept[i] += k;
            c_sel[i] += sel;
            c_drop[i] += k & !sel & (xi != 0.f);
            if (SLACK) {
                c_prot[i] += p;
                c_imp[i] += p & !sel;
                c_timp[i] += p & !(k & (sx * gt > 0.f));
            }
        }
        theta[j] = combine(d, ws, b[j], lam, on_base, NORM);   /* §7 */
    }
    for (int i = 0; i < NC; i++) {
        int64_t *c = cnt + (size_t)i * FM_NCOUNTERS;
        c[FM_KEPT] += c_kept[i];
        c[FM_SELECTED] += c_sel[i];
        c[FM_DROPPED_BY_SIGN] += c_drop[i];
        if (SLACK) {
            c[FM_PROTECTED] += c_prot[i];
            c[FM_IMPORTANT_DROPPED] += c_imp[i];
            c[FM_TIES_IMPORTANT_DROPPED] += c_timp[i];
        }
    }
}

/* No election: sel_i = kept_i, W = Σ w_i (a->wsum). KEEP: 0 every entry kept, 1 trim
 * (|x_i| >= t_i), 2 DARE's drop (s->km, c_i = a->cw[i]), 3 DELLA's (s->km, s->cf). */
FM_INLINE void sum_block(const fm_merge_args *a, merge_scratch *s, int len, int64_t *cnt,
                         const int KEEP, const int NORM)
{
    double *restrict d = s->d;
    for (int j = 0; j < len; j++) d[j] = 0.0;
    for (int i = 0; i < a->n; i++) {
        const float *restrict x = s->x + (size_t)i * FM_BLOCK;
        const int32_t *restrict km = s->km + (size_t)i * FM_BLOCK;
        const double *restrict cfa = s->cf + (size_t)i * FM_BLOCK;
        const double ci = a->cw[i];
        const float ti = a->t[i], hi = a->h[i];
        int c_kept = 0;
        for (int j = 0; j < len; j++) {
            const float ax = fabsf(x[j]);
            const int k = KEEP >= 2 ? km[j] != 0 : KEEP == 1 ? (ax >= ti) & !(ax >= hi) : 1;
            d[j] += k ? (KEEP == 3 ? cfa[j] : ci) * (double)x[j] : 0.0;
            c_kept += k;
        }
        if (KEEP) {
            cnt[(size_t)i * FM_NCOUNTERS + FM_KEPT] += c_kept;
            cnt[(size_t)i * FM_NCOUNTERS + FM_SELECTED] += c_kept;
        }
    }
    const double lam = a->scale, wsum = a->wsum;
    const int on_base = a->on_base;
    double *restrict theta = s->theta;
    const float *restrict b = s->b;
    for (int j = 0; j < len; j++) theta[j] = combine(d[j], wsum, b[j], lam, on_base, NORM);
}

/* Entries [off0, off1) of the chunk in blocks of up to FM_BLOCK from off0: load (x_i in
 * fp32, non-finite counted), the pass the flags ask for, store. */
FM_INLINE void merge_span_impl(const fm_merge_args *a, merge_scratch *s, int64_t off0,
                               int64_t off1, int64_t *cnt, const int ELECT, const int SLACK,
                               const int NORM, const int DROP)
{
    for (int64_t off = off0; off < off1; off += FM_BLOCK) {
        const int len = (int)(off1 - off < FM_BLOCK ? off1 - off : FM_BLOCK);
        prefetch_at(a->base, a->base_dt, a->models, a->n, a->models_dt, a->N, off + FM_BLOCK);
        if (a->on_base) fm_load(s->b, a->base, a->base_dt, off, len);
        for (int i = 0; i < a->n; i++) {
            float *x = s->x + (size_t)i * FM_BLOCK;
            if (a->on_base) fm_load_sub(x, a->models[i], a->models_dt, off, len, s->b);
            else fm_load(x, a->models[i], a->models_dt, off, len);
            cnt[(size_t)i * FM_NCOUNTERS + FM_NONFINITE] += count_nonfinite(x, len);
        }
        if (DROP)                 /* §8a: kept_i of this block from the entries' global index */
            for (int i = 0; i < a->n; i++) {
                int32_t *km = s->km + (size_t)i * FM_BLOCK;
                double *cf = s->cf + (size_t)i * FM_BLOCK;
                const uint64_t g0 = (uint64_t)(a->offset + off);
                if (DROP == 2 && a->rank_keep) {   /* §8d, ranked here: the row's T_i, c_i */
                    const size_t at = (size_t)i * (size_t)a->rank_M + (size_t)(off - s->r0);
                    row_keep(km, cf, s->rb, g0, len, a->key[0], a->key[1], (uint32_t)i,
                             s->rT + at, s->rcf + at);
                } else if (DROP == 2) {   /* §8d: DELLA's per-entry thresholds and factors */
                    ranked_keep(km, cf, s->rb, g0, len, a->key[0], a->key[1],
                                (uint32_t)i, a->keep + (size_t)i * (size_t)a->N + off, a->w[i],
                                a->keep_rescale);
                } else {
                    dare_keep(km, s->rb, g0, len, a->key[0], a->key[1], (uint32_t)i,
                              a->dthr[i], a->dall[i]);     /* c_i: a->cw[i] (DROP 1) */
                }
            }
        if (ELECT == FM_ELECT_NONE) {
            if (DROP) sum_block(a, s, len, cnt, DROP + 1, NORM);
            else if (a->trim) sum_block(a, s, len, cnt, 1, NORM);
            else sum_block(a, s, len, cnt, 0, NORM);
        } else if (a->n == 2) {
            elect_block_fused(a, s, len, cnt, 2, SLACK, ELECT == FM_ELECT_COUNT, NORM, DROP);
        } else {
            elect_block(a, s, len, cnt, SLACK, ELECT == FM_ELECT_COUNT, NORM, DROP);
        }
        fm_store_f64(a->out, a->out_dt, off, s->theta, len);
    }
}

FM_CLONES static void merge_span(const fm_merge_args *a, merge_scratch *s, int64_t off0,
                                 int64_t off1, int64_t *cnt, int has_slack)
{
#define FM_RANGE(E, S, D) (a->normalize ? merge_span_impl(a, s, off0, off1, cnt, E, S, 1, D) \
                                        : merge_span_impl(a, s, off0, off1, cnt, E, S, 0, D))
#define FM_RANGE_DROP(E, S) (drop == 2 ? FM_RANGE(E, S, 2) : drop ? FM_RANGE(E, S, 1) \
                                                                : FM_RANGE(E, S, 0))
#define FM_RANGE_ELECT(E) (has_slack ? FM_RANGE_DROP(E, 1) : FM_RANGE_DROP(E, 0))
    /* DROP: 0 none, 1 DARE (one c_i per model), 2 DELLA (c_i per entry) */
    const int drop = !a->drop ? 0 : a->keep || a->rank_keep ? 2 : 1;
    if (a->elect == FM_ELECT_NONE) FM_RANGE_DROP(FM_ELECT_NONE, 0);
    else if (a->elect == FM_ELECT_SUM) FM_RANGE_ELECT(FM_ELECT_SUM);
    else FM_RANGE_ELECT(FM_ELECT_COUNT);
#undef FM_RANGE_ELECT
#undef FM_RANGE_DROP
#undef FM_RANGE
}

/* The fused rank stage's per-tensor tables (a->rank_keep): c_i(ρ) per rank, and which
 * models have one T for every rank (density 0 or 1, ε = 0, M = 1: no sort needed). */
typedef struct {
    double *cf;       /* [n][M]: (w_i·2^32) / T_i(ρ) (0 when T = 0) with rescale, else w_i */
    int flat[FM_MAX_MODELS];
} rank_tables;

static int rank_tables_init(rank_tables *tb, const fm_merge_args *a)
{
    const int64_t M = a->rank_M;
    tb->cf = malloc((size_t)a->n * (size_t)M * sizeof(double));
    if (!tb->cf) return -1;
    for (int i = 0; i < a->n; i++) {
        const int64_t *T = a->rank_keep + (size_t)i * (size_t)M;
        double *cf = tb->cf + (size_t)i * (size_t)M;
        const double w32 = a->w[i] * 4294967296.0;      /* exact: a power-of-two scaling */
        tb->flat[i] = 1;
        for (int64_t r = 0; r < M; r++) {
            cf[r] = a->keep_rescale ? (T[r] != 0 ? w32 / (double)T[r] : 0.0) : a->w[i];
            tb->flat[i] &= T[r] == T[0];
        }
    }
    return 0;
}

/* s->rT, s->rcf = T_i(ρ_i(g)), c_i(ρ_i(g)) for the entries g of the row starting at entry
 * r0 of the chunk: ρ_i(g) the rank by ascending key bits(|τ_i|), ties by index
 * (fm_row_thresholds). */
FM_CLONES static void rank_row(const fm_merge_args *a, const rank_tables *tb, merge_scratch *s,
                               int64_t r0)
{
    const int M = (int)a->rank_M;
    int loaded = 0;
    s->r0 = r0;
    for (int i = 0; i < a->n; i++) {
        const int64_t *tab = a->rank_keep + (size_t)i * (size_t)M;
        const double *ctab = tb->cf + (size_t)i * (size_t)M;
        int64_t *restrict T = s->rT + (size_t)i * (size_t)M;
        double *restrict cf = s->rcf + (size_t)i * (size_t)M;
        if (tb->flat[i]) {
            for (int j = 0; j < M; j++) { T[j] = tab[0]; cf[j] = ctab[0]; }
            continue;
        }
        if (!loaded) {
            fm_load(s->rowb, a->base, a->base_dt, r0, M);
            loaded = 1;
        }
        load_keys(s->rkey, a->models[i], a->models_dt, r0, M, s->rowb);
        fm_row_thresholds(s->rkey, (uint32_t)M, tab, ctab, T, cf, &s->sort);
    }
}

/* Per-thread scratch of fm_merge in one arena (free ar->mem after use): the block arrays,
 * and the row arrays of the fused rank stage when M > 0. -1 when out of memory. */
static int merge_scratch_init(merge_scratch *s, arena *ar, int n, int64_t M)
{
    const size_t row = FM_BLOCK * sizeof(float), drow = FM_BLOCK * sizeof(double);
    const size_t rrow = 8 * FM_RGROUPS * sizeof(uint16_t);
    const size_t m = (size_t)M, hist = 3 * FM_RANK_BINS * sizeof(uint32_t);
    size_t bytes = rounded(row) * (4 + (size_t)n) + rounded(drow) * 5 +
                   rounded(FM_BLOCK * sizeof(int32_t)) +
                   rounded(FM_BLOCK * sizeof(int32_t) * (size_t)n) +
                   rounded(drow * (size_t)n) + rounded(rrow);
    if (M > 0)
        bytes += rounded(m * (size_t)n * sizeof(int64_t)) + rounded(m * (size_t)n * sizeof(double)) +
                 rounded(m * sizeof(float)) + rounded(m * sizeof(uint32_t)) +
                 2 * rounded(m * sizeof(uint64_t)) + rounded(hist);
    if (arena_init(ar, bytes) != 0) return -1;
    s->b = arena_take(ar, row);
    s->x = arena_take(ar, row * (size_t)n);
    s->gam = arena_take(ar, row);
    s->gamt = arena_take(ar, row);
    s->ap = arena_take(ar, FM_BLOCK * sizeof(int32_t));
    s->g = arena_take(ar, drow);
    s->gp = arena_take(ar, drow);
    s->d = arena_take(ar, drow);
    s->ws = arena_take(ar, drow);
    s->theta = arena_take(ar, drow);
    s->km = arena_take(ar, FM_BLOCK * sizeof(int32_t) * (size_t)n);
    s->cf = arena_take(ar, drow * (size_t)n);
    s->rb = arena_take(ar, rrow);
    memset(s->b, 0, row);   /* without a base it stays 0 (combine reads it, discards it) */
    s->r0 = 0;
    s->rT = NULL;
    s->rcf = NULL;
    s->rowb = NULL;
    s->rkey = NULL;
    s->sort.a = s->sort.b = NULL;
    s->sort.hist = NULL;
    if (M > 0) {
        s->rT = arena_take(ar, m * (size_t)n * sizeof(int64_t));
        s->rcf = arena_take(ar, m * (size_t)n * sizeof(double));
        s->rowb = arena_take(ar, m * sizeof(float));
        s->rkey = arena_take(ar, m * sizeof(uint32_t));
        s->sort.a = arena_take(ar, m * sizeof(uint64_t));
        s->sort.b = arena_take(ar, m * sizeof(uint64_t));
        s->sort.hist = arena_take(ar, hist);
    }
    return 0;
}

/* Rows of M entries handed out per work chunk: about FM_MERGE_CHUNK_BLOCKS blocks' worth */
static int64_t rows_per_chunk(int64_t M)
{
    const int64_t per = FM_MERGE_CHUNK_BLOCKS * FM_BLOCK / M;
    return per > 0 ? per : 1;
}

int fm_merge(const fm_merge_args *a)
{
    const int n = a->n;
    const int64_t M = a->rank_keep ? a->rank_M : 0;   /* > 0: the fused rank stage, by rows */
    int has_slack = 0;
    rank_tables tb = {NULL, {0}};

    memset(a->counts, 0, (size_t)n * FM_NCOUNTERS * sizeof(int64_t));
    if (a->N == 0) return 0;
    for (int i = 0; i < n; i++) has_slack |= a->u[i] == a->u[i];   /* NaN: protects none */
    if (M > 0 && rank_tables_init(&tb, a) != 0) return -1;

    /* work units: blocks of FM_BLOCK, or rows of M with the rank stage */
    work w = M > 0 ? (work){a->N / M, rows_per_chunk(M), 0}
                   : work_for(a->N, FM_MERGE_CHUNK_BLOCKS);
    const int nt = fm_pick_threads(a->threads, w.nblk);
    int failed = 0;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
#endif
    {
        int64_t cnt[FM_MAX_MODELS * FM_NCOUNTERS];
        merge_scratch s;
        arena ar;
        memset(cnt, 0, sizeof cnt);
        if (merge_scratch_init(&s, &ar, n, M) != 0) {
            failed = 1;
        } else {
            for (int64_t u0, u1; take_chunk(&w, &u0, &u1);) {
                if (M == 0) {
                    merge_span(a, &s, u0 * FM_BLOCK, u1 * FM_BLOCK < a->N ? u1 * FM_BLOCK : a->N,
                               cnt, has_slack);
                    continue;
                }
                for (int64_t r = u0; r < u1; r++) {
                    rank_row(a, &tb, &s, r * M);
                    merge_span(a, &s, r * M, (r + 1) * M, cnt, has_slack);
                }
            }
            free(ar.mem);
#ifdef _OPENMP
#pragma omp critical(fastmerge_counts)
#endif
            for (int k = 0; k < n * FM_NCOUNTERS; k++) a->counts[k] += cnt[k];
        }
    }
    free(tb.cf);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------ */
/* conversions (tests): the same inline routines the kernels use                        */

FM_CLONES void fm_convert(void *dst, int dst_dt, const void *src, int src_dt, int64_t N)
{
    float tmp[FM_BLOCK];
    for (int64_t off = 0; off < N; off += FM_BLOCK) {
        const int len = (int)(N - off < FM_BLOCK ? N - off : FM_BLOCK);
        fm_load(tmp, src, src_dt, off, len);
        fm_store(dst, dst_dt, off, tmp, len);
    }
}

FM_CLONES void fm_convert_f64(void *dst, int dst_dt, const double *src, int64_t N)
{
    for (int64_t off = 0; off < N; off += FM_BLOCK) {
        const int len = (int)(N - off < FM_BLOCK ? N - off : FM_BLOCK);
        fm_store_f64(dst, dst_dt, off, src + off, len);
    }
}
