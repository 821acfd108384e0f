// fuselm's native quantizers: ggml's quantizers without an importance matrix for the legacy types, the K-quants
// and IQ4, written from the numpy codecs in fuselm/quants (legacy.py, kquants.py, ksearch.py, iq4nl.py), which
// stay the specification and are tested byte-equal to these files (quantize_lanes.h, quantize_legacy.h).
//
// Exactness needs C float semantics step by step: every operation in float, left to right, sums one element at
// a time, no contraction into FMA (built with -ffp-contract=off, no -ffast-math), nearest_int as round half to
// even (the 12582912 trick), roundf for Q8_0, fp16 stores rounded to nearest even (F16C).
//
// ABI: fqz_quantize(type, x, x_type, out, nrows, ncols) quantizes rows of float32 (x_type 0), fp16 (1) or bf16
// (30, ggml's ids) into ggml blocks, widening each block to float32 on the way (exact), and returns 0; -1 for a
// type this file does not have, -2 for NaN/Inf input (or |x| >= 2^40), -3 when an fp16 scale overflows to inf (the caller then runs
// the numpy codec, which raises the error that names the tensor). It runs on the calling thread: callers split rows over threads, as
// llama-quantize does (no OpenMP pool spinning against other work on a busy machine).

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int QK = 256;
constexpr float GROUP_MAX_EPS = 1e-15f;

enum GgmlType { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23 };

