// fuselm CPU kernels for matmuls on GGML block-quantized weights (AVX-512 VNNI/VBMI/BITALG, OpenMP).
//
// Layout. At load, each weight is repacked once into 16-row interleaved tiles: for every group of 16 rows and
// every ggml block along K, one tile of 16 * block_bytes bytes (the same size as the 16 original blocks).
// A tile holds the 16 rows' scales as arrays (d[16], ...) and their codes so that one 64-byte vector gives,
// in dword lane r, four consecutive codes of row r. Rows are padded with zero rows to a multiple of 16.
//
// Decode (few activation rows): the activation is quantized to 16 bits per element, per block of 32:
// x ~= d_a * (h + l/256) with h, l int8. Broadcasting four h (or l) values against a code vector, one VNNI
// vpdpbusd accumulates 64 products for 16 rows at once; scales, offsets and mins are applied per sub-block in
// float32. The error is ~2^-16 of each 32-block's largest |x|, far below llama.cpp's 8-bit activations.
//
// Prefill (many rows): fq_dequant decodes rows to fp16 (or bf16) for a oneDNN GEMM in torch.
//
// Every type is a struct with the ggml block (QK elements, BS bytes), the code offset OFF and sub-block
// size SUB, and:
//   repack(src rows[16], dst tile)        ggml blocks of 16 rows -> one tile
//   visit(tile, quad, sub)                calls quad(t, codes) for the element quads t = 0..QK/4-1 (codes of
//                                         elements 4t..4t+3 of all 16 rows) and, after the last quad of each
//                                         sub-block j, sub(j, scale, min): per-row float scale and min, with
//                                         w = scale * (code - OFF) + min.

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
      defined(__AVX512VBMI__) && defined(__F16C__))
#error "fuselm kernels need AVX-512 F/BW/VL/VNNI/VBMI and F16C (Ice Lake, Zen 4 or newer)"
#endif

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

namespace {

constexpr int R = 16;  // rows per tile

inline uint32_t rd32(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

inline __m512 halfs16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

inline __m512i ld(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }

// (v shifted so that bit `from` of every byte lands on bit `to`) & mask, then or-ed into c
template <int FROM, int TO>
inline __m512i or_bits(__m512i c, __m512i v, __m512i mask) {
    __m512i s;
    if (FROM > TO) s = _mm512_srli_epi16(v, FROM - TO);
    else if (FROM < TO) s = _mm512_slli_epi16(v, TO - FROM);
    else s = v;
    return _mm512_ternarylogic_epi32(c, s, mask, 0xF8);  // c | (s & mask)
}

// codes of quad t from a 4-bit code vector: even t = low nibbles, odd t = high nibbles
inline __m512i nib(__m512i v, int t) {
    const __m512i m4 = _mm512_set1_epi8(15);
    return (t & 1) ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : _mm512_and_si512(v, m4);
}

// 4-bit codes of a 32-element block (q[e], e = 0..31) into the tile's 4 vectors: vector c, lane r, byte i
// holds q[8c + i] | q[8c + 4 + i] << 4.
inline void put_nibbles(uint8_t* dst, int r, const uint8_t* q, int nq8) {
    for (int c = 0; c < nq8; c++)
        for (int i = 0; i < 4; i++) dst[64 * c + 4 * r + i] = (uint8_t)((q[8 * c + i] & 15) | (q[8 * c + 4 + i] & 15) << 4);
}

// one bit per element of a 32-element run, as a dword: element e at bit 8 * (e % 4) + e / 4
inline uint32_t bitplane32(const uint8_t* bits) {
    uint32_t v = 0;
    for (int e = 0; e < 32; e++) v |= (uint32_t)(bits[e] & 1) << (8 * (e % 4) + e / 4);
    return v;
}

// element e of a legacy 32-block stores its 4 low bits in qs[e % 16] (low nibble for e < 16)
inline void legacy_nibbles(const uint8_t* qs, uint8_t* q) {
    for (int e = 0; e < 16; e++) q[e] = qs[e] & 15, q[e + 16] = qs[e] >> 4;
}

// ------------------------------------------------------------------------------------------------ legacy

struct Q4_0 {
    static constexpr int QK = 32, BS = 18, OFF = 8, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) {
        for (int r = 0; r < R; r++) {
            uint8_t q[32];
            memcpy(t + 2 * r, src[r], 2);
            legacy_nibbles(src[r] + 2, q);
            put_nibbles(t + 32, r, q, 4);
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        for (int c = 0; c < 4; c++) {
            const __m512i v = ld(t + 32 + 64 * c);
            quad(2 * c, nib(v, 0));
            quad(2 * c + 1, nib(v, 1));
        }
        sub(0, halfs16(t), _mm512_setzero_ps());
    }
};

struct IQ4_NL {
    static constexpr int QK = 32, BS = 18, OFF = 128, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) { Q4_0::repack(src, t); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        // kvalues_iq4nl + 128: unsigned codes, OFF = 128
        const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141,
                                                                 (char)153, (char)166, (char)181, (char)197, (char)217,
                                                                 (char)241));
        for (int c = 0; c < 4; c++) {
            const __m512i v = ld(t + 32 + 64 * c);
            quad(2 * c, _mm512_shuffle_epi8(lut, nib(v, 0)));
            quad(2 * c + 1, _mm512_shuffle_epi8(lut, nib(v, 1)));
        }
        sub(0, halfs16(t), _mm512_setzero_ps());
    }
};

