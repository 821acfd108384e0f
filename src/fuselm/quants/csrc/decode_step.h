// A decode step's work between its matmuls, in float32: RMSNorm, SiLU(gate) * up, and attention for one new
// position per sequence (RoPE on q and k, k and v written into the KV cache, softmax over the row's positions).
//
// Each replaces several torch ops whose fixed costs (dispatch, temporaries, views) outweighed the arithmetic at
// one token: ~0.4 ms per layer of a 22-layer model. Small work stays on the calling thread, because waking the
// OpenMP pool (passive waiting, see fuselm/threads.py) costs ~35 us on a VM, more than the work itself.
#pragma once

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace fq {

// e^x on 16 lanes: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), e^r by its Taylor series to r^7
// (truncation < 2e-8 relative), 2^n put into the exponent. x is clamped to [-87, 88] (e^-87 ~ 1.6e-38).
inline VF f_exp(VF x) {
    x = f_min(f_max(x, f_set1(-87.f)), f_set1(88.f));
    const VF n = f_round(f_mul(x, f_set1(1.44269504088896341f)));
    VF r = f_fma(n, f_set1(-0.693359375f), x);
    r = f_fma(n, f_set1(2.12194440e-4f), r);
    VF p = f_set1(1.f / 5040);
    p = f_fma(p, r, f_set1(1.f / 720));
    p = f_fma(p, r, f_set1(1.f / 120));
    p = f_fma(p, r, f_set1(1.f / 24));
    p = f_fma(p, r, f_set1(1.f / 6));
    p = f_fma(p, r, f_set1(0.5f));
    p = f_fma(p, r, f_set1(1.f));
    p = f_fma(p, r, f_set1(1.f));
    return f_mul(p, f_pow2i(n));
}

inline float dot(const float* a, const float* b, int64_t n) {
    VF acc = f_zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = f_fma(f_load(a + i), f_load(b + i), acc);
    float s = f_sum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)), HF Llama's order of operations
inline void rms_norm(const float* x, const float* w, int64_t M, int64_t D, float eps, float* out) {
#pragma omp parallel for schedule(static) if (M * D >= (1 << 18))
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * D;
        float* o = out + m * D;
        const float inv = 1.f / sqrtf(dot(xr, xr, D) / (float)D + eps);
        int64_t d = 0;
        for (; d + 16 <= D; d += 16) f_store(o + d, f_mul(f_load(w + d), f_mul(f_load(xr + d), f_set1(inv))));
        for (; d < D; d++) o[d] = w[d] * (xr[d] * inv);
    }
}

