// TALL masks (bit-packed), applying one packed mask, and whole-array dtype conversion (for
// tests). Consensus merging (masks counted on the fly, never stored) lives in merge.cpp.
//
// Blocks hold BLOCK elements (a multiple of 8), so a block owns whole bytes of every mask row
// and threads never share a byte.
#include <vector>

#include "common.h"
#include "kernels.h"
#include "simd.h"

namespace nlm {
namespace {

static_assert(BLOCK % 8 == 0, "blocks must own whole mask bytes");

// flags[i] = |x_i| > lam * |tau_i - x_i| (fp32: subtract, abs, multiply, compare), x_i = fp32(x[i]),
// or with DIFF fp32(x[i]) - fp32(b[i]); returns how many x_i are NaN/Inf.
template <int D, bool DIFF>
inline int32_t tall_row(const typename DT<D>::S* __restrict x, const typename DT<D>::S* __restrict b, int n,
                        float lam, const float* __restrict tau, uint8_t* __restrict flags) {
    int32_t nf = 0;
    for (int i = 0; i < n; i++) {
        const float v = DIFF ? DT<D>::load(x[i]) - DT<D>::load(b[i]) : DT<D>::load(x[i]);
        const float d = std::fabs(tau[i] - v);
        flags[i] = uint8_t(std::fabs(v) > lam * d);
        nf += DIFF ? !std::isfinite(v) : DT<D>::nonfinite(x[i]);
    }
    return nf;
}

// bytes[j] = sum_k flags[8j + k] << k (little-endian bit order).
inline void pack_bits(const uint8_t* __restrict flags, int nbytes, uint8_t* __restrict bytes) {
    for (int j = 0; j < nbytes; j++) {
        const uint8_t* f = flags + 8 * j;
        bytes[j] = uint8_t(f[0] | (f[1] << 1) | (f[2] << 2) | (f[3] << 3) | (f[4] << 4) | (f[5] << 5) | (f[6] << 6) |
                           (f[7] << 7));
    }
}

// rows: T task vector rows, or (DIFF) T experts and the base (row T).
template <int D, bool DIFF>
int64_t tall_impl(const void* const* rows_, int64_t T, int64_t N, const void* tau, int tau_dtype, const float* lam,
                  uint8_t* out, int nthreads) {
    using S = typename DT<D>::S;
    const S* const* rows = reinterpret_cast<const S* const*>(rows_);
    const int64_t row_bytes = (N + 7) / 8;
    struct Scratch {
        alignas(64) float tb[BLOCK];
        alignas(64) uint8_t flags[BLOCK];
    };
    return for_each_block<Scratch>(N, threads_for(N * T, nthreads), [&](Scratch& sc, int64_t off, int n) {
        const int nbytes = (n + 7) / 8;
        int64_t nf = load_block(tau_dtype, tau, off, n, sc.tb);
        for (int i = n; i < nbytes * 8; i++) sc.flags[i] = 0;  // padding bits of the last byte
        for (int64_t t = 0; t < T; t++) {
            prefetch_span(rows[t] + off + BLOCK, n * int64_t(sizeof(S)));  // this row's next block (prefetch)
            nf += tall_row<D, DIFF>(rows[t] + off, DIFF ? rows[T] + off : nullptr, n, lam[t], sc.tb, sc.flags);
            pack_bits(sc.flags, nbytes, out + t * row_bytes + off / 8);
        }
        return nf;
    });
}

template <bool DIFF>
int64_t tall_rows(const void* const* rows, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                  const float* lam, uint8_t* out, int nthreads) {
    if (N <= 0 || T <= 0) return 0;
    switch (dtype) {
        case F16: return tall_impl<F16, DIFF>(rows, T, N, tau, tau_dtype, lam, out, nthreads);
        case BF16: return tall_impl<BF16, DIFF>(rows, T, N, tau, tau_dtype, lam, out, nthreads);
        default: return tall_impl<F32, DIFF>(rows, T, N, tau, tau_dtype, lam, out, nthreads);
    }
}

// bit i of the block's packed bytes as 0/1, for i < n rounded up to a multiple of 8
template <typename I>
inline void unpack_bits(const uint8_t* __restrict bytes, int n, I* __restrict bits) {
    const int nbytes = (n + 7) / 8;
    for (int j = 0; j < nbytes; j++) {
        const I b = bytes[j];
        for (int k = 0; k < 8; k++) bits[8 * j + k] = I((b >> k) & 1);
    }
}

// Exact copy where the bit is set, +0 elsewhere (no conversion: NaN payloads survive).
template <typename S>
void apply_mask_copy(const uint8_t* packed, int64_t N, const S* tau, S* out, int nthreads) {
    struct Scratch {
        alignas(64) S bits[BLOCK];
    };
    for_each_block<Scratch>(N, threads_for(N, nthreads), [&](Scratch& sc, int64_t off, int n) {
        unpack_bits(packed + off / 8, n, sc.bits);
        const S* __restrict s = tau + off;
        S* __restrict o = out + off;
        for (int i = 0; i < n; i++) o[i] = s[i] & S(-sc.bits[i]);  // all ones where the bit is set
    });
}

}  // namespace

int64_t tall_masks(const void* tv, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                   const float* lam, uint8_t* out, int nthreads) {
    std::vector<const void*> rows(size_t(std::max<int64_t>(T, 0)));
    for (int64_t t = 0; t < T; t++) rows[size_t(t)] = static_cast<const char*>(tv) + t * N * int64_t(itemsize(dtype));
    return tall_rows<false>(rows.data(), dtype, T, N, tau, tau_dtype, lam, out, nthreads);
}

int64_t tall_masks_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                          const void* tau, int tau_dtype, const float* lam, uint8_t* out, int nthreads) {
    std::vector<const void*> rows(experts, experts + std::max<int64_t>(T, 0));
    rows.push_back(base);
    return tall_rows<true>(rows.data(), dtype, T, N, tau, tau_dtype, lam, out, nthreads);
}

