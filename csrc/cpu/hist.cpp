// Radix histograms of magnitudes (the exact TIES threshold without sorting), and the one-read
// window count that brackets the k-th magnitude (count_window).
//
// Each thread counts its contiguous range into private uint32 tables, then adds them into the
// shared int64 histogram (integer sums: the result does not depend on the thread count).
// Consecutive elements go to NSUB interleaved sub-tables so that runs of equal values (zeros of
// a sparse task vector, say) do not serialize on one counter's store-to-load latency.
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"
#include "simd.h"

namespace nlm {
namespace {

constexpr int HIGH_BINS = 1 << 15;
constexpr int LOW_BINS = 1 << 16;
constexpr int NSUB = 4;
// elements counted into uint32 tables before they are flushed (each sub-table gets a quarter)
constexpr int64_t FLUSH = int64_t(1) << 31;
// Below this many elements: one thread counting straight into the int64 histogram (clearing
// and adding up the private tables costs about as much as counting 2^17 elements).
constexpr int64_t SMALL = int64_t(1) << 18;
constexpr int64_t MIN_PER_THREAD = int64_t(1) << 17;

std::vector<uint32_t>& scratch(size_t size) {
    static thread_local std::vector<uint32_t> buf;
    if (buf.size() < size) buf.assign(size, 0);
    return buf;
}

// Counts of the elements [0, n) into the int64 `hist` [BINS] on up to `nthreads` threads: each
// thread counts runs of at most FLUSH elements of its range into SUB private uint32 tables
// (count(begin, end, tables)), adds them into `hist` under a lock and clears them again.
template <int BINS, int SUB, class Count>
void threaded_histogram(int64_t n, int nthreads, int64_t* hist, Count count) {
    [[maybe_unused]] const int nt = threads_for(n, nthreads, MIN_PER_THREAD);
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        thread_range(n, NLM_NUM_THREADS(), NLM_THREAD_ID(), b, e);
        std::vector<uint32_t>& buf = scratch(size_t(SUB) * BINS);
        uint32_t* h = buf.data();
        for (int64_t p = b; p < e; p += FLUSH) {
            count(p, std::min(e, p + FLUSH), h);
#pragma omp critical(nlm_hist)
            for (int k = 0; k < BINS; k++) {
                int64_t sum = 0;
                for (int j = 0; j < SUB; j++) sum += h[k + j * BINS];
                hist[k] += sum;
            }
            std::fill(h, h + size_t(SUB) * BINS, 0u);  // leave the scratch zeroed
        }
    }
}

template <typename U>
inline void count_direct(const U* __restrict x, int64_t n, uint32_t mask, int shift, int64_t* __restrict hist) {
    for (int64_t i = 0; i < n; i++) hist[(x[i] & mask) >> shift] += 1;
}

template <typename U>
inline void count_sub(const U* __restrict x, int64_t n, uint32_t mask, int shift, uint32_t* __restrict h) {
    uint32_t* __restrict h0 = h;
    uint32_t* __restrict h1 = h + HIGH_BINS;
    uint32_t* __restrict h2 = h + 2 * HIGH_BINS;
    uint32_t* __restrict h3 = h + 3 * HIGH_BINS;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const uint32_t a = (uint32_t(x[i]) & mask) >> shift;
        const uint32_t b = (uint32_t(x[i + 1]) & mask) >> shift;
        const uint32_t c = (uint32_t(x[i + 2]) & mask) >> shift;
        const uint32_t d = (uint32_t(x[i + 3]) & mask) >> shift;
        h0[a] += 1;
        h1[b] += 1;
        h2[c] += 1;
        h3[d] += 1;
    }
    for (; i < n; i++) h0[(uint32_t(x[i]) & mask) >> shift] += 1;
}

template <typename U>
void hist_high(const U* x, int64_t n, uint32_t mask, int shift, int64_t* hist, int nthreads) {
    if (n < SMALL) {
        count_direct(x, n, mask, shift, hist);
        return;
    }
    threaded_histogram<HIGH_BINS, NSUB>(n, nthreads, hist, [&](int64_t p, int64_t q, uint32_t* h) {
        count_sub(x + p, q - p, mask, shift, h);
    });
}

