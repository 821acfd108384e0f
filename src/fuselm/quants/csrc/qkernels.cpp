// fuselm CPU kernels for matmuls on GGML block-quantized weights (AVX-512 VNNI/VBMI or AVX2; OpenMP).
//
// Layout. At load, each weight is repacked once into 16-row interleaved tiles (qtypes.h): for every group of
// 16 rows and every ggml block along K, one tile of 16 * block_bytes bytes (the same size as the 16 original
// blocks). Rows are padded with zero rows to a multiple of 16.
//
// Decode (few activation rows): each activation row is quantized to 16 bits per element, per block of 32:
// x ~= d_a * (h + l/256) with h, l int8. Broadcasting four h (or l) values against a code vector, one VNNI
// vpdpbusd (AVX2: maddubs + madd) accumulates 64 products for 16 weight rows at once; scales, offsets and mins
// are applied per sub-block in float32. The error is ~2^-16 of each 32-block's largest |x|, far below
// llama.cpp's 8-bit activations. Every activation row is computed by the same sequence of operations whatever
// the number of rows M, so row i of an M-row call equals the 1-row call on that row bit for bit; all M rows
// are served from one read of each weight tile.
//
// Prefill (many rows): fq_dequant decodes rows to fp16, bf16 or f32 for a GEMM in torch.
//
// simd.h picks the vector width at compile time: AVX-512 F/BW/VL/VNNI/VBMI, else AVX2 + FMA + F16C
// (FQ_FORCE_AVX2 forces the latter, for tests on AVX-512 machines).

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>

#include "dequant.h"
#include "qtypes.h"

namespace {

using namespace fq;

// ------------------------------------------------------------------------------------------------ repack

template <class T>
void repack(const uint8_t* W, int64_t N, int64_t K, uint8_t* out) {
    const int64_t nb = K / T::QK, rb = nb * T::BS, groups = (N + R - 1) / R;
    static const uint8_t zero[T::BS] = {};
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t* src[R];
        for (int64_t b = 0; b < nb; b++) {
            for (int r = 0; r < R; r++) {
                const int64_t n = g * R + r;
                src[r] = n < N ? W + n * rb + b * T::BS : zero;
            }
            T::repack(src, out + (g * nb + b) * R * T::BS);
        }
    }
}

// ------------------------------------------------------------------------------------------------ activations