int64_t apply_mask(const uint8_t* packed, int64_t N, const void* tau, int tau_dtype, void* out, int out_dtype,
                   const void* base, int base_dtype, int nthreads) {
    if (N <= 0) return 0;
    if (base == nullptr && out_dtype == tau_dtype) {  // copies of (finite) inputs: nothing to count
        if (tau_dtype == F32) {
            apply_mask_copy(packed, N, static_cast<const uint32_t*>(tau), static_cast<uint32_t*>(out), nthreads);
        } else {
            apply_mask_copy(packed, N, static_cast<const uint16_t*>(tau), static_cast<uint16_t*>(out), nthreads);
        }
        return 0;
    }
    struct Scratch {
        alignas(64) float tb[BLOCK], res[BLOCK];
        alignas(64) int32_t bits[BLOCK];
    };
    return for_each_block<Scratch>(N, threads_for(N, nthreads), [&](Scratch& sc, int64_t off, int n) {
        load_block(tau_dtype, tau, off, n, sc.tb);
        unpack_bits(packed + off / 8, n, sc.bits);
        if (base != nullptr) {
            load_block(base_dtype, base, off, n, sc.res);
            for (int i = 0; i < n; i++) sc.res[i] = sc.res[i] + (sc.bits[i] ? sc.tb[i] : 0.0f);
        } else {
            for (int i = 0; i < n; i++) sc.res[i] = sc.bits[i] ? sc.tb[i] : 0.0f;
        }
        return store_block(out_dtype, out, off, n, sc.res);
    });
}

void convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n, int nthreads) {
    if (n <= 0) return;
    struct Scratch {
        alignas(64) float buf[BLOCK];
    };
    for_each_block<Scratch>(n, threads_for(n, nthreads), [&](Scratch& sc, int64_t off, int m) {
        load_block(src_dtype, src, off, m, sc.buf);
        store_block(dst_dtype, dst, off, m, sc.buf);
    });
}

namespace {
template <int D>
void load_simd_t(const void* src, float* dst, int64_t n) {
    const typename DT<D>::S* s = static_cast<const typename DT<D>::S*>(src);
    int64_t i = 0;
    for (; i + simd::VL <= n; i += simd::VL) simd::store(dst + i, simd::VLoad<D>::load(s + i));
    for (; i < n; i++) dst[i] = DT<D>::load(s[i]);
}
}  // namespace

void load_simd(const void* src, int src_dtype, float* dst, int64_t n) {
    switch (src_dtype) {
        case F16: load_simd_t<F16>(src, dst, n); break;
        case BF16: load_simd_t<BF16>(src, dst, n); break;
        default: load_simd_t<F32>(src, dst, n);
    }
}

}  // namespace nlm
