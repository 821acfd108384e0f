// fuselm CPU kernels for matmuls on GGML block-quantized weights (AVX-512 VNNI/VBMI/BITALG, OpenMP).
//
// The weights are read in ggml's own block layout, straight from the (possibly memory-mapped) file bytes:
// no repack, so resident memory stays at the file size.
//
// Decode (few activation rows): a GEMV that keeps the weights as integer codes and quantizes the activation
// to 16 bits per element, per block of 32: x ~= d_a * (h + l/256) with h, l int8. Two VNNI dot products
// (codes x h, codes x l) then give sum(code * x) to ~2^-16 of the block's largest |x|, far finer than
// llama.cpp's 8-bit activations. Per-group weight scales, offsets and mins are applied in float32.
//
// Prefill (many rows): `fq_dequant_bf16` decodes rows of weights to bf16 for a oneDNN/AMX GEMM in torch.
//
// Every type is described by a decoder that turns one "unit" of blocks into 64-code vectors (u8 codes in a
// type-specific element order) plus, per vector, a lane vector of scales (and mins): one float per 4 codes.
// Then w = scale * (code - OFF) + min for every element. The activation is permuted once per call into the
// same order (PERM16: which natural 16-element group sits at each 16-code slot of a unit).

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
      defined(__AVX512VBMI__) && defined(__AVX512BITALG__) && defined(__F16C__))
#error "fuselm kernels need AVX-512 F/BW/VL/VNNI/VBMI/BITALG and F16C (Ice Lake, Zen 4 or newer)"
#endif

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>

namespace {

inline float h2f(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

inline __mmask64 bytes_mask(int64_t n) {  // first n (clamped to 0..64) bytes
    if (n <= 0) return 0;
    if (n >= 64) return ~(__mmask64)0;
    return (((__mmask64)1) << n) - 1;
}

// lane L of a vector gets group value idx[L / 4] (4 lanes = 16 codes per 16-element group)
inline __m512i lane_idx(int g0, int g1, int g2, int g3) {
    return _mm512_setr_epi32(g0, g0, g0, g0, g1, g1, g1, g1, g2, g2, g2, g2, g3, g3, g3, g3);
}

// ---------------------------------------------------------------------------------------------------------
// Decoders. decode(p, nblk, c, wl, ml): p = first block of the unit, nblk = valid blocks (< BPU only in a
// row's tail: bytes past them are not read and give zero codes and zero scales).

struct Q4_0 {
    static constexpr int QK = 32, BS = 18, BPU = 4, NV = 2, OFF = 8;
    static constexpr bool MIN = false;
    static constexpr int PERM16[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    static inline void load(const uint8_t* p, int64_t nb, __m512i& r0, __m512i& r1) {  // nb bytes
        r0 = _mm512_maskz_loadu_epi8(bytes_mask(nb), p);
        r1 = _mm512_maskz_loadu_epi8(bytes_mask(nb - 64), p + 64);
    }
    static inline __m512i qs_idx(int stride, int off) {  // 4 blocks x 16 qs bytes, gathered
        alignas(64) uint8_t idx[64];
        for (int i = 0; i < 64; i++) idx[i] = (uint8_t)(stride * (i / 16) + off + i % 16);
        return _mm512_load_si512(idx);
    }
    static inline __m512i w_idx(int stride_words, int off_words) {  // lane L -> half word of block L/4
        alignas(64) uint16_t idx[32];
        for (int i = 0; i < 32; i++) idx[i] = (uint16_t)(stride_words * ((i % 16) / 4) + off_words);
        return _mm512_load_si512(idx);
    }
    static inline void nibbles(__m512i qs, __m512i* c) {
        const __m512i m4 = _mm512_set1_epi8(15);
        c[0] = _mm512_and_si512(qs, m4);
        c[1] = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m4);
    }
    static inline __m512 halfs(__m512i idx, __m512i r0, __m512i r1) {
        return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(r0, idx, r1)));
    }
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512*) {
        static const __m512i QI = qs_idx(BS, 2), DI = w_idx(BS / 2, 0);
        __m512i r0, r1;
        load(p, (int64_t)nblk * BS, r0, r1);
        nibbles(_mm512_permutex2var_epi8(r0, QI, r1), c);
        wl[0] = wl[1] = halfs(DI, r0, r1);
    }
};