// Low-16-bit histogram of the elements whose high bits equal `prefix`. Most elements do not
// match: a vectorized test over a chunk of 32 skips chunks without a match; matching elements
// alternate between two sub-tables (runs of equal values, e.g. all zeros with prefix 0).
constexpr int CHUNK = 32;

// NT = 2: alternate between two uint32 sub-tables (h, h + LOW_BINS); NT = 1: one table.
template <int NT, typename C>
inline void low_chunk(const uint32_t* __restrict x, int n, uint32_t prefix, C* __restrict h) {
    for (int j = 0; j < n; j++) {
        const uint32_t v = x[j] & 0x7FFFFFFFu;
        if ((v >> 16) == prefix) h[(NT == 2 ? (j & 1) << 16 : 0) | (v & 0xFFFFu)] += 1;
    }
}

template <int NT, typename C>
void count_low(const uint32_t* __restrict x, int64_t n, uint32_t prefix, C* __restrict h) {
    int64_t i = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        const uint32_t* __restrict c = x + i;
        uint32_t any = 0;
        for (int j = 0; j < CHUNK; j++) any |= uint32_t(((c[j] & 0x7FFFFFFFu) >> 16) == prefix);
        if (any) low_chunk<NT>(c, CHUNK, prefix, h);
    }
    low_chunk<NT>(x + i, int(n - i), prefix, h);
}

// Task vectors formed as they are counted: a run of fp32(e) - fp32(b) magnitudes as bits goes
// to a per-thread buffer (L1), then through the counting loops above.
constexpr int RUN = 2048;

// (e and b are read a run at a time, next to other streams: their next runs are hinted, prefetch)
template <int D>
void diff_bits(const typename DT<D>::S* __restrict e, const typename DT<D>::S* __restrict b, int n,
               uint32_t* __restrict out) {
    constexpr int LINE = LINE_BYTES / int(sizeof(typename DT<D>::S));
    for (int i0 = 0; i0 < n; i0 += LINE) {
        prefetch(e + i0 + RUN);
        prefetch(b + i0 + RUN);
        const int i1 = std::min(i0 + LINE, n);
        for (int i = i0; i < i1; i++) out[i] = f32_bits(DT<D>::load(e[i]) - DT<D>::load(b[i])) & 0x7FFFFFFFu;
    }
}

// count(bits, m, h) over runs of the elements [p, q) of the task vector expert - base.
template <int D, class Count>
void over_diff_runs(const void* base, const void* expert, int64_t p, int64_t q, Count count) {
    using S = typename DT<D>::S;
    const S* e = static_cast<const S*>(expert);
    const S* b = static_cast<const S*>(base);
    alignas(64) uint32_t bits[RUN];
    for (int64_t r = p; r < q; r += RUN) {
        const int m = int(std::min<int64_t>(RUN, q - r));
        diff_bits<D>(e + r, b + r, m, bits);
        count(bits, m);
    }
}

template <int D>
void hist_models_t(const void* base, const void* expert, int64_t n, int64_t* hist, int nthreads) {
    if (n < SMALL) {
        over_diff_runs<D>(base, expert, 0, n, [&](const uint32_t* x, int m) { count_direct(x, m, 0x7FFFFFFFu, 16, hist); });
        return;
    }
    threaded_histogram<HIGH_BINS, NSUB>(n, nthreads, hist, [&](int64_t p, int64_t q, uint32_t* h) {
        over_diff_runs<D>(base, expert, p, q, [&](const uint32_t* x, int m) { count_sub(x, m, 0x7FFFFFFFu, 16, h); });
    });
}

