// Batched permutation gathers: out[o, i, m, j, u] = src[o, p0[i], m, p1[j], u] for a batch of
// tensors, each viewed as a contiguous [outer, A0, mid, A1, inner] block (see CONTRACT.md).
//
// Every tensor is read and written once. The output is cut into work items of about CHUNK bytes:
// a run of whole "r1 rows" (r1 = (o, i, m), each A1 * inner contiguous output elements), or, for a
// row longer than CHUNK, one slice of a row. Items of all tensors go to one OpenMP loop, so a batch
// of many small tensors (BN vectors) and a few large ones (conv weights) keeps every thread busy.
// Values are moved as 2- or 4-byte words (or bytes): the copy is exact for every dtype, NaN
// payloads included.
#include <cstring>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace nlm {
namespace {

// output bytes per work item: large enough that the per-item set-up is noise, small enough that
// a 10 MB tensor gives each of a few threads many items (dynamic scheduling evens them out)
constexpr int64_t CHUNK = int64_t(64) << 10;
// below this many output bytes in a call: one thread (starting the others costs more)
constexpr int64_t MIN_PARALLEL_BYTES = int64_t(256) << 10;

// rows (bytes) up to this size are staged through a per-thread buffer before the gather
constexpr size_t STAGE_BYTES = size_t(64) << 10;

struct Item {
    int64_t job;
    int64_t r_begin, r_end;  // r1 rows [r_begin, r_end)
    int64_t c_begin, c_end;  // output elements [c_begin, c_end) of each row (a slice, or the whole row)
};

// Copy n bytes, K <= n <= 2K, as two K-byte moves (the second one ends at the run's end; they
// overlap inside the run when n < 2K). K is fixed per tensor, so the compiler emits plain
// register loads and stores and the branch that picks K is the same for every run.
template <size_t K>
inline void copy_k(char* __restrict d, const char* __restrict s, size_t n) {
    char a[K], b[K];
    std::memcpy(a, s, K);
    std::memcpy(b, s + n - K, K);
    std::memcpy(d, a, K);
    std::memcpy(d + n - K, b, K);
}

inline void copy_any(char* __restrict d, const char* __restrict s, size_t n) {
    if (n >= 64) std::memcpy(d, s, n);
    else if (n >= 32) copy_k<32>(d, s, n);
    else if (n >= 16) copy_k<16>(d, s, n);
    else if (n >= 8) copy_k<8>(d, s, n);
    else if (n >= 4) copy_k<4>(d, s, n);
    else if (n >= 2) copy_k<2>(d, s, n);
    else if (n == 1) *d = *s;
}

// One output row: A1 runs of `nb` bytes, run j taken from s_row + p1[j] * nb.
template <size_t K>
inline void gather_runs(char* __restrict d, const char* __restrict s_row, const int64_t* __restrict p1, int64_t A1,
                        size_t nb) {
    for (int64_t j = 0; j < A1; j++) copy_k<K>(d + size_t(j) * nb, s_row + size_t(p1[j]) * nb, nb);
}

template <size_t W>
inline void gather_words(char* __restrict d, const char* __restrict s_row, const int64_t* __restrict p1,
                         int64_t A1) {
    for (int64_t j = 0; j < A1; j++) std::memcpy(d + size_t(j) * W, s_row + size_t(p1[j]) * W, W);
}

void gather_row(char* d, const char* s_row, const int64_t* p1, int64_t A1, size_t nb) {
    switch (nb) {  // single elements: one move each
        case 2: gather_words<2>(d, s_row, p1, A1); return;
        case 4: gather_words<4>(d, s_row, p1, A1); return;
        case 8: gather_words<8>(d, s_row, p1, A1); return;
        default: break;
    }
    if (nb >= 64) {
        for (int64_t j = 0; j < A1; j++) std::memcpy(d + size_t(j) * nb, s_row + size_t(p1[j]) * nb, nb);
    } else if (nb >= 32) gather_runs<32>(d, s_row, p1, A1, nb);
    else if (nb >= 16) gather_runs<16>(d, s_row, p1, A1, nb);
    else if (nb >= 8) gather_runs<8>(d, s_row, p1, A1, nb);
    else if (nb >= 4) gather_runs<4>(d, s_row, p1, A1, nb);
    else if (nb >= 2) gather_runs<2>(d, s_row, p1, A1, nb);
    else for (int64_t j = 0; j < A1; j++) d[j] = s_row[p1[j]];
}

// One work item of one job, in bytes.
void run(const PermuteJob& jb, const Item& it) {
    const char* src = static_cast<const char*>(jb.src);
    char* dst = static_cast<char*>(jb.dst);
    const int64_t A0 = jb.a0, mid = jb.mid, A1 = jb.a1;
    const size_t isz = size_t(jb.itemsize);
    const size_t nb = size_t(jb.inner) * isz;  // bytes per inner run
    const size_t row = size_t(A1) * nb;        // bytes per r1 row
    const bool whole = it.c_begin == 0 && it.c_end == A1 * jb.inner;
    // r1 = (o * A0 + i) * mid + m; decode the first, then step the counters
    int64_t m = it.r_begin % mid;
    int64_t i = (it.r_begin / mid) % A0;
    int64_t o = it.r_begin / (mid * A0);
    alignas(64) static thread_local char stage[STAGE_BYTES];
    for (int64_t r = it.r_begin; r < it.r_end; r++) {
        const int64_t pi = jb.p0 ? jb.p0[i] : i;
        const char* s_row = src + size_t((o * A0 + pi) * mid + m) * row;
        char* d_row = dst + size_t(r) * row;
        if (!jb.p1) {  // the row is contiguous in the source too
            copy_any(d_row + size_t(it.c_begin) * isz, s_row + size_t(it.c_begin) * isz,
                     size_t(it.c_end - it.c_begin) * isz);
        } else if (whole) {
            // the runs of a row are read in a random order, which defeats the hardware
            // prefetcher: stream the source row into a cache-resident buffer first (in order, at
            // full bandwidth), then gather from there
            if (row <= STAGE_BYTES) {
                std::memcpy(stage, s_row, row);
                s_row = stage;
            }
            gather_row(d_row, s_row, jb.p1, A1, nb);
        } else {  // a slice of one long row
            int64_t c = it.c_begin;
            while (c < it.c_end) {
                const int64_t j = c / jb.inner, u = c % jb.inner;
                const int64_t n = std::min(jb.inner - u, it.c_end - c);
                copy_any(d_row + size_t(c) * isz, s_row + size_t(jb.p1[j] * jb.inner + u) * isz, size_t(n) * isz);
                c += n;
            }
        }
        if (++m == mid) {
            m = 0;
            if (++i == A0) {
                i = 0;
                ++o;
            }
        }
    }
}

}  // namespace