// x [M, K] (f32 or bf16) -> per row: h, l int8 [K]; dal f32 [K/32] = d_a / 256; so int32 [K/SUB] = OFF * sum of
// (256 h + l) over the sub-block; xs f32 [K/SUB] = sum of x~ over the sub-block (for mins).
struct Act {
    int8_t* h;
    int8_t* l;
    float* dal;
    int32_t* so;
    float* xs;
    int64_t stride;  // bytes between rows
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

uint8_t* scratch(size_t bytes) {
    static thread_local uint8_t* buf = nullptr;
    static thread_local size_t cap = 0;
    if (bytes > cap) {
        free(buf);
        cap = (size_t)round_up((int64_t)bytes, 1 << 16);
        buf = (uint8_t*)aligned_alloc(64, cap);
    }
    return buf;
}

Act act_layout(int64_t M, int64_t K, int sub) {
    const int64_t ns = K / sub;
    const int64_t stride = round_up(2 * K + 4 * (K / 32) + 8 * ns, 64);
    uint8_t* base = scratch(stride * M);
    return Act{(int8_t*)base, (int8_t*)base + K, (float*)(base + 2 * K), (int32_t*)(base + 2 * K + 4 * (K / 32)),
               (float*)(base + 2 * K + 4 * (K / 32) + 4 * ns), stride};
}

// one 32-block's sums of (256 h + l), halves j = 0, 1 -> so, xs
inline void put_sums(const Act& a, int64_t m, int64_t b, const int32_t* s16, int off, int sub) {
    float* dal = (float*)((uint8_t*)a.dal + m * a.stride);
    int32_t* so = (int32_t*)((uint8_t*)a.so + m * a.stride);
    float* xs = (float*)((uint8_t*)a.xs + m * a.stride);
    if (sub == 16) {
        for (int j = 0; j < 2; j++) so[2 * b + j] = off * s16[j], xs[2 * b + j] = (float)s16[j] * dal[b];
    } else {
        so[b] = off * (s16[0] + s16[1]);
        xs[b] = (float)(s16[0] + s16[1]) * dal[b];
    }
}

#if FQ_AVX512
inline __m512 load_x16(const void* x, int bf16, int64_t i) {
    if (bf16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_loadu_ps((const float*)x + i);
}

Act prep(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx, int off, int sub) {
    const Act a = act_layout(M, K, sub);
    const int64_t stride = a.stride;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 c127 = _mm512_set1_ps(127.f), cm127 = _mm512_set1_ps(-127.f), c256 = _mm512_set1_ps(256.f);
    for (int64_t m = 0; m < M; m++) {
        const void* xr = bf16 ? (const void*)((const uint16_t*)x + m * ldx) : (const void*)((const float*)x + m * ldx);
        int8_t* h = a.h + m * stride;
        int8_t* l = a.l + m * stride;
        float* dal = (float*)((uint8_t*)a.dal + m * stride);
        for (int64_t b = 0; b < K / 32; b++) {
            const __m512 x0 = load_x16(xr, bf16, 32 * b), x1 = load_x16(xr, bf16, 32 * b + 16);
            const float amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
            const float d = amax / 127.f;
            const __m512 vid = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            dal[b] = d * (1.f / 256.f);
            int32_t s16[2];
            for (int j = 0; j < 2; j++) {
                const __m512 t = _mm512_mul_ps(j ? x1 : x0, vid);
                const __m512 hh = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512 ll = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, hh), c256),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                ll = _mm512_min_ps(_mm512_max_ps(ll, cm127), c127);
                const __m512i hi = _mm512_cvtps_epi32(hh), li = _mm512_cvtps_epi32(ll);
                _mm_storeu_si128((__m128i*)(h + 32 * b + 16 * j), _mm512_cvtsepi32_epi8(hi));
                _mm_storeu_si128((__m128i*)(l + 32 * b + 16 * j), _mm512_cvtsepi32_epi8(li));
                s16[j] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), li));
            }
            put_sums(a, m, b, s16, off, sub);
        }
    }
    return a;
}
#else
// The same rounding on 8-lane AVX2 vectors: identical h, l, sums (nearest-even rounding, as nearbyint and the
// AVX-512 roundscale).
inline __m256 load_x8(const void* x, int bf16, int64_t i) {
    if (bf16) {
        const __m128i v = _mm_loadu_si128((const __m128i*)((const uint16_t*)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    return _mm256_loadu_ps((const float*)x + i);
}

inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// four 8-lane int32 vectors (elements 0-7, 8-15, 16-23, 24-31) -> 32 int8 in element order
inline void store_bytes32(int8_t* dst, const __m256i q[4]) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)dst, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

Act prep(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx, int off, int sub) {
    const Act a = act_layout(M, K, sub);
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 c127 = _mm256_set1_ps(127.f), cm127 = _mm256_set1_ps(-127.f), c256 = _mm256_set1_ps(256.f);
    for (int64_t m = 0; m < M; m++) {
        const void* xr = bf16 ? (const void*)((const uint16_t*)x + m * ldx) : (const void*)((const float*)x + m * ldx);
        int8_t* h = a.h + m * a.stride;
        int8_t* l = a.l + m * a.stride;
        float* dal = (float*)((uint8_t*)a.dal + m * a.stride);
        for (int64_t b = 0; b < K / 32; b++) {
            __m256 xv[4];
            __m256 mx = _mm256_setzero_ps();
            for (int q = 0; q < 4; q++) {
                xv[q] = load_x8(xr, bf16, 32 * b + 8 * q);
                mx = _mm256_max_ps(mx, _mm256_and_ps(xv[q], absmask));
            }
            const float amax = reduce8<MaxOp>(mx);
            const float d = amax / 127.f;
            const __m256 vid = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            dal[b] = d * (1.f / 256.f);
            __m256i hi[4], li[4], sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int q = 0; q < 4; q++) {
                const __m256 t = _mm256_mul_ps(xv[q], vid);
                const __m256 hh = _mm256_round_ps(t, mode);
                __m256 ll = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, hh), c256), mode);
                ll = _mm256_min_ps(_mm256_max_ps(ll, cm127), c127);
                hi[q] = _mm256_cvtps_epi32(hh);
                li[q] = _mm256_cvtps_epi32(ll);
                sum[q / 2] = _mm256_add_epi32(sum[q / 2], _mm256_add_epi32(_mm256_slli_epi32(hi[q], 8), li[q]));
            }
            store_bytes32(h + 32 * b, hi);
            store_bytes32(l + 32 * b, li);
            const int32_t s16[2] = {hsum8(sum[0]), hsum8(sum[1])};
            put_sums(a, m, b, s16, off, sub);
        }
    }
    return a;
}
#endif