template <int D>
void hist_low_models_t(const void* base, const void* expert, int64_t n, int64_t* hist, uint32_t prefix, int nthreads) {
    if (n < SMALL) {
        over_diff_runs<D>(base, expert, 0, n, [&](const uint32_t* x, int m) { count_low<1>(x, m, prefix, hist); });
        return;
    }
    threaded_histogram<LOW_BINS, 2>(n, nthreads, hist, [&](int64_t p, int64_t q, uint32_t* h) {
        over_diff_runs<D>(base, expert, p, q, [&](const uint32_t* x, int m) { count_low<2>(x, m, prefix, h); });
    });
}

// One-read selection: fp32 magnitude bits counted against a window [lo, lo + width) of bit
// patterns. A vector of VL elements at a time: lane counters of the elements below the window
// and of the non-finite ones (magnitude bits are below 2^31: signed compares), and a test for
// any element inside; a vector with one is compacted without branches into a per-thread buffer
// of window offsets, which is added into the shared int64 window under a lock when full (integer
// sums: the counts do not depend on the thread count).
constexpr int PENDING = 4096;
constexpr int32_t INF_BITS = 0x7F800000;
constexpr int64_t LANE_RUN = int64_t(1) << 24;  // vectors counted before the lane counters are summed

inline bool any_lane(simd::vu m) {
    uint64_t words[sizeof m / 8];
    std::memcpy(words, &m, sizeof m);
    uint64_t any = 0;
    for (uint64_t w : words) any |= w;
    return any != 0;
}

struct WindowCounter {
    uint32_t lo, width;
    int64_t* hist;  // [1 + width]: below the window, then one bin per bit pattern in it
    int64_t below = 0, nonfinite = 0;
    int npending = 0;
    uint32_t pending[PENDING + 4 * simd::VL];

    void flush() {
#pragma omp critical(nlm_window)
        for (int j = 0; j < npending; j++) hist[1 + pending[j]] += 1;
        npending = 0;
    }

    void compact(const uint32_t* __restrict c, int m) {
        const uint32_t l = lo, w = width;
        uint32_t* __restrict out = pending;
        int k = npending;
        int j = 0;
#if defined(__AVX512F__)
        // vpcompressd: a vector's in-window offsets in one store (a whole vector is stored: pending
        // has room for 4 VL past PENDING, and a call adds at most 4 VL before the flush test).
        // The scalar loop below was a third of the job's counting pass (perf, session 7).
        static_assert(4 * simd::VL >= 16, "pending holds a whole 16-lane store past PENDING");
        const __m512i vl = _mm512_set1_epi32(int32_t(l)), vw = _mm512_set1_epi32(int32_t(w)),
                      magnitude = _mm512_set1_epi32(0x7FFFFFFF);
        for (; j + 16 <= m; j += 16) {
            const __m512i off = _mm512_sub_epi32(_mm512_and_si512(_mm512_loadu_si512(c + j), magnitude), vl);
            const __mmask16 in = _mm512_cmplt_epu32_mask(off, vw);
            _mm512_storeu_si512(out + k, _mm512_maskz_compress_epi32(in, off));
            k += __builtin_popcount(in);
        }
#endif
        for (; j < m; j++) {
            const uint32_t off = (c[j] & 0x7FFFFFFFu) - l;
            out[k] = off;
            k += int(off < w);
        }
        npending = k;
        if (npending >= PENDING) flush();
    }

    void count(const uint32_t* __restrict x, int64_t n) {
        using simd::vi;
        using simd::vu;
        constexpr int VL = simd::VL, G = 4 * VL;  // a group of four vectors shares one test
        const int32_t l = int32_t(lo);
        int64_t i = 0;
        while (i + G <= n) {
            vi nb{}, nf{};
            const int64_t end = i + std::min<int64_t>((n - i) / G, LANE_RUN) * G;
            for (; i < end; i += G) {
                vu in{};
                for (int q = 0; q < 4; q++) {
                    vi v;
                    std::memcpy(&v, x + i + q * VL, sizeof v);
                    v &= 0x7FFFFFFF;
                    nb -= v < l;
                    nf -= v >= INF_BITS;
                    in |= (vu)(v - l) < width;
                }
                if (any_lane(in)) compact(x + i, G);
            }
            for (int j = 0; j < VL; j++) {
                below += nb[j];
                nonfinite += nf[j];
            }
        }
        for (int64_t j = i; j < n; j++) {
            const uint32_t v = x[j] & 0x7FFFFFFFu;
            below += v < lo;
            nonfinite += v >= uint32_t(INF_BITS);
        }
        compact(x + i, int(n - i));
    }