void permute(const PermuteJob* jobs, int64_t njobs, int nthreads) {
    std::vector<Item> items;
    int64_t total_bytes = 0;
    for (int64_t k = 0; k < njobs; k++) {
        const PermuteJob& jb = jobs[k];
        const int64_t rows = jb.outer * jb.a0 * jb.mid;
        const int64_t row = jb.a1 * jb.inner;
        if (rows == 0 || row == 0) continue;
        const int64_t row_bytes = row * jb.itemsize;
        total_bytes += rows * row_bytes;
        if (row_bytes >= CHUNK) {  // slices of CHUNK bytes (whole inner runs where they fit)
            int64_t per = std::max<int64_t>(1, CHUNK / jb.itemsize);
            if (jb.p1 && jb.inner < per) per = (per / jb.inner) * jb.inner;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < row; c += per) items.push_back({k, r, r + 1, c, std::min(row, c + per)});
        } else {
            const int64_t per = std::max<int64_t>(1, CHUNK / row_bytes);
            for (int64_t r = 0; r < rows; r += per) items.push_back({k, r, std::min(rows, r + per), 0, row});
        }
    }
    const int64_t n = int64_t(items.size());
    int nt = total_bytes < MIN_PARALLEL_BYTES ? 1 : std::max(1, nthreads);
    if (nt > n) nt = int(std::max<int64_t>(1, n));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t k = 0; k < n; k++) run(jobs[items[k].job], items[k]);
}

}  // namespace nlm
