// Fused merges over T stacked task vectors [T, N]: TIES, task arithmetic, consensus; and the same
// over the models themselves (the task vectors formed in registers).
//
// All share one driver. A thread owns a contiguous range of blocks (BLOCK elements);
// a block is processed in strips of STRIP elements (U fixed-width vectors). For one strip the
// T row segments are read once from memory in task order t = 0..T-1, everything accumulated
// (election, sums, counters) staying in registers; the strip's fp32 result goes to a block
// buffer, which one conversion pass adds to `base` and writes into `out` (any dtype).
//
// The inputs are rows given by pointers (row t of stacked task vectors at tv + t * N; or the T
// experts and, as row T, the base of the same storage dtype). A kernel with DIFF reads the task
// vector x_t = fp32(e_t) - fp32(base) (rounded to fp32: what precomputed fp32 task vectors hold,
// so its results are bit-identical to theirs).
//
// A models kernel may also drop entries at random (DARE, RandomKeep): a Keep policy (KeepAll or
// KeepDrawn) draws the T tasks' keep flags of a block as it begins and zeroes the dropped entries
// of the task vectors in registers.
//
// Every element's arithmetic is independent of the partition, so outputs do not depend on the
// thread count; the counters are integers. Non-finite task vector entries are detected cheaply
// (a running max of the |x| bit patterns, >= 0x7f800000 iff NaN/Inf) and counted exactly only
// in a block that has one. The non-finite count also counts the results that are NaN/Inf in the
// output dtype (finite inputs whose merge overflows it): the caller tells the two apart.
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"
#include "simd.h"