struct IQ4_NL {
    static constexpr int QK = 32, BS = 18, BPU = 4, NV = 2, OFF = 128;
    static constexpr bool MIN = false;
    static constexpr int PERM16[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512* ml) {
        // kvalues_iq4nl + 128, so that codes are unsigned (OFF = 128)
        static const __m512i LUT = _mm512_broadcast_i32x4(
            _mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153, (char)166, (char)181,
                          (char)197, (char)217, (char)241));
        Q4_0::decode(p, nblk, c, wl, ml);
        c[0] = _mm512_shuffle_epi8(LUT, c[0]);
        c[1] = _mm512_shuffle_epi8(LUT, c[1]);
    }
};

struct Q4_1 {
    static constexpr int QK = 32, BS = 20, BPU = 4, NV = 2, OFF = 0;
    static constexpr bool MIN = true;
    static constexpr int PERM16[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512* ml) {
        static const __m512i QI = Q4_0::qs_idx(BS, 4), DI = Q4_0::w_idx(BS / 2, 0), MI = Q4_0::w_idx(BS / 2, 1);
        __m512i r0, r1;
        Q4_0::load(p, (int64_t)nblk * BS, r0, r1);
        Q4_0::nibbles(_mm512_permutex2var_epi8(r0, QI, r1), c);
        wl[0] = wl[1] = Q4_0::halfs(DI, r0, r1);
        ml[0] = ml[1] = Q4_0::halfs(MI, r0, r1);
    }
};

// Q5_0 / Q5_1: the fifth bit of element j of a block is bit j of its 32-bit qh.
inline __m512i qh_qwords(int stride_words, int off_words) {  // qword k <- qh of block k/2
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 32; i++) {
        const int k = i / 4, b = k / 2;
        idx[i] = (uint16_t)(stride_words * b + off_words + (i % 2));
    }
    return _mm512_load_si512(idx);
}

inline void add_fifth_bit(__m512i qh, __m512i* c) {
    alignas(64) static uint8_t sel0[64], sel1[64];
    static bool init = [] {
        for (int i = 0; i < 64; i++) sel0[i] = (uint8_t)(i % 16), sel1[i] = (uint8_t)(16 + i % 16);
        return true;
    }();
    (void)init;
    const __m512i b16 = _mm512_set1_epi8(16);
    const __mmask64 k0 = _mm512_bitshuffle_epi64_mask(qh, _mm512_load_si512(sel0));
    const __mmask64 k1 = _mm512_bitshuffle_epi64_mask(qh, _mm512_load_si512(sel1));
    c[0] = _mm512_mask_add_epi8(c[0], k0, c[0], b16);
    c[1] = _mm512_mask_add_epi8(c[1], k1, c[1], b16);
}

struct Q5_0 {
    static constexpr int QK = 32, BS = 22, BPU = 4, NV = 2, OFF = 16;
    static constexpr bool MIN = false;
    static constexpr int PERM16[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512*) {
        static const __m512i QI = Q4_0::qs_idx(BS, 6), DI = Q4_0::w_idx(BS / 2, 0), HI = qh_qwords(BS / 2, 1);
        __m512i r0, r1;
        Q4_0::load(p, (int64_t)nblk * BS, r0, r1);
        Q4_0::nibbles(_mm512_permutex2var_epi8(r0, QI, r1), c);
        add_fifth_bit(_mm512_permutex2var_epi16(r0, HI, r1), c);
        wl[0] = wl[1] = Q4_0::halfs(DI, r0, r1);
    }
};

struct Q5_1 {
    static constexpr int QK = 32, BS = 24, BPU = 4, NV = 2, OFF = 0;
    static constexpr bool MIN = true;
    static constexpr int PERM16[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512* ml) {
        static const __m512i QI = Q4_0::qs_idx(BS, 8), DI = Q4_0::w_idx(BS / 2, 0), MI = Q4_0::w_idx(BS / 2, 1),
                             HI = qh_qwords(BS / 2, 2);
        __m512i r0, r1;
        Q4_0::load(p, (int64_t)nblk * BS, r0, r1);
        Q4_0::nibbles(_mm512_permutex2var_epi8(r0, QI, r1), c);
        add_fifth_bit(_mm512_permutex2var_epi16(r0, HI, r1), c);
        wl[0] = wl[1] = Q4_0::halfs(DI, r0, r1);
        ml[0] = ml[1] = Q4_0::halfs(MI, r0, r1);
    }
};

