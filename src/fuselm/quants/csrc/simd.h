// 16-lane vectors for fuselm's kernels, on AVX-512 (one register) or AVX2 (two registers).
//
// VI is 64 bytes of integers (16 dwords / 64 bytes), VF is 16 floats. The kernels are written once against the
// functions below; FQ_AVX512 is 1 when the build targets AVX-512 F/BW/VL/VNNI/VBMI, else 0 (AVX2 + FMA + F16C).
// Integer results are identical on both; v_dpbusd on AVX2 is exact only while every pair of byte products
// fits in int16 (unsigned codes <= 127 against int8 in [-127, 127]); the GEMV's SubDot handles wider codes.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__) && defined(__F16C__) && !defined(FQ_FORCE_AVX2)
#define FQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FQ_AVX512 0
#else
#error "fuselm kernels need AVX2, FMA and F16C (Haswell, Zen or newer)"
#endif

namespace fq {

#if FQ_AVX512
using VI = __m512i;
using VF = __m512;

inline VI v_load(const void* p) { return _mm512_loadu_si512(p); }
inline void v_store(void* p, VI v) { _mm512_storeu_si512(p, v); }
inline VI v_zero() { return _mm512_setzero_si512(); }
inline VI v_set8(int c) { return _mm512_set1_epi8((char)c); }
inline VI v_set32(int c) { return _mm512_set1_epi32(c); }
inline VI v_and(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI v_or(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI v_srl16(VI a, int n) { return _mm512_srli_epi16(a, n); }
inline VI v_sll16(VI a, int n) { return _mm512_slli_epi16(a, n); }
inline VI v_srl32(VI a, int n) { return _mm512_srli_epi32(a, n); }
inline VI v_sll32(VI a, int n) { return _mm512_slli_epi32(a, n); }
inline VI v_add32(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI v_sub32(VI a, VI b) { return _mm512_sub_epi32(a, b); }
inline VI v_sub8(VI a, VI b) { return _mm512_sub_epi8(a, b); }
inline VI v_bcast128(__m128i x) { return _mm512_broadcast_i32x4(x); }
inline VI v_shuf8(VI lut, VI idx) { return _mm512_shuffle_epi8(lut, idx); }  // per 16-byte lane
inline VI v_u8to32(const void* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline VI v_i8to32(const void* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
// acc + sum of 4 byte products per dword: u unsigned bytes, s signed bytes
inline VI v_dpbusd(VI acc, VI u, VI s) { return _mm512_dpbusd_epi32(acc, u, s); }

inline VF f_zero() { return _mm512_setzero_ps(); }
inline VF f_set1(float v) { return _mm512_set1_ps(v); }
inline VF f_load(const float* p) { return _mm512_loadu_ps(p); }
inline void f_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF f_add(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF f_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF f_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF f_fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline VF f_from(VI a) { return _mm512_cvtepi32_ps(a); }
inline VF f_halfs(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline VF f_bf16s(const void* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline float f_sum(VF a) { return _mm512_reduce_add_ps(a); }
inline float f_max_lane(VF a) { return _mm512_reduce_max_ps(a); }
inline __m256 half_sum(VF a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))); }
inline VF f_max(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF f_min(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF f_div(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF f_round(VF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF f_pow2i(VF n) {  // 2^n for integral n in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#else
struct VI {
    __m256i a, b;
};
struct VF {
    __m256 a, b;
};
#define FQ_I2(EXPR_A, EXPR_B) return VI{EXPR_A, EXPR_B}
#define FQ_F2(EXPR_A, EXPR_B) return VF{EXPR_A, EXPR_B}

inline VI v_load(const void* p) { FQ_I2(_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)); }
inline void v_store(void* p, VI v) {
    _mm256_storeu_si256((__m256i*)p, v.a);
    _mm256_storeu_si256((__m256i*)p + 1, v.b);
}
inline VI v_zero() { FQ_I2(_mm256_setzero_si256(), _mm256_setzero_si256()); }
inline VI v_set8(int c) { FQ_I2(_mm256_set1_epi8((char)c), _mm256_set1_epi8((char)c)); }
inline VI v_set32(int c) { FQ_I2(_mm256_set1_epi32(c), _mm256_set1_epi32(c)); }
inline VI v_and(VI x, VI y) { FQ_I2(_mm256_and_si256(x.a, y.a), _mm256_and_si256(x.b, y.b)); }
inline VI v_or(VI x, VI y) { FQ_I2(_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)); }
inline VI v_srl16(VI x, int n) { FQ_I2(_mm256_srli_epi16(x.a, n), _mm256_srli_epi16(x.b, n)); }
inline VI v_sll16(VI x, int n) { FQ_I2(_mm256_slli_epi16(x.a, n), _mm256_slli_epi16(x.b, n)); }
inline VI v_srl32(VI x, int n) { FQ_I2(_mm256_srli_epi32(x.a, n), _mm256_srli_epi32(x.b, n)); }
inline VI v_sll32(VI x, int n) { FQ_I2(_mm256_slli_epi32(x.a, n), _mm256_slli_epi32(x.b, n)); }
inline VI v_add32(VI x, VI y) { FQ_I2(_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)); }
inline VI v_sub32(VI x, VI y) { FQ_I2(_mm256_sub_epi32(x.a, y.a), _mm256_sub_epi32(x.b, y.b)); }
inline VI v_sub8(VI x, VI y) { FQ_I2(_mm256_sub_epi8(x.a, y.a), _mm256_sub_epi8(x.b, y.b)); }
inline VI v_bcast128(__m128i x) { FQ_I2(_mm256_broadcastsi128_si256(x), _mm256_broadcastsi128_si256(x)); }
inline VI v_shuf8(VI lut, VI idx) { FQ_I2(_mm256_shuffle_epi8(lut.a, idx.a), _mm256_shuffle_epi8(lut.b, idx.b)); }
inline VI v_u8to32(const void* p) {
    const uint8_t* q = (const uint8_t*)p;
    FQ_I2(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)q)), _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8))));
}
inline VI v_i8to32(const void* p) {
    const uint8_t* q = (const uint8_t*)p;
    FQ_I2(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)), _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8))));
}
inline __m256i dp4(__m256i acc, __m256i u, __m256i s) {  // maddubs pairs (no saturation here), then pairs again
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline VI v_dpbusd(VI acc, VI u, VI s) { FQ_I2(dp4(acc.a, u.a, s.a), dp4(acc.b, u.b, s.b)); }

inline VF f_zero() { FQ_F2(_mm256_setzero_ps(), _mm256_setzero_ps()); }
inline VF f_set1(float v) { FQ_F2(_mm256_set1_ps(v), _mm256_set1_ps(v)); }
inline VF f_load(const float* p) { FQ_F2(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
inline void f_store(float* p, VF v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
}
inline VF f_add(VF x, VF y) { FQ_F2(_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)); }
inline VF f_sub(VF x, VF y) { FQ_F2(_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)); }
inline VF f_mul(VF x, VF y) { FQ_F2(_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)); }
inline VF f_fma(VF x, VF y, VF z) { FQ_F2(_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)); }
inline VF f_from(VI x) { FQ_F2(_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)); }
inline VF f_halfs(const void* p) {
    FQ_F2(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p + 1)));
}
inline __m256 bf16x8(const void* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline VF f_bf16s(const void* p) { FQ_F2(bf16x8(p), bf16x8((const uint8_t*)p + 16)); }
struct AddOp {
    static __m128 v4(__m128 a, __m128 b) { return _mm_add_ps(a, b); }
    static __m128 v1(__m128 a, __m128 b) { return _mm_add_ss(a, b); }
};
struct MaxOp {
    static __m128 v4(__m128 a, __m128 b) { return _mm_max_ps(a, b); }
    static __m128 v1(__m128 a, __m128 b) { return _mm_max_ss(a, b); }
};
// Op over the 8 lanes of s: the two 128-bit halves, then within the half
template <class Op>
inline float reduce8(__m256 s) {
    __m128 q = Op::v4(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = Op::v4(q, _mm_movehl_ps(q, q));
    q = Op::v1(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
inline float f_sum(VF x) { return reduce8<AddOp>(_mm256_add_ps(x.a, x.b)); }
inline __m256 half_sum(VF x) { return _mm256_add_ps(x.a, x.b); }
inline float f_max_lane(VF x) { return reduce8<MaxOp>(_mm256_max_ps(x.a, x.b)); }
inline VF f_max(VF x, VF y) { FQ_F2(_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)); }
inline VF f_min(VF x, VF y) { FQ_F2(_mm256_min_ps(x.a, y.a), _mm256_min_ps(x.b, y.b)); }
inline VF f_div(VF x, VF y) { FQ_F2(_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)); }
inline VF f_round(VF x) {
    FQ_F2(_mm256_round_ps(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m256 pow2i8(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline VF f_pow2i(VF n) { FQ_F2(pow2i8(n.a), pow2i8(n.b)); }  // 2^n for integral n in [-126, 127]
#undef FQ_I2
#undef FQ_F2
#endif

// the sums of four vectors' lanes, as one 4-lane vector (fewer shuffles than four f_sum)
inline __m128 f_sum4(VF a, VF b, VF c, VF d) {
    const __m256 ab = _mm256_hadd_ps(half_sum(a), half_sum(b)), cd = _mm256_hadd_ps(half_sum(c), half_sum(d));
    const __m256 s = _mm256_hadd_ps(ab, cd);  // lanes: a b c d of the low 128 bits, then of the high
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (no NaN inputs here)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

}  // namespace fq
