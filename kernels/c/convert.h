/* fp16 / bf16 <-> fp32 conversions and block load/store, written to vectorise.
 *
 * Every routine is branch-free per element (selects, not jumps), so gcc -O3 turns the
 * block loops into SIMD code. Widening (fp16/bf16 -> fp32) is exact. Narrowing rounds to
 * nearest, ties to even, exactly as IEEE 754 asks: subnormals are produced, values past
 * the largest finite number become +-inf, and NaN stays NaN (quiet, sign kept, payload
 * truncated: the behaviour of the x86 F16C / AVX512-BF16 instructions).
 *
 * Requirements: the default floating-point environment (round to nearest, no FTZ/DAZ) and
 * no -ffast-math; the fp16 narrowing relies on an fp32 addition rounding correctly.
 */
#ifndef FASTMERGE_CONVERT_H
#define FASTMERGE_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* dtype codes shared with the Python side (fastmerge._cmerge.F32 / F16 / BF16) */
enum { FM_F32 = 0, FM_F16 = 1, FM_BF16 = 2 };

static inline int fm_dtype_size(int dt) { return dt == FM_F32 ? 4 : 2; }

static inline uint32_t fm_f2u(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static inline float fm_u2f(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* fp16 -> fp32, exact. Normal numbers rebias the exponent (+112); subnormals are
 * mantissa * 2^-24 (exact in fp32); inf keeps its bits; NaN is quieted, payload kept. */
static inline float fm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;                       /* exponent and mantissa */
    uint32_t normal = (em << 13) + 0x38000000u;      /* (127 - 15) << 23 */
    uint32_t special = (em << 13) | 0x7f800000u | (em > 0x7c00u ? 0x00400000u : 0u);
    uint32_t sub = fm_f2u((float)(int32_t)em * 0x1p-24f);
    uint32_t r = em >= 0x7c00u ? special : normal;
    r = em < 0x0400u ? sub : r;
    return fm_u2f(r | sign);
}

/* bf16 -> fp32, exact: bf16 is the top half of an fp32 bit pattern. */
static inline float fm_bf16_to_f32(uint16_t h) { return fm_u2f((uint32_t)h << 16); }

/* fp32 -> fp16, round to nearest even.
 * |x| >= 2^-14: rebias and round at bit 13 by integer addition (carries into the
 *   exponent handle mantissa overflow, and values from 65520 up become inf 0x7c00);
 * |x| <  2^-14: adding 0.5f rounds |x| to a multiple of 2^-24 (the fp16 subnormal step)
 *   in the fp32 adder itself; the bits above 0.5f's are the fp16 subnormal. */
static inline uint16_t fm_f32_to_f16(float f)
{
    uint32_t x = fm_f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    uint32_t odd = (ax >> 13) & 1u;
    uint32_t normal = (ax + 0xc8000fffu + odd) >> 13;   /* -(112 << 23) + 0xfff + odd */
    uint32_t sub = fm_f2u(fm_u2f(ax) + 0.5f) - 0x3f000000u;
    uint32_t r = ax < 0x38800000u ? sub : normal;
    r = ax >= 0x47800000u ? 0x7c00u : r;                  /* >= 65536: inf */
    r = ax > 0x7f800000u ? (0x7e00u | ((ax >> 13) & 0x3ffu)) : r;  /* NaN */
    return (uint16_t)(r | sign);
}

/* fp32 -> bf16, round to nearest even (overflow carries into inf); NaN quieted. */
static inline uint16_t fm_f32_to_bf16(float f)
{
    uint32_t x = fm_f2u(f);
    uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t nan = (x >> 16) | 0x0040u;
    return (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

static inline uint64_t fm_d2u(double f) { uint64_t u; memcpy(&u, &f, sizeof u); return u; }
static inline double fm_u2d(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }

/* fp64 -> fp16, rounded once to nearest even (the fp32 routine's method, on 64 bits):
 * |x| >= 2^-14: rebias and round at bit 42 by integer addition (carries reach the
 *   exponent; from 65520 up the result is inf 0x7c00);
 * |x| <  2^-14: adding 2^28, whose ulp is 2^-24 (the fp16 subnormal step), rounds |x| in
 *   the fp64 adder itself; the low bits are then the fp16 subnormal. */
static inline uint16_t fm_f64_to_f16(double f)
{
    const uint64_t x = fm_d2u(f);
    const uint64_t ax = x & 0x7fffffffffffffffull;
    const uint64_t sign = (x >> 48) & 0x8000u;
    const uint64_t odd = (ax >> 42) & 1u;
    const uint64_t normal = ((ax + 0x1ffffffffffull + odd) >> 42) - ((uint64_t)(1023 - 15) << 10);
    const uint64_t sub = fm_d2u(fm_u2d(ax) + 0x1p28) - 0x41b0000000000000ull;   /* bits(2^28) */
    uint64_t r = ax < 0x3f10000000000000ull ? sub : normal;                       /* 2^-14 */
    r = ax >= 0x40effe0000000000ull ? 0x7c00u : r;                                /* 65520 */
    r = ax > 0x7ff0000000000000ull ? (0x7e00u | ((ax >> 42) & 0x3ffu)) : r;       /* NaN */
    return (uint16_t)(r | sign);
}

/* fp64 -> bf16, rounded once to nearest even: as fm_f64_to_f16 with bf16's 8-bit exponent
 * and 7-bit mantissa (round at bit 45; subnormals below 2^-126 by adding 2^-81, whose ulp
 * is the bf16 subnormal step 2^-133; from (2 - 2^-8)·2^127 up: inf 0x7f80). NaN: 0x7fc0. */
static inline uint16_t fm_f64_to_bf16(double f)
{
    const uint64_t x = fm_d2u(f);
    const uint64_t ax = x & 0x7fffffffffffffffull;
    const uint64_t sign = (x >> 48) & 0x8000u;
    const uint64_t odd = (ax >> 45) & 1u;
    const uint64_t normal = ((ax + 0xfffffffffffull + odd) >> 45) - ((uint64_t)(1023 - 127) << 7);
    const uint64_t sub = fm_d2u(fm_u2d(ax) + 0x1p-81) - 0x3ae0000000000000ull;  /* bits(2^-81) */
    uint64_t r = ax < 0x3810000000000000ull ? sub : normal;                       /* 2^-126 */
    r = ax >= 0x47eff00000000000ull ? 0x7f80u : r;                                /* rounds to inf */
    r = ax > 0x7ff0000000000000ull ? 0x7fc0u : r;                                 /* NaN */
    return (uint16_t)(r | sign);
}

/* dst[j] = f32(src[off + j]) for j < len */
static inline __attribute__((always_inline)) void fm_load(float *restrict dst, const void *restrict src, int dt,
                           int64_t off, int len)
{
    if (dt == FM_F32) {
        memcpy(dst, (const float *)src + off, (size_t)len * sizeof(float));
    } else if (dt == FM_F16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) dst[j] = fm_f16_to_f32(s[j]);
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) dst[j] = fm_bf16_to_f32(s[j]);
    }
}

/* dst[j] = f32(src[off + j]) - b[j]  (docs/spec.md §1: τ = f32(θ_i) − f32(θ_b), in fp32) */
static inline __attribute__((always_inline)) void fm_load_sub(float *restrict dst, const void *restrict src, int dt,
                               int64_t off, int len, const float *restrict b)
{
    if (dt == FM_F32) {
        const float *s = (const float *)src + off;
        for (int j = 0; j < len; j++) dst[j] = s[j] - b[j];
    } else if (dt == FM_F16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) dst[j] = fm_f16_to_f32(s[j]) - b[j];
    } else {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int j = 0; j < len; j++) dst[j] = fm_bf16_to_f32(s[j]) - b[j];
    }
}

/* dst[off + j] = round_dt(src[j]) for j < len */
static inline __attribute__((always_inline)) void fm_store(void *restrict dst, int dt, int64_t off,
                            const float *restrict src, int len)
{
    if (dt == FM_F32) {
        memcpy((float *)dst + off, src, (size_t)len * sizeof(float));
    } else if (dt == FM_F16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) d[j] = fm_f32_to_f16(src[j]);
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) d[j] = fm_f32_to_bf16(src[j]);
    }
}

/* dst[off + j] = round_dt(src[j]) for j < len: fp64 rounded once to nearest even */
static inline __attribute__((always_inline)) void fm_store_f64(void *restrict dst, int dt, int64_t off,
                                const double *restrict src, int len)
{
    if (dt == FM_F32) {
        float *d = (float *)dst + off;
        for (int j = 0; j < len; j++) d[j] = (float)src[j];
    } else if (dt == FM_F16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) d[j] = fm_f64_to_f16(src[j]);
    } else {
        uint16_t *d = (uint16_t *)dst + off;
        for (int j = 0; j < len; j++) d[j] = fm_f64_to_bf16(src[j]);
    }
}

#endif /* FASTMERGE_CONVERT_H */