// ------------------------------------------------------------------------------------------------ GEMV

struct Out {  // y[m * ldy + n] = value + bias[n], f32 or bf16
    void* y;
    int64_t ldy, N;
    const float* bias;
    int bf16;
    inline void put16(int64_t m, int64_t n0, VF v) const {  // rows n0 .. n0 + 15 (clipped to N)
        const int64_t cnt = std::min<int64_t>(16, N - n0);
        if (cnt == 16 && !bf16) {
            if (bias) v = f_add(v, f_load(bias + n0));
            f_store((float*)y + m * ldy + n0, v);
            return;
        }
        alignas(64) float t[16];
        f_store(t, v);
        for (int64_t i = 0; i < cnt; i++) {
            const float f = bias ? t[i] + bias[n0 + i] : t[i];
            if (bf16) ((uint16_t*)y)[m * ldy + n0 + i] = f32_to_bf16(f);
            else ((float*)y)[m * ldy + n0 + i] = f;
        }
    }
};

// One activation row's integer dot product with the 16 weight rows over one sub-block:
// 256 * sum(code * h) + sum(code * l) per row (codes still carry OFF, except for SubDot::SIGNED).
#if FQ_AVX512
template <class T>
struct SubDot {
    static constexpr bool SIGNED = false;
    using Code = VI;
    VI h, l;
    static Code prepare(VI c) { return c; }
    void zero() { h = l = v_zero(); }
    void add(int, Code c, VI xh, VI xl) {
        h = v_dpbusd(h, c, xh);
        l = v_dpbusd(l, c, xl);
    }
    VI total() const { return v_add32(v_sll32(h, 8), l); }
};
#else
// AVX2: maddubs (pairs of byte products in int16) summed in int16 over F quads, then widened once: fewer
// instructions than widening every quad. F is what cannot overflow: F * 2 * CMAX * 127 < 2^15. Codes above 127
// (OFF = 128) would saturate maddubs, so those go signed: |code - 128| against x with the code's sign.
template <class T>
struct SubDot {
    static constexpr bool SIGNED = T::OFF == 128;
    static constexpr int QPS = T::SUB / 4, LIMIT = 32767 / (2 * 127 * (SIGNED ? 128 : T::CMAX));
    static constexpr int F = LIMIT >= 8 ? std::min(QPS, 8) : LIMIT >= 4 ? 4 : LIMIT >= 2 ? 2 : 1;
    static_assert(QPS % F == 0 && LIMIT >= 1);
    struct Code {
        __m256i u[2], q[2];  // unsigned factor; the signed codes whose sign goes onto x (SIGNED only)
    };
    __m256i h[2], l[2], s[2];
    static Code prepare(VI c) {
        Code k;
        const __m256i cv[2] = {c.a, c.b};
        for (int i = 0; i < 2; i++) {
            if constexpr (SIGNED) {
                k.q[i] = _mm256_xor_si256(cv[i], _mm256_set1_epi8((char)0x80));
                k.u[i] = _mm256_abs_epi8(k.q[i]);
            } else {
                k.u[i] = cv[i];
            }
        }
        return k;
    }
    void zero() {
        for (int i = 0; i < 2; i++) h[i] = l[i] = s[i] = _mm256_setzero_si256();
    }
    void add(int t, const Code& c, VI xh, VI xl) {
        const __m256i xhv[2] = {xh.a, xh.b}, xlv[2] = {xl.a, xl.b};
        for (int i = 0; i < 2; i++) {
            const __m256i a = SIGNED ? _mm256_sign_epi8(xhv[i], c.q[i]) : xhv[i];
            const __m256i b = SIGNED ? _mm256_sign_epi8(xlv[i], c.q[i]) : xlv[i];
            h[i] = _mm256_add_epi16(h[i], _mm256_maddubs_epi16(c.u[i], a));
            l[i] = _mm256_add_epi16(l[i], _mm256_maddubs_epi16(c.u[i], b));
        }
        if ((t % QPS + 1) % F == 0) {
            for (int i = 0; i < 2; i++) {
                s[i] = _mm256_add_epi32(s[i], _mm256_add_epi32(_mm256_madd_epi16(h[i], _mm256_set1_epi16(256)),
                                                                _mm256_madd_epi16(l[i], _mm256_set1_epi16(1))));
                h[i] = l[i] = _mm256_setzero_si256();
            }
        }
    }
    VI total() const { return VI{s[0], s[1]}; }
};
#endif

