// Raw-pointer entry points of the nlmerge CPU kernels (see nlmerge/kernels/CONTRACT.md).
// The pybind11 layer (module.cpp) validates buffers and releases the GIL around these calls.
#pragma once

#include <cstdint>

#include "common.h"

namespace nlm {

enum Disjoint : int { MEAN = 0, SUM = 1, MAX = 2 };

// hist[(abs_bits(x) >> shift)] += 1 for every element; hist has 32768 int64 bins.
void hist_magnitude(const void* x, int dtype, int64_t n, int64_t* hist, int shift, int nthreads);

// For fp32 x: hist[abs_bits & 0xffff] += 1 where abs_bits >> 16 == prefix; 65536 bins.
void hist_magnitude_low(const float* x, int64_t n, int64_t* hist, int64_t prefix, int nthreads);

// Models histograms: the same over x = fp32(expert) - fp32(base) (fp32 magnitudes, shift 16), base
// and expert n elements of one dtype; the task vector is formed as it is counted.
void hist_magnitude_models(const void* base, const void* expert, int dtype, int64_t n, int64_t* hist, int nthreads);
void hist_magnitude_low_models(const void* base, const void* expert, int dtype, int64_t n, int64_t* hist,
                               int64_t prefix, int nthreads);

// One-read selection over fp32 magnitude bits v = abs_bits(x) (count_window: fp32 x;
// count_window_models: x = fp32(expert) - fp32(base), base and expert n elements of one dtype):
// hist[0] += #(v < lo), hist[1 + v - lo] += 1 for lo <= v < lo + width (hist: int64 [1 + width]);
// returns #(v >= 0x7F800000), the non-finite elements. The caller keeps lo + width <= 0x7F800000.
int64_t count_window(const float* x, int64_t n, uint32_t lo, uint32_t width, int64_t* hist, int nthreads);
int64_t count_window_models(const void* base, const void* expert, int dtype, int64_t n, uint32_t lo, uint32_t width,
                            int64_t* hist, int nthreads);

// count_window_models of T tasks in one pass over the base and the T experts: task t's window
// [lo[t], lo[t] + width[t]) into hists[t] (int64 [1 + width[t]]); nonfinite[t] += its
// non-finite count (nonfinite: int64 [T], added to).
void count_window_models_tasks(const void* base, const void* const* experts, int dtype, int64_t T, int64_t n,
                               const uint32_t* lo, const uint32_t* width, int64_t* const* hists, int64_t* nonfinite,
                               int nthreads);

// The one-read selections of T tasks over the models in one pass (count_windows_models): with
// v = abs_bits(fp32(experts[t]) - fp32(base)) and the window lo[t] <= hi[t] <= 0x7F800000,
// counts[t] (int64 [T][6]) = {#(v < lo), #(v == lo), candidates written, #(v == hi) (0 when hi ==
// lo), any v >= 0x7F800000 (0/1), overflow (0/1)}; the candidates, the v with lo < v < hi, go to
// cand[t * cap, t * cap + counts[t][2]) in no particular order. Overflow 1: they did not all fit
// (each thread has a share of cap proportional to its range), and that task's window is unusable.
void count_windows_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t n,
                          const uint32_t* lo, const uint32_t* hi, int64_t* counts, uint32_t* cand, int64_t cap,
                          int nthreads);

// nonfinite (here and in the returns below): NaN/Inf inputs plus results that are NaN/Inf in the
// output dtype.
struct TiesResult {
    int64_t sign_sum, ambiguous, nonfinite;
};

// DARE's random keep of a merge over the models: element i of task t is kept iff the 24-bit
// draw of element i on stream t of (k0, k1, h) (random_bits below) is < thresholds[t]; a dropped
// element's task vector entry is +0.
struct RandomKeep {
    uint32_t k0, k1, h;
    const uint32_t* thresholds;  // [T], each in [0, 2^24]
    // the keep flags drawn already (keep_l1_norms_models records them), or nullptr: draw them.
    // Row t at bits + t * keep_row_bytes(N); bit i % 8 of its byte i / 8 is element i's flag.
    const uint8_t* bits = nullptr;
};

// Bytes of a row of recorded keep flags: whole blocks (the flags past N are 0).
inline int64_t keep_row_bytes(int64_t N) { return (N + BLOCK - 1) / BLOCK * (BLOCK / 8); }

// Arguments of a TIES pass besides its inputs.
struct TiesArgs {
    const float* thresholds;
    const float* weights;
    const float* divisors;       // disjoint "mean": divided by the sum of divisors[t] over the agreeing
                                 // tasks (nullptr: the weights); mergekit's normalize after DARE's
                                 // rescale divides by the weights before the rescale
    void* out;
    int out_dtype;
    const void* base;  // added to the result (nullptr: none)
    int base_dtype;
    float lam;
    bool count_sign;
    int disjoint;
    int fill_sign;
    const int64_t* blocks;       // run only these blocks (of BLOCK elements; nullptr: all)
    int64_t nblocks;             // how many are listed
    uint8_t* ambiguous_blocks;   // nullptr, or [ceil(N / BLOCK)]: 1 for a run block with an
                                 // ambiguous element (zero elected sign, a kept entry), 0 else
    int nthreads;
    const RandomKeep* keep;      // ties_merge_models only: nullptr (every element kept) or DARE's draws
};

TiesResult ties_merge(const void* tv, int dtype, int64_t T, int64_t N, const TiesArgs& args);

// ties_merge on the task vectors fp32(experts[t]) - fp32(base), formed in registers (bit-identical
// to ties_merge on them precomputed in fp32); base and the T experts are separate buffers of N
// elements of one dtype; args.base is what the result adds (this base, or nullptr).
TiesResult ties_merge_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                             const TiesArgs& args);

