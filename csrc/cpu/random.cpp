// Counter-based draws of nlmerge.ops.random (see CONTRACT.md, "Random draws"): Philox4x32-10
// (Salmon et al., SC 2011; the rounds and constants of Random123) of the counter
// (j mod 2^32, j >> 32, stream, h) under the key (k0, k1), for j = i / 4; element i is lane i % 4.
//
// Each element is a pure function of its index, so the result cannot depend on the thread count
// or on how the range is cut. The work unit is a chunk of CHUNK counters: its words are generated
// into a per-thread buffer in element order, then the part of the chunk inside [offset, offset + n)
// is written out as 24-bit draws, fp32 uniforms or keep flags.
//
// The rounds run on vectors of 64-bit lanes, one counter per lane, each 32-bit word in a lane's
// low half: Philox's 32x32 -> 64-bit products are then one unsigned even-lane multiply
// (pmuludq), which reads only the low halves, so the upper halves may hold garbage until the end.
// GCC's own vectorization of the scalar rounds used 64x64-bit multiplies (vpmullq) and shuffles,
// 3.5x slower.
#include <algorithm>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "random.cpp stores pairs of 32-bit words as one 64-bit word");

namespace nlm {
namespace {

constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl increments of the key
constexpr int ROUNDS = 10;
constexpr int UNIFORM_BITS = 24;
constexpr uint64_t LOW = 0xFFFFFFFFu;

#if defined(__AVX512F__)
constexpr int QBYTES = 64;
#elif defined(__AVX2__)
constexpr int QBYTES = 32;
#else
constexpr int QBYTES = 16;
#endif
constexpr int QL = QBYTES / 8;  // counters per vector
constexpr int U = 2;            // independent vectors per step: two dependency chains in flight
typedef uint64_t vq __attribute__((vector_size(QBYTES)));
typedef uint64_t pair_word __attribute__((may_alias));  // two uint32 words written as one

// Counters per chunk (4 words each: 16 KiB of buffer, in L1 with the output it feeds).
constexpr int64_t CHUNK = 1024;
static_assert(CHUNK % (QL * U) == 0, "a chunk is whole steps");

// Lane-wise low(x) * low(m) as 64-bit products.
static inline vq mul32(vq x, vq m) {
#if defined(__AVX512F__)
    return (vq)_mm512_mul_epu32((__m512i)x, (__m512i)m);
#elif defined(__AVX2__)
    return (vq)_mm256_mul_epu32((__m256i)x, (__m256i)m);
#elif defined(__SSE2__)
    return (vq)_mm_mul_epu32((__m128i)x, (__m128i)m);
#else
    return (x & LOW) * (m & LOW);
#endif
}

static inline vq splat(uint64_t x) { return vq{} + x; }

// words[4 * q + lane] = lane of Philox4x32-10 of counter (j0 + q, c2, c3), for q in [0, m) with
// m rounded up to whole steps (at most CHUNK).
void philox_words(uint64_t j0, int64_t m, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                  uint32_t* __restrict words) {
    vq iota, ka[ROUNDS], kb[ROUNDS];
    for (int l = 0; l < QL; l++) iota[l] = uint64_t(l);
    for (int r = 0; r < ROUNDS; r++) {  // the key of round r
        ka[r] = splat(uint32_t(k0 + uint32_t(r) * W0));
        kb[r] = splat(uint32_t(k1 + uint32_t(r) * W1));
    }
    const vq m0 = splat(M0), m1 = splat(M1);
    pair_word* __restrict pairs = reinterpret_cast<pair_word*>(words);  // (lane 0, 1), (lane 2, 3) of a counter
    for (int64_t q = 0; q < m; q += QL * U) {
        vq x0[U], x1[U], x2[U], x3[U];
        for (int u = 0; u < U; u++) {
            const vq j = iota + (j0 + uint64_t(q + u * QL));
            x0[u] = j;  // low half used
            x1[u] = j >> 32;
            x2[u] = splat(c2);
            x3[u] = splat(c3);
        }
#pragma GCC unroll 10
        for (int r = 0; r < ROUNDS; r++) {
            for (int u = 0; u < U; u++) {
                const vq p0 = mul32(x0[u], m0), p1 = mul32(x2[u], m1);
                x0[u] = (p1 >> 32) ^ x1[u] ^ ka[r];
                x2[u] = (p0 >> 32) ^ x3[u] ^ kb[r];
                x1[u] = p1;
                x3[u] = p0;
            }
        }
        for (int u = 0; u < U; u++) {
            const vq v01 = (x0[u] & LOW) | (x1[u] << 32), v23 = (x2[u] & LOW) | (x3[u] << 32);
            for (int l = 0; l < QL; l++) {
                pairs[2 * (q + u * QL + l)] = v01[l];
                pairs[2 * (q + u * QL + l) + 1] = v23[l];
            }
        }
    }
}

// What a draw becomes in the output: its 24 random bits, their uniform, or u < density.
struct Bits {
    int64_t* out;
    void operator()(int64_t e, const uint32_t* __restrict w, int64_t m) const {
        int64_t* __restrict o = out + e;
        for (int64_t i = 0; i < m; i++) o[i] = int64_t(w[i] >> (32 - UNIFORM_BITS));
    }
};
struct Uniform {
    float* out;
    void operator()(int64_t e, const uint32_t* __restrict w, int64_t m) const {
        float* __restrict o = out + e;
        for (int64_t i = 0; i < m; i++) o[i] = float(int32_t(w[i] >> (32 - UNIFORM_BITS))) * 0x1.0p-24f;  // exact
    }
};
struct Keep {
    uint8_t* out;
    uint32_t threshold;
    void operator()(int64_t e, const uint32_t* __restrict w, int64_t m) const {
        uint8_t* __restrict o = out + e;
        for (int64_t i = 0; i < m; i++) o[i] = uint8_t((w[i] >> (32 - UNIFORM_BITS)) < threshold);
    }
};

template <class Write>
void draws(const PhiloxStream& s, int64_t offset, int64_t n, Write write, int nthreads) {
    if (n <= 0) return;
    const int64_t first = offset / 4, end = (offset + n + 3) / 4;  // counters covering the range
    const int64_t chunks = (end - first + CHUNK - 1) / CHUNK;
    const int nt = threads_for(n, nthreads, int64_t(1) << 14);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        alignas(64) uint32_t words[4 * CHUNK];
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t j0 = first + c * CHUNK, m = std::min(CHUNK, end - j0);
            philox_words(uint64_t(j0), m, s.stream, s.h, s.k0, s.k1, words);  // j0 + CHUNK < 2^61: no wrap
            // elements [lo, hi) of this chunk that lie in the requested range
            const int64_t lo = std::max(offset, 4 * j0), hi = std::min(offset + n, 4 * (j0 + m));
            write(lo - offset, words + (lo - 4 * j0), hi - lo);
        }
    }
}

}  // namespace

void random_bits(const PhiloxStream& s, int64_t offset, int64_t n, int64_t* out, int nthreads) {
    draws(s, offset, n, Bits{out}, nthreads);
}

void random_uniform(const PhiloxStream& s, int64_t offset, int64_t n, float* out, int nthreads) {
    draws(s, offset, n, Uniform{out}, nthreads);
}

void random_keep(const PhiloxStream& s, int64_t offset, int64_t n, uint32_t threshold, uint8_t* out, int nthreads) {
    draws(s, offset, n, Keep{out, threshold}, nthreads);
}

void block_draws(const PhiloxStream& s, int64_t off, int n, uint32_t* out) {
    static_assert((BLOCK / 4) % (QL * U) == 0, "a block's counters are whole steps: philox_words stays inside it");
    philox_words(uint64_t(off / 4), (n + 3) / 4, s.stream, s.h, s.k0, s.k1, out);
    for (int i = 0; i < n; i++) out[i] >>= 32 - UNIFORM_BITS;
}

}  // namespace nlm