    // adds what is pending and the count below the window into hist; returns the non-finite count
    int64_t finish() {
        flush();
#pragma omp critical(nlm_window)
        hist[0] += below;
        return nonfinite;
    }
};

// feed(p, q, counter) counts the elements [p, q) into the counter; on up to nthreads threads.
template <class Feed>
int64_t threaded_window(int64_t n, int nthreads, uint32_t lo, uint32_t width, int64_t* hist, Feed feed) {
    [[maybe_unused]] const int nt = threads_for(n, nthreads, MIN_PER_THREAD);
    int64_t nonfinite = 0;
#pragma omp parallel num_threads(nt) reduction(+ : nonfinite)
    {
        int64_t b, e;
        thread_range(n, NLM_NUM_THREADS(), NLM_THREAD_ID(), b, e);
        WindowCounter w{lo, width, hist};
        feed(b, e, w);
        nonfinite += w.finish();
    }
    return nonfinite;
}

template <int D>
int64_t window_models_t(const void* base, const void* expert, int64_t n, uint32_t lo, uint32_t width, int64_t* hist,
                        int nthreads) {
    return threaded_window(n, nthreads, lo, width, hist, [&](int64_t p, int64_t q, WindowCounter& w) {
        over_diff_runs<D>(base, expert, p, q, [&](const uint32_t* x, int m) { w.count(x, m); });
    });
}

// Several tasks' selections in one read (count_windows_models). For each task, a window lo <= hi of
// magnitude bits chosen from a sample: the elements below lo, equal to lo and equal to hi are
// counted in vector lanes (ties at the edges, e.g. the zeros of a sparse task vector, are never
// collected), those strictly between are compacted into the task's candidate buffer (vpcompressd
// with AVX-512, else branch-free stores). The base of a run of RUN elements is converted once and
// stays in L1 while the T experts stream past it.
struct TaskWindow {
    int32_t lo, hi, hi_eq;  // hi_eq: hi, or -1 (never equal: magnitude bits are >= 0) when hi == lo
    uint32_t* out;          // next free candidate slot of this thread's segment
    uint32_t* end;          // end of the segment
    bool overflow = false;
    simd::vi below{}, at_lo{}, at_hi{};
    simd::vu max{};
    int64_t total[3] = {0, 0, 0};

    void flush_lanes() {
        for (int j = 0; j < simd::VL; j++) {
            total[0] += below[j];
            total[1] += at_lo[j];
            total[2] += at_hi[j];
        }
        below = at_lo = at_hi = simd::vi{};
    }

    // counts VL magnitudes v and collects those in (lo, hi)
#if defined(__AVX512F__)
    // in mask registers: one compare and one masked add per count (the generic form below widens
    // each compare to a vector first), and lo < v < hi as one unsigned compare:
    // v - (lo + 1) < hi - lo - 1 (magnitude bits are below 2^31; nothing is inside when hi <= lo + 1)
    inline void add(simd::vi v) {
        const __m512i x = (__m512i)v, one = _mm512_set1_epi32(1);
        below = (simd::vi)_mm512_mask_add_epi32((__m512i)below, _mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(lo)),
                                                (__m512i)below, one);
        at_lo = (simd::vi)_mm512_mask_add_epi32((__m512i)at_lo, _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(lo)),
                                                (__m512i)at_lo, one);
        at_hi = (simd::vi)_mm512_mask_add_epi32((__m512i)at_hi, _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(hi_eq)),
                                                (__m512i)at_hi, one);
        max = (simd::vu)_mm512_max_epu32((__m512i)max, x);
        const uint32_t span = hi > lo ? uint32_t(hi - lo - 1) : 0;
        const __mmask16 k = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(x, _mm512_set1_epi32(lo + 1)),
                                                     _mm512_set1_epi32(int32_t(span)));
        if (out + simd::VL > end) {  // no room for a whole vector: the task falls back (overflow)
            overflow = overflow || k != 0;
            return;
        }
        _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(k, x));
        out += __builtin_popcount(k);
    }