struct Q4_1 {
    static constexpr int QK = 32, BS = 20, OFF = 0, SUB = 32;
    static constexpr bool MIN = true;
    static void repack(const uint8_t* const* src, uint8_t* t) {
        for (int r = 0; r < R; r++) {
            uint8_t q[32];
            memcpy(t + 2 * r, src[r], 2);
            memcpy(t + 32 + 2 * r, src[r] + 2, 2);
            legacy_nibbles(src[r] + 4, q);
            put_nibbles(t + 64, r, q, 4);
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        for (int c = 0; c < 4; c++) {
            const __m512i v = ld(t + 64 + 64 * c);
            quad(2 * c, nib(v, 0));
            quad(2 * c + 1, nib(v, 1));
        }
        sub(0, halfs16(t), halfs16(t + 32));
    }
};

// Q5_0 / Q5_1: bit 4 of element e is bit e of the block's 32-bit qh; in the tile, a bit plane per row.
inline void repack_q5(const uint8_t* const* src, uint8_t* t, int qh_at, int qs_at, int scale_bytes) {
    uint8_t* planes = t + 2 * scale_bytes * R / 2;  // after d[16] (and m[16])
    for (int r = 0; r < R; r++) {
        for (int s = 0; s < scale_bytes / 2; s++) memcpy(t + 32 * s + 2 * r, src[r] + 2 * s, 2);
        const uint32_t qh = rd32(src[r] + qh_at);
        uint8_t q[32], hb[32];
        legacy_nibbles(src[r] + qs_at, q);
        for (int e = 0; e < 32; e++) hb[e] = (qh >> e) & 1;
        const uint32_t plane = bitplane32(hb);
        memcpy(planes + 4 * r, &plane, 4);
        put_nibbles(planes + 64, r, q, 4);
    }
}

template <int PLANE_AT, class Q>
inline void visit_q5(const uint8_t* t, Q&& quad) {
    const __m512i hb = ld(t + PLANE_AT), b4 = _mm512_set1_epi8(16);
    const uint8_t* codes = t + PLANE_AT + 64;
    const __m512i v0 = ld(codes), v1 = ld(codes + 64), v2 = ld(codes + 128), v3 = ld(codes + 192);
    // quad t: elements 4t + i sit at bit 8i + t of the plane; move bit t to bit 4
    quad(0, or_bits<0, 4>(nib(v0, 0), hb, b4));
    quad(1, or_bits<1, 4>(nib(v0, 1), hb, b4));
    quad(2, or_bits<2, 4>(nib(v1, 0), hb, b4));
    quad(3, or_bits<3, 4>(nib(v1, 1), hb, b4));
    quad(4, or_bits<4, 4>(nib(v2, 0), hb, b4));
    quad(5, or_bits<5, 4>(nib(v2, 1), hb, b4));
    quad(6, or_bits<6, 4>(nib(v3, 0), hb, b4));
    quad(7, or_bits<7, 4>(nib(v3, 1), hb, b4));
}

struct Q5_0 {
    static constexpr int QK = 32, BS = 22, OFF = 16, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) { repack_q5(src, t, 2, 6, 2); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        visit_q5<32>(t, quad);
        sub(0, halfs16(t), _mm512_setzero_ps());
    }
};

