// Decode attention over a KV cache: one query position per sequence, every cached position attended to.
//
// q [B, H, D] f32 (contiguous); K, V: element (b, g, t, d) at base + b * sb + g * sg + t * D + d (elements of
// f32, fp16 or bf16: kind 2, 1, 0), g = h / (H / G) (grouped-query attention); positions t in [pad[b], L) are
// attended to (pad NULL: from 0). out [B, H, D] f32. Scores and the softmax are float32, two passes over the
// positions (scores kept in a buffer). One (b, h) pair per task, on demand, so a busy core takes fewer.
#pragma once

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include <vector>

#include "simd.h"

namespace fq {

template <int KIND>
inline VF load16(const void* base, int64_t i) {
    if constexpr (KIND == 2) return f_load((const float*)base + i);
    else if constexpr (KIND == 1) return f_halfs((const uint16_t*)base + i);
    else return f_bf16s((const uint16_t*)base + i);
}

template <int KIND>
inline float load1(const void* base, int64_t i) {
    if constexpr (KIND == 2) return ((const float*)base)[i];
    const uint16_t u = ((const uint16_t*)base)[i];
    if constexpr (KIND == 1) return f16_to_f32(u);
    uint32_t w = (uint32_t)u << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

template <int KIND>
void decode_attention(const float* q, const void* K, const void* V, int64_t B, int64_t H, int64_t G, int64_t D,
                      int64_t L, int64_t sb, int64_t sg, const int64_t* pad, float scale, float* out) {
    const int64_t D16 = D / 16 * 16, per_group = H / G;
#pragma omp parallel
    {
        std::vector<float> p(L > 0 ? L : 1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, g = h / per_group;
            const float* qv = q + bh * D;
            float* o = out + bh * D;
            const int64_t t0 = pad ? pad[b] : 0;
            const int64_t base = b * sb + g * sg;
            float mx = -INFINITY;
            for (int64_t t = t0; t < L; t++) {
                const int64_t row = base + t * D;
                VF acc = f_zero();
                for (int64_t d = 0; d < D16; d += 16) acc = f_fma(f_load(qv + d), load16<KIND>(K, row + d), acc);
                float s = f_sum(acc);
                for (int64_t d = D16; d < D; d++) s += qv[d] * load1<KIND>(K, row + d);
                p[t] = s * scale;
                mx = p[t] > mx ? p[t] : mx;
            }
            float sum = 0.f;
            for (int64_t t = t0; t < L; t++) sum += (p[t] = expf(p[t] - mx));
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t t = t0; t < L; t++) {
                const int64_t row = base + t * D;
                const VF w = f_set1(p[t] * inv);
                for (int64_t d = 0; d < D16; d += 16) f_store(o + d, f_fma(w, load16<KIND>(V, row + d), f_load(o + d)));
                for (int64_t d = D16; d < D; d++) o[d] += p[t] * inv * load1<KIND>(V, row + d);
            }
        }
    }
}

}  // namespace fq

extern "C" int fq_decode_attention(const float* q, const void* K, const void* V, int kind, int64_t B, int64_t H,
                                   int64_t G, int64_t D, int64_t L, int64_t sb, int64_t sg, const int64_t* pad,
                                   float scale, float* out) {
    if (G <= 0 || H % G != 0) return -2;
    if (kind == 2) fq::decode_attention<2>(q, K, V, B, H, G, D, L, sb, sg, pad, scale, out);
    else if (kind == 1) fq::decode_attention<1>(q, K, V, B, H, G, D, L, sb, sg, pad, scale, out);
    else if (kind == 0) fq::decode_attention<0>(q, K, V, B, H, G, D, L, sb, sg, pad, scale, out);
    else return -1;
    return 0;
}