#else
    inline void add(simd::vi v) {
        using simd::vi;
        below -= v < lo;
        at_lo -= v == lo;
        at_hi -= v == hi_eq;
        max = simd::vmaxu(max, (simd::vu)v);
        const vi inside = (v > lo) & (v < hi);
        if (out + simd::VL > end) {  // no room for a whole vector: the task falls back (overflow)
            overflow = overflow || any_lane((simd::vu)inside);
            return;
        }
        for (int j = 0; j < simd::VL; j++) {
            *out = uint32_t(v[j]);
            out += inside[j] != 0;
        }
    }
#endif

    inline void add_one(uint32_t v) {  // the scalar form of add, for a run's tail
        const int32_t s = int32_t(v);
        total[0] += s < lo;
        total[1] += s == lo;
        total[2] += s == hi_eq;
        max[0] = std::max(max[0], v);
        if (s > lo && s < hi) {
            if (out < end) {
                *out++ = v;
            } else {
                overflow = true;
            }
        }
    }
};

constexpr int64_t LANE_FLUSH_RUNS = 1 << 16;  // runs before the int32 lane counters are summed

// Start of a thread's candidate segment: cap * b / n without overflowing int64.
inline int64_t segment(int64_t cap, int64_t b, int64_t n) { return int64_t((__int128)cap * b / n); }

template <int D>
void windows_models_t(const void* base, const void* const* experts, int64_t T, int64_t n, const uint32_t* lo,
                      const uint32_t* hi, int64_t* counts, uint32_t* cand, int64_t cap, int nthreads) {
    using S = typename DT<D>::S;
    using simd::VL;
    const int nt = threads_for(n, nthreads, MIN_PER_THREAD);
    // per thread and task: candidates written (its segment starts at segment(cap, b, n)), counts
    std::vector<int64_t> written(size_t(nt) * T, 0), sums(size_t(nt) * T * 5, 0);
    int used = 1;
#pragma omp parallel num_threads(nt)
    {
        const int nth = NLM_NUM_THREADS(), tid = NLM_THREAD_ID();
        if (tid == 0) used = nth;
        int64_t b, e;
        thread_range(n, nth, tid, b, e);
        std::vector<TaskWindow> w(T);
        for (int64_t t = 0; t < T; t++) {
            w[t].lo = int32_t(lo[t]);
            w[t].hi = int32_t(hi[t]);
            w[t].hi_eq = hi[t] == lo[t] ? -1 : int32_t(hi[t]);
            w[t].out = cand + t * cap + segment(cap, b, n);
            w[t].end = cand + t * cap + segment(cap, e, n);
        }
        alignas(64) float bf[RUN];
        int64_t runs = 0;
        for (int64_t r = b; r < e; r += RUN) {
            const int m = int(std::min<int64_t>(RUN, e - r));
            const S* bs = static_cast<const S*>(base) + r;
            for (int i = 0; i < m; i++) bf[i] = DT<D>::load(bs[i]);
            prefetch_span(bs + RUN, m * int64_t(sizeof(S)));  // the base's next run (see prefetch)
            for (int64_t t = 0; t < T; t++) {
                const S* xs = static_cast<const S*>(experts[t]) + r;
                TaskWindow tw = w[t];  // a local copy stays in registers (stores to its buffer could alias w[t])
                int i = 0;
                for (; i + VL <= m; i += VL) {
                    prefetch(xs + RUN + i);  // this expert's next run (see prefetch)
                    simd::vf x = simd::VLoad<D>::load(xs + i);
                    simd::vf bv;
                    std::memcpy(&bv, bf + i, sizeof bv);
                    tw.add((simd::vi)((simd::vu)(x - bv) & 0x7FFFFFFFu));
                }
                for (; i < m; i++) tw.add_one(f32_bits(DT<D>::load(xs[i]) - bf[i]) & 0x7FFFFFFFu);
                w[t] = tw;
            }
            if (++runs % LANE_FLUSH_RUNS == 0)
                for (auto& tw : w) tw.flush_lanes();
        }
        for (int64_t t = 0; t < T; t++) {
            TaskWindow& tw = w[t];
            tw.flush_lanes();
            int64_t* s = &sums[(size_t(tid) * T + t) * 5];
            s[0] = tw.total[0];
            s[1] = tw.total[1];
            s[2] = tw.total[2];
            uint32_t mx = 0;
            for (int j = 0; j < VL; j++) mx = std::max(mx, tw.max[j]);
            s[3] = mx >= uint32_t(INF_BITS);
            s[4] = tw.overflow;
            written[size_t(tid) * T + t] = tw.out - (cand + t * cap + segment(cap, b, n));
        }
    }
    // gather each task's segments into one run from cand[t * cap]; counts in thread order
    for (int64_t t = 0; t < T; t++) {
        int64_t* c = counts + t * 6;
        std::fill(c, c + 6, 0);
        uint32_t* dst = cand + t * cap;
        for (int i = 0; i < used; i++) {
            int64_t b, e;
            thread_range(n, used, i, b, e);
            const int64_t* s = &sums[(size_t(i) * T + t) * 5];
            const int64_t k = written[size_t(i) * T + t];
            std::memmove(dst, cand + t * cap + segment(cap, b, n), size_t(k) * sizeof(uint32_t));
            dst += k;
            c[0] += s[0];
            c[1] += s[1];
            c[2] += k;
            c[3] += s[2];
            c[4] |= s[3];
            c[5] |= s[4];
        }
    }
}