struct Q5_1 {
    static constexpr int QK = 32, BS = 24, OFF = 0, SUB = 32;
    static constexpr bool MIN = true;
    static void repack(const uint8_t* const* src, uint8_t* t) { repack_q5(src, t, 4, 8, 4); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        visit_q5<64>(t, quad);
        sub(0, halfs16(t), halfs16(t + 32));
    }
};

struct Q8_0 {
    static constexpr int QK = 32, BS = 34, OFF = 128, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) {
        for (int r = 0; r < R; r++) {
            memcpy(t + 2 * r, src[r], 2);
            for (int e = 0; e < 32; e++) t[32 + 64 * (e / 4) + 4 * r + e % 4] = (uint8_t)(src[r][2 + e] ^ 0x80);  // q+128
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        for (int c = 0; c < 8; c++) quad(c, ld(t + 32 + 64 * c));
        sub(0, halfs16(t), _mm512_setzero_ps());
    }
};

// ------------------------------------------------------------------------------------------------ K-quants

// copy `n` bytes at `at` of each row's block into a [n][16] byte array at dst
inline void transpose_bytes(const uint8_t* const* src, int at, int n, uint8_t* dst) {
    for (int r = 0; r < R; r++)
        for (int i = 0; i < n; i++) dst[16 * i + r] = src[r][at + i];
}

inline void copy_halfs(const uint8_t* const* src, int at, uint8_t* dst) {
    for (int r = 0; r < R; r++) memcpy(dst + 2 * r, src[r] + at, 2);
}

// 2-bit codes of 16-element sub-blocks: vector z, lane r, byte i, bits 2s: element 16z + 4s + i
inline void put_crumbs(uint8_t* dst, int r, const uint8_t* q) {
    for (int z = 0; z < 16; z++)
        for (int i = 0; i < 4; i++) {
            uint8_t b = 0;
            for (int s = 0; s < 4; s++) b |= (uint8_t)((q[16 * z + 4 * s + i] & 3) << (2 * s));
            dst[64 * z + 4 * r + i] = b;
        }
}

// low 2 bits of element e = 128h + 32s + l in Q2_K / Q3_K: bits 2s of qs[32h + l]
inline void k_low2(const uint8_t* qs, uint8_t* q) {
    for (int e = 0; e < 256; e++) q[e] = (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

template <int S, class Q>
inline void crumb_quads(__m512i v, int z, Q&& quad) {
    const __m512i m3 = _mm512_set1_epi8(3);
    quad(4 * z + S, S ? _mm512_and_si512(_mm512_srli_epi16(v, 2 * S), m3) : _mm512_and_si512(v, m3));
}

struct Q2_K {
    static constexpr int QK = 256, BS = 84, OFF = 0, SUB = 16;
    static constexpr bool MIN = true;
    // tile: d[16] @0, dmin[16] @32, scales[16][16] @64, codes 16 vectors @320
    static void repack(const uint8_t* const* src, uint8_t* t) {
        copy_halfs(src, 80, t);
        copy_halfs(src, 82, t + 32);
        transpose_bytes(src, 0, 16, t + 64);
        for (int r = 0; r < R; r++) {
            uint8_t q[256];
            k_low2(src[r] + 16, q);
            put_crumbs(t + 320, r, q);
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        const __m512 d = halfs16(t), dmin = halfs16(t + 32);
        const __m512i m4 = _mm512_set1_epi32(15);
        for (int z = 0; z < 16; z++) {
            const __m512i v = ld(t + 320 + 64 * z);
            crumb_quads<0>(v, z, quad);
            crumb_quads<1>(v, z, quad);
            crumb_quads<2>(v, z, quad);
            crumb_quads<3>(v, z, quad);
            const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(t + 64 + 16 * z)));
            sub(z, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(s, m4)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4)), _mm512_sub_ps(_mm512_setzero_ps(), dmin)));
        }
    }
};

