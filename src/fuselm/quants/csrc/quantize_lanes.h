// fuselm's native quantizers, part 2: the scale searches with one group per vector lane. Included by
// quantize.cpp inside its anonymous namespace (it uses GROUP_MAX_EPS from there).

// The searches run one group per vector lane (GCC vector extensions): each lane does exactly the scalar C steps
// on its own group, in the same order, so the bytes do not change; branches become per-lane selects.
template <int N> struct Lanes;
template <> struct Lanes<8> {
    typedef float f __attribute__((vector_size(32)));
    typedef int32_t i __attribute__((vector_size(32)));
};
template <int N> using VF = typename Lanes<N>::f;
template <int N> using VI = typename Lanes<N>::i;

template <int N> inline VI<N> nearest_int_v(VF<N> v) {
    VF<N> t = v + 12582912.f;
    VI<N> i;
    std::memcpy(&i, &t, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

template <int N> inline VF<N> fabs_v(VF<N> v) {
    VI<N> i;
    std::memcpy(&i, &v, sizeof i);
    i &= 0x7fffffff;
    VF<N> out;
    std::memcpy(&out, &i, sizeof out);
    return out;
}

template <int N> inline VI<N> clamp_v(VI<N> v, int lo, int hi) {
    v = v < lo ? VI<N>{} + lo : v;
    return v > hi ? VI<N>{} + hi : v;
}

template <int N> inline VF<N> to_f(VI<N> v) { return __builtin_convertvector(v, VF<N>); }

// Group g's element i is xt[i][g]: n values per group, N groups side by side.
template <int N> void transpose_in(const float *x, int n, VF<N> *xt) {
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < N; ++g) xt[i][g] = x[n * g + i];
}

// Scale and min for n values into 0..nmax, weighted least squares over nstep+1 trial scales (make_qkx2_quants).
template <int N>
VF<N> search_scale_min(int n, int nmax, const VF<N> *x, const VF<N> *w, VI<N> *L, VF<N> *the_min, float rmin,
                       float rdelta, int nstep, bool use_mad) {
    VI<N> aux[32];
    VF<N> lo = x[0], hi = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    lo = lo > 0 ? VF<N>{} : lo;
    const VI<N> flat = hi == lo;
    const VF<N> flat_min = -lo;
    VF<N> iscale = (float)nmax / (hi - lo);
    VF<N> scale = 1 / iscale;
    VF<N> best{};
    for (int i = 0; i < n; ++i) {
        L[i] = clamp_v<N>(nearest_int_v<N>(iscale * (x[i] - lo)), 0, nmax);
        VF<N> diff = scale * to_f<N>(L[i]) + lo - x[i];
        diff = use_mad ? fabs_v<N>(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int step = 0; nstep >= 1 && step <= nstep; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (hi - lo);
        VF<N> sum_l{}, sum_l2{}, sum_xl{};
        for (int i = 0; i < n; ++i) {
            aux[i] = clamp_v<N>(nearest_int_v<N>(iscale * (x[i] - lo)), 0, nmax);
            const VF<N> l = to_f<N>(aux[i]);
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const VF<N> det = sum_w * sum_l2 - sum_l * sum_l;
        VF<N> s = (sum_w * sum_xl - sum_x * sum_l) / det;
        VF<N> m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const VI<N> clip = m > 0;
        m = clip ? VF<N>{} : m;
        s = clip ? sum_xl / sum_l2 : s;
        VF<N> err{};
        for (int i = 0; i < n; ++i) {
            VF<N> diff = s * to_f<N>(aux[i]) + m - x[i];
            diff = use_mad ? fabs_v<N>(diff) : diff * diff;
            err += w[i] * diff;
        }
        const VI<N> take = (det > 0) & (err < best);
        for (int i = 0; i < n; ++i) L[i] = take ? aux[i] : L[i];
        best = take ? err : best;
        scale = take ? s : scale;
        lo = take ? m : lo;
    }
    for (int i = 0; i < n; ++i) L[i] = flat ? VI<N>{} : L[i];
    *the_min = flat ? flat_min : -lo;
    return flat ? VF<N>{} : scale;
}

// Per lane: the value of largest magnitude among n (the first one on ties) and, in *amax, its magnitude.
template <int N> VF<N> signed_max(int n, const VF<N> *x, VF<N> *amax) {
    VF<N> mx{}, a_max{};
    for (int i = 0; i < n; ++i) {
        const VF<N> a = fabs_v<N>(x[i]);
        const VI<N> bigger = a > a_max;
        a_max = bigger ? a : a_max;
        mx = bigger ? x[i] : mx;
    }
    *amax = a_max;
    return mx;
}

// Signed scale for n values into -nmax..nmax-1 (stored + nmax), weights x^2, 18 trial scales (Q6_K's
// make_qx_quants with rmse_type 1).
template <int N> VF<N> search_symmetric(int n, int nmax, const VF<N> *x, VI<N> *L) {
    VF<N> amax;
    const VF<N> mx = signed_max<N>(n, x, &amax);
    const VI<N> zero = amax < GROUP_MAX_EPS;
    VF<N> iscale = (float)-nmax / mx;
    VF<N> sumlx{}, suml2{};
    for (int i = 0; i < n; ++i) {
        const VI<N> l = clamp_v<N>(nearest_int_v<N>(iscale * x[i]), -nmax, nmax - 1);
        L[i] = l + nmax;
        const VF<N> w = x[i] * x[i], lf = to_f<N>(l);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    VF<N> scale = suml2 != 0 ? sumlx / suml2 : VF<N>{};
    VF<N> best = scale * sumlx;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        iscale = -(nmax + 0.1f * step) / mx;
        sumlx = VF<N>{};
        suml2 = VF<N>{};
        for (int i = 0; i < n; ++i) {
            const VF<N> lf = to_f<N>(clamp_v<N>(nearest_int_v<N>(iscale * x[i]), -nmax, nmax - 1));
            const VF<N> w = x[i] * x[i];
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        const VI<N> take = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        for (int i = 0; i < n; ++i)
            L[i] = take ? nmax + clamp_v<N>(nearest_int_v<N>(iscale * x[i]), -nmax, nmax - 1) : L[i];
        scale = take ? sumlx / suml2 : scale;
        best = take ? scale * sumlx : best;
    }
    for (int i = 0; i < n; ++i) L[i] = zero ? VI<N>{} : L[i];
    return zero ? VF<N>{} : scale;
}

// Q3_K's search (make_q3_quants with rmse): from the max scale, move single codes while the weighted fit improves,
// up to 5 passes; a lane whose pass changes nothing stops, as the scalar loop breaks.
template <int N> VF<N> search_q3(int n, int nmax, const VF<N> *x, VI<N> *L) {
    VF<N> amax;
    const VF<N> mx = signed_max<N>(n, x, &amax);
    const VI<N> zero = amax < GROUP_MAX_EPS;
    const VF<N> iscale = (float)-nmax / mx;
    VF<N> sumlx{}, suml2{};
    for (int i = 0; i < n; ++i) {
        L[i] = clamp_v<N>(nearest_int_v<N>(iscale * x[i]), -nmax, nmax - 1);
        const VF<N> w = x[i] * x[i], lf = to_f<N>(L[i]);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    VI<N> active = ~zero;
    for (int pass = 0; pass < 5; ++pass) {
        VI<N> changed{};
        for (int i = 0; i < n; ++i) {
            const VF<N> w = x[i] * x[i], lf = to_f<N>(L[i]);
            const VF<N> slx = sumlx - w * x[i] * lf;
            const VF<N> sl2 = suml2 - w * lf * lf;
            const VI<N> nl = clamp_v<N>(nearest_int_v<N>(x[i] * sl2 / slx), -nmax, nmax - 1);
            const VF<N> nlf = to_f<N>(nl);
            const VF<N> slx_new = slx + w * x[i] * nlf;
            const VF<N> sl2_new = sl2 + w * nlf * nlf;
            const VI<N> take = active & (slx > 0) & (nl != L[i]) & (sl2_new > 0) &
                               (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new);
            L[i] = take ? nl : L[i];
            sumlx = take ? slx_new : sumlx;
            suml2 = take ? sl2_new : suml2;
            changed |= take;
        }
        active &= changed;
        bool any = false;
        for (int g = 0; g < N; ++g) any |= active[g] != 0;
        if (!any) break;
    }
    for (int i = 0; i < n; ++i) L[i] = zero ? VI<N>{} : L[i] + nmax;
    const VF<N> scale = suml2 > 0 ? sumlx / suml2 : VF<N>{};
    return zero ? VF<N>{} : scale;
}