// T tasks' windows in one pass: each thread walks its range run by run, forming every task's
// differences from the same run of the base (still in cache), one WindowCounter per task.
template <int D>
void window_models_tasks_t(const void* base, const void* const* experts, int64_t T, int64_t n, const uint32_t* lo,
                           const uint32_t* width, int64_t* const* hists, int64_t* nonfinite, int nthreads) {
    using S = typename DT<D>::S;
    [[maybe_unused]] const int nt = threads_for(n, nthreads, MIN_PER_THREAD);
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        thread_range(n, NLM_NUM_THREADS(), NLM_THREAD_ID(), b, e);
        std::vector<WindowCounter> counters;
        counters.reserve(size_t(T));
        for (int64_t t = 0; t < T; t++) counters.push_back(WindowCounter{lo[t], width[t], hists[t]});
        alignas(64) uint32_t bits[RUN];
        const S* bs = static_cast<const S*>(base);
        for (int64_t r = b; r < e; r += RUN) {
            const int m = int(std::min<int64_t>(RUN, e - r));
            for (int64_t t = 0; t < T; t++) {
                diff_bits<D>(static_cast<const S*>(experts[t]) + r, bs + r, m, bits);
                counters[size_t(t)].count(bits, m);
            }
        }
        for (int64_t t = 0; t < T; t++) {
            const int64_t nf = counters[size_t(t)].finish();
#pragma omp atomic
            nonfinite[t] += nf;
        }
    }
}

}  // namespace

void hist_magnitude(const void* x, int dtype, int64_t n, int64_t* hist, int shift, int nthreads) {
    if (n <= 0) return;
    if (dtype == F32) {
        hist_high(static_cast<const uint32_t*>(x), n, 0x7FFFFFFFu, shift, hist, nthreads);
    } else {
        hist_high(static_cast<const uint16_t*>(x), n, 0x7FFFu, shift, hist, nthreads);
    }
}

