// Block types of fuselm's kernels: ggml blocks of 16 rows repacked into one interleaved tile, and how to walk it.
//
// Every type is a struct with the ggml block (QK elements, BS bytes), the code offset OFF, the largest code
// CMAX, the sub-block size SUB, and:
//   repack(src rows[16], dst tile)        ggml blocks of 16 rows -> one tile
//   visit(tile, quad, sub)                calls quad(t, codes) for the element quads t = 0..QK/4-1 (codes of
//                                         elements 4t..4t+3 of all 16 rows) and, after the last quad of each
//                                         sub-block j, sub(j, scale, min): per-row float scale and min, with
//                                         w = scale * (code - OFF) + min.
// A tile holds the 16 rows' scales as arrays (d[16], ...) and their codes so that one 64-byte vector gives,
// in dword lane r, four consecutive codes of row r.
#pragma once

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

#include "simd.h"

namespace fq {

constexpr int R = 16;  // rows per tile

// Work is handed out in chunks of 16-row groups, a few per thread, on demand (OpenMP dynamic schedule): when
// another process holds one core, the thread that shares it takes fewer chunks instead of holding up the call.
// A chunk is always computed whole by one thread, so results do not depend on who takes it.
inline int64_t chunk_groups(int64_t groups) {
    return std::max<int64_t>(1, groups / (4 * (int64_t)omp_get_max_threads()));
}

inline uint32_t rd32(const uint8_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

inline VI ld(const uint8_t* p) { return v_load(p); }

// (v shifted so that bit `from` of every byte lands on bit `to`) & mask, then or-ed into c
template <int FROM, int TO>
inline VI or_bits(VI c, VI v, VI mask) {
    VI s;
    if (FROM > TO) s = v_srl16(v, FROM - TO);
    else if (FROM < TO) s = v_sll16(v, TO - FROM);
    else s = v;
    return v_or(c, v_and(s, mask));
}

// codes of quad t from a 4-bit code vector: even t = low nibbles, odd t = high nibbles
inline VI nib(VI v, int t) {
    const VI m4 = v_set8(15);
    return (t & 1) ? v_and(v_srl16(v, 4), m4) : v_and(v, m4);
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
    static constexpr int QK = 32, BS = 18, OFF = 8, CMAX = 15, SUB = 32;
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
            const VI v = ld(t + 32 + 64 * c);
            quad(2 * c, nib(v, 0));
            quad(2 * c + 1, nib(v, 1));
        }
        sub(0, f_halfs(t), f_zero());
    }
};

struct IQ4_NL {
    static constexpr int QK = 32, BS = 18, OFF = 128, CMAX = 255, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) { Q4_0::repack(src, t); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        // kvalues_iq4nl + 128: unsigned codes, OFF = 128
        const VI lut = v_bcast128(_mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141,
                                                                 (char)153, (char)166, (char)181, (char)197, (char)217,
                                                                 (char)241));
        for (int c = 0; c < 4; c++) {
            const VI v = ld(t + 32 + 64 * c);
            quad(2 * c, v_shuf8(lut, nib(v, 0)));
            quad(2 * c + 1, v_shuf8(lut, nib(v, 1)));
        }
        sub(0, f_halfs(t), f_zero());
    }
};

struct Q4_1 {
    static constexpr int QK = 32, BS = 20, OFF = 0, CMAX = 15, SUB = 32;
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
            const VI v = ld(t + 64 + 64 * c);
            quad(2 * c, nib(v, 0));
            quad(2 * c + 1, nib(v, 1));
        }
        sub(0, f_halfs(t), f_halfs(t + 32));
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
    const VI hb = ld(t + PLANE_AT), b4 = v_set8(16);
    const uint8_t* codes = t + PLANE_AT + 64;
    const VI v0 = ld(codes), v1 = ld(codes + 64), v2 = ld(codes + 128), v3 = ld(codes + 192);
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
    static constexpr int QK = 32, BS = 22, OFF = 16, CMAX = 31, SUB = 32;
    static constexpr bool MIN = false;
    static void repack(const uint8_t* const* src, uint8_t* t) { repack_q5(src, t, 2, 6, 2); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        visit_q5<32>(t, quad);
        sub(0, f_halfs(t), f_zero());
    }
};