template <class T, int MR>
void gemv_groups(const uint8_t* W, int64_t g0, int64_t g1, int64_t K, const Act& a, int64_t m0, const Out& out) {
    using Dot = SubDot<T>;
    const int64_t nb = K / T::QK;
    const int8_t* hr[MR];
    const int8_t* lr[MR];
    const float* dr[MR];
    const int32_t* sr[MR];
    const float* xr[MR];
    for (int m = 0; m < MR; m++) {
        const int64_t o = (m0 + m) * a.stride;
        hr[m] = (const int8_t*)((const uint8_t*)a.h + o);
        lr[m] = (const int8_t*)((const uint8_t*)a.l + o);
        dr[m] = (const float*)((const uint8_t*)a.dal + o);
        sr[m] = (const int32_t*)((const uint8_t*)a.so + o);
        xr[m] = (const float*)((const uint8_t*)a.xs + o);
    }
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t* tile = W + g * nb * R * T::BS;
        VF acc[MR], accm[MR];
        Dot dot[MR];
        for (int m = 0; m < MR; m++) acc[m] = accm[m] = f_zero();
        for (int64_t b = 0; b < nb; b++, tile += R * T::BS) {
            const int64_t k0 = b * T::QK;
            // The tile at least 16 KiB ahead goes into L2: keeps more DRAM reads in flight than the hardware
            // prefetcher alone. Measured, 2 cores, weights streamed from DRAM: vs the next tile, Q4_0 decode +37% and
            // Q8_0 +21% on the 22-layer model (8 and 32 KiB were slower). K-quant tiles (36-53 lines) issue one
            // line per quad, spread over the tile's work: vs a burst at the tile's start, Q4_K +17%, Q5_K +23%,
            // Q6_K +28% (Q4_K_M decode +13-21%); legacy tiles (5-9 lines) keep the burst. Prefetches past the end
            // of the buffer are harmless.
            constexpr int64_t ahead = std::max<int64_t>(R * T::BS, 16384);
            constexpr bool spread = T::QK == 256;
            if constexpr (!spread)
                for (int i = 0; i < R * T::BS; i += 64) _mm_prefetch((const char*)tile + ahead + i, _MM_HINT_T1);
            for (int m = 0; m < MR; m++) dot[m].zero();
            T::visit(
                tile,
                [&](int t, VI c) {
                    if constexpr (spread)
                        for (int64_t i = 64 * t; i < R * T::BS; i += 64 * (T::QK / 4))
                            _mm_prefetch((const char*)tile + ahead + i, _MM_HINT_T1);
                    const typename Dot::Code code = Dot::prepare(c);
                    for (int m = 0; m < MR; m++) {
                        const int64_t i = k0 + 4 * t;
                        dot[m].add(t, code, v_set32((int)rd32((const uint8_t*)hr[m] + i)),
                                   v_set32((int)rd32((const uint8_t*)lr[m] + i)));
                    }
                },
                [&](int j, VF scale, VF mn) {
                    const int64_t s = (k0 + j * T::SUB) / T::SUB;
                    for (int m = 0; m < MR; m++) {
                        VI tt = dot[m].total();
                        if (T::OFF && !Dot::SIGNED) tt = v_sub32(tt, v_set32(sr[m][s]));
                        const float da = dr[m][(k0 + j * T::SUB) / 32];
                        acc[m] = f_fma(f_from(tt), f_mul(scale, f_set1(da)), acc[m]);
                        if (T::MIN) accm[m] = f_fma(mn, f_set1(xr[m][s]), accm[m]);
                        dot[m].zero();
                    }
                });
        }
        for (int m = 0; m < MR; m++) out.put16(m0 + m, g * R, f_add(acc[m], accm[m]));
    }
}