struct Q8_0 {
    static constexpr int QK = 32, BS = 34, BPU = 2, NV = 1, OFF = 128;
    static constexpr bool MIN = false;
    static constexpr int PERM16[4] = {0, 1, 2, 3};
    static inline void decode(const uint8_t* p, int nblk, __m512i* c, __m512* wl, __m512*) {
        static const __m512i QI = [] {
            alignas(64) uint8_t idx[64];
            for (int i = 0; i < 64; i++) idx[i] = (uint8_t)(BS * (i / 32) + 2 + i % 32);
            return _mm512_load_si512(idx);
        }();
        static const __m512i DI = [] {
            alignas(64) uint16_t idx[32];
            for (int i = 0; i < 32; i++) idx[i] = (uint16_t)((BS / 2) * ((i % 16) / 8));
            return _mm512_load_si512(idx);
        }();
        const int64_t nb = (int64_t)nblk * BS;
        const __m512i r0 = _mm512_maskz_loadu_epi8(bytes_mask(nb), p);
        const __m512i r1 = _mm512_maskz_loadu_epi8(bytes_mask(nb - 64), p + 64);
        c[0] = _mm512_xor_si512(_mm512_permutex2var_epi8(r0, QI, r1), _mm512_set1_epi8((char)0x80));
        if (nblk < BPU) c[0] = _mm512_maskz_mov_epi8(bytes_mask(32 * nblk), c[0]);
        wl[0] = Q4_0::halfs(DI, r0, r1);
    }
};

// K-quants: one unit = one 256-element super-block; NV = 4 vectors of 64 codes.
constexpr int KPERM_2_3[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};
constexpr int KPERM_4_5[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
constexpr int KPERM_6[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// wl[v] from per-16-group values g[16] (natural group order), using the type's PERM16
template <const int* P, int DIV>
inline void lanes_from_groups(__m512 g, __m512* out) {
    static const __m512i I0 = lane_idx(P[0] / DIV, P[1] / DIV, P[2] / DIV, P[3] / DIV);
    static const __m512i I1 = lane_idx(P[4] / DIV, P[5] / DIV, P[6] / DIV, P[7] / DIV);
    static const __m512i I2 = lane_idx(P[8] / DIV, P[9] / DIV, P[10] / DIV, P[11] / DIV);
    static const __m512i I3 = lane_idx(P[12] / DIV, P[13] / DIV, P[14] / DIV, P[15] / DIV);
    out[0] = _mm512_permutexvar_ps(I0, g);
    out[1] = _mm512_permutexvar_ps(I1, g);
    out[2] = _mm512_permutexvar_ps(I2, g);
    out[3] = _mm512_permutexvar_ps(I3, g);
}

struct Q2_K {
    static constexpr int QK = 256, BS = 84, BPU = 1, NV = 4, OFF = 0;
    static constexpr bool MIN = true;
    static constexpr const int* PERM16 = KPERM_2_3;
    static inline void decode(const uint8_t* p, int, __m512i* c, __m512* wl, __m512* ml) {
        const __m512i m3 = _mm512_set1_epi8(3);
        const __m512i q = _mm512_loadu_si512(p + 16);
        c[0] = _mm512_and_si512(q, m3);
        c[1] = _mm512_and_si512(_mm512_srli_epi16(q, 2), m3);
        c[2] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m3);
        c[3] = _mm512_and_si512(_mm512_srli_epi16(q, 6), m3);
        const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
        const __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(s, _mm512_set1_epi32(15))),
                                        _mm512_set1_ps(h2f(p + 80)));
        const __m512 mn = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4)), _mm512_set1_ps(-h2f(p + 82)));
        lanes_from_groups<KPERM_2_3, 1>(sc, wl);
        lanes_from_groups<KPERM_2_3, 1>(mn, ml);
    }
};

struct Q3_K {
    static constexpr int QK = 256, BS = 110, BPU = 1, NV = 4, OFF = 4;
    static constexpr bool MIN = false;
    static constexpr const int* PERM16 = KPERM_2_3;
    static inline void decode(const uint8_t* p, int, __m512i* c, __m512* wl, __m512*) {
        const __m512i m3 = _mm512_set1_epi8(3), b4 = _mm512_set1_epi8(4);
        const __m512i q = _mm512_loadu_si512(p + 32);
        const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
        // vector s: codes i < 32 take hmask bit s, codes i >= 32 take bit 4 + s
        const __mmask64 lo32 = 0x00000000FFFFFFFFull;
        for (int s = 0; s < 4; s++) {
            const __m512i bit = _mm512_mask_blend_epi8(lo32, _mm512_set1_epi8((char)(1 << (4 + s))),
                                                       _mm512_set1_epi8((char)(1 << s)));
            const __m512i lo2 = s ? _mm512_and_si512(_mm512_srli_epi16(q, 2 * s), m3) : _mm512_and_si512(q, m3);
            c[s] = _mm512_mask_add_epi8(lo2, _mm512_test_epi8_mask(hm, bit), lo2, b4);
        }
        uint32_t u0, u1, u2;
        memcpy(&u0, p + 96, 4);
        memcpy(&u1, p + 100, 4);
        memcpy(&u2, p + 104, 4);
        const uint32_t k4 = 0x0F0F0F0Fu, k2 = 0x03030303u;
        const uint32_t s0 = (u0 & k4) | ((u2 & k2) << 4);
        const uint32_t s1 = (u1 & k4) | (((u2 >> 2) & k2) << 4);
        const uint32_t s2 = ((u0 >> 4) & k4) | (((u2 >> 4) & k2) << 4);
        const uint32_t s3 = ((u1 >> 4) & k4) | (((u2 >> 6) & k2) << 4);
        const __m512i sv = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_setr_epi32((int)s0, (int)s1, (int)s2, (int)s3)),
                                            _mm512_set1_epi32(32));
        lanes_from_groups<KPERM_2_3, 1>(_mm512_mul_ps(_mm512_cvtepi32_ps(sv), _mm512_set1_ps(h2f(p + 108))), wl);
    }
};