struct Q3_K {
    static constexpr int QK = 256, BS = 110, OFF = 4, SUB = 16;
    static constexpr bool MIN = false;
    // tile: d[16] @0, scales[12][16] @32, low 2 bits 16 vectors @224, high-bit planes 8 vectors @1248
    // (vector w, lane r, byte i, bit 4 * (z - 2w) + s: high bit of element 16z + 4s + i, z = 2w, 2w + 1)
    static void repack(const uint8_t* const* src, uint8_t* t) {
        copy_halfs(src, 108, t);
        transpose_bytes(src, 96, 12, t + 32);
        for (int r = 0; r < R; r++) {
            uint8_t q[256];
            k_low2(src[r] + 32, q);
            put_crumbs(t + 224, r, q);
            const uint8_t* hm = src[r];
            for (int w = 0; w < 8; w++)
                for (int i = 0; i < 4; i++) {
                    uint8_t b = 0;
                    for (int zz = 0; zz < 2; zz++)
                        for (int s = 0; s < 4; s++) {
                            const int e = 16 * (2 * w + zz) + 4 * s + i;
                            b |= (uint8_t)(((hm[e % 32] >> (e / 32)) & 1) << (4 * zz + s));
                        }
                    t[1248 + 64 * w + 4 * r + i] = b;
                }
        }
    }
    template <int S, int ZZ, class Q>
    static inline void quad3(__m512i v, __m512i hb, int z, Q&& quad) {
        const __m512i m3 = _mm512_set1_epi8(3), b4 = _mm512_set1_epi8(4);
        const __m512i lo = S ? _mm512_and_si512(_mm512_srli_epi16(v, 2 * S), m3) : _mm512_and_si512(v, m3);
        quad(4 * z + S, or_bits<4 * ZZ + S, 2>(lo, hb, b4));
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        // 6-bit scales j = 0..15 for all rows: low 4 bits from bytes 0..7, high 2 bits from bytes 8..11
        const __m512i x0 = ld(t + 32), x1 = ld(t + 96), x2 = ld(t + 160);
        const __m512i k4 = _mm512_set1_epi8(15), k30 = _mm512_set1_epi8(0x30), b32 = _mm512_set1_epi8(32);
        alignas(64) int8_t sc[256];
        _mm512_store_si512(sc, _mm512_sub_epi8(_mm512_ternarylogic_epi32(
                                                    x0, _mm512_and_si512(_mm512_slli_epi16(x2, 4), k30), k4, 0xEC),
                                                b32));
        _mm512_store_si512(sc + 64, _mm512_sub_epi8(_mm512_ternarylogic_epi32(
                                                        x1, _mm512_and_si512(_mm512_slli_epi16(x2, 2), k30), k4, 0xEC),
                                                    b32));
        _mm512_store_si512(sc + 128, _mm512_sub_epi8(_mm512_ternarylogic_epi32(
                                                         _mm512_srli_epi16(x0, 4), _mm512_and_si512(x2, k30), k4, 0xEC),
                                                     b32));
        _mm512_store_si512(sc + 192, _mm512_sub_epi8(
                                         _mm512_ternarylogic_epi32(_mm512_srli_epi16(x1, 4),
                                                                   _mm512_and_si512(_mm512_srli_epi16(x2, 2), k30), k4, 0xEC),
                                         b32));
        const __m512 d = halfs16(t);
        for (int w = 0; w < 8; w++) {
            const __m512i hb = ld(t + 1248 + 64 * w);
            for (int zz = 0; zz < 2; zz++) {
                const int z = 2 * w + zz;
                const __m512i v = ld(t + 224 + 64 * z);
                if (zz == 0) {
                    quad3<0, 0>(v, hb, z, quad);
                    quad3<1, 0>(v, hb, z, quad);
                    quad3<2, 0>(v, hb, z, quad);
                    quad3<3, 0>(v, hb, z, quad);
                } else {
                    quad3<0, 1>(v, hb, z, quad);
                    quad3<1, 1>(v, hb, z, quad);
                    quad3<2, 1>(v, hb, z, quad);
                    quad3<3, 1>(v, hb, z, quad);
                }
                const __m512i s = _mm512_cvtepi8_epi32(_mm_load_si128((const __m128i*)(sc + 16 * z)));
                sub(z, _mm512_mul_ps(_mm512_cvtepi32_ps(s), d), _mm512_setzero_ps());
            }
        }
    }
};

// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
// tile: d[16] @0, dmin[16] @32, scale bytes [12][16] @64, (Q5_K: bit planes 8 vectors @256), codes 32 vectors
inline void k4_unpack_scales(const uint8_t* t, uint8_t* sc, uint8_t* mn) {  // -> sc[8][16], mn[8][16]
    const __m512i x0 = ld(t + 64), x1 = ld(t + 128), x2 = ld(t + 192);
    const __m512i k6 = _mm512_set1_epi8(63), k4 = _mm512_set1_epi8(15), k30 = _mm512_set1_epi8(0x30);
    _mm512_store_si512(sc, _mm512_and_si512(x0, k6));
    _mm512_store_si512(mn, _mm512_and_si512(x1, k6));
    _mm512_store_si512(sc + 64, _mm512_ternarylogic_epi32(x2, _mm512_and_si512(_mm512_srli_epi16(x0, 2), k30), k4, 0xEC));
    _mm512_store_si512(mn + 64, _mm512_ternarylogic_epi32(_mm512_srli_epi16(x2, 4),
                                                          _mm512_and_si512(_mm512_srli_epi16(x1, 2), k30), k4, 0xEC));
}

inline void k4_low4(const uint8_t* qs, uint8_t* q) {  // element 64c + l (+32): qs[32c + l] low (high) nibble
    for (int e = 0; e < 256; e++) q[e] = (qs[32 * (e / 64) + e % 32] >> (4 * ((e % 64) / 32))) & 15;
}

template <class F>
inline void k4_subs(const uint8_t* t, F&& f) {  // f(j, scale, min) for the 8 sub-blocks
    alignas(64) uint8_t sc[128], mn[128];
    k4_unpack_scales(t, sc, mn);
    const __m512 d = halfs16(t), nd = _mm512_sub_ps(_mm512_setzero_ps(), halfs16(t + 32));
    for (int j = 0; j < 8; j++) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(sc + 16 * j))));
        const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(mn + 16 * j))));
        f(j, _mm512_mul_ps(s, d), _mm512_mul_ps(m, nd));
    }
}

struct Q4_K {
    static constexpr int QK = 256, BS = 144, OFF = 0, SUB = 32;
    static constexpr bool MIN = true;
    static void repack(const uint8_t* const* src, uint8_t* t) {
        copy_halfs(src, 0, t);
        copy_halfs(src, 2, t + 32);
        transpose_bytes(src, 4, 12, t + 64);
        for (int r = 0; r < R; r++) {
            uint8_t q[256];
            k4_low4(src[r] + 16, q);
            put_nibbles(t + 256, r, q, 32);
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        alignas(64) uint8_t sc[128], mn[128];
        k4_unpack_scales(t, sc, mn);
        const __m512 d = halfs16(t), nd = _mm512_sub_ps(_mm512_setzero_ps(), halfs16(t + 32));
        for (int j = 0; j < 8; j++) {
            for (int c = 0; c < 4; c++) {
                const __m512i v = ld(t + 256 + 64 * (4 * j + c));
                quad(8 * j + 2 * c, nib(v, 0));
                quad(8 * j + 2 * c + 1, nib(v, 1));
            }
            const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(sc + 16 * j))));
            const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(mn + 16 * j))));
            sub(j, _mm512_mul_ps(s, d), _mm512_mul_ps(m, nd));
        }
    }
};

struct Q5_K {
    static constexpr int QK = 256, BS = 176, OFF = 0, SUB = 32;
    static constexpr bool MIN = true;
    static void repack(const uint8_t* const* src, uint8_t* t) {
        copy_halfs(src, 0, t);
        copy_halfs(src, 2, t + 32);
        transpose_bytes(src, 4, 12, t + 64);
        for (int r = 0; r < R; r++) {
            uint8_t q[256], hb[256];
            k4_low4(src[r] + 48, q);
            const uint8_t* qh = src[r] + 16;
            for (int e = 0; e < 256; e++) hb[e] = (qh[e % 32] >> (e / 32)) & 1;  // bit 2c (+1) for chunk c lo (hi)
            for (int j = 0; j < 8; j++) {
                const uint32_t plane = bitplane32(hb + 32 * j);
                memcpy(t + 256 + 64 * j + 4 * r, &plane, 4);
            }
            put_nibbles(t + 768, r, q, 32);
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        alignas(64) uint8_t sc[128], mn[128];
        k4_unpack_scales(t, sc, mn);
        const __m512 d = halfs16(t), nd = _mm512_sub_ps(_mm512_setzero_ps(), halfs16(t + 32));
        const __m512i b4 = _mm512_set1_epi8(16);
        for (int j = 0; j < 8; j++) {
            const __m512i hb = ld(t + 256 + 64 * j);
            const uint8_t* codes = t + 768 + 256 * j;
            const __m512i v0 = ld(codes), v1 = ld(codes + 64), v2 = ld(codes + 128), v3 = ld(codes + 192);
            quad(8 * j + 0, or_bits<0, 4>(nib(v0, 0), hb, b4));
            quad(8 * j + 1, or_bits<1, 4>(nib(v0, 1), hb, b4));
            quad(8 * j + 2, or_bits<2, 4>(nib(v1, 0), hb, b4));
            quad(8 * j + 3, or_bits<3, 4>(nib(v1, 1), hb, b4));
            quad(8 * j + 4, or_bits<4, 4>(nib(v2, 0), hb, b4));
            quad(8 * j + 5, or_bits<5, 4>(nib(v2, 1), hb, b4));
            quad(8 * j + 6, or_bits<6, 4>(nib(v3, 0), hb, b4));
            quad(8 * j + 7, or_bits<7, 4>(nib(v3, 1), hb, b4));
            const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(sc + 16 * j))));
            const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128((const __m128i*)(mn + 16 * j))));
            sub(j, _mm512_mul_ps(s, d), _mm512_mul_ps(m, nd));
        }
    }
};