// out[m, i] = silu(g) * u for a row [g (F values), u (F values)] of gu
inline void silu_mul(const float* gu, int64_t M, int64_t F, float* out) {
#pragma omp parallel for schedule(static) if (M * F >= (1 << 17))
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + m * 2 * F;
        const float* u = g + F;
        float* o = out + m * F;
        int64_t i = 0;
        for (; i + 16 <= F; i += 16) {
            const VF gv = f_load(g + i);
            const VF s = f_div(gv, f_add(f_set1(1.f), f_exp(f_sub(f_zero(), gv))));
            f_store(o + i, f_mul(s, f_load(u + i)));
        }
        for (; i < F; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

// HF's rotate-half RoPE on the first R of D values: x * cos + rotate_half(x) * sin; the rest pass through
inline void rope(const float* x, const float* c, const float* s, int64_t R, int64_t D, float* o) {
    const int64_t h = R / 2;
    for (int64_t i = 0; i < h; i++) o[i] = x[i] * c[i] + -x[i + h] * s[i];
    for (int64_t i = h; i < R; i++) o[i] = x[i] * c[i] + x[i - h] * s[i];
    for (int64_t i = R; i < D; i++) o[i] = x[i];
}

// p[t] = scale * q . K[t] for n keys of D values, four keys at a time (one reduction for four sums)
inline void scores(const float* q, const float* K, int64_t n, int64_t D, float scale, float* p) {
    const int64_t D16 = D / 16 * 16;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float* k0 = K + t * D;
        VF a0 = f_zero(), a1 = f_zero(), a2 = f_zero(), a3 = f_zero();
        for (int64_t d = 0; d < D16; d += 16) {
            const VF qv = f_load(q + d);
            a0 = f_fma(qv, f_load(k0 + d), a0);
            a1 = f_fma(qv, f_load(k0 + D + d), a1);
            a2 = f_fma(qv, f_load(k0 + 2 * D + d), a2);
            a3 = f_fma(qv, f_load(k0 + 3 * D + d), a3);
        }
        __m128 s4 = f_sum4(a0, a1, a2, a3);
        if (D16 < D) {  // D not a multiple of 16 (rare): the rest in scalar code
            alignas(16) float r[4] = {};
            for (int j = 0; j < 4; j++)
                for (int64_t d = D16; d < D; d++) r[j] += q[d] * k0[j * D + d];
            s4 = _mm_add_ps(s4, _mm_load_ps(r));
        }
        _mm_storeu_ps(p + t, _mm_mul_ps(s4, _mm_set1_ps(scale)));
    }
    for (; t < n; t++) p[t] = dot(q, K + t * D, D) * scale;
}

// o[d] = sum over t of w[t] * V[t, d]: 64 values of o at a time stay in registers over all n keys
inline void weighted_sum(const float* w, const float* V, int64_t n, int64_t D, float* o) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
        VF a0 = f_zero(), a1 = f_zero(), a2 = f_zero(), a3 = f_zero();
        for (int64_t t = 0; t < n; t++) {
            const float* vr = V + t * D + d0;
            const VF wt = f_set1(w[t]);
            a0 = f_fma(wt, f_load(vr), a0);
            a1 = f_fma(wt, f_load(vr + 16), a1);
            a2 = f_fma(wt, f_load(vr + 32), a2);
            a3 = f_fma(wt, f_load(vr + 48), a3);
        }
        f_store(o + d0, a0), f_store(o + d0 + 16, a1), f_store(o + d0 + 32, a2), f_store(o + d0 + 48, a3);
    }
    for (; d0 + 16 <= D; d0 += 16) {
        VF a0 = f_zero();
        for (int64_t t = 0; t < n; t++) a0 = f_fma(f_set1(w[t]), f_load(V + t * D + d0), a0);
        f_store(o + d0, a0);
    }
    for (; d0 < D; d0++) {
        float a0 = 0.f;
        for (int64_t t = 0; t < n; t++) a0 += w[t] * V[t * D + d0];
        o[d0] = a0;
    }
}

// p = softmax(p) over n >= 1 values, 16 lanes at a time (the tail through a copy padded with -inf)
inline void softmax(float* p, int64_t n) {
    const int64_t n16 = n / 16 * 16;
    alignas(64) float tail[16];
    std::fill(tail, tail + 16, -INFINITY);
    std::copy(p + n16, p + n, tail);
    VF m = f_load(tail);
    for (int64_t t = 0; t < n16; t += 16) m = f_max(m, f_load(p + t));
    const VF mx = f_set1(f_max_lane(m));
    VF sum = f_zero();
    for (int64_t t = 0; t < n16; t += 16) {
        const VF e = f_exp(f_sub(f_load(p + t), mx));
        f_store(p + t, e);
        sum = f_add(sum, e);
    }
    f_store(tail, f_exp(f_sub(f_load(tail), mx)));  // the padding lanes (e^-87 after the clamp) are not summed
    float total = f_sum(sum);
    for (int64_t t = n16; t < n; t++) total += tail[t - n16];
    const float inv = 1.f / total;
    for (int64_t t = 0; t < n16; t += 16) f_store(p + t, f_mul(f_load(p + t), f_set1(inv)));
    for (int64_t t = n16; t < n; t++) p[t] = tail[t - n16] * inv;
}