template <class T>
void linear(const uint8_t* W, int64_t N, int64_t K, const void* x, int bf16, int64_t M, int64_t ldx, const Out& out) {
    const Act a = prep(x, bf16, M, K, ldx, T::OFF, T::SUB);
    const int64_t groups = (N + R - 1) / R, chunk = chunk_groups(groups);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < (groups + chunk - 1) / chunk; c++) {
        const int64_t g0 = c * chunk, g1 = std::min(groups, g0 + chunk);
        // M <= 4: one pass; more rows: chunks of 4 rows over 4 groups at a time while their tiles are in L2
        // (<= 300 KiB at K = 5632), so the weights still come from memory once
        const int64_t step = M <= 4 ? g1 - g0 : 4;
        for (int64_t g = g0; g < g1; g += step) {
            const int64_t ge = std::min(g1, g + step);
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                switch (std::min<int64_t>(4, M - m0)) {
                    case 1: gemv_groups<T, 1>(W, g, ge, K, a, m0, out); break;
                    case 2: gemv_groups<T, 2>(W, g, ge, K, a, m0, out); break;
                    case 3: gemv_groups<T, 3>(W, g, ge, K, a, m0, out); break;
                    default: gemv_groups<T, 4>(W, g, ge, K, a, m0, out); break;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------ dense

// F16 / BF16 rows (not repacked): float32 GEMV, weights widened in registers. Each activation row's sum runs in
// the same order whatever MR is (batch invariance).
// One activation row against two weight rows at once: two DRAM streams in flight instead of one (decode is
// bandwidth-bound), each row summed in exactly dense_rows' order.
template <bool BF16>
int64_t dense_row_pairs(const uint16_t* W, int64_t n0, int64_t n1, int64_t K, const float* x, float* y) {
    const int64_t K16 = K / 16 * 16;
    if (K16 != K) return n0;  // dense_rows takes them all
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        const uint16_t* r0 = W + n * K;
        const uint16_t* r1 = r0 + K;
        VF a[2][2] = {{f_zero(), f_zero()}, {f_zero(), f_zero()}};
        for (int64_t k = 0; k < K; k += 16) {
            if ((k & 31) == 0) {
                _mm_prefetch((const char*)(r0 + k) + 4096, _MM_HINT_T1);
                _mm_prefetch((const char*)(r1 + k) + 4096, _MM_HINT_T1);
            }
            const VF xv = f_load(x + k);
            const int j = (k >> 4) & 1;
            a[0][j] = f_fma(BF16 ? f_bf16s(r0 + k) : f_halfs(r0 + k), xv, a[0][j]);
            a[1][j] = f_fma(BF16 ? f_bf16s(r1 + k) : f_halfs(r1 + k), xv, a[1][j]);
        }
        y[n] = f_sum(f_add(a[0][0], a[0][1]));
        y[n + 1] = f_sum(f_add(a[1][0], a[1][1]));
    }
    return n;
}

template <bool BF16, int MR>
void dense_rows(const uint16_t* W, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, int64_t m0,
                float* y, int64_t N) {
    const int64_t K16 = K / 16 * 16;
    if constexpr (MR == 1) n0 = dense_row_pairs<BF16>(W, n0, n1, K, x + m0 * ldx, y + m0 * N);
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t* row = W + n * K;
        VF acc[MR][2];
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = f_zero();
        for (int64_t k = 0; k < K16; k += 16) {
            if ((k & 31) == 0) _mm_prefetch((const char*)(row + k) + 4096, _MM_HINT_T1);  // 4 KiB ahead, into L2
            const VF w = BF16 ? f_bf16s(row + k) : f_halfs(row + k);
            const int j = (k >> 4) & 1;
            for (int m = 0; m < MR; m++) acc[m][j] = f_fma(w, f_load(x + (m0 + m) * ldx + k), acc[m][j]);
        }
        for (int m = 0; m < MR; m++) {
            float s = f_sum(f_add(acc[m][0], acc[m][1]));
            for (int64_t k = K16; k < K; k++) {
                uint32_t u = (uint32_t)row[k] << 16;
                float wk;
                memcpy(&wk, &u, 4);
                s += (BF16 ? wk : f16_to_f32(row[k])) * x[(m0 + m) * ldx + k];
            }
            y[(m0 + m) * N + n] = s;
        }
    }
}

template <bool BF16>
void dense_linear(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx, const Out& out) {
    float* y = (float*)scratch(sizeof(float) * (M * N + 16));  // then bias / dtype in put16
    const int64_t chunk = 16 * chunk_groups((N + 15) / 16);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < (N + chunk - 1) / chunk; c++) {
        const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            switch (std::min<int64_t>(4, M - m0)) {
                case 1: dense_rows<BF16, 1>(W, n0, n1, K, x, ldx, m0, y, N); break;
                case 2: dense_rows<BF16, 2>(W, n0, n1, K, x, ldx, m0, y, N); break;
                case 3: dense_rows<BF16, 3>(W, n0, n1, K, x, ldx, m0, y, N); break;
                default: dense_rows<BF16, 4>(W, n0, n1, K, x, ldx, m0, y, N); break;
            }
        }
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n += 16) out.put16(m, n, f_load(y + m * N + n));
}

}  // namespace