struct Q6_K {
    static constexpr int QK = 256, BS = 210, OFF = 32, SUB = 16;
    static constexpr bool MIN = false;
    // tile: d[16] @0, int8 scales [16][16] @32, low 4 bits 32 vectors @288, high 2 bits 16 vectors @2336
    // (vector p, lane r, byte i, bits 2u: element 8c + 4h + i with c = 2p + u / 2, h = u % 2)
    static void repack(const uint8_t* const* src, uint8_t* t) {
        copy_halfs(src, 208, t);
        transpose_bytes(src, 192, 16, t + 32);
        for (int r = 0; r < R; r++) {
            const uint8_t* ql = src[r];
            const uint8_t* qh = src[r] + 128;
            uint8_t lo[256], hi[256];
            for (int e = 0; e < 256; e++) {
                const int h = e / 128, f = e % 128;
                lo[e] = (ql[64 * h + f % 64] >> (4 * (f / 64))) & 15;
                hi[e] = (qh[32 * h + f % 32] >> (2 * (f / 32))) & 3;
            }
            put_nibbles(t + 288, r, lo, 32);
            for (int p = 0; p < 16; p++)
                for (int i = 0; i < 4; i++) {
                    uint8_t b = 0;
                    for (int u = 0; u < 4; u++) b |= (uint8_t)(hi[8 * (2 * p + u / 2) + 4 * (u % 2) + i] << (2 * u));
                    t[2336 + 64 * p + 4 * r + i] = b;
                }
        }
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        const __m512 d = halfs16(t);
        const __m512i m30 = _mm512_set1_epi8(0x30);
        for (int z = 0; z < 16; z++) {  // sub-block z = elements 16z.. = chunks 2z, 2z+1 = high-bit vector z
            const __m512i hb = ld(t + 2336 + 64 * z);
            const __m512i v0 = ld(t + 288 + 64 * (2 * z)), v1 = ld(t + 288 + 64 * (2 * z + 1));
            quad(4 * z + 0, or_bits<0, 4>(nib(v0, 0), hb, m30));
            quad(4 * z + 1, or_bits<2, 4>(nib(v0, 1), hb, m30));
            quad(4 * z + 2, or_bits<4, 4>(nib(v1, 0), hb, m30));
            quad(4 * z + 3, or_bits<6, 4>(nib(v1, 1), hb, m30));
            const __m512i s = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(t + 32 + 16 * z)));
            sub(z, _mm512_mul_ps(_mm512_cvtepi32_ps(s), d), _mm512_setzero_ps());
        }
    }
};

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

inline __m512 load_x16(const void* x, int bf16, int64_t i) {
    if (bf16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_loadu_ps((const float*)x + i);
}

Act prep(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx, int off, int sub) {
    const int64_t ns = K / sub;
    const int64_t stride = round_up(2 * K + 4 * (K / 32) + 8 * ns, 64);
    uint8_t* base = scratch(stride * M);
    const Act a{(int8_t*)base, (int8_t*)base + K, (float*)(base + 2 * K), (int32_t*)(base + 2 * K + 4 * (K / 32)),
                (float*)(base + 2 * K + 4 * (K / 32) + 4 * ns), stride};
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 c127 = _mm512_set1_ps(127.f), cm127 = _mm512_set1_ps(-127.f), c256 = _mm512_set1_ps(256.f);
    for (int64_t m = 0; m < M; m++) {
        const void* xr = bf16 ? (const void*)((const uint16_t*)x + m * ldx) : (const void*)((const float*)x + m * ldx);
        int8_t* h = a.h + m * stride;
        int8_t* l = a.l + m * stride;
        float* dal = (float*)((uint8_t*)a.dal + m * stride);
        int32_t* so = (int32_t*)((uint8_t*)a.so + m * stride);
        float* xs = (float*)((uint8_t*)a.xs + m * stride);
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
            if (sub == 16) {
                for (int j = 0; j < 2; j++) so[2 * b + j] = off * s16[j], xs[2 * b + j] = (float)s16[j] * dal[b];
            } else {
                so[b] = off * (s16[0] + s16[1]);
                xs[b] = (float)(s16[0] + s16[1]) * dal[b];
            }
        }
    }
    return a;
}

