// Dequantize repacked tiles to bf16, fp16 or f32 rows (the prefill GEMM's weight tiles).
#pragma once

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>

#include "qtypes.h"

namespace fq {

enum OutKind { OUT_BF16 = 0, OUT_F16 = 1, OUT_F32 = 2 };

// 16 values to out[row * ldo + col ..] as bf16 (round to nearest even), fp16 or f32
template <int KIND>
inline void store16(void* out, int64_t row, int64_t col, int64_t ldo, VF w) {
    const int64_t i = row * ldo + col;
    if constexpr (KIND == OUT_F32) {
        f_store((float*)out + i, w);
        return;
    }
    uint16_t* o = (uint16_t*)out + i;
#if FQ_AVX512
    if constexpr (KIND == OUT_F16) {
        _mm256_storeu_si256((__m256i*)o, _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m512i u = _mm512_castps_si512(w);
        const __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        _mm256_storeu_si256((__m256i*)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16)));
    }
#else
    if constexpr (KIND == OUT_F16) {
        _mm_storeu_si128((__m128i*)o, _mm256_cvtps_ph(w.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i*)o + 1, _mm256_cvtps_ph(w.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        auto half = [](__m256 f) {
            const __m256i u = _mm256_castps_si256(f);
            const __m256i r = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
            return _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
        };
        const __m256i p = _mm256_packus_epi32(half(w.a), half(w.b));  // lanes a0-3 b0-3 a4-7 b4-7
        _mm256_storeu_si256((__m256i*)o, _mm256_permute4x64_epi64(p, 0xD8));
    }
#endif
}

#if FQ_AVX512

// Rows [n0, n1) (n0 a multiple of 16) to out[(n - n0) * ldo + k] (OutKind): per sub-block, the quads' code vectors
// (16 rows x 4 codes) are transposed into 16-code runs per row, then w = scale * code + (min - scale * OFF).
template <class T, int KIND>
void dequant_groups(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, void* out, int64_t ldo) {
    const int64_t nb = K / T::QK;
    const __m512 off = _mm512_set1_ps((float)T::OFF);
    // byte 16 * L + j of a 4-row vector -> dword j: row L's 16 codes as zero-extended dwords
    alignas(64) static const uint8_t spread[4][64] = {
#define FQ_SPREAD(L)                                                                                   \
    {16 * L + 0,  0, 0, 0, 16 * L + 1,  0, 0, 0, 16 * L + 2,  0, 0, 0, 16 * L + 3,  0, 0, 0,          \
     16 * L + 4,  0, 0, 0, 16 * L + 5,  0, 0, 0, 16 * L + 6,  0, 0, 0, 16 * L + 7,  0, 0, 0,          \
     16 * L + 8,  0, 0, 0, 16 * L + 9,  0, 0, 0, 16 * L + 10, 0, 0, 0, 16 * L + 11, 0, 0, 0,          \
     16 * L + 12, 0, 0, 0, 16 * L + 13, 0, 0, 0, 16 * L + 14, 0, 0, 0, 16 * L + 15, 0, 0, 0}
        FQ_SPREAD(0), FQ_SPREAD(1), FQ_SPREAD(2), FQ_SPREAD(3)
#undef FQ_SPREAD
    };
    const __mmask64 low_bytes = 0x1111111111111111ull;
    for (int64_t g = n0 / R; g * R < n1; g++) {
        const int rows = (int)std::min<int64_t>(R, n1 - g * R);
        const uint8_t* tile = W + g * nb * R * T::BS;
        for (int64_t b = 0; b < nb; b++, tile += R * T::BS) {
            alignas(64) __m512i q[T::SUB / 4];
            T::visit(
                tile, [&](int t, __m512i c) { q[t % (T::SUB / 4)] = c; },
                [&](int j, __m512 scale, __m512 mn) {
                    alignas(64) float sc[16], mv[16];
                    _mm512_store_ps(sc, scale);
                    _mm512_store_ps(mv, _mm512_fnmadd_ps(scale, off, mn));
                    for (int u = 0; u < T::SUB / 16; u++) {  // 16 elements = 4 quads
                        const __m512i a = _mm512_unpacklo_epi32(q[4 * u], q[4 * u + 1]);
                        const __m512i bq = _mm512_unpackhi_epi32(q[4 * u], q[4 * u + 1]);
                        const __m512i c = _mm512_unpacklo_epi32(q[4 * u + 2], q[4 * u + 3]);
                        const __m512i d = _mm512_unpackhi_epi32(q[4 * u + 2], q[4 * u + 3]);
                        // 128-bit lane L of rowsv[X] holds the 16 codes of row 4L + X
                        const __m512i rowsv[4] = {_mm512_unpacklo_epi64(a, c), _mm512_unpackhi_epi64(a, c),
                                                  _mm512_unpacklo_epi64(bq, d), _mm512_unpackhi_epi64(bq, d)};
                        const int64_t col = b * T::QK + j * T::SUB + 16 * u;
                        for (int L = 0; L < 4; L++) {
                            const __m512i idx = _mm512_load_si512(spread[L]);
                            for (int X = 0; X < 4; X++) {
                                const int r = 4 * L + X;
                                if (r >= rows) break;
                                const __m512i c32 = _mm512_maskz_permutexvar_epi8(low_bytes, idx, rowsv[X]);
                                const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c32), _mm512_set1_ps(sc[r]),
                                                                 _mm512_set1_ps(mv[r]));
                                store16<KIND>(out, g * R - n0 + r, col, ldo, w);
                            }
                        }
                    }
                });
        }
    }
}