struct Q5_1 {
    static constexpr int QK = 32, BS = 24, OFF = 0, CMAX = 31, SUB = 32;
    static constexpr bool MIN = true;
    static void repack(const uint8_t* const* src, uint8_t* t) { repack_q5(src, t, 4, 8, 4); }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        visit_q5<64>(t, quad);
        sub(0, f_halfs(t), f_halfs(t + 32));
    }
};

struct Q8_0 {
    static constexpr int QK = 32, BS = 34, OFF = 128, CMAX = 255, SUB = 32;
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
        sub(0, f_halfs(t), f_zero());
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
inline void crumb_quads(VI v, int z, Q&& quad) {
    const VI m3 = v_set8(3);
    quad(4 * z + S, S ? v_and(v_srl16(v, 2 * S), m3) : v_and(v, m3));
}

struct Q2_K {
    static constexpr int QK = 256, BS = 84, OFF = 0, CMAX = 3, SUB = 16;
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
        const VF d = f_halfs(t), dmin = f_halfs(t + 32);
        const VI m4 = v_set32(15);
        for (int z = 0; z < 16; z++) {
            const VI v = ld(t + 320 + 64 * z);
            crumb_quads<0>(v, z, quad);
            crumb_quads<1>(v, z, quad);
            crumb_quads<2>(v, z, quad);
            crumb_quads<3>(v, z, quad);
            const VI s = v_u8to32(t + 64 + 16 * z);
            sub(z, f_mul(f_from(v_and(s, m4)), d),
                f_mul(f_from(v_srl32(s, 4)), f_sub(f_zero(), dmin)));
        }
    }
};

struct Q3_K {
    static constexpr int QK = 256, BS = 110, OFF = 4, CMAX = 7, SUB = 16;
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
    static inline void quad3(VI v, VI hb, int z, Q&& quad) {
        const VI m3 = v_set8(3), b4 = v_set8(4);
        const VI lo = S ? v_and(v_srl16(v, 2 * S), m3) : v_and(v, m3);
        quad(4 * z + S, or_bits<4 * ZZ + S, 2>(lo, hb, b4));
    }
    template <class Q, class S>
    static inline void visit(const uint8_t* t, Q&& quad, S&& sub) {
        // 6-bit scales j = 0..15 for all rows: low 4 bits from bytes 0..7, high 2 bits from bytes 8..11
        const VI x0 = ld(t + 32), x1 = ld(t + 96), x2 = ld(t + 160);
        const VI k4 = v_set8(15), k30 = v_set8(0x30), b32 = v_set8(32);
        alignas(64) int8_t sc[256];
        v_store(sc, v_sub8(v_or(v_and(v_sll16(x2, 4), k30), v_and(x0, k4)), b32));
        v_store(sc + 64, v_sub8(v_or(v_and(v_sll16(x2, 2), k30), v_and(x1, k4)), b32));
        v_store(sc + 128, v_sub8(v_or(v_and(x2, k30), v_and(v_srl16(x0, 4), k4)), b32));
        v_store(sc + 192, v_sub8(v_or(v_and(v_srl16(x2, 2), k30), v_and(v_srl16(x1, 4), k4)), b32));
        const VF d = f_halfs(t);
        for (int w = 0; w < 8; w++) {
            const VI hb = ld(t + 1248 + 64 * w);
            for (int zz = 0; zz < 2; zz++) {
                const int z = 2 * w + zz;
                const VI v = ld(t + 224 + 64 * z);
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
                const VI s = v_i8to32(sc + 16 * z);
                sub(z, f_mul(f_from(s), d), f_zero());
            }
        }
    }
};

// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
// tile: d[16] @0, dmin[16] @32, scale bytes [12][16] @64, (Q5_K: bit planes 8 vectors @256), codes 32 vectors
inline void k4_unpack_scales(const uint8_t* t, uint8_t* sc, uint8_t* mn) {  // -> sc[8][16], mn[8][16]
    const VI x0 = ld(t + 64), x1 = ld(t + 128), x2 = ld(t + 192);
    const VI k6 = v_set8(63), k4 = v_set8(15), k30 = v_set8(0x30);
    v_store(sc, v_and(x0, k6));
    v_store(mn, v_and(x1, k6));
    v_store(sc + 64, v_or(v_and(v_srl16(x0, 2), k30), v_and(x2, k4)));
    v_store(mn + 64, v_or(v_and(v_srl16(x1, 2), k30), v_and(v_srl16(x2, 4), k4)));
}