namespace nlm {
namespace {

using namespace simd;

#ifndef NLM_STRIP_VECTORS
#define NLM_STRIP_VECTORS 4
#endif
constexpr int U = NLM_STRIP_VECTORS;
constexpr int STRIP = U * VL;
static_assert(BLOCK % STRIP == 0, "blocks hold whole strips");

struct Counts {
    int64_t sign_sum = 0, ambiguous = 0, nonfinite = 0;
};

// Per-lane counters of a block, reduced to scalars once per block.
struct Lanes {
    vi ssum[U], amb[U];
    vu absmax[U];
    void clear() {
        for (int u = 0; u < U; u++) {
            ssum[u] = splati(0);
            amb[u] = splati(0);
            absmax[u] = splatu(0);
        }
    }
};

// Exact count of NaN/Inf task vector entries x_t[at, at + n), t in [0, T) (run only when the
// cheap test fired); with DIFF x_t = fp32(rows[t]) - fp32(rows[T]).
template <int D, bool DIFF>
int64_t count_nonfinite_rows(const typename DT<D>::S* const* rows, int64_t at, int64_t T, int n) {
    int64_t c = 0;
    for (int64_t t = 0; t < T; t++) {
        const typename DT<D>::S* xt = rows[t] + at;
        int32_t ct = 0;
        if (DIFF) {
            const typename DT<D>::S* b = rows[T] + at;
            for (int i = 0; i < n; i++) ct += !std::isfinite(DT<D>::load(xt[i]) - DT<D>::load(b[i]));
        } else {
            for (int i = 0; i < n; i++) ct += DT<D>::nonfinite(xt[i]);
        }
        c += ct;
    }
    return c;
}

// Which blocks a call runs: all of them (list == nullptr) or the `count` listed ones; where
// `ambiguous` is set, ambiguous[blk] = 1 for a run block with an ambiguous element, else 0.
struct BlockSel {
    const int64_t* list = nullptr;
    int64_t count = 0;
    uint8_t* ambiguous = nullptr;
};

// The driver: items [i0, i1) of one thread (block i, or sel.list[i]), over rows[0, T + K::DIFF).
// K provides
//   static constexpr bool DIFF                 whether rows[T] is the base of task vectors
//   int64_t begin_block(int64_t off, int n)   per-element inputs of the block (returns their
//                                              non-finite count)
//   void strip(const S* const* x, int64_t at, int j, float* res, Lanes&)
//                                              strip at block offset j; row t at x[t] + at
template <int D, class K>
Counts run_blocks(K& k, const typename DT<D>::S* const* rows, int64_t T, int64_t N, void* out, int out_dtype,
                  const void* base, int base_dtype, const BlockSel& sel, int64_t i0, int64_t i1) {
    using S = typename DT<D>::S;
    const int64_t nrows = T + K::DIFF;
    std::vector<S> tail;  // zero-padded copy of a block's last partial strip (nrows x STRIP)
    std::vector<const S*> tail_rows(size_t(nrows), nullptr);
    alignas(64) float res[BLOCK];
    alignas(64) float bas[BLOCK];
    Lanes lanes;
    Counts c;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t blk = sel.list ? sel.list[i] : i;
        const int64_t off = blk * BLOCK;
        const int n = int(std::min<int64_t>(BLOCK, N - off));
        lanes.clear();
        c.nonfinite += k.begin_block(off, n);
        const int full = n - n % STRIP;
        for (int j = 0; j < full; j += STRIP) {
            // this strip of the next block, in every row (prefetch): 10-15% off TIES and task
            // arithmetic over the models (2^26, T = 4, bf16 and fp32, 2 cores), where the T + 1
            // streams read a strip at a time outran the hardware prefetcher
            for (int64_t t = 0; t < nrows; t++) prefetch_span(rows[t] + off + j + BLOCK, STRIP * int64_t(sizeof(S)));
            k.strip(rows, off + j, j, res + j, lanes);
        }
        if (full < n) {
            // zeros change no counter: a zero is trimmed to 0, elects sign 0, is never masked
            // (with DIFF the padded task vector entries are 0 - 0 = 0)
            tail.assign(size_t(nrows) * STRIP, S(0));
            for (int64_t t = 0; t < nrows; t++) {
                for (int j = full; j < n; j++) tail[size_t(t) * STRIP + (j - full)] = rows[t][off + j];
                tail_rows[size_t(t)] = tail.data() + t * STRIP;
            }
            alignas(64) float tres[STRIP];
            k.strip(tail_rows.data(), 0, full, tres, lanes);
            for (int j = full; j < n; j++) res[j] = tres[j - full];
        }
        int32_t ssum = 0, amb = 0;
        uint32_t absmax = 0;
        for (int u = 0; u < U; u++) {
            for (int l = 0; l < VL; l++) {
                ssum += lanes.ssum[u][l];
                amb += lanes.amb[u][l];
                absmax = absmax > lanes.absmax[u][l] ? absmax : lanes.absmax[u][l];
            }
        }
        c.sign_sum += ssum;
        c.ambiguous += amb;
        if (sel.ambiguous) sel.ambiguous[blk] = amb != 0;
        if (absmax >= 0x7F800000u) c.nonfinite += count_nonfinite_rows<D, K::DIFF>(rows, off, T, n);
        if (base != nullptr) {
            c.nonfinite += load_block(base_dtype, base, off, n, bas);
            for (int i = 0; i < n; i++) res[i] = bas[i] + res[i];
        }
        c.nonfinite += store_block(out_dtype, out, off, n, res);
    }
    return c;
}

// Runs the driver on nthreads threads; make(...) builds each thread's kernel object. rows_:
// T (+ 1 with DIFF) row pointers of storage dtype D.
template <int D, class Make>
Counts parallel_blocks(const void* const* rows_, int64_t T, int64_t N, void* out, int out_dtype, const void* base,
                       int base_dtype, const BlockSel& sel, int nthreads, Make make) {
    using S = typename DT<D>::S;
    const S* const* rows = reinterpret_cast<const S* const*>(rows_);
    const int64_t nblocks = sel.list ? sel.count : (N + BLOCK - 1) / BLOCK;
    [[maybe_unused]] const int nt = threads_for(std::min(N, nblocks * BLOCK) * std::max<int64_t>(T, 1), nthreads);
    int64_t sign_sum = 0, ambiguous = 0, nonfinite = 0;
#pragma omp parallel num_threads(nt) reduction(+ : sign_sum, ambiguous, nonfinite)
    {
        int64_t b0, b1;
        thread_range(nblocks, NLM_NUM_THREADS(), NLM_THREAD_ID(), b0, b1);
        auto k = make();
        const Counts c = run_blocks<D>(k, rows, T, N, out, out_dtype, base, base_dtype, sel, b0, b1);
        sign_sum += c.sign_sum;
        ambiguous += c.ambiguous;
        nonfinite += c.nonfinite;
    }
    return Counts{sign_sum, ambiguous, nonfinite};
}

// Row pointers of stacked task vectors [T, N] of dtype d.
std::vector<const void*> stacked_rows(const void* tv, int d, int64_t T, int64_t N) {
    std::vector<const void*> rows(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; t++) rows[size_t(t)] = static_cast<const char*>(tv) + t * N * int64_t(itemsize(d));
    return rows;
}

// Row pointers of the models: the T experts, then the base (row T).
std::vector<const void*> model_rows(const void* base, const void* const* experts, int64_t T) {
    std::vector<const void*> rows(experts, experts + T);
    rows.push_back(base);
    return rows;
}

// The strip's base values in fp32 (with DIFF; zeros otherwise, unused).
template <int D, bool DIFF>
inline void strip_base(const typename DT<D>::S* const* x, int64_t T, int64_t at, vf* b) {
    for (int u = 0; u < U; u++) b[u] = DIFF ? VLoad<D>::load(x[T] + at + u * VL) : splat(0.0f);
}

// Vector u of x_t in a strip: fp32(row), minus the base's fp32 vector with DIFF (|x_t| is then
// NaN/Inf where e_t or the base is, or where their difference overflows).
template <int D, bool DIFF>
inline vf task_value(const typename DT<D>::S* __restrict xt, int u, vf b) {
    const vf v = VLoad<D>::load(xt + u * VL);
    return DIFF ? v - b : v;
}

// w_t * v, or v itself for unit weights (UNIT: every weight is 1, and 1 * v is v exactly), which
// the TIES kernel checks once per call: the multiplies left out take 6% off its pass (task
// arithmetic, waiting on memory more, gained nothing).
template <bool UNIT>
inline vf weighted(vf wt, vf v) { return UNIT ? v : wt * v; }

inline bool unit_weights(const float* w, int64_t T) {
    return std::all_of(w, w + T, [](float x) { return x == 1.0f; });
}

// Every entry kept (no random keep).
struct KeepAll {
    void begin_block(int64_t, int) {}
    inline vf apply(int64_t, int, vf v) const { return v; }
};

// The VL keep flags from flag j (a multiple of VL) of a block's recorded flags, as a lane mask.
inline vi recorded_flags(const uint8_t* block_flags, int j) {
    uint32_t word = 0;
    std::memcpy(&word, block_flags + j / 8, (VL + 7) / 8);
    word >>= j & 7;  // VL = 4: half a byte
    vu lane_bit;
    for (int l = 0; l < VL; l++) lane_bit[l] = 1u << l;
    return (vi)((splatu(word) & lane_bit) != 0u);
}

// DARE's random keep: the T tasks' draws of the block (stream t for task t), and v where
// draw < thresholds[t], else +0 (what masking precomputed task vectors writes); or, when the
// flags were recorded (keep->bits, by the L1 pass), v where the flag is set: the same flags,
// without drawing them again (the draws were a third of a dare_ties job's time).
struct KeepDrawn {
    const RandomKeep* keep;
    int64_t T, row_bytes;
    std::vector<uint32_t> draws;  // T x BLOCK, when drawn here
    const uint8_t* flags = nullptr;  // recorded: task 0's flags of the block (task t: + t * row_bytes)