// Q4_K / Q5_K 6-bit scales and mins: 16 floats [d*sc0..7, -dmin*m0..7]
inline __m512 k4_scales(const uint8_t* p) {
    uint32_t u0, u1, u2;
    memcpy(&u0, p + 4, 4);
    memcpy(&u1, p + 8, 4);
    memcpy(&u2, p + 12, 4);
    const uint32_t k6 = 0x3F3F3F3Fu, k4 = 0x0F0F0F0Fu, k2 = 0x03030303u;
    const uint32_t sc03 = u0 & k6, m03 = u1 & k6;
    const uint32_t sc47 = (u2 & k4) | (((u0 >> 6) & k2) << 4);
    const uint32_t m47 = ((u2 >> 4) & k4) | (((u1 >> 6) & k2) << 4);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_setr_epi32((int)sc03, (int)sc47, (int)m03, (int)m47));
    const __m512 dm = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(h2f(p)), _mm512_set1_ps(-h2f(p + 2)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(v), dm);
}

template <const int* P>
inline void k4_lanes(__m512 g, __m512* wl, __m512* ml) {  // g = [sc x8, min x8] per 32-element sub-block
    static const __m512i I0 = lane_idx(P[0] / 2, P[1] / 2, P[2] / 2, P[3] / 2);
    static const __m512i I1 = lane_idx(P[4] / 2, P[5] / 2, P[6] / 2, P[7] / 2);
    static const __m512i I2 = lane_idx(P[8] / 2, P[9] / 2, P[10] / 2, P[11] / 2);
    static const __m512i I3 = lane_idx(P[12] / 2, P[13] / 2, P[14] / 2, P[15] / 2);
    const __m512i e8 = _mm512_set1_epi32(8);
    wl[0] = _mm512_permutexvar_ps(I0, g);
    wl[1] = _mm512_permutexvar_ps(I1, g);
    wl[2] = _mm512_permutexvar_ps(I2, g);
    wl[3] = _mm512_permutexvar_ps(I3, g);
    ml[0] = _mm512_permutexvar_ps(_mm512_add_epi32(I0, e8), g);
    ml[1] = _mm512_permutexvar_ps(_mm512_add_epi32(I1, e8), g);
    ml[2] = _mm512_permutexvar_ps(_mm512_add_epi32(I2, e8), g);
    ml[3] = _mm512_permutexvar_ps(_mm512_add_epi32(I3, e8), g);
}

struct Q4_K {
    static constexpr int QK = 256, BS = 144, BPU = 1, NV = 4, OFF = 0;
    static constexpr bool MIN = true;
    static constexpr const int* PERM16 = KPERM_4_5;
    static inline void decode(const uint8_t* p, int, __m512i* c, __m512* wl, __m512* ml) {
        const __m512i m4 = _mm512_set1_epi8(15);
        const __m512i a = _mm512_loadu_si512(p + 16), b = _mm512_loadu_si512(p + 80);
        c[0] = _mm512_and_si512(a, m4);
        c[1] = _mm512_and_si512(_mm512_srli_epi16(a, 4), m4);
        c[2] = _mm512_and_si512(b, m4);
        c[3] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
        k4_lanes<KPERM_4_5>(k4_scales(p), wl, ml);
    }
};

