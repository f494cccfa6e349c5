// Shared helpers of the nlmerge CPU kernels: dtype tags, exact fp16/bf16 <-> fp32 conversions,
// block load/store with non-finite counting, and OpenMP helpers.
//
// Everything here is plain scalar C++ written so that GCC auto-vectorizes the block loops
// (integer bit tricks and selects instead of branches). Build with -ffp-contract=off: the
// fp16 rounding trick and every kernel rely on separate multiply and add.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nlm {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Elements per block: the unit of work of the element-wise kernels. Small enough that every
// per-block scratch array and the T rows of a block stay in L1/L2, large enough that the
// per-block overhead (a few switches and function calls) is negligible.
#ifndef NLM_BLOCK
#define NLM_BLOCK 1024
#endif
constexpr int BLOCK = NLM_BLOCK;

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---- fp16 -> fp32 (exact; NaN stays NaN with its payload, quieted as the hardware does) ----
// The normal path rebases the exponent with a float multiply by 2^-112 (exact, and it maps the
// fp16 exponent 31 to the fp32 exponent 255, i.e. Inf/NaN); subnormals go through the
// magic-number subtraction 0.5 + m*2^-24 - 0.5 (exact). No intermediate is an fp32 subnormal,
// so the result is also right with flush-to-zero / denormals-are-zero set.
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return bits_f32(r);
}

// ---- fp32 -> fp16, round to nearest even ----
// Scaling |f| by 2^112 * 2^-110 and adding a power of two chosen from f's exponent makes the FPU
// round the mantissa at exactly the fp16 ulp (normal and subnormal results alike); overflow
// becomes Inf. NaN -> quiet NaN with the sign and the top 9 payload bits (like vcvtps2ph).
static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

// ---- bf16 <-> fp32 ----
static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// Round to nearest even; Inf stays Inf, overflow rounds to Inf; NaN -> quiet NaN keeping the
// sign and the top payload bits.
static inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// ---- per-dtype traits: storage type, conversions, non-finite test on the raw bits ----
template <int D> struct DT;
template <> struct DT<F32> {
    using S = float;
    using U = uint32_t;  // same-size unsigned integer
    static inline float load(float v) { return v; }
    static inline float store(float v) { return v; }
    static inline int nonfinite(float v) { return (f32_bits(v) & 0x7F800000u) == 0x7F800000u; }
    static inline uint32_t abs_bits(float v) { return f32_bits(v) & 0x7FFFFFFFu; }
    static constexpr uint32_t INF_BITS = 0x7F800000u;  // abs_bits >= INF_BITS iff NaN/Inf
};
template <> struct DT<F16> {
    using S = uint16_t;
    using U = uint16_t;
    static inline float load(uint16_t v) { return f16_to_f32(v); }
    static inline uint16_t store(float v) { return f32_to_f16(v); }
    static inline int nonfinite(uint16_t v) { return (v & 0x7C00u) == 0x7C00u; }
    static inline uint16_t abs_bits(uint16_t v) { return v & 0x7FFFu; }
    static constexpr uint16_t INF_BITS = 0x7C00u;
};
template <> struct DT<BF16> {
    using S = uint16_t;
    using U = uint16_t;
    static inline float load(uint16_t v) { return bf16_to_f32(v); }
    static inline uint16_t store(float v) { return f32_to_bf16(v); }
    static inline int nonfinite(uint16_t v) { return (v & 0x7F80u) == 0x7F80u; }
    static inline uint16_t abs_bits(uint16_t v) { return v & 0x7FFFu; }
    static constexpr uint16_t INF_BITS = 0x7F80u;
};

// A read hint for the cache line at p (never faults, past the end of an array included). A kernel
// that reads several streams one run at a time (a run of 2048 bf16 is one 4 KiB page) defeats
// the hardware prefetcher, which does not cross pages: every run of every stream starts cold.
// Hinting the next run of a stream while this one is read keeps them all warm (the T-task
// selection count, 2^26 bf16, T = 4, on 2 cores: 98 -> 42 ms).
static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
constexpr int LINE_BYTES = 64;
// the hint for every line of [p, p + bytes)
static inline void prefetch_span(const void* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += LINE_BYTES) prefetch(static_cast<const char*>(p) + i);
}

static inline size_t itemsize(int d) { return d == F32 ? 4 : 2; }