    KeepDrawn(const RandomKeep* k, int64_t T_, int64_t N)
        : keep(k), T(T_), row_bytes(keep_row_bytes(N)), draws(k->bits ? 0 : size_t(T_) * BLOCK) {}
    void begin_block(int64_t off, int n) {
        if (keep->bits) {
            flags = keep->bits + off / 8;
            return;
        }
        for (int64_t t = 0; t < T; t++)
            block_draws(PhiloxStream{keep->k0, keep->k1, uint32_t(t), keep->h}, off, n, draws.data() + t * BLOCK);
    }
    // v: the task vector values of task t at block offset j (VL of them)
    inline vf apply(int64_t t, int j, vf v) const {
        if (flags) return keep_if(recorded_flags(flags + t * row_bytes, j), v);
        vu d;
        std::memcpy(&d, draws.data() + t * BLOCK + j, sizeof d);
        return keep_if(d < splatu(keep->thresholds[t]), v);
    }
};

// ---------------------------------------------------------------------------------------------
// TIES: res = lam * merged. Pass 1 trims, elects (task order) and keeps the trimmed values of
// the strip in a T x STRIP buffer (L1); pass 2 merges the entries agreeing with the sign.
template <int D, bool COUNT, int DISJ, bool DIFF_, class Keep>
struct TiesKernel {
    using S = typename DT<D>::S;
    static constexpr bool DIFF = DIFF_;
    int64_t T;
    const float* thr;
    const float* w;
    const float* dv;  // what "mean" divides by: the weights, or the divisors given
    vf fill, lam;
    std::vector<float> buf;
    Keep keep;
    bool unit;  // unit_weights