struct Q5_K {
    static constexpr int QK = 256, BS = 176, BPU = 1, NV = 4, OFF = 0;
    static constexpr bool MIN = true;
    static constexpr const int* PERM16 = KPERM_4_5;
    static inline void decode(const uint8_t* p, int, __m512i* c, __m512* wl, __m512* ml) {
        const __m512i m4 = _mm512_set1_epi8(15), b16 = _mm512_set1_epi8(16);
        const __m512i a = _mm512_loadu_si512(p + 48), b = _mm512_loadu_si512(p + 112);
        const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 16)));
        const __mmask64 lo32 = 0x00000000FFFFFFFFull;
        c[0] = _mm512_and_si512(a, m4);
        c[1] = _mm512_and_si512(_mm512_srli_epi16(a, 4), m4);
        c[2] = _mm512_and_si512(b, m4);
        c[3] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
        // vector v: codes i < 32 are chunk 2*(v/2) (qh bit 2*chunk + v%2 ... see qh layout), i >= 32 the next chunk
        for (int v = 0; v < 4; v++) {
            const int chunk = 2 * (v / 2), hi = v % 2;
            const __m512i bit = _mm512_mask_blend_epi8(lo32, _mm512_set1_epi8((char)(1 << (2 * (chunk + 1) + hi))),
                                                       _mm512_set1_epi8((char)(1 << (2 * chunk + hi))));
            c[v] = _mm512_mask_add_epi8(c[v], _mm512_test_epi8_mask(h, bit), c[v], b16);
        }
        k4_lanes<KPERM_4_5>(k4_scales(p), wl, ml);
    }
};

struct Q6_K {
    static constexpr int QK = 256, BS = 210, BPU = 1, NV = 4, OFF = 32;
    static constexpr bool MIN = false;
    static constexpr const int* PERM16 = KPERM_6;
    static inline void decode(const uint8_t* p, int, __m512i* c, __m512* wl, __m512*) {
        const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
        // word shifts: words 0..15 (codes 0..31) and 16..31 (codes 32..63)
        const __m512i shl = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(4), _mm512_set1_epi16(2));
        const __m512i shr = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(0), _mm512_set1_epi16(2));
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(p + 64 * h);
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(p + 128 + 32 * h)));
            const __m512i lo = _mm512_and_si512(ql, m4), hi = _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4);
            c[2 * h] = _mm512_ternarylogic_epi32(lo, _mm512_sllv_epi16(qh, shl), m30, 0xF8);
            c[2 * h + 1] = _mm512_ternarylogic_epi32(hi, _mm512_srlv_epi16(qh, shr), m30, 0xF8);
        }
        const __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 192)))),
                                        _mm512_set1_ps(h2f(p + 208)));
        lanes_from_groups<KPERM_6, 1>(sc, wl);
    }
};

// ---------------------------------------------------------------------------------------------------------
// Activation preparation: x [M, K] (f32 or bf16) -> per row, in the type's unit order, padded to Kp:
//   h, l int8 [Kp]; dal f32 [Kp/4] = d_a / 256 of each lane's block; so i32 [Kp/4] = OFF * sum over the lane
//   of (256 h + l); sf f32 [Kp/4] = the lane's sum of x~ (for mins).