void hist_magnitude_low(const float* xf, int64_t n, int64_t* hist, int64_t prefix, int nthreads) {
    if (n <= 0 || prefix < 0 || prefix >= HIGH_BINS) return;
    const uint32_t* x = reinterpret_cast<const uint32_t*>(xf);
    const uint32_t pre = uint32_t(prefix);
    if (n < SMALL) {
        count_low<1>(x, n, pre, hist);
        return;
    }
    threaded_histogram<LOW_BINS, 2>(n, nthreads, hist, [&](int64_t p, int64_t q, uint32_t* h) {
        count_low<2>(x + p, q - p, pre, h);
    });
}

void hist_magnitude_models(const void* base, const void* expert, int dtype, int64_t n, int64_t* hist, int nthreads) {
    if (n <= 0) return;
    switch (dtype) {
        case F16: hist_models_t<F16>(base, expert, n, hist, nthreads); break;
        case BF16: hist_models_t<BF16>(base, expert, n, hist, nthreads); break;
        default: hist_models_t<F32>(base, expert, n, hist, nthreads);
    }
}

void hist_magnitude_low_models(const void* base, const void* expert, int dtype, int64_t n, int64_t* hist,
                               int64_t prefix, int nthreads) {
    if (n <= 0 || prefix < 0 || prefix >= HIGH_BINS) return;
    const uint32_t pre = uint32_t(prefix);
    switch (dtype) {
        case F16: hist_low_models_t<F16>(base, expert, n, hist, pre, nthreads); break;
        case BF16: hist_low_models_t<BF16>(base, expert, n, hist, pre, nthreads); break;
        default: hist_low_models_t<F32>(base, expert, n, hist, pre, nthreads);
    }
}

void count_windows_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t n,
                          const uint32_t* lo, const uint32_t* hi, int64_t* counts, uint32_t* cand, int64_t cap,
                          int nthreads) {
    if (n <= 0 || T <= 0) {
        std::fill(counts, counts + 6 * std::max<int64_t>(T, 0), 0);
        return;
    }
    switch (dtype) {
        case F16: windows_models_t<F16>(base, experts, T, n, lo, hi, counts, cand, cap, nthreads); break;
        case BF16: windows_models_t<BF16>(base, experts, T, n, lo, hi, counts, cand, cap, nthreads); break;
        default: windows_models_t<F32>(base, experts, T, n, lo, hi, counts, cand, cap, nthreads);
    }
}

int64_t count_window(const float* x, int64_t n, uint32_t lo, uint32_t width, int64_t* hist, int nthreads) {
    if (n <= 0) return 0;
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
    return threaded_window(n, nthreads, lo, width, hist,
                           [&](int64_t p, int64_t q, WindowCounter& w) { w.count(bits + p, q - p); });
}

void count_window_models_tasks(const void* base, const void* const* experts, int dtype, int64_t T, int64_t n,
                               const uint32_t* lo, const uint32_t* width, int64_t* const* hists, int64_t* nonfinite,
                               int nthreads) {
    if (n <= 0 || T <= 0) return;
    switch (dtype) {
        case F16: window_models_tasks_t<F16>(base, experts, T, n, lo, width, hists, nonfinite, nthreads); break;
        case BF16: window_models_tasks_t<BF16>(base, experts, T, n, lo, width, hists, nonfinite, nthreads); break;
        default: window_models_tasks_t<F32>(base, experts, T, n, lo, width, hists, nonfinite, nthreads);
    }
}

int64_t count_window_models(const void* base, const void* expert, int dtype, int64_t n, uint32_t lo, uint32_t width,
                            int64_t* hist, int nthreads) {
    if (n <= 0) return 0;
    switch (dtype) {
        case F16: return window_models_t<F16>(base, expert, n, lo, width, hist, nthreads);
        case BF16: return window_models_t<BF16>(base, expert, n, lo, width, hist, nthreads);
        default: return window_models_t<F32>(base, expert, n, lo, width, hist, nthreads);
    }
}

}  // namespace nlm