// dst[0:n] = fp32(src[off:off+n]); returns how many were NaN/Inf.
template <int D>
static inline int64_t load_block_t(const void* src, int64_t off, int n, float* __restrict dst) {
    const typename DT<D>::S* __restrict s = static_cast<const typename DT<D>::S*>(src) + off;
    int32_t nf = 0;
    for (int i = 0; i < n; i++) {
        dst[i] = DT<D>::load(s[i]);
        nf += DT<D>::nonfinite(s[i]);
    }
    return nf;
}

static inline int64_t load_block(int d, const void* src, int64_t off, int n, float* __restrict dst) {
    switch (d) {
        case F16: return load_block_t<F16>(src, off, n, dst);
        case BF16: return load_block_t<BF16>(src, off, n, dst);
        default: return load_block_t<F32>(src, off, n, dst);
    }
}

// dst[off:off+n] = dtype(src[0:n]) (round to nearest even); returns how many stored values are
// NaN/Inf: a finite fp32 value that overflows the output dtype counts (the merges' result check).
// The store loop only keeps the largest |bits| (a max in the same lanes: free next to the
// conversion; a per-element count cost 15-30% of this loop); the exact count runs only in a block
// that has one.
template <int D>
static inline int64_t store_block_t(void* dst, int64_t off, int n, const float* __restrict src) {
    using T = DT<D>;
    typename T::S* __restrict o = static_cast<typename T::S*>(dst) + off;
    typename T::U worst = 0;
    for (int i = 0; i < n; i++) {
        const typename T::S v = T::store(src[i]);
        o[i] = v;
        const typename T::U a = T::abs_bits(v);
        worst = worst > a ? worst : a;
    }
    if (worst < T::INF_BITS) return 0;
    int32_t nf = 0;
    for (int i = 0; i < n; i++) nf += T::nonfinite(o[i]);
    return nf;
}

static inline int64_t store_block(int d, void* dst, int64_t off, int n, const float* __restrict src) {
    switch (d) {
        case F16: return store_block_t<F16>(dst, off, n, src);
        case BF16: return store_block_t<BF16>(dst, off, n, src);
        default: return store_block_t<F32>(dst, off, n, src);
    }
}

// Number of threads for a pass over `work` elements: one thread below `min_per_thread` elements
// per thread (thread start-up would cost more than it saves).
static inline int threads_for(int64_t work, int requested, int64_t min_per_thread = 1 << 16) {
    int64_t t = work / min_per_thread;
    if (t < 1) t = 1;
    if (requested < 1) requested = 1;
    return (int)std::min<int64_t>(t, requested);
}

// Blocks [0, nblocks) split into nt contiguous ranges.
static inline void thread_range(int64_t nblocks, int nt, int tid, int64_t& b0, int64_t& b1) {
    b0 = nblocks * tid / nt;
    b1 = nblocks * (tid + 1) / nt;
}

#ifdef _OPENMP
#define NLM_THREAD_ID() omp_get_thread_num()
#define NLM_NUM_THREADS() omp_get_num_threads()
#else
#define NLM_THREAD_ID() 0
#define NLM_NUM_THREADS() 1
#endif

// The elements [0, N) in blocks of BLOCK on `nt` threads, each thread one contiguous range of
// blocks: a `Scratch` (a thread's buffers) is made once per thread, then `body(scratch, off, n)`
// runs for the block at `off` of `n` elements. A body that returns a count (e.g. non-finite
// values) has the counts summed and returned.
template <class Scratch, class Body>
int64_t for_each_block(int64_t N, [[maybe_unused]] int nt, Body body) {
    constexpr bool counts = !std::is_void_v<std::invoke_result_t<Body&, Scratch&, int64_t, int>>;
    const int64_t nblocks = (N + BLOCK - 1) / BLOCK;
    int64_t total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
    {
        Scratch scratch;
        int64_t b0, b1;
        thread_range(nblocks, NLM_NUM_THREADS(), NLM_THREAD_ID(), b0, b1);
        for (int64_t blk = b0; blk < b1; blk++) {
            const int64_t off = blk * BLOCK;
            const int n = int(std::min<int64_t>(BLOCK, N - off));
            if constexpr (counts) {
                total += body(scratch, off, n);
            } else {
                body(scratch, off, n);
            }
        }
    }
    return total;
}

}  // namespace nlm