struct Act {
    int64_t kp;  // padded K
    int8_t* h;
    int8_t* l;
    float* dal;
    int32_t* so;
    float* sf;
    int64_t stride;  // bytes per row of the scratch
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

struct Out {  // y[m * ldy + n] = value + bias[n], stored as f32 or bf16
    void* y;
    int64_t ldy;
    const float* bias;
    int bf16;
    inline void put(int64_t m, int64_t n, float v) const {
        if (bias) v += bias[n];
        if (bf16) ((uint16_t*)y)[m * ldy + n] = f32_to_bf16(v);
        else ((float*)y)[m * ldy + n] = v;
    }
};

uint8_t* scratch(size_t bytes) {
    static thread_local uint8_t* buf = nullptr;
    static thread_local size_t cap = 0;
    if (bytes > cap) {
        free(buf);
        cap = round_up((int64_t)bytes, 1 << 16);
        buf = (uint8_t*)aligned_alloc(64, cap);
    }
    return buf;
}

inline __m512 load_x16(const void* x, int bf16, int64_t i) {
    if (bf16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_loadu_ps((const float*)x + i);
}

template <class T>
Act prep(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx) {
    constexpr int U = T::QK * T::BPU;
    const int64_t kp = round_up(K, U);
    const int64_t stride = round_up(kp * 2 + (kp / 4) * 12, 64);
    // natural-order h, l and block scales live after the per-row areas
    uint8_t* base = scratch(stride * M + kp * 2 + (kp / 32) * 4 + 64);
    Act a{kp, (int8_t*)base, (int8_t*)base + kp, (float*)(base + 2 * kp), (int32_t*)(base + 2 * kp + kp),
          (float*)(base + 2 * kp + 2 * kp), stride};
    int8_t* hn = (int8_t*)(base + stride * M);
    int8_t* ln = hn + kp;
    float* dblk = (float*)(ln + kp);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 c127 = _mm512_set1_ps(127.f), cm127 = _mm512_set1_ps(-127.f), c256 = _mm512_set1_ps(256.f);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t m = 0; m < M; m++) {
        const void* xr = bf16 ? (const void*)((const uint16_t*)x + m * ldx) : (const void*)((const float*)x + m * ldx);
        for (int64_t b = 0; b < kp / 32; b++) {
            if (b * 32 >= K) {
                memset(hn + b * 32, 0, 32);
                memset(ln + b * 32, 0, 32);
                dblk[b] = 0.f;
                continue;
            }
            const __m512 x0 = load_x16(xr, bf16, b * 32), x1 = load_x16(xr, bf16, b * 32 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            dblk[b] = amax / 127.f;
            const __m512 vid = _mm512_set1_ps(id);
            for (int j = 0; j < 2; j++) {
                const __m512 t = _mm512_mul_ps(j ? x1 : x0, vid);
                const __m512 hh = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512 ll = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, hh), c256),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                ll = _mm512_min_ps(_mm512_max_ps(ll, cm127), c127);
                _mm_storeu_si128((__m128i*)(hn + b * 32 + 16 * j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hh)));
                _mm_storeu_si128((__m128i*)(ln + b * 32 + 16 * j), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(ll)));
            }
        }
        int8_t* h = a.h + m * stride;
        int8_t* l = a.l + m * stride;
        float* dal = (float*)((uint8_t*)a.dal + m * stride);
        int32_t* so = (int32_t*)((uint8_t*)a.so + m * stride);
        float* sf = (float*)((uint8_t*)a.sf + m * stride);
        for (int64_t u = 0; u < kp / U; u++) {
            for (int g = 0; g < U / 16; g++) {
                const int64_t src = u * U + 16 * T::PERM16[g], dst = u * U + 16 * g;
                _mm_storeu_si128((__m128i*)(h + dst), _mm_loadu_si128((const __m128i*)(hn + src)));
                _mm_storeu_si128((__m128i*)(l + dst), _mm_loadu_si128((const __m128i*)(ln + src)));
                const float d = dblk[src / 32] * (1.f / 256.f);
                _mm_storeu_ps(dal + dst / 4, _mm_set1_ps(d));
            }
        }
        for (int64_t i = 0; i < kp; i += 64) {
            const __m512i sh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(h + i));
            const __m512i sl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(l + i));
            const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(sh, 8), sl);
            _mm512_storeu_si512(so + i / 4, _mm512_mullo_epi32(s, _mm512_set1_epi32(T::OFF)));
            _mm512_storeu_ps(sf + i / 4, _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(dal + i / 4)));
        }
    }
    return a;
}

// ---------------------------------------------------------------------------------------------------------
// GEMV over rows [n0, n1) for MR (1..4) activation rows.

template <class T, int MR>
void gemv_rows(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, const Act& a, int64_t m0,
               const Out& out) {
    constexpr int U = T::QK * T::BPU;
    const int64_t nblocks = K / T::QK, nunits = (nblocks + T::BPU - 1) / T::BPU;
    const int8_t* hr[MR];
    const int8_t* lr[MR];
    const float* dr[MR];
    const int32_t* sr[MR];
    const float* fr[MR];
    for (int m = 0; m < MR; m++) {
        const int64_t o = (m0 + m) * a.stride;
        hr[m] = (const int8_t*)((const uint8_t*)a.h + o);
        lr[m] = (const int8_t*)((const uint8_t*)a.l + o);
        dr[m] = (const float*)((const uint8_t*)a.dal + o);
        sr[m] = (const int32_t*)((const uint8_t*)a.so + o);
        fr[m] = (const float*)((const uint8_t*)a.sf + o);
    }
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* row = W + n * row_bytes;
        __m512 acc[MR][T::NV], accm[MR];
        for (int m = 0; m < MR; m++) {
            accm[m] = _mm512_setzero_ps();
            for (int v = 0; v < T::NV; v++) acc[m][v] = _mm512_setzero_ps();
        }
        for (int64_t u = 0; u < nunits; u++) {
            const int nblk = (int)std::min<int64_t>(T::BPU, nblocks - u * T::BPU);
            __m512i c[T::NV];
            __m512 wl[T::NV], ml[T::NV];
            T::decode(row + u * T::BPU * T::BS, nblk, c, wl, ml);
            for (int v = 0; v < T::NV; v++) {
                const int64_t pos = u * U + 64 * v;
                for (int m = 0; m < MR; m++) {
                    const __m512i ah = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[v], _mm512_loadu_si512(hr[m] + pos));
                    const __m512i al = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[v], _mm512_loadu_si512(lr[m] + pos));
                    __m512i t = _mm512_add_epi32(_mm512_slli_epi32(ah, 8), al);
                    if (T::OFF) t = _mm512_sub_epi32(t, _mm512_loadu_si512(sr[m] + pos / 4));
                    acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(wl[v], _mm512_loadu_ps(dr[m] + pos / 4)),
                                                acc[m][v]);
                    if (T::MIN) accm[m] = _mm512_fmadd_ps(_mm512_loadu_ps(fr[m] + pos / 4), ml[v], accm[m]);
                }
            }
        }
        for (int m = 0; m < MR; m++) {
            __m512 s = accm[m];
            for (int v = 0; v < T::NV; v++) s = _mm512_add_ps(s, acc[m][v]);
            out.put(m0 + m, n, _mm512_reduce_add_ps(s));
        }
    }
}