struct Attend {
    const float *q, *k, *v;  // [B, H, D], [B, G, D], [B, G, D]: element (b, h, d) at q[b * ldq + h * D + d]
    int64_t ldq, ldk, ldv;
    const float *cos, *sin;  // [R] for row b at cos + b * ldcs (ldcs 0: one table for every row)
    int64_t ldcs, R;
    float *K, *V;  // the cache: element (row, g, t, d) at K[row * sb + g * sg + t * D + d]
    int64_t sb, sg;
    const int64_t *rows, *starts, *pads;  // per batch row: its cache row, the new token's slot, first real slot
    int64_t window;                       // > 0: keys older than the window are not attended to
    int64_t B, H, G, D;
    float scale;
    float* out;  // [B, H * D]
};

inline void decode_attend(const Attend& a) {
    const int64_t D = a.D, per_group = a.H / a.G;
    int64_t longest = 0;
    for (int64_t b = 0; b < a.B; b++) {  // the new keys (rotated) and values into the cache, first
        const float* c = a.cos + b * a.ldcs;
        const float* s = a.sin + b * a.ldcs;
        for (int64_t g = 0; g < a.G; g++) {
            const int64_t at = a.rows[b] * a.sb + g * a.sg + a.starts[b] * D;
            rope(a.k + b * a.ldk + g * D, c, s, a.R, D, a.K + at);
            std::copy(a.v + b * a.ldv + g * D, a.v + b * a.ldv + (g + 1) * D, a.V + at);
        }
        longest = std::max(longest, a.starts[b] + 1);
    }
#pragma omp parallel for schedule(dynamic, 1) if (a.B * a.H * longest * D >= (1 << 20))
    for (int64_t bh = 0; bh < a.B * a.H; bh++) {
        static thread_local std::vector<float> p, qr;
        const int64_t b = bh / a.H, h = bh % a.H, g = h / per_group;
        const int64_t end = a.starts[b] + 1;
        const int64_t lo = a.window > 0 ? std::max(a.pads[b], end - a.window) : a.pads[b];
        if ((int64_t)p.size() < end) p.resize(end);
        if ((int64_t)qr.size() < D) qr.resize(D);
        rope(a.q + b * a.ldq + h * D, a.cos + b * a.ldcs, a.sin + b * a.ldcs, a.R, D, qr.data());
        const float* Kb = a.K + a.rows[b] * a.sb + g * a.sg;
        const float* Vb = a.V + a.rows[b] * a.sb + g * a.sg;
        float* o = a.out + b * a.H * D + h * D;
        const int64_t n = end - lo;
        scores(qr.data(), Kb + lo * D, n, D, a.scale, p.data());
        softmax(p.data(), n);
        weighted_sum(p.data(), Vb + lo * D, n, D, o);
    }
}

}  // namespace fq

extern "C" {

// x, out [M, D] and w [D], contiguous
int fq_rms_norm(const float* x, const float* w, int64_t M, int64_t D, float eps, float* out) {
    fq::rms_norm(x, w, M, D, eps, out);
    return 0;
}

// gu [M, 2F], out [M, F], contiguous
int fq_silu_mul(const float* gu, int64_t M, int64_t F, float* out) {
    fq::silu_mul(gu, M, F, out);
    return 0;
}

// See struct Attend for the arguments, in its order; rows, slots and padding are checked against the cache.
int fq_decode_attend(const float* q, const float* k, const float* v, int64_t ldq, int64_t ldk, int64_t ldv,
                     const float* cos, const float* sin, int64_t ldcs, int64_t R, float* K, float* V, int64_t sb,
                     int64_t sg, int64_t cache_rows, int64_t capacity, const int64_t* rows, const int64_t* starts,
                     const int64_t* pads, int64_t window, int64_t B, int64_t H, int64_t G, int64_t D, float scale,
                     float* out) {
    if (G <= 0 || H % G != 0 || R > D || R % 2) return -2;
    for (int64_t b = 0; b < B; b++)
        if (rows[b] < 0 || rows[b] >= cache_rows || starts[b] >= capacity || pads[b] < 0 || pads[b] > starts[b])
            return -3;
    fq::decode_attend(fq::Attend{q, k, v, ldq, ldk, ldv, cos, sin, ldcs, R, K, V, sb, sg, rows, starts, pads, window,
                                 B, H, G, D, scale, out});
    return 0;
}
}