// ------------------------------------------------------------------------------------------------ GEMV

inline __m256i to_bf16(__m512 w) {  // round to nearest even
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(w);
#else
    const __m512i u = _mm512_castps_si512(w);
    const __m512i r =
        _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, r), 16));
#endif
}

struct Out {  // y[m * ldy + n] = value + bias[n], f32 or bf16
    void* y;
    int64_t ldy, N;
    const float* bias;
    int bf16;
    inline void put16(int64_t m, int64_t n0, __m512 v) const {  // rows n0 .. n0 + 15 (clipped to N)
        const __mmask16 k = (N - n0) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + n0));
        if (bf16) _mm256_mask_storeu_epi16((uint16_t*)y + m * ldy + n0, k, to_bf16(v));
        else _mm512_mask_storeu_ps((float*)y + m * ldy + n0, k, v);
    }
};

template <class T, int MR>
void gemv_groups(const uint8_t* W, int64_t g0, int64_t g1, int64_t K, const Act& a, int64_t m0, const Out& out) {
    constexpr int QPS = T::SUB / 4;  // quads per sub-block
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
        constexpr int P = 1;  // accumulator pairs per row (2, for even / odd quads, measured no faster)
        __m512 acc[MR], accm[MR];
        __m512i ah[MR][P], al[MR][P];
        for (int m = 0; m < MR; m++) acc[m] = accm[m] = _mm512_setzero_ps();
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
            for (int m = 0; m < MR; m++)
                for (int p = 0; p < P; p++) ah[m][p] = al[m][p] = _mm512_setzero_si512();
            T::visit(
                tile,
                [&](int t, __m512i c) {
                    if constexpr (spread)
                        for (int64_t i = 64 * t; i < R * T::BS; i += 64 * (T::QK / 4))
                            _mm_prefetch((const char*)tile + ahead + i, _MM_HINT_T1);
                    const int p = t % P;
                    for (int m = 0; m < MR; m++) {
                        const int64_t i = k0 + 4 * t;
                        ah[m][p] = _mm512_dpbusd_epi32(ah[m][p], c, _mm512_set1_epi32((int)rd32((const uint8_t*)hr[m] + i)));
                        al[m][p] = _mm512_dpbusd_epi32(al[m][p], c, _mm512_set1_epi32((int)rd32((const uint8_t*)lr[m] + i)));
                    }
                },
                [&](int j, __m512 scale, __m512 mn) {
                    const int64_t s = (k0 + j * T::SUB) / T::SUB;
                    for (int m = 0; m < MR; m++) {
                        __m512i h = ah[m][0], l = al[m][0];
                        if (P == 2) h = _mm512_add_epi32(h, ah[m][P - 1]), l = _mm512_add_epi32(l, al[m][P - 1]);
                        __m512i tt = _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
                        if (T::OFF) tt = _mm512_sub_epi32(tt, _mm512_set1_epi32(sr[m][s]));
                        const float da = dr[m][(k0 + j * T::SUB) / 32];
                        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tt), _mm512_mul_ps(scale, _mm512_set1_ps(da)), acc[m]);
                        if (T::MIN) accm[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xr[m][s]), accm[m]);
                        for (int p = 0; p < P; p++) ah[m][p] = al[m][p] = _mm512_setzero_si512();
                    }
                });
        }
        for (int m = 0; m < MR; m++) out.put16(m0 + m, g * R, _mm512_add_ps(acc[m], accm[m]));
    }
}

