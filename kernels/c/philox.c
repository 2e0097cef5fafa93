/* Philox4x32-10 (Salmon et al. 2011, Random123's philox4x32_R(10, ...)) for DARE's random
 * words (docs/spec.md §8a): one call per counter, its four words read as eight 16-bit
 * halves (half 2k: the low 16 bits of word k, half 2k + 1: the high 16 bits).
 *
 * A round on counter (a, b, c, d) under key (k0, k1), with the 64-bit products
 * M0·a = hi0·2^32 + lo0 and M1·c = hi1·2^32 + lo1:
 *     (a, b, c, d) <- (hi1 ^ b ^ k0, lo1, hi0 ^ d ^ k1, lo0)
 * then k0 += W0, k1 += W1 (mod 2^32); ten rounds.
 *
 * The SIMD variants keep each word in the low half of a 64-bit lane, so that one
 * vpmuludq (which reads only the low halves) gives the 64-bit products of a whole vector
 * of counters; the high halves may hold garbage, which no later step reads. They run two
 * independent vectors at a time (8 or 16 counters; measured best on Zen 4, more spill or
 * gain nothing) and store the words interleaved, a0 b0 c0 d0 a1 ... (on x86, little-endian,
 * the halves are then in order). Integer operations only: every variant gives the same
 * words. Without target-clone support (non-x86 or an old compiler) only the scalar
 * variant is built.
 */
#include "philox.h"

#include <string.h>

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u

static inline void philox10(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    uint32_t a = c[0], b = c[1], x = c[2], d = c[3];
    for (int r = 0; r < 10; r++) {
        const uint64_t p0 = (uint64_t)M0 * a, p1 = (uint64_t)M1 * x;
        const uint32_t na = (uint32_t)(p1 >> 32) ^ b ^ k0, nx = (uint32_t)(p0 >> 32) ^ d ^ k1;
        b = (uint32_t)p1;
        d = (uint32_t)p0;
        a = na;
        x = nx;
        k0 += W0;
        k1 += W1;
    }
    c[0] = a; c[1] = b; c[2] = x; c[3] = d;
}

void fm_philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) { philox10(ctr, k0, k1); }

static void groups_scalar(uint16_t *r, uint64_t q0, int ng, uint32_t k0, uint32_t k1,
                          uint32_t model, uint32_t stream)
{
    const int n = (ng + FM_PHILOX_BATCH - 1) / FM_PHILOX_BATCH * FM_PHILOX_BATCH;
    for (int q = 0; q < n; q++) {
        const uint64_t c = q0 + (uint64_t)q;
        uint32_t w[4] = {(uint32_t)c, (uint32_t)(c >> 32), model, stream};
        philox10(w, k0, k1);
        for (int k = 0; k < 4; k++) {
            r[8 * (size_t)q + 2 * k] = (uint16_t)w[k];
            r[8 * (size_t)q + 2 * k + 1] = (uint16_t)(w[k] >> 16);
        }
    }
}

#if defined(FASTMERGE_TARGET_CLONES) && defined(__x86_64__)
#include <immintrin.h>

#define FM_AVX2 __attribute__((target("avx2")))
#define FM_AVX512 __attribute__((target("avx512f")))

/* one round on V vectors of counters (a, b, c, d in the low halves of 64-bit lanes) */
#define ROUND(T, mul, srl, xor, set1, V)                                                  \
    do {                                                                                  \
        const T K0 = set1((long long)k0), K1 = set1((long long)k1);                       \
        for (int v = 0; v < V; v++) {                                                     \
            const T p0 = mul(a[v], m0), p1 = mul(c[v], m1);                               \
            a[v] = xor(xor(srl(p1, 32), b[v]), K0);                                       \
            c[v] = xor(xor(srl(p0, 32), d[v]), K1);                                       \
            b[v] = p1;                                                                    \
            d[v] = p0;                                                                    \
        }                                                                                 \
        k0 += W0;                                                                         \
        k1 += W1;                                                                         \
    } while (0)

