// Portable fixed-width vectors (GCC/Clang vector extensions) for the hottest kernel (TIES),
// where plain loops left GCC's vectorizer too much freedom (spills, or no vectorization at all
// for some strip widths). The width follows the target: 64 bytes with AVX-512, 32 with AVX,
// 16 otherwise; GCC lowers the generic operations to whatever the target has.
//
// Semantics are exactly those of the scalar code in common.h, lane by lane: IEEE fp32 multiply
// and add (no contraction with -ffp-contract=off), integer bit manipulations, and selects.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace nlm {
namespace simd {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif
constexpr int VL = VBYTES / 4;  // fp32 lanes

typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));
typedef uint16_t vh __attribute__((vector_size(VBYTES / 2)));

// Broadcasts. For floats `x - 0` (exact for every x, -0.0 included, and folded away by the
// compiler), not `0 + x`, which is an fp add that turns -0.0 into +0.0.
static inline vf splat(float x) { return x - vf{}; }
static inline vi splati(int32_t x) { return vi{} + x; }
static inline vu splatu(uint32_t x) { return vu{} + x; }

// Lane-wise select on a comparison mask (all ones / all zeros per lane).
static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vu selectu(vi mask, vu a, vu b) { return (vu)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf keep_if(vi mask, vf a) { return (vf)((vi)a & mask); }  // a where mask, else +0
static inline vf vabs(vf a) { return (vf)((vu)a & 0x7FFFFFFFu); }
static inline vu vmaxu(vu a, vu b) { return selectu(a > b, a, b); }
static inline vf vmax(vf a, vf b) { return select(a > b, a, b); }

// Loads of VL elements as fp32 (unaligned); the conversions are the vector forms of
// f16_to_f32 / bf16_to_f32 in common.h.
template <int D> struct VLoad;
template <> struct VLoad<F32> {
    static inline vf load(const float* p) {
        vf v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
};
template <> struct VLoad<BF16> {
    static inline vf load(const uint16_t* p) {
        vh h;
        std::memcpy(&h, p, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
};
template <> struct VLoad<F16> {
    static inline vf load(const uint16_t* p) {
        vh h;
        std::memcpy(&h, p, sizeof h);
        const vu w = __builtin_convertvector(h, vu) << 16;
        const vu sign = w & 0x80000000u;
        const vu two_w = w + w;
        const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * splat(0x1.0p-112f);
        const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - splat(0.5f);
        return (vf)(sign | selectu(two_w < (1u << 27), (vu)denormalized, (vu)normalized));
    }
};

static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

}  // namespace simd
}  // namespace nlm