inline void k4_low4(const uint8_t* qs, uint8_t* q) {  // element 64c + l (+32): qs[32c + l] low (high) nibble
    for (int e = 0; e < 256; e++) q[e] = (qs[32 * (e / 64) + e % 32] >> (4 * ((e % 64) / 32))) & 15;
}

struct Q4_K {
    static constexpr int QK = 256, BS = 144, OFF = 0, CMAX = 15, SUB = 32;
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
        const VF d = f_halfs(t), nd = f_sub(f_zero(), f_halfs(t + 32));
        for (int j = 0; j < 8; j++) {
            for (int c = 0; c < 4; c++) {
                const VI v = ld(t + 256 + 64 * (4 * j + c));
                quad(8 * j + 2 * c, nib(v, 0));
                quad(8 * j + 2 * c + 1, nib(v, 1));
            }
            const VF s = f_from(v_u8to32(sc + 16 * j));
            const VF m = f_from(v_u8to32(mn + 16 * j));
            sub(j, f_mul(s, d), f_mul(m, nd));
        }
    }
};

struct Q5_K {
    static constexpr int QK = 256, BS = 176, OFF = 0, CMAX = 31, SUB = 32;
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
        const VF d = f_halfs(t), nd = f_sub(f_zero(), f_halfs(t + 32));
        const VI b4 = v_set8(16);
        for (int j = 0; j < 8; j++) {
            const VI hb = ld(t + 256 + 64 * j);
            const uint8_t* codes = t + 768 + 256 * j;
            const VI v0 = ld(codes), v1 = ld(codes + 64), v2 = ld(codes + 128), v3 = ld(codes + 192);
            quad(8 * j + 0, or_bits<0, 4>(nib(v0, 0), hb, b4));
            quad(8 * j + 1, or_bits<1, 4>(nib(v0, 1), hb, b4));
            quad(8 * j + 2, or_bits<2, 4>(nib(v1, 0), hb, b4));
            quad(8 * j + 3, or_bits<3, 4>(nib(v1, 1), hb, b4));
            quad(8 * j + 4, or_bits<4, 4>(nib(v2, 0), hb, b4));
            quad(8 * j + 5, or_bits<5, 4>(nib(v2, 1), hb, b4));
            quad(8 * j + 6, or_bits<6, 4>(nib(v3, 0), hb, b4));
            quad(8 * j + 7, or_bits<7, 4>(nib(v3, 1), hb, b4));
            const VF s = f_from(v_u8to32(sc + 16 * j));
            const VF m = f_from(v_u8to32(mn + 16 * j));
            sub(j, f_mul(s, d), f_mul(m, nd));
        }
    }
};

struct Q6_K {
    static constexpr int QK = 256, BS = 210, OFF = 32, CMAX = 63, SUB = 16;
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
        const VF d = f_halfs(t);
        const VI m30 = v_set8(0x30);
        for (int z = 0; z < 16; z++) {  // sub-block z = elements 16z.. = chunks 2z, 2z+1 = high-bit vector z
            const VI hb = ld(t + 2336 + 64 * z);
            const VI v0 = ld(t + 288 + 64 * (2 * z)), v1 = ld(t + 288 + 64 * (2 * z + 1));
            quad(4 * z + 0, or_bits<0, 4>(nib(v0, 0), hb, m30));
            quad(4 * z + 1, or_bits<2, 4>(nib(v0, 1), hb, m30));
            quad(4 * z + 2, or_bits<4, 4>(nib(v1, 0), hb, m30));
            quad(4 * z + 3, or_bits<6, 4>(nib(v1, 1), hb, m30));
            const VI s = v_i8to32(t + 32 + 16 * z);
            sub(z, f_mul(f_from(s), d), f_zero());
        }
    }
};

}  // namespace fq