int64_t task_arithmetic(const void* tv, int dtype, int64_t T, int64_t N, const float* weights, void* out,
                        int out_dtype, const void* base, int base_dtype, float lam, int nthreads);

// task_arithmetic on the task vectors fp32(experts[t]) - fp32(base), formed in registers (bit-identical
// to task_arithmetic on them precomputed in fp32, with `base` as its base when include_base, else none);
// base and the T experts are separate buffers of N elements of one dtype. With `keep`, the task
// vectors with DARE's dropped entries set to +0 (the non-finite count still covers every entry).
int64_t task_arithmetic_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                               const float* weights, void* out, int out_dtype, float lam, bool include_base,
                               const RandomKeep* keep, int nthreads);

// DARE's L1 norms over the models (norms [T][2]): norms[t][0] = L1(x_t), norms[t][1] = L1 of x_t's
// entries kept by `keep`, x_t = fp32(experts[t]) - fp32(base). Each is the fp64 sum of the fp32
// |x| in a fixed order (nlmerge.ops.dare.l1_norm): per block of BLOCK elements (zero-padded), 16
// lanes (lane l: elements l, l + 16, ...) summed in element order, the lanes then halved pairwise
// (l + w onto l, w = 8, 4, 2, 1); the block sums, zero-padded to a power of two, halved likewise.
// Independent of the thread count; NaN/Inf in a task vector makes its norms non-finite. With
// `bits` (T rows of keep_row_bytes(N)), the keep flags are recorded there too, for the merge pass
// (RandomKeep::bits): a second drawing costs a DARE job as much as its L1 pass does.
void keep_l1_norms_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                          const RandomKeep& keep, double* norms, uint8_t* bits, int nthreads);

// out: T rows of row_bytes = ceil(N/8) bytes.
int64_t tall_masks(const void* tv, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                   const float* lam, uint8_t* out, int nthreads);
int64_t tall_masks_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                          const void* tau, int tau_dtype, const float* lam, uint8_t* out, int nthreads);

int64_t consensus(const void* tv, int dtype, int64_t T, int64_t N, const void* tau, int tau_dtype,
                  const float* lam, int64_t k, void* out, int out_dtype, const void* base, int base_dtype,
                  float alpha, int nthreads);
// consensus on fp32(experts[t]) - fp32(base), with this base added to the result.
int64_t consensus_models(const void* base, const void* const* experts, int dtype, int64_t T, int64_t N,
                         const void* tau, int tau_dtype, const float* lam, int64_t k, void* out, int out_dtype,
                         float alpha, int nthreads);

// Returns how many results are NaN/Inf in the output dtype (inputs are checked by the caller).
int64_t apply_mask(const uint8_t* packed, int64_t N, const void* tau, int tau_dtype, void* out, int out_dtype,
                   const void* base, int base_dtype, int nthreads);

// Conversions over whole arrays (exposed for tests).
void convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n, int nthreads);
// src (any dtype) -> fp32 through the vector loads of simd.h (the kernels' path; for tests).
void load_simd(const void* src, int src_dtype, float* dst, int64_t n);

// Batched permutation gathers (permute.cpp): for each job, with src and dst contiguous
// [outer, a0, mid, a1, inner] arrays of `itemsize`-byte words (1, 2, 4 or 8),
// dst[o, i, m, j, u] = src[o, p0[i], m, p1[j], u]; p0 / p1 null means the identity. Indices must
// lie in [0, a0) / [0, a1) (the binding checks). Exact: values are copied as raw words.
struct PermuteJob {
    const void* src;
    void* dst;
    int64_t outer, a0, mid, a1, inner, itemsize;
    const int64_t* p0;
    const int64_t* p1;
};
void permute(const PermuteJob* jobs, int64_t njobs, int nthreads);

// Dtype tag of float64 data, read by channel_stats only (next to F32, F16, BF16 of common.h).
constexpr int F64 = 3;

// Per-channel shifted sums (channel_stats.cpp): x (F32, F16, BF16 or F64) a contiguous
// [outer, C, inner] array; sum[c] += sum(double(x) - shift[c]), sumsq[c] += sum((double(x) -
// shift[c])^2) over (outer, inner), in float64. Returns false, leaving sum and sumsq unchanged,
// when a new total is not finite (NaN/Inf in x). Deterministic for any thread count.
bool channel_stats(const void* x, int dtype, int64_t outer, int64_t C, int64_t inner, const double* shift,
                   double* sum, double* sumsq, int nthreads);

// Counter-based draws (random.cpp): element i of a stream is lane i % 4 of Philox4x32-10 of the
// counter (i / 4 mod 2^32, i / 4 >> 32, stream, h) under the key (k0, k1); its draw is the word's
// top 24 bits. For the elements [offset, offset + n), offset + n <= 2^62, into out[0, n):
// random_bits the draws, random_uniform draw * 2^-24 (exact), random_keep draw < threshold as 0/1.
// Pure functions of the index: the same for any thread count or cut of the range.
struct PhiloxStream {
    uint32_t k0, k1, stream, h;
};
void random_bits(const PhiloxStream& s, int64_t offset, int64_t n, int64_t* out, int nthreads);
void random_uniform(const PhiloxStream& s, int64_t offset, int64_t n, float* out, int nthreads);
void random_keep(const PhiloxStream& s, int64_t offset, int64_t n, uint32_t threshold, uint8_t* out, int nthreads);
// The draws of the elements [off, off + n) into draws[0, n), in the calling thread: off a multiple
// of 4, n <= BLOCK; draws holds BLOCK entries (those from n on may be overwritten). What the merge
// kernels' random keep compares.
void block_draws(const PhiloxStream& s, int64_t off, int n, uint32_t* draws);

}  // namespace nlm