    int64_t begin_block(int64_t off, int n) {
        keep.begin_block(off, n);
        return 0;
    }

    inline void strip(const S* const* __restrict x, int64_t at, int j, float* __restrict res, Lanes& lanes) {
        if (unit) {
            strip_weighted<true>(x, at, j, res, lanes);
        } else {
            strip_weighted<false>(x, at, j, res, lanes);
        }
    }

    template <bool UNIT>
    inline void strip_weighted(const S* const* __restrict x, int64_t at, int j, float* __restrict res, Lanes& lanes) {
        float* __restrict b = buf.data();
        vf m[U], bv[U];
        vu any[U], absmax[U];
        strip_base<D, DIFF>(x, T, at, bv);
        for (int u = 0; u < U; u++) {
            m[u] = splat(0.0f);
            any[u] = splatu(0);
            absmax[u] = splatu(0);
        }
        for (int64_t t = 0; t < T; t++) {
            const S* __restrict xt = x[t] + at;
            float* __restrict bt = b + t * STRIP;
            const vf th = splat(thr[t]), wt = splat(w[t]);
            for (int u = 0; u < U; u++) {
                const vf x0 = task_value<D, DIFF>(xt, u, bv[u]);
                const vf v = keep.apply(t, j + u * VL, x0);
                const vf tr = keep_if(vabs(v) >= th, v);  // trimmed_t
                store(bt + u * VL, tr);
                if (COUNT) {
                    m[u] = m[u] + __builtin_convertvector((tr < 0.0f) - (tr > 0.0f), vf);  // + sign
                } else {
                    m[u] = m[u] + weighted<UNIT>(wt, tr);
                }
                any[u] |= (vu)tr;                             // |bits| != 0 iff some trimmed_t != 0
                absmax[u] = vmaxu(absmax[u], (vu)vabs(x0));  // >= 0x7f800000 iff some NaN/Inf (dropped or not)
            }
        }
        // s0 = sign(m); s = fill where s0 == 0; dir = +1 where agreeing means trimmed > 0 and
        // -1 where it means trimmed < 0 (s < 0, and s == 0 as in the contract): then
        // agree_t == (dir * trimmed_t > 0) exactly
        vf s[U], dir[U], num[U], den[U];
        for (int u = 0; u < U; u++) {
            const vi s0 = (m[u] < 0.0f) - (m[u] > 0.0f);
            const vi zero = s0 == 0;
            lanes.ssum[u] += s0;
            lanes.amb[u] -= zero & (vi)((any[u] & 0x7FFFFFFFu) != 0u);
            lanes.absmax[u] = vmaxu(lanes.absmax[u], absmax[u]);
            s[u] = select(zero, fill, __builtin_convertvector(s0, vf));
            dir[u] = select(s[u] > 0.0f, splat(1.0f), splat(-1.0f));
            num[u] = splat(0.0f);
            den[u] = splat(0.0f);
        }
        for (int64_t t = 0; t < T; t++) {
            const float* __restrict bt = b + t * STRIP;
            const vf wt = splat(w[t]), dt = splat(dv[t]);
            for (int u = 0; u < U; u++) {
                const vf tr = VLoad<F32>::load(bt + u * VL);
                const vi agree = dir[u] * tr > 0.0f;
                if (DISJ == MAX) {
                    num[u] = vmax(num[u], keep_if(agree, vabs(tr)));
                } else {
                    num[u] = num[u] + keep_if(agree, weighted<UNIT>(wt, tr));
                    if (DISJ == MEAN) den[u] = den[u] + keep_if(agree, dt);
                }
            }
        }
        for (int u = 0; u < U; u++) {
            vf merged;
            if (DISJ == MEAN) {
                const vi has = den[u] != 0.0f;
                merged = keep_if(has, num[u] / select(has, den[u], splat(1.0f)));
            } else if (DISJ == SUM) {
                merged = num[u];
            } else {
                merged = num[u] * s[u];
            }
            store(res + u * VL, lam * merged);
        }
    }
};

// The Keep policy of a kernel: KeepAll, or KeepDrawn from `keep` (non-null).
template <class Keep>
Keep make_keep(const RandomKeep* keep, int64_t T, int64_t N) {
    if constexpr (std::is_same_v<Keep, KeepAll>) {
        return KeepAll{};
    } else {
        return KeepDrawn(keep, T, N);
    }
}

template <int D, bool COUNT, int DISJ, bool DIFF, class Keep>
Counts ties_impl(const void* const* rows, int64_t T, int64_t N, const TiesArgs& a) {
    const BlockSel sel{a.blocks, a.nblocks, a.ambiguous_blocks};
    return parallel_blocks<D>(rows, T, N, a.out, a.out_dtype, a.base, a.base_dtype, sel, a.nthreads, [&] {
        return TiesKernel<D, COUNT, DISJ, DIFF, Keep>{T, a.thresholds, a.weights,
                                                      a.divisors ? a.divisors : a.weights, splat(float(a.fill_sign)),
                                                      splat(a.lam), std::vector<float>(size_t(T) * STRIP),
                                                      make_keep<Keep>(a.keep, T, N), unit_weights(a.weights, T)};
    });
}

template <int D, bool DIFF, class Keep>
Counts ties_modes(const void* const* rows, int64_t T, int64_t N, const TiesArgs& a) {
#define NLM_TIES(C, J) return ties_impl<D, C, J, DIFF, Keep>(rows, T, N, a)
    if (a.count_sign) {
        if (a.disjoint == SUM) NLM_TIES(true, SUM);
        if (a.disjoint == MAX) NLM_TIES(true, MAX);
        NLM_TIES(true, MEAN);
    }
    if (a.disjoint == SUM) NLM_TIES(false, SUM);
    if (a.disjoint == MAX) NLM_TIES(false, MAX);
    NLM_TIES(false, MEAN);
#undef NLM_TIES
}

template <bool DIFF, class Keep>
Counts ties_dtypes(const void* const* rows, int dtype, int64_t T, int64_t N, const TiesArgs& a) {
    switch (dtype) {
        case F16: return ties_modes<F16, DIFF, Keep>(rows, T, N, a);
        case BF16: return ties_modes<BF16, DIFF, Keep>(rows, T, N, a);
        default: return ties_modes<F32, DIFF, Keep>(rows, T, N, a);
    }
}

// A random keep only over the models (DIFF): stacked task vectors come masked already.
template <bool DIFF>
TiesResult ties_rows(const void* const* rows, int dtype, int64_t T, int64_t N, const TiesArgs& a) {
    if (N <= 0 || T <= 0 || (a.blocks != nullptr && a.nblocks <= 0)) return TiesResult{0, 0, 0};
    Counts c;
    if constexpr (DIFF) {
        c = a.keep ? ties_dtypes<true, KeepDrawn>(rows, dtype, T, N, a) : ties_dtypes<true, KeepAll>(rows, dtype, T, N, a);
    } else {
        c = ties_dtypes<false, KeepAll>(rows, dtype, T, N, a);
    }
    return TiesResult{c.sign_sum, c.ambiguous, c.nonfinite};
}

// ---------------------------------------------------------------------------------------------
// Task arithmetic: res = lam * (0 + w_0 x_0 + w_1 x_1 + ...), in task order; with DIFF
// x_t = fp32(e_t) - fp32(base) (row T), formed in registers (then kept or dropped by Keep).
template <int D, bool DIFF_, class Keep>
struct TaskArithmeticKernel {
    using S = typename DT<D>::S;
    static constexpr bool DIFF = DIFF_;
    int64_t T;
    const float* w;
    vf lam;
    Keep keep;