template <class T>
void linear(const uint8_t* W, int64_t N, int64_t K, int64_t row_bytes, const void* x, int bf16, int64_t M,
            int64_t ldx, const Out& out) {
    const Act a = prep<T>(x, bf16, M, K, ldx);
    const int nt = omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
        const int64_t n0 = N * t / T_, n1 = N * (t + 1) / T_;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            switch (std::min<int64_t>(4, M - m0)) {
                case 1: gemv_rows<T, 1>(W, row_bytes, n0, n1, K, a, m0, out); break;
                case 2: gemv_rows<T, 2>(W, row_bytes, n0, n1, K, a, m0, out); break;
                case 3: gemv_rows<T, 3>(W, row_bytes, n0, n1, K, a, m0, out); break;
                default: gemv_rows<T, 4>(W, row_bytes, n0, n1, K, a, m0, out); break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Dequantize rows to bf16 (natural order): w = wl * (code - OFF) + ml.

inline __m256i to_bf16(__m512 w) {  // round to nearest even
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(w);
#else
    const __m512i u = _mm512_castps_si512(w);
    const __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16));
#endif
}

template <class T>
void dequant_rows(const uint8_t* W, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, uint16_t* out, int64_t ldo) {
    constexpr int U = T::QK * T::BPU;
    const int64_t nblocks = K / T::QK, nunits = (nblocks + T::BPU - 1) / T::BPU;
    const __m512 off = _mm512_set1_ps((float)T::OFF);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* row = W + n * row_bytes;
        uint16_t* o = out + (n - n0) * ldo;
        for (int64_t u = 0; u < nunits; u++) {
            const int nblk = (int)std::min<int64_t>(T::BPU, nblocks - u * T::BPU);
            __m512i c[T::NV];
            __m512 wl[T::NV], ml[T::NV];
            T::decode(row + u * T::BPU * T::BS, nblk, c, wl, ml);
            const int ngroups = (int)std::min<int64_t>(U / 16, (K - u * U) / 16);
            for (int v = 0; v < T::NV; v++) {
                for (int g = 0; g < 4; g++) {
                    const int slot = 4 * v + g;
                    const int dst = T::PERM16[slot];
                    if (dst >= ngroups) continue;
                    const __m512i gi = _mm512_set1_epi32(4 * g);
                    __m128i c16;
                    switch (g) {
                        case 0: c16 = _mm512_extracti32x4_epi32(c[v], 0); break;
                        case 1: c16 = _mm512_extracti32x4_epi32(c[v], 1); break;
                        case 2: c16 = _mm512_extracti32x4_epi32(c[v], 2); break;
                        default: c16 = _mm512_extracti32x4_epi32(c[v], 3); break;
                    }
                    const __m512 qf = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c16)), off);
                    __m512 w = _mm512_mul_ps(qf, _mm512_permutexvar_ps(gi, wl[v]));
                    if (T::MIN) w = _mm512_add_ps(w, _mm512_permutexvar_ps(gi, ml[v]));
                    _mm256_storeu_si256((__m256i*)(o + u * U + 16 * dst), to_bf16(w));
                }
            }
        }
    }
}