#else
// Rows [n0, n1) (n0 a multiple of 16) to out[(n - n0) * ldo + k] (OutKind): row r's 16 codes of 4 quads are
// dword r of each quad's code vector.
template <class T, int KIND>
void dequant_groups(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, void* out, int64_t ldo) {
    constexpr int QPS = T::SUB / 4;
    const int64_t nb = K / T::QK;
    for (int64_t g = n0 / R; g * R < n1; g++) {
        const int rows = (int)std::min<int64_t>(R, n1 - g * R);
        const uint8_t* tile = W + g * nb * R * T::BS;
        for (int64_t b = 0; b < nb; b++, tile += R * T::BS) {
            alignas(64) uint32_t q[QPS][R];
            T::visit(
                tile, [&](int t, VI c) { v_store(q[t % QPS], c); },
                [&](int j, VF scale, VF mn) {
                    alignas(64) float sc[16], mv[16];
                    f_store(sc, scale);
                    f_store(mv, mn);
                    for (int r = 0; r < rows; r++) {
                        const VF s = f_set1(sc[r]), m = f_set1(std::fma(-sc[r], (float)T::OFF, mv[r]));
                        for (int u = 0; u < T::SUB / 16; u++) {
                            alignas(16) const uint32_t codes[4] = {q[4 * u][r], q[4 * u + 1][r], q[4 * u + 2][r], q[4 * u + 3][r]};
                            store16<KIND>(out, g * R - n0 + r, b * T::QK + j * T::SUB + 16 * u, ldo,
                                          f_fma(f_from(v_u8to32(codes)), s, m));
                        }
                    }
                });
        }
    }
}
#endif

template <class T, int KIND>
void dequant(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, void* out, int64_t ldo) {
    const int64_t g0 = n0 / R, g1 = (n1 + R - 1) / R, chunk = chunk_groups(g1 - g0);
    const int64_t es = KIND == OUT_F32 ? 4 : 2;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < (g1 - g0 + chunk - 1) / chunk; c++) {
        const int64_t a = g0 + c * chunk, b = std::min(g1, a + chunk);
        const int64_t r0 = std::max(n0, a * R), r1 = std::min(n1, b * R);
        dequant_groups<T, KIND>(W, r0, r1, K, (uint8_t*)out + (r0 - n0) * ldo * es, ldo);
    }
}

}  // namespace fq
