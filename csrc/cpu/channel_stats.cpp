// Per-channel shifted sums for streaming statistics (see CONTRACT.md, "Channel statistics").
//
// x is a contiguous [outer, C, inner] array; for every channel c the kernel adds
// sum(x - shift[c]) and sum((x - shift[c])^2) over (outer, inner) into float64 accumulators,
// converting each element to float64 first (a shift near the mean then leaves no cancellation
// that matters). Deterministic: the work is cut into items of a fixed size that does not depend
// on the thread count, each item writes its own partial sums, and partials are added in a fixed
// order.
#include <vector>

#include "common.h"
#include "kernels.h"

namespace nlm {
namespace {

// Elements per work item (128 KiB of fp32): large enough to amortize the per-item overhead,
// small enough that a batch of activations makes many items for the threads to share.
constexpr int64_t ITEM = int64_t(1) << 15;
// 8 float64 lanes: one AVX-512 register, two AVX2 ones (GCC lowers the generic operations to
// whatever the target has); 1.6x faster than 4 lanes on an AVX-512 EPYC.
typedef double vd __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

// Element loads as float64: one, or 8 consecutive ones as a vector.
template <int D> struct In {
    using S = typename DT<D>::S;
    static inline double get(S v) { return double(DT<D>::load(v)); }
    static inline vd get8(const S* p) {
        vf8 f;
        for (int j = 0; j < 8; j++) f[j] = DT<D>::load(p[j]);
        return __builtin_convertvector(f, vd);
    }
};
template <> struct In<F32> {
    using S = float;
    static inline double get(float v) { return double(v); }
    static inline vd get8(const float* p) {
        vf8 f;
        std::memcpy(&f, p, sizeof f);
        return __builtin_convertvector(f, vd);
    }
};
template <> struct In<F64> {
    using S = double;
    static inline double get(double v) { return v; }
    static inline vd get8(const double* p) {
        vd v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
};

// Features last (inner == 1): rows [r0, r1) of [outer, C], every channel; lane-wise over c. Four
// rows per pass: the running sums are loaded and stored once per four elements, not per element.
template <int D>
void rows(const typename In<D>::S* __restrict x, int64_t C, int64_t r0, int64_t r1, const double* __restrict shift,
          double* __restrict s, double* __restrict ss) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const typename In<D>::S* __restrict p = x + r * C;
        for (int64_t c = 0; c < C; c++) {
            const double d0 = In<D>::get(p[c]) - shift[c], d1 = In<D>::get(p[C + c]) - shift[c];
            const double d2 = In<D>::get(p[2 * C + c]) - shift[c], d3 = In<D>::get(p[3 * C + c]) - shift[c];
            s[c] += (d0 + d1) + (d2 + d3);
            ss[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    }
    for (; r < r1; r++) {
        const typename In<D>::S* __restrict row = x + r * C;
        for (int64_t c = 0; c < C; c++) {
            const double d = In<D>::get(row[c]) - shift[c];
            s[c] += d;
            ss[c] += d * d;
        }
    }
}

// One contiguous run of n elements of one channel. Four independent vector accumulators per sum:
// a single running sum is a chain of dependent adds (latency-bound, and GCC may not reorder it
// under strict IEEE semantics); the lanes are combined in a fixed order at the end.
template <int D>
void run(const typename In<D>::S* __restrict p, int64_t n, double k, double& s_out, double& ss_out) {
    const vd kv = k - vd{};
    vd s0 = {}, s1 = {}, s2 = {}, s3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const vd d0 = In<D>::get8(p + i) - kv, d1 = In<D>::get8(p + i + 8) - kv;
        const vd d2 = In<D>::get8(p + i + 16) - kv, d3 = In<D>::get8(p + i + 24) - kv;
        s0 += d0;
        s1 += d1;
        s2 += d2;
        s3 += d3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    for (; i + 8 <= n; i += 8) {
        const vd d = In<D>::get8(p + i) - kv;
        s0 += d;
        q0 += d * d;
    }
    const vd sv = (s0 + s1) + (s2 + s3), qv = (q0 + q1) + (q2 + q3);
    double ts = 0.0, tss = 0.0;
    for (int j = 0; j < 8; j++) {
        ts += sv[j];
        tss += qv[j];
    }
    for (; i < n; i++) {
        const double d = In<D>::get(p[i]) - k;
        ts += d;
        tss += d * d;
    }
    s_out += ts;
    ss_out += tss;
}

template <int D>
bool channel_stats_t(const void* xv, int64_t outer, int64_t C, int64_t inner, const double* shift, double* sum,
                     double* sumsq, int nthreads) {
    const typename In<D>::S* x = static_cast<const typename In<D>::S*>(xv);
    // Items: a block of `ob` outer indices times a block of `cb` channels (all channels when
    // inner == 1, where the loop runs along c); partial row `bo` holds the block's sums.
    const int64_t cb = inner == 1 ? C : std::max<int64_t>(1, std::min<int64_t>(C, ITEM / inner));
    const int64_t ob = std::max<int64_t>(1, ITEM / (cb * inner));
    const int64_t nob = (outer + ob - 1) / ob, ncb = (C + cb - 1) / cb;
    const int64_t items = nob * ncb;
    std::vector<double> partial(size_t(nob * 2 * C), 0.0);
    const int nt = threads_for(outer * C * inner, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t it = 0; it < items; it++) {
        const int64_t bo = it / ncb, bc = it % ncb;
        const int64_t o0 = bo * ob, o1 = std::min(outer, o0 + ob);
        const int64_t c0 = bc * cb, c1 = std::min(C, c0 + cb);
        double* s = partial.data() + bo * 2 * C;
        double* ss = s + C;
        if (inner == 1) {
            rows<D>(x, C, o0, o1, shift, s, ss);
        } else {
            for (int64_t o = o0; o < o1; o++)
                for (int64_t c = c0; c < c1; c++) run<D>(x + (o * C + c) * inner, inner, shift[c], s[c], ss[c]);
        }
    }
    // New totals first; the accumulators change only if every one of them is finite.
    std::vector<double> total(size_t(2 * C));
    int bad = 0;
    const int ntr = threads_for(nob * C, nthreads, ITEM);
#pragma omp parallel for num_threads(ntr) schedule(static) reduction(| : bad) if (ntr > 1)
    for (int64_t c = 0; c < C; c++) {
        double ts = sum[c], tss = sumsq[c];
        for (int64_t bo = 0; bo < nob; bo++) {
            ts += partial[size_t(bo * 2 * C + c)];
            tss += partial[size_t(bo * 2 * C + C + c)];
        }
        total[size_t(c)] = ts;
        total[size_t(C + c)] = tss;
        bad |= !(std::isfinite(ts) && std::isfinite(tss));
    }
    if (bad) return false;
    std::copy(total.begin(), total.begin() + C, sum);
    std::copy(total.begin() + C, total.end(), sumsq);
    return true;
}

}  // namespace

bool channel_stats(const void* x, int dtype, int64_t outer, int64_t C, int64_t inner, const double* shift,
                   double* sum, double* sumsq, int nthreads) {
    switch (dtype) {
        case F16: return channel_stats_t<F16>(x, outer, C, inner, shift, sum, sumsq, nthreads);
        case BF16: return channel_stats_t<BF16>(x, outer, C, inner, shift, sum, sumsq, nthreads);
        case F64: return channel_stats_t<F64>(x, outer, C, inner, shift, sum, sumsq, nthreads);
        default: return channel_stats_t<F32>(x, outer, C, inner, shift, sum, sumsq, nthreads);
    }
}

}  // namespace nlm