// ------------------------------------------------------------------------------------------------ C ABI
// Type ids are ggml's (GGMLQuantizationType). Functions return 0, or -1 for an unsupported type.

#define FQ_DISPATCH(TYPE, CALL)       \
    switch (TYPE) {                   \
        case 2: CALL(Q4_0); break;    \
        case 3: CALL(Q4_1); break;    \
        case 6: CALL(Q5_0); break;    \
        case 7: CALL(Q5_1); break;    \
        case 8: CALL(Q8_0); break;    \
        case 10: CALL(Q2_K); break;   \
        case 11: CALL(Q3_K); break;   \
        case 12: CALL(Q4_K); break;   \
        case 13: CALL(Q5_K); break;   \
        case 14: CALL(Q6_K); break;   \
        case 20: CALL(IQ4_NL); break; \
        default: return -1;           \
    }

extern "C" {

int fq_version() { return 6; }

// vector width the library was built for: 512 (AVX-512) or 256 (AVX2)
int fq_isa() { return FQ_AVX512 ? 512 : 256; }

int fq_tile_rows() { return R; }

// ggml rows W [N, K] -> 16-row tiles out [ceil(N / 16) * 16 * row_bytes] (rows past N are zero).
int fq_repack(int type, const uint8_t* W, int64_t N, int64_t K, uint8_t* out) {
#define FQ_REPACK(T) repack<T>(W, N, K, out)
    FQ_DISPATCH(type, FQ_REPACK)
#undef FQ_REPACK
    return 0;
}

// y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] (bias may be NULL) for n < N. W: repacked tiles (F16 / BF16:
// plain rows). x: f32 or bf16 (x_bf16 = 1), row stride ldx. y: f32 or bf16 (y_bf16 = 1), row stride ldy.
int fq_linear(int type, const uint8_t* W, int64_t N, int64_t K, const void* x, int x_bf16, int64_t M, int64_t ldx,
              void* y, int y_bf16, int64_t ldy, const float* bias) {
    const Out out{y, ldy, N, bias, y_bf16};
    if (type == 1 || type == 30) {
        const float* xf = (const float*)x;
        if (x_bf16) {  // widen once: the GEMV reads x for every row
            float* buf = (float*)aligned_alloc(64, (size_t)round_up(sizeof(float) * M * K, 64));
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < K; k++) {
                    const uint32_t u = (uint32_t)((const uint16_t*)x)[m * ldx + k] << 16;
                    memcpy(buf + m * K + k, &u, 4);
                }
            if (type == 1) dense_linear<false>((const uint16_t*)W, N, K, buf, M, K, out);
            else dense_linear<true>((const uint16_t*)W, N, K, buf, M, K, out);
            free(buf);
            return 0;
        }
        if (type == 1) dense_linear<false>((const uint16_t*)W, N, K, xf, M, ldx, out);
        else dense_linear<true>((const uint16_t*)W, N, K, xf, M, ldx, out);
        return 0;
    }
#define FQ_LINEAR(T) linear<T>(W, N, K, x, x_bf16, M, ldx, out)
    FQ_DISPATCH(type, FQ_LINEAR)
#undef FQ_LINEAR
    return 0;
}

// out[n - n0, k] (kind 0: bf16, 1: fp16, 2: f32; row stride ldo elements) = dequantized W[n, k] for n in
// [n0, n1); W: repacked tiles, n0 a multiple of 16.
int fq_dequant(int type, const uint8_t* W, int64_t n0, int64_t n1, int64_t K, void* out, int64_t ldo, int kind) {
    if (n0 % R) return -2;
    if (kind < 0 || kind > 2) return -3;
#define FQ_DEQ(T)                                                            \
    if (kind == OUT_F32) dequant<T, OUT_F32>(W, n0, n1, K, out, ldo);        \
    else if (kind == OUT_F16) dequant<T, OUT_F16>(W, n0, n1, K, out, ldo);   \
    else dequant<T, OUT_BF16>(W, n0, n1, K, out, ldo)
    FQ_DISPATCH(type, FQ_DEQ)
#undef FQ_DEQ
    return 0;
}
}

#include "decode_step.h"  // fq_rms_norm, fq_silu_mul, fq_decode_attend