inline int nearest_int(float v) {
    float t = v + 12582912.f;
    int32_t i;
    std::memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

inline uint16_t to_half(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float from_half(uint16_t h) { return _cvtsh_ss(h); }
inline void put_half(uint8_t *p, float v) { uint16_t h = to_half(v); std::memcpy(p, &h, 2); }
inline float get_half(const uint8_t *p) { uint16_t h; std::memcpy(&h, p, 2); return from_half(h); }
inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

#include "quantize_lanes.h"

#include "quantize_legacy.h"

// ---------------------------------------------------------------- searches (ksearch.py)

// ---------------------------------------------------------------- Q4_K / Q5_K

// 8 sub-blocks of 32: 6-bit scales and mins under fp16 d and dmin; out gets d, dmin, the 12 scale bytes; L the
// codes 0..nmax from the stored scales.
void k45_head(const float *x, int nmax, float rmin, int nstep, uint8_t *out, uint8_t *L) {
    VF<8> xt[32], wt[32], sum_x2{}, av_x, min_v;
    VI<8> Lt[32];
    transpose_in<8>(x, 32, xt);
    for (int l = 0; l < 32; ++l) sum_x2 += xt[l] * xt[l];
    const VF<8> mean = sum_x2 / 32;
    for (int g = 0; g < 8; ++g) av_x[g] = std::sqrt(mean[g]);
    for (int l = 0; l < 32; ++l) wt[l] = av_x + fabs_v<8>(xt[l]);
    const VF<8> scale_v = search_scale_min<8>(32, nmax, xt, wt, Lt, &min_v, rmin, 0.1f, nstep, false);
    float scales[8], mins[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        scales[j] = scale_v[j];
        mins[j] = min_v[j];
        for (int l = 0; l < 32; ++l) L[32 * j + l] = (uint8_t)Lt[l][j];
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t *sc = out + 4, ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);
        lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
        if (ls[j] > 63) ls[j] = 63;
        if (lm[j] > 63) lm[j] = 63;
    }
    for (int j = 0; j < 4; ++j) {
        sc[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
        sc[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
        sc[j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4);
    }
    put_half(out, max_scale / 63.f);
    put_half(out + 2, max_min / 63.f);
    const float d_all = get_half(out), m_all = get_half(out + 2);
    for (int j = 0; j < 8; ++j) {
        const float d = d_all * ls[j];
        if (d == 0.f) continue;
        const float dm = m_all * lm[j];
        for (int i = 0; i < 32; ++i) L[32 * j + i] = (uint8_t)clampi(nearest_int((x[32 * j + i] + dm) / d), 0, nmax);
    }
}

void q4_k_block(const float *x, uint8_t *out) {
    uint8_t L[QK];
    k45_head(x, 15, -1.f, 20, out, L);
    uint8_t *q = out + 16;
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) q[32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4);
}

void q5_k_block(const float *x, uint8_t *out) {
    uint8_t L[QK];
    k45_head(x, 31, -0.5f, 15, out, L);
    uint8_t *qh = out + 16, *ql = out + 48;
    std::memset(qh, 0, 32);
    for (int c = 0; c < 4; ++c) {
        for (int j = 0; j < 32; ++j) {
            int a = L[64 * c + j], b = L[64 * c + 32 + j];
            if (a > 15) { a -= 16; qh[j] |= (uint8_t)(1 << (2 * c)); }
            if (b > 15) { b -= 16; qh[j] |= (uint8_t)(2 << (2 * c)); }
            ql[32 * c + j] = (uint8_t)(a | (b << 4));
        }
    }
}

// Q6_K and Q3_K: the 16 sub-blocks of 16 values searched 8 at a time (one AVX2 register per vector) with
// `search`; codes into L, each sub-block's scale into scales. Returns the scale of largest magnitude (the first on
// ties) and that magnitude in *max_abs.
template <class Search>
static float sub_block_scales(const float *x, int8_t *L, float *scales, float *max_abs, Search search) {
    for (int half = 0; half < 2; ++half) {
        VF<8> xt[16];
        VI<8> Lt[16];
        transpose_in<8>(x + 128 * half, 16, xt);
        const VF<8> scale_v = search(xt, Lt);
        for (int g = 0; g < 8; ++g) {
            const int b = 8 * half + g;
            scales[b] = scale_v[g];
            for (int i = 0; i < 16; ++i) L[16 * b + i] = (int8_t)Lt[i][g];
        }
    }
    float max_scale = 0;
    *max_abs = 0;
    for (int b = 0; b < 16; ++b) {
        const float a = std::fabs(scales[b]);
        if (a > *max_abs) { *max_abs = a; max_scale = scales[b]; }
    }
    return max_scale;
}

// ---------------------------------------------------------------- Q6_K

void q6_k_block(const float *x, uint8_t *out) {
    int8_t L[QK];
    float scales[16], max_abs;
    const float max_scale = sub_block_scales(x, L, scales, &max_abs, [](const VF<8> *xt, VI<8> *Lt) {
        return search_symmetric<8>(16, 32, xt, Lt);
    });
    uint8_t *ql = out, *qh = out + 128;
    int8_t *sc = (int8_t *)(out + 192);
    if (max_abs < GROUP_MAX_EPS) {
        std::memset(out, 0, 210);
        put_half(out + 208, 0.f);
        return;
    }
    const float iscale = -128.f / max_scale;
    put_half(out + 208, 1 / iscale);
    for (int b = 0; b < 16; ++b) {
        int v = nearest_int(iscale * scales[b]);
        sc[b] = (int8_t)(v < 127 ? v : 127);
    }
    const float d_all = get_half(out + 208);
    for (int b = 0; b < 16; ++b) {
        const float d = d_all * sc[b];
        if (d == 0.f) continue;
        for (int i = 0; i < 16; ++i) L[16 * b + i] = (int8_t)(clampi(nearest_int(x[16 * b + i] / d), -32, 31) + 32);
    }
    for (int h = 0; h < 2; ++h) {
        const int8_t *Lh = L + 128 * h;
        uint8_t *qlh = ql + 64 * h, *qhh = qh + 32 * h;
        for (int l = 0; l < 32; ++l) {
            qlh[l] = (uint8_t)((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
            qlh[l + 32] = (uint8_t)((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
            qhh[l] = (uint8_t)((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                               ((Lh[l + 96] >> 4) << 6));
        }
    }
}

// ---------------------------------------------------------------- Q2_K / Q3_K

void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *p = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)(p[0] | (p[32] << 2) | (p[64] << 4) | (p[96] << 6));
        }
}

void q2_k_block(const float *x, uint8_t *out) {
    uint8_t L[QK];
    float scales[16], mins[16];
    for (int half = 0; half < 2; ++half) {  // 8 lanes: one AVX2 register per vector
        VF<8> xt[16], wt[16], min_v;
        VI<8> Lt[16];
        transpose_in<8>(x + 128 * half, 16, xt);
        for (int l = 0; l < 16; ++l) wt[l] = fabs_v<8>(xt[l]);
        const VF<8> scale_v = search_scale_min<8>(16, 3, xt, wt, Lt, &min_v, -0.5f, 0.1f, 15, true);
        for (int g = 0; g < 8; ++g) {
            const int j = 8 * half + g;
            scales[j] = scale_v[g];
            mins[j] = min_v[g];
            for (int l = 0; l < 16; ++l) L[16 * j + l] = (uint8_t)Lt[l][g];
        }
    }
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint8_t *sc = out;
    if (max_scale > 0) {
        const float iscale = 15.f / max_scale;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
        put_half(out + 80, max_scale / 15.f);
    } else {
        std::memset(sc, 0, 16);
        put_half(out + 80, 0.f);
    }
    if (max_min > 0) {
        const float iscale = 15.f / max_min;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(sc[j] | (nearest_int(iscale * mins[j]) << 4));
        put_half(out + 82, max_min / 15.f);
    } else {
        put_half(out + 82, 0.f);
    }
    const float d_all = get_half(out + 80), m_all = get_half(out + 82);
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * (sc[j] & 0xF);
        if (d == 0.f) continue;
        const float dm = m_all * (sc[j] >> 4);
        for (int i = 0; i < 16; ++i) L[16 * j + i] = (uint8_t)clampi(nearest_int((x[16 * j + i] + dm) / d), 0, 3);
    }
    pack_2bit(L, out + 16);
}

void q3_k_block(const float *x, uint8_t *out) {
    int8_t L[QK];
    float scales[16], amax;
    const float max_scale = sub_block_scales(x, L, scales, &amax, [](const VF<8> *xt, VI<8> *Lt) {
        return search_q3<8>(16, 4, xt, Lt);
    });
    uint8_t *hmask = out, *qs = out + 32, *sc = out + 96;
    std::memset(sc, 0, 12);
    if (max_scale != 0.f) {
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l = (int8_t)(clampi(l, -32, 31) + 32);
            if (j < 8) sc[j] = l & 0xF;
            else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        put_half(out + 108, 1 / iscale);
    } else {
        put_half(out + 108, 0.f);
    }
    const float d_all = get_half(out + 108);
    for (int j = 0; j < 16; ++j) {
        int8_t s = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
        s = (int8_t)((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        const float d = d_all * s;
        if (d == 0.f) continue;
        for (int i = 0; i < 16; ++i) L[16 * j + i] = (int8_t)(clampi(nearest_int(x[16 * j + i] / d), -4, 3) + 4);
    }
    std::memset(hmask, 0, 32);
    for (int j = 0; j < QK; ++j) {
        if (L[j] > 3) {
            hmask[j % 32] |= (uint8_t)(1 << (j / 32));
            L[j] = (int8_t)(L[j] - 4);
        }
    }
    pack_2bit((const uint8_t *)L, qs);
}

// ---------------------------------------------------------------- IQ4_NL / IQ4_XS (iq4nl.py)

constexpr int8_t KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// The nearest codebook entry, a tie going up (ggml's best_index_int8). The midpoints between entries are
// multiples of 1/2, so the answer depends only on floor(2v): a table over that, clamped at both ends.
constexpr int SLOT_LO = 2 * -127 - 1, SLOT_HI = 2 * 113 + 1;

struct IndexTable {
    uint8_t idx[SLOT_HI - SLOT_LO + 1];
    IndexTable() {
        for (int s = SLOT_LO; s <= SLOT_HI; ++s) {
            // midpoints m <= v for v in [s/2, (s+1)/2): m is a multiple of 1/2, so m <= s/2, i.e. 2m <= s
            int n = 0;
            for (int k = 0; k < 15; ++k) n += s >= KVALUES[k] + KVALUES[k + 1] ? 1 : 0;
            idx[s - SLOT_LO] = (uint8_t)n;
        }
    }
};
const IndexTable INDEX;

inline int best_index(float v) {
    float t = 2 * v;  // exact
    t = t > SLOT_HI ? SLOT_HI : t;
    t = t >= SLOT_LO ? t : SLOT_LO;  // NaN too (only in groups whose result is discarded), as the codec does
    return INDEX.idx[(int)std::floor(t) - SLOT_LO];
}

// The scale of one 32-group with weights x^2: the max scale, then 15 trial inverse scales (ntry = 7).
float iq4_group_scale(const float *x) {
    float amax = 0, mx = 0;
    for (int j = 0; j < 32; ++j) {
        const float a = std::fabs(x[j]);
        if (a > amax) { amax = a; mx = x[j]; }
    }
    if (amax < GROUP_MAX_EPS) return 0.f;
    float d = -mx / KVALUES[0];
    float id = 1 / d, sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
        const float q = KVALUES[best_index(id * x[j])], w = x[j] * x[j];
        sumqx += w * q * x[j];
        sumq2 += w * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int t = -7; t <= 7; ++t) {
        id = (t + KVALUES[0]) / mx;
        sumqx = sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            const float q = KVALUES[best_index(id * x[j])], w = x[j] * x[j];
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

void pack_iq4(const uint8_t *L, uint8_t *qs, int groups) {
    for (int g = 0; g < groups; ++g)
        for (int j = 0; j < 16; ++j) qs[16 * g + j] = (uint8_t)(L[32 * g + j] | (L[32 * g + 16 + j] << 4));
}

void iq4_nl_block(const float *x, uint8_t *out) {
    const float d = iq4_group_scale(x);
    put_half(out, d);
    const float id = d != 0.f ? 1 / d : 0;
    uint8_t L[32];
    for (int j = 0; j < 32; ++j) L[j] = (uint8_t)best_index(id * x[j]);
    pack_iq4(L, out + 2, 1);
}

void iq4_xs_block(const float *x, uint8_t *out) {
    float scales[8];
    float max_scale = 0, amax_scale = 0;
    for (int g = 0; g < 8; ++g) {
        scales[g] = iq4_group_scale(x + 32 * g);
        const float a = std::fabs(scales[g]);
        if (a > amax_scale) { amax_scale = a; max_scale = scales[g]; }
    }
    const float d = -max_scale / 32;
    put_half(out, d);
    const float id = d != 0.f ? 1 / d : 0.f;
    uint16_t scales_h = 0;
    uint8_t *scales_l = out + 4, L[QK];
    std::memset(scales_l, 0, 4);
    for (int g = 0; g < 8; ++g) {
        int l = clampi(nearest_int(id * scales[g]), -32, 31);
        const float dl = d * l;
        const float idl = dl != 0.f ? 1 / dl : 0.f;
        for (int j = 0; j < 32; ++j) L[32 * g + j] = (uint8_t)best_index(idl * x[32 * g + j]);
        l += 32;
        scales_l[g / 2] |= (uint8_t)((l & 0xF) << (4 * (g % 2)));
        scales_h |= (uint16_t)((l >> 4) << (2 * g));
    }
    std::memcpy(out + 2, &scales_h, 2);
    pack_iq4(L, out + 8, 8);
}

struct Kind {
    int block, bytes;
    void (*run)(const float *, uint8_t *);
    int half0, half1;  // byte offsets of the block's fp16 fields (-1: none)
};

bool kind_of(int type, Kind *k) {
    switch (type) {
        case Q4_0: *k = {32, 18, q4_0_block, 0, -1}; return true;
        case Q4_1: *k = {32, 20, q4_1_block, 0, 2}; return true;
        case Q5_0: *k = {32, 22, q5_0_block, 0, -1}; return true;
        case Q5_1: *k = {32, 24, q5_1_block, 0, 2}; return true;
        case Q8_0: *k = {32, 34, q8_0_block, 0, -1}; return true;
        case Q2_K: *k = {QK, 84, q2_k_block, 80, 82}; return true;
        case Q3_K: *k = {QK, 110, q3_k_block, 108, -1}; return true;
        case Q4_K: *k = {QK, 144, q4_k_block, 0, 2}; return true;
        case Q5_K: *k = {QK, 176, q5_k_block, 0, 2}; return true;
        case Q6_K: *k = {QK, 210, q6_k_block, 208, -1}; return true;
        case IQ4_NL: *k = {32, 18, iq4_nl_block, 0, -1}; return true;
        case IQ4_XS: *k = {QK, 136, iq4_xs_block, 0, -1}; return true;
        default: return false;
    }
}

// NaN/Inf, and |x| >= 2^40 (where the searches' x^3 terms overflow and C and numpy part ways), go to the codec.
inline bool in_range(const float *x, int n) {
    uint32_t bad = 0;
    for (int i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, x + i, 4);
        bad |= (u & 0x7f800000u) >= ((127u + 40u) << 23);
    }
    return bad == 0;
}

inline bool half_inf(const uint8_t *block, int offset) {
    if (offset < 0) return false;
    uint16_t h;
    std::memcpy(&h, block + offset, 2);
    return (h & 0x7c00) == 0x7c00;
}

}  // namespace

extern "C" {

int fqz_version() { return 2; }

int fqz_has(int type) {
    Kind k;
    return kind_of(type, &k) ? 1 : 0;
}

int fqz_quantize(int type, const void *x, int x_type, uint8_t *out, int64_t nrows, int64_t ncols) {
    Kind k;
    if (!kind_of(type, &k) || ncols % k.block != 0 || (x_type != 0 && x_type != 1 && x_type != 30)) return -1;
    const int64_t per_row = ncols / k.block, n = nrows * per_row;
    float buf[QK];
    for (int64_t b = 0; b < n; ++b) {
        const float *xb = buf;
        if (x_type == 0) {
            xb = (const float *)x + b * k.block;
        } else if (x_type == 1) {
            const uint16_t *h = (const uint16_t *)x + b * k.block;
            for (int i = 0; i < k.block; i += 8)
                _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
        } else {
            const uint16_t *h = (const uint16_t *)x + b * k.block;
            for (int i = 0; i < k.block; ++i) {
                const uint32_t u = (uint32_t)h[i] << 16;
                std::memcpy(buf + i, &u, 4);
            }
        }
        uint8_t *ob = out + b * k.bytes;
        if (!in_range(xb, k.block)) return -2;
        k.run(xb, ob);
        if (half_inf(ob, k.half0) || half_inf(ob, k.half1)) return -3;
    }
    return 0;
}

}  // extern "C"