    int64_t begin_block(int64_t off, int n) {
        keep.begin_block(off, n);
        return 0;
    }

    inline void strip(const S* const* __restrict x, int64_t at, int j, float* __restrict res, Lanes& lanes) {
        vf acc[U], b[U];
        vu absmax[U];
        strip_base<D, DIFF>(x, T, at, b);
        for (int u = 0; u < U; u++) {
            acc[u] = splat(0.0f);
            absmax[u] = splatu(0);
        }
        for (int64_t t = 0; t < T; t++) {
            const S* __restrict xt = x[t] + at;
            const vf wt = splat(w[t]);
            for (int u = 0; u < U; u++) {
                const vf v = task_value<D, DIFF>(xt, u, b[u]);
                acc[u] = acc[u] + wt * keep.apply(t, j + u * VL, v);
                absmax[u] = vmaxu(absmax[u], (vu)vabs(v));
            }
        }
        for (int u = 0; u < U; u++) {
            lanes.absmax[u] = vmaxu(lanes.absmax[u], absmax[u]);
            store(res + u * VL, lam * acc[u]);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Consensus: c = #t with |x_t| > lam_t * |tau - x_t|; res = alpha * (c >= k ? tau : 0).
template <int D, bool DIFF_>
struct ConsensusKernel {
    using S = typename DT<D>::S;
    static constexpr bool DIFF = DIFF_;
    int64_t T;
    const float* lam;
    vi k;
    vf alpha;
    const void* tau;
    int tau_dtype;
    std::vector<float> tb;  // tau of the block in fp32 (BLOCK + zero padding)

    int64_t begin_block(int64_t off, int n) {
        const int64_t nf = load_block(tau_dtype, tau, off, n, tb.data());
        for (int i = n; i < BLOCK; i++) tb[i] = 0.0f;
        return nf;
    }

    inline void strip(const S* const* __restrict x, int64_t at, int j, float* __restrict res, Lanes& lanes) {
        vf tau_v[U], b[U];
        vi cnt[U];
        vu absmax[U];
        strip_base<D, DIFF>(x, T, at, b);
        for (int u = 0; u < U; u++) {
            tau_v[u] = VLoad<F32>::load(tb.data() + j + u * VL);
            cnt[u] = splati(0);
            absmax[u] = splatu(0);
        }
        for (int64_t t = 0; t < T; t++) {
            const S* __restrict xt = x[t] + at;
            const vf lt = splat(lam[t]);
            for (int u = 0; u < U; u++) {
                const vf v = task_value<D, DIFF>(xt, u, b[u]);
                const vf a = vabs(v);
                cnt[u] -= a > lt * vabs(tau_v[u] - v);  // mask is -1 where set
                absmax[u] = vmaxu(absmax[u], (vu)a);
            }
        }
        for (int u = 0; u < U; u++) {
            lanes.absmax[u] = vmaxu(lanes.absmax[u], absmax[u]);
            store(res + u * VL, alpha * keep_if(cnt[u] >= k, tau_v[u]));
        }
    }
};

// rows: T task vector rows, or (DIFF) T experts and the base, all of dtype D.
template <int D, bool DIFF, class Keep>
int64_t task_arithmetic_t(const void* const* rows, int64_t T, int64_t N, const float* w, void* out, int out_dtype,
                          const void* base, int base_dtype, float lam, const RandomKeep* keep, int nthreads) {
    return parallel_blocks<D>(rows, T, N, out, out_dtype, base, base_dtype, BlockSel{}, nthreads,
                              [&] {
                                  return TaskArithmeticKernel<D, DIFF, Keep>{T, w, splat(lam),
                                                                             make_keep<Keep>(keep, T, N)};
                              })
        .nonfinite;
}

template <bool DIFF, class Keep>
int64_t task_arithmetic_dtypes(const void* const* rows, int dtype, int64_t T, int64_t N, const float* w, void* out,
                               int out_dtype, const void* base, int base_dtype, float lam, const RandomKeep* keep,
                               int nthreads) {
#define NLM_TA(D) return task_arithmetic_t<D, DIFF, Keep>(rows, T, N, w, out, out_dtype, base, base_dtype, lam, keep, nthreads)
    switch (dtype) {
        case F16: NLM_TA(F16);
        case BF16: NLM_TA(BF16);
        default: NLM_TA(F32);
    }
#undef NLM_TA
}

// A random keep only over the models (DIFF), as for TIES.
template <bool DIFF>
int64_t task_arithmetic_rows(const void* const* rows, int dtype, int64_t T, int64_t N, const float* w, void* out,
                             int out_dtype, const void* base, int base_dtype, float lam, const RandomKeep* keep,
                             int nthreads) {
    if (N <= 0 || T <= 0) return 0;
    if constexpr (DIFF) {
        if (keep) {
            return task_arithmetic_dtypes<true, KeepDrawn>(rows, dtype, T, N, w, out, out_dtype, base, base_dtype,
                                                           lam, keep, nthreads);
        }
    }
    return task_arithmetic_dtypes<DIFF, KeepAll>(rows, dtype, T, N, w, out, out_dtype, base, base_dtype, lam, nullptr,
                                                 nthreads);
}

template <int D, bool DIFF>
int64_t consensus_t(const void* const* rows, int64_t T, int64_t N, const void* tau, int tau_dtype, const float* lam,
                    int64_t k, void* out, int out_dtype, const void* base, int base_dtype, float alpha,
                    int nthreads) {
    // 0 <= c <= T: clamping k to [0, T + 1] keeps the comparison in int32 without changing it
    const int32_t kk = int32_t(std::max<int64_t>(0, std::min<int64_t>(k, T + 1)));
    return parallel_blocks<D>(rows, T, N, out, out_dtype, base, base_dtype, BlockSel{}, nthreads,
                              [&] {
                                  return ConsensusKernel<D, DIFF>{T, lam, splati(kk), splat(alpha), tau, tau_dtype,
                                                                  std::vector<float>(BLOCK)};
                              })
        .nonfinite;
}

template <bool DIFF>
int64_t consensus_rows(const void* const* rows, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                       const float* lam, int64_t k, void* out, int out_dtype, const void* base, int base_dtype,
                       float alpha, int nthreads) {
    if (N <= 0) return 0;
#define NLM_CONSENSUS(D) \
    return consensus_t<D, DIFF>(rows, T, N, tau, tau_dtype, lam, k, out, out_dtype, base, base_dtype, alpha, nthreads)
    switch (dtype) {
        case F16: NLM_CONSENSUS(F16);
        case BF16: NLM_CONSENSUS(BF16);
        default: NLM_CONSENSUS(F32);
    }
#undef NLM_CONSENSUS
}
// ---------------------------------------------------------------------------------------------
// DARE's L1 norms (keep_l1_norms_models in kernels.h states the summation order).
constexpr int L1_LANES = 16;
static_assert(BLOCK % L1_LANES == 0, "blocks hold whole rows of lanes");
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));

// The fp64 sum of a[0, BLOCK) (non-negative fp32) in the lane order: lanes 0-7 and 8-15 in two
// vector accumulators (kept in registers: indexing one 16-lane vector kept it in memory, 3x slower).
double block_l1(const float* __restrict a) {
    vd8 lo = vd8{}, hi = vd8{};
    for (int i = 0; i < BLOCK; i += L1_LANES) {
        vf8 x, y;
        std::memcpy(&x, a + i, sizeof x);
        std::memcpy(&y, a + i + 8, sizeof y);
        lo = lo + __builtin_convertvector(x, vd8);
        hi = hi + __builtin_convertvector(y, vd8);
    }
    const vd8 halved = lo + hi;  // lane l += lane l + 8
    double r[8];
    std::memcpy(r, &halved, sizeof r);
    for (int w = 4; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) r[l] = r[l] + r[l + w];
    return r[0];
}

// The pairwise-halving sum of v[0, n), zero-padded to a power of two (v is overwritten).
double halving_sum(double* v, int64_t n) {
    int64_t p = 1;
    while (p < n) p *= 2;
    for (int64_t w = p / 2; w >= 1; w /= 2)
        for (int64_t l = 0; l < w && l + w < n; l++) v[l] = v[l] + v[l + w];  // v[l + w] beyond n: +0
    return v[0];
}

struct L1Scratch {
    alignas(64) float all[BLOCK];
    alignas(64) float kept[BLOCK];
    alignas(64) uint32_t draws[BLOCK];
};

// The keep flags of a block's n draws (the bits past n are 0) into row (BLOCK / 8 bytes).
void record_flags(const uint32_t* __restrict draws, int n, uint32_t threshold, uint8_t* __restrict row) {
#if defined(__AVX512F__)
    static_assert(BLOCK % 16 == 0, "whole 16-flag words");
    const __m512i thr = _mm512_set1_epi32(int32_t(threshold));
    for (int i = 0; i < BLOCK; i += 16) {
        __mmask16 kept = _mm512_cmplt_epu32_mask(_mm512_loadu_si512(draws + i), thr);
        if (i + 16 > n) kept &= i >= n ? 0 : __mmask16((1u << (n - i)) - 1);
        std::memcpy(row + i / 8, &kept, 2);
    }
#else
    for (int byte = 0; byte < BLOCK / 8; byte++) {
        uint32_t packed = 0;
        for (int j = 0; j < 8; j++) {
            const int i = byte * 8 + j;
            packed |= uint32_t(i < n && draws[i] < threshold) << j;
        }
        row[byte] = uint8_t(packed);
    }
#endif
}

template <int D>
void keep_l1_norms_t(const void* base_, const void* const* experts_, int64_t T, int64_t N, const RandomKeep& keep,
                     double* norms, uint8_t* bits, int nthreads) {
    using S = typename DT<D>::S;
    const S* base = static_cast<const S*>(base_);
    const int64_t nblocks = (N + BLOCK - 1) / BLOCK, row_bytes = keep_row_bytes(N);
    std::vector<double> sums(size_t(2 * T * nblocks));  // [t][0: all, 1: kept][block]
    for_each_block<L1Scratch>(N, threads_for(N * T, nthreads), [&](L1Scratch& s, int64_t off, int n) {
        const int64_t blk = off / BLOCK;
        for (int64_t t = 0; t < T; t++) {
            const S* __restrict e = static_cast<const S*>(experts_[t]) + off;
            const S* __restrict b = base + off;
            block_draws(PhiloxStream{keep.k0, keep.k1, uint32_t(t), keep.h}, off, n, s.draws);
            const uint32_t thr = keep.thresholds[t];
            if (bits) record_flags(s.draws, n, thr, bits + t * row_bytes + off / 8);
            const int full = n - n % VL;
            for (int i = 0; i < full; i += VL) {
                const vf a = vabs(VLoad<D>::load(e + i) - VLoad<D>::load(b + i));
                vu d;
                std::memcpy(&d, s.draws + i, sizeof d);
                store(s.all + i, a);
                store(s.kept + i, keep_if(d < splatu(thr), a));
            }
            for (int i = full; i < n; i++) {
                const float a = std::fabs(DT<D>::load(e[i]) - DT<D>::load(b[i]));
                s.all[i] = a;
                s.kept[i] = s.draws[i] < thr ? a : 0.0f;
            }
            for (int i = n; i < BLOCK; i++) s.all[i] = s.kept[i] = 0.0f;
            sums[size_t((2 * t) * nblocks + blk)] = block_l1(s.all);
            sums[size_t((2 * t + 1) * nblocks + blk)] = block_l1(s.kept);
        }
    });
    for (int64_t k = 0; k < 2 * T; k++) norms[k] = halving_sum(sums.data() + k * nblocks, nblocks);
}

}  // namespace

TiesResult ties_merge(const void* tv, int dtype, int64_t T, int64_t N, const TiesArgs& a) {
    const std::vector<const void*> rows = stacked_rows(tv, dtype, T, N);
    return ties_rows<false>(rows.data(), dtype, T, N, a);
}

TiesResult ties_merge_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                             const TiesArgs& a) {
    const std::vector<const void*> rows = model_rows(base, experts, T);
    return ties_rows<true>(rows.data(), dtype, T, N, a);
}

