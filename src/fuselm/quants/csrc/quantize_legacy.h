// fuselm's native quantizers, part 3: the 32-element types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (legacy.py). Included by
// quantize.cpp inside its anonymous namespace, after quantize_lanes.h.

// ---------------------------------------------------------------- Q8_0

void q8_0_block(const float *x, uint8_t *out) {
    // max |x| in 8 lanes, then across them: max is exact in any order (the values are finite)
    VF<8> v[4], a;
    std::memcpy(v, x, sizeof v);
    a = fabs_v<8>(v[0]);
    for (int k = 1; k < 4; ++k) {
        const VF<8> b = fabs_v<8>(v[k]);
        a = b > a ? b : a;
    }
    float amax = 0.f;
    for (int g = 0; g < 8; ++g) amax = std::fmax(amax, a[g]);
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    put_half(out, d);
    for (int k = 0; k < 4; ++k) {
        const VF<8> y = v[k] * id;
        for (int g = 0; g < 8; ++g) out[2 + 8 * k + g] = (uint8_t)(int8_t)std::roundf(y[g]);
    }
}

// ---------------------------------------------------------------- Q4_0 / Q4_1 / Q5_0 / Q5_1 (legacy.py)

// Symmetric: d = (signed value of max |x|) / -levels, codes min(2*levels - 1, (int8)(x/d + levels + 0.5)).
// Asymmetric: d = (max - min) / top, codes (int8)((x - min)/d + 0.5), at most top. 4 or 5 bits; the 5th bits of
// all 32 codes go to a uint32 after d (and m).
void legacy_block(const float *x, uint8_t *out, bool symmetric, int bits) {
    uint8_t q[32];
    int off = 2;
    if (symmetric) {
        const int levels = 1 << (bits - 1);
        float amax = 0.f, mx = 0.f;
        for (int j = 0; j < 32; ++j)
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); mx = x[j]; }
        const float d = mx / -levels;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        put_half(out, d);
        for (int j = 0; j < 32; ++j) {
            const int v = (int8_t)(x[j] * id + (levels + 0.5f));
            q[j] = (uint8_t)(v < 2 * levels - 1 ? v : 2 * levels - 1);
        }
    } else {
        const int top = (1 << bits) - 1;
        float lo = x[0], hi = x[0];
        for (int j = 1; j < 32; ++j) {
            if (x[j] < lo) lo = x[j];
            if (x[j] > hi) hi = x[j];
        }
        const float d = (hi - lo) / top;
        const float id = d != 0.f ? 1.0f / d : 0.0f;
        put_half(out, d);
        put_half(out + 2, lo);
        off = 4;
        for (int j = 0; j < 32; ++j) {
            const int v = (int8_t)((x[j] - lo) * id + 0.5f);
            q[j] = (uint8_t)(v < top ? v : top);
        }
    }
    if (bits == 5) {
        uint32_t qh = 0;
        for (int j = 0; j < 32; ++j) qh |= (uint32_t)(q[j] >> 4) << j;
        std::memcpy(out + off, &qh, 4);
        off += 4;
    }
    for (int j = 0; j < 16; ++j) out[off + j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

void q4_0_block(const float *x, uint8_t *out) { legacy_block(x, out, true, 4); }
void q4_1_block(const float *x, uint8_t *out) { legacy_block(x, out, false, 4); }
void q5_0_block(const float *x, uint8_t *out) { legacy_block(x, out, true, 5); }
void q5_1_block(const float *x, uint8_t *out) { legacy_block(x, out, false, 5); }