template <class T>
void dequant(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, int64_t row_bytes, uint16_t* out, int64_t ldo) {
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
        const int64_t rows = n1 - n0;
        const int64_t a = n0 + rows * t / T_, b = n0 + rows * (t + 1) / T_;
        dequant_rows<T>(W, row_bytes, a, b, K, out + (a - n0) * ldo, ldo);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Dense F16 / BF16 weights: exact float32 GEMV (weights widened in registers).

template <bool BF16, int MR>
void dense_rows(const uint16_t* W, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, int64_t m0,
                const Out& out) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t* row = W + n * K;
        __m512 acc[MR][2];
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            for (int j = 0; j < 2; j++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i*)(row + k + 16 * j));
                const __m512 w = BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                                      : _mm512_cvtph_ps(raw);
                for (int m = 0; m < MR; m++)
                    acc[m][j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (m0 + m) * ldx + k + 16 * j), acc[m][j]);
            }
        }
        for (; k < K; k += 16) {
            const __mmask16 mk = (__mmask16)((K - k) >= 16 ? 0xFFFF : ((1u << (K - k)) - 1));
            const __m256i raw = _mm256_maskz_loadu_epi16(mk, row + k);
            const __m512 w = BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                                  : _mm512_cvtph_ps(raw);
            for (int m = 0; m < MR; m++)
                acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, x + (m0 + m) * ldx + k), acc[m][0]);
        }
        for (int m = 0; m < MR; m++) out.put(m0 + m, n, _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
    }
}

template <bool BF16>
void dense_linear(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx, const Out& out) {
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
        const int64_t n0 = N * t / T_, n1 = N * (t + 1) / T_;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            switch (std::min<int64_t>(4, M - m0)) {
                case 1: dense_rows<BF16, 1>(W, n0, n1, K, x, ldx, m0, out); break;
                case 2: dense_rows<BF16, 2>(W, n0, n1, K, x, ldx, m0, out); break;
                case 3: dense_rows<BF16, 3>(W, n0, n1, K, x, ldx, m0, out); break;
                default: dense_rows<BF16, 4>(W, n0, n1, K, x, ldx, m0, out); break;
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// C ABI. Type ids are ggml's (GGMLQuantizationType). Return 0 on success, -1 for an unsupported type.

#define FQ_DISPATCH(TYPE, CALL)              \
    switch (TYPE) {                          \
        case 2: CALL(Q4_0); break;           \
        case 3: CALL(Q4_1); break;           \
        case 6: CALL(Q5_0); break;           \
        case 7: CALL(Q5_1); break;           \
        case 8: CALL(Q8_0); break;           \
        case 10: CALL(Q2_K); break;          \
        case 11: CALL(Q3_K); break;          \
        case 12: CALL(Q4_K); break;          \
        case 13: CALL(Q5_K); break;          \
        case 14: CALL(Q6_K); break;          \
        case 20: CALL(IQ4_NL); break;        \
        default: return -1;                  \
    }

extern "C" {

int fq_version() { return 1; }

// y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] (bias may be NULL). x: f32 or bf16 (x_bf16 = 1), row stride ldx;
// y: f32 or bf16 (y_bf16 = 1), row stride ldy. Types 1 (F16) and 30 (BF16) are dense rows of K halfs.
int fq_linear(int type, const uint8_t* W, int64_t N, int64_t K, int64_t row_bytes, const void* x, int x_bf16,
              int64_t M, int64_t ldx, void* y, int y_bf16, int64_t ldy, const float* bias) {
    const Out out{y, ldy, bias, y_bf16};
    if (type == 1 || type == 30) {
        const float* xf = (const float*)x;
        if (x_bf16) {  // widen once; the GEMV reads x many times
            float* buf = (float*)scratch(sizeof(float) * M * K);
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < K; k++) {
                    const uint32_t u = (uint32_t)((const uint16_t*)x)[m * ldx + k] << 16;
                    memcpy(buf + m * K + k, &u, 4);
                }
            xf = buf;
            ldx = K;
        }
        if (type == 1) dense_linear<false>((const uint16_t*)W, N, K, xf, M, ldx, out);
        else dense_linear<true>((const uint16_t*)W, N, K, xf, M, ldx, out);
        return 0;
    }
#define FQ_LINEAR(T) linear<T>(W, N, K, row_bytes, x, x_bf16, M, ldx, out)
    FQ_DISPATCH(type, FQ_LINEAR)
#undef FQ_LINEAR
    return 0;
}

// out[n - n0, k] (bf16, row stride ldo) = dequantized W[n, k] for n in [n0, n1).
int fq_dequant_bf16(int type, const uint8_t* W, int64_t n0, int64_t n1, int64_t K, int64_t row_bytes,
                    uint16_t* out, int64_t ldo) {
#define FQ_DEQ(T) dequant<T>(W, n0, n1, K, row_bytes, out, ldo)
    FQ_DISPATCH(type, FQ_DEQ)
#undef FQ_DEQ
    return 0;
}
}