template <class T>
void linear(const uint8_t* W, int64_t N, int64_t K, const void* x, int bf16, int64_t M, int64_t ldx, const Out& out) {
    const Act a = prep(x, bf16, M, K, ldx, T::OFF, T::SUB);
    const int64_t groups = (N + R - 1) / R;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
        // M <= 4: one pass; more rows: chunks of 4 rows per group while its tiles are in L1/L2, so the
        // weights still come from memory once
        const int64_t step = M <= 4 ? g1 - g0 : 1;
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

// ------------------------------------------------------------------------------------------------ dequantize

// Rows [n0, n1) (n0 a multiple of 16) to bf16 out[(n - n0) * ldo + k]: per sub-block, the quads' code vectors
// (16 rows x 4 codes) are transposed into 16-code runs per row, then w = scale * code + (min - scale * OFF).
template <class T, bool F16>
void dequant_groups(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, uint16_t* out, int64_t ldo) {
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
        uint16_t* o = out + (g * R - n0) * ldo;
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
                        uint16_t* ok = o + b * T::QK + j * T::SUB + 16 * u;
                        for (int L = 0; L < 4; L++) {
                            const __m512i idx = _mm512_load_si512(spread[L]);
                            for (int X = 0; X < 4; X++) {
                                const int r = 4 * L + X;
                                if (r >= rows) break;
                                const __m512i c32 = _mm512_maskz_permutexvar_epi8(low_bytes, idx, rowsv[X]);
                                const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c32), _mm512_set1_ps(sc[r]),
                                                                 _mm512_set1_ps(mv[r]));
                                const __m256i h = F16 ? _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                                      : to_bf16(w);
                                _mm256_storeu_si256((__m256i*)(ok + r * ldo), h);
                            }
                        }
                    }
                });
        }
    }
}

template <class T, bool F16>
void dequant(const uint8_t* W, int64_t n0, int64_t n1, int64_t K, uint16_t* out, int64_t ldo) {
    const int64_t g0 = n0 / R, g1 = (n1 + R - 1) / R;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t a = g0 + (g1 - g0) * t / nt, b = g0 + (g1 - g0) * (t + 1) / nt;
        if (a < b) {
            const int64_t r0 = std::max(n0, a * R), r1 = std::min(n1, b * R);
            dequant_groups<T, F16>(W, r0, r1, K, out + (r0 - n0) * ldo, ldo);
        }
    }
}

// ------------------------------------------------------------------------------------------------ dense

// F16 / BF16 rows (not repacked): exact float32 GEMV, weights widened in registers.
template <bool BF16, int MR>
void dense_rows(const uint16_t* W, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t ldx, int64_t m0,
                float* y, int64_t N) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t* row = W + n * K;
        __m512 acc[MR][2];
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
            _mm_prefetch((const char*)(row + k) + 4096, _MM_HINT_T1);  // 4 KiB ahead, into L2
            for (int j = 0; j < 2; j++) {
                const int64_t kk = k + 16 * j;
                if (kk >= K) break;
                const __mmask16 mk = (K - kk) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - kk)) - 1);
                const __m256i raw = _mm256_maskz_loadu_epi16(mk, row + kk);
                const __m512 w = BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                                      : _mm512_cvtph_ps(raw);
                for (int m = 0; m < MR; m++)
                    acc[m][j] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, x + (m0 + m) * ldx + kk), acc[m][j]);
            }
        }
        for (int m = 0; m < MR; m++) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
    }
}

template <bool BF16>
void dense_linear(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx, const Out& out) {
    float* y = (float*)scratch(sizeof(float) * M * N + 64);  // then bias / dtype in put16
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
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
        for (int64_t n = 0; n < N; n += 16) {
            const __mmask16 k = (N - n) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
            out.put16(m, n, _mm512_maskz_loadu_ps(k, y + m * N + n));
        }
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

int fq_version() { return 3; }

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

// out[n - n0, k] (bf16, or fp16 if f16 = 1; row stride ldo) = dequantized W[n, k] for n in [n0, n1);
// W: repacked tiles, n0 a multiple of 16.
int fq_dequant(int type, const uint8_t* W, int64_t n0, int64_t n1, int64_t K, uint16_t* out, int64_t ldo, int f16) {
    if (n0 % R) return -2;
#define FQ_DEQ(T) f16 ? dequant<T, true>(W, n0, n1, K, out, ldo) : dequant<T, false>(W, n0, n1, K, out, ldo)
    FQ_DISPATCH(type, FQ_DEQ)
#undef FQ_DEQ
    return 0;
}
}