FM_AVX2 static void groups_avx2(uint16_t *r, uint64_t q0, int ng, uint32_t k0_, uint32_t k1_,
                                uint32_t model, uint32_t stream)
{
    enum { V = 2 };    /* more vectors would spill: AVX2 has 16 registers */
    const __m256i m0 = _mm256_set1_epi64x(M0), m1 = _mm256_set1_epi64x(M1);
    const __m256i step = _mm256_set_epi64x(3, 2, 1, 0);
    for (int q = 0; q < ng; q += 4 * V) {
        __m256i a[V], b[V], c[V], d[V];
        uint32_t k0 = k0_, k1 = k1_;
        for (int v = 0; v < V; v++) {
            const long long qv = (long long)(q0 + (uint64_t)(q + 4 * v));
            a[v] = _mm256_add_epi64(_mm256_set1_epi64x(qv), step);   /* b: high halves */
            b[v] = _mm256_srli_epi64(a[v], 32);
            c[v] = _mm256_set1_epi64x(model);
            d[v] = _mm256_set1_epi64x(stream);
        }
        for (int rd = 0; rd < 10; rd++)
            ROUND(__m256i, _mm256_mul_epu32, _mm256_srli_epi64, _mm256_xor_si256,
                  _mm256_set1_epi64x, V);
        for (int v = 0; v < V; v++) {   /* lanes (a_l | b_l << 32), (c_l | d_l << 32), in order */
            const __m256i ab = _mm256_blend_epi32(a[v], _mm256_slli_epi64(b[v], 32), 0xAA);
            const __m256i cd = _mm256_blend_epi32(c[v], _mm256_slli_epi64(d[v], 32), 0xAA);
            const __m256i lo = _mm256_unpacklo_epi64(ab, cd), hi = _mm256_unpackhi_epi64(ab, cd);
            __m256i *out = (__m256i *)(r + 8 * (size_t)(q + 4 * v));
            _mm256_storeu_si256(out, _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
}

FM_AVX512 static void groups_avx512(uint16_t *r, uint64_t q0, int ng, uint32_t k0_,
                                    uint32_t k1_, uint32_t model, uint32_t stream)
{
    enum { V = FM_PHILOX_BATCH / 8 };
    const __m512i m0 = _mm512_set1_epi64(M0), m1 = _mm512_set1_epi64(M1);
    const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i first = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i second = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    for (int q = 0; q < ng; q += FM_PHILOX_BATCH) {
        __m512i a[V], b[V], c[V], d[V];
        uint32_t k0 = k0_, k1 = k1_;
        for (int v = 0; v < V; v++) {
            const long long qv = (long long)(q0 + (uint64_t)(q + 8 * v));
            a[v] = _mm512_add_epi64(_mm512_set1_epi64(qv), step);    /* b: high halves */
            b[v] = _mm512_srli_epi64(a[v], 32);
            c[v] = _mm512_set1_epi64(model);
            d[v] = _mm512_set1_epi64(stream);
        }
        for (int rd = 0; rd < 10; rd++)
            ROUND(__m512i, _mm512_mul_epu32, _mm512_srli_epi64, _mm512_xor_si512,
                  _mm512_set1_epi64, V);
        for (int v = 0; v < V; v++) {   /* lanes (a_l | b_l << 32), (c_l | d_l << 32), in order */
            const __m512i ab = _mm512_mask_blend_epi32(0xAAAA, a[v], _mm512_slli_epi64(b[v], 32));
            const __m512i cd = _mm512_mask_blend_epi32(0xAAAA, c[v], _mm512_slli_epi64(d[v], 32));
            uint16_t *out = r + 8 * (size_t)(q + 8 * v);
            _mm512_storeu_si512(out, _mm512_permutex2var_epi64(ab, first, cd));
            _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi64(ab, second, cd));
        }
    }
}
#endif

typedef void (*groups_fn)(uint16_t *, uint64_t, int, uint32_t, uint32_t, uint32_t, uint32_t);

static struct {
    const char *name;
    groups_fn fn;
} g_impl = {"scalar", groups_scalar};

static int supported(const char *name)
{
    if (!strcmp(name, "scalar")) return 1;
#if defined(FASTMERGE_TARGET_CLONES) && defined(__x86_64__)
    __builtin_cpu_init();
    if (!strcmp(name, "avx2")) return __builtin_cpu_supports("avx2");
    if (!strcmp(name, "avx512")) return __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

int fm_philox_use(const char *name)
{
    if (!supported(name)) return -1;
#if defined(FASTMERGE_TARGET_CLONES) && defined(__x86_64__)
    if (!strcmp(name, "avx512")) g_impl.fn = groups_avx512, g_impl.name = "avx512";
    else if (!strcmp(name, "avx2")) g_impl.fn = groups_avx2, g_impl.name = "avx2";
    else
#endif
        g_impl.fn = groups_scalar, g_impl.name = "scalar";
    return 0;
}

void fm_philox_init(void)
{
    if (fm_philox_use("avx512") != 0 && fm_philox_use("avx2") != 0) fm_philox_use("scalar");
}

const char *fm_philox_variant(void) { return g_impl.name; }

void fm_philox_halves(uint16_t *r, uint64_t q0, int ng, uint32_t k0, uint32_t k1,
                      uint32_t model, uint32_t stream)
{
    g_impl.fn(r, q0, ng, k0, k1, model, stream);
}