int64_t task_arithmetic(const void* tv, int dtype, int64_t T, int64_t N, const float* weights, void* out,
                        int out_dtype, const void* base, int base_dtype, float lam, int nthreads) {
    const std::vector<const void*> rows = stacked_rows(tv, dtype, T, N);
    return task_arithmetic_rows<false>(rows.data(), dtype, T, N, weights, out, out_dtype, base, base_dtype, lam,
                                       nullptr, nthreads);
}

int64_t task_arithmetic_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                               const float* weights, void* out, int out_dtype, float lam, bool include_base,
                               const RandomKeep* keep, int nthreads) {
    const std::vector<const void*> rows = model_rows(base, experts, T);
    return task_arithmetic_rows<true>(rows.data(), dtype, T, N, weights, out, out_dtype, include_base ? base : nullptr,
                                      dtype, lam, keep, nthreads);
}

void keep_l1_norms_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                          const RandomKeep& keep, double* norms, uint8_t* bits, int nthreads) {
    if (T <= 0) return;
    if (N <= 0) {
        std::fill(norms, norms + 2 * T, 0.0);
        return;
    }
    switch (dtype) {
        case F16: keep_l1_norms_t<F16>(base, experts, T, N, keep, norms, bits, nthreads); break;
        case BF16: keep_l1_norms_t<BF16>(base, experts, T, N, keep, norms, bits, nthreads); break;
        default: keep_l1_norms_t<F32>(base, experts, T, N, keep, norms, bits, nthreads);
    }
}

int64_t consensus(const void* tv, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                  const float* lam, int64_t k, void* out, int out_dtype, const void* base, int base_dtype,
                  float alpha, int nthreads) {
    const std::vector<const void*> rows = stacked_rows(tv, dtype, T, N);
    return consensus_rows<false>(rows.data(), dtype, T, N, tau, tau_dtype, lam, k, out, out_dtype, base, base_dtype,
                                 alpha, nthreads);
}

int64_t consensus_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                         const void* tau, int tau_dtype, const float* lam, int64_t k, void* out, int out_dtype,
                         float alpha, int nthreads) {
    const std::vector<const void*> rows = model_rows(base, experts, T);
    return consensus_rows<true>(rows.data(), dtype, T, N, tau, tau_dtype, lam, k, out, out_dtype, base, dtype, alpha,
                                nthreads);
}

}  // namespace nlm
