// pybind11 bindings of the nlmerge CPU kernels: the extension module `nlmerge._C`.
//
// Arguments are NumPy arrays (or anything with the buffer protocol that numpy accepts without a
// copy); 16-bit floats travel as uint16/int16 arrays with a dtype string. Nothing here links
// against torch. Buffers are checked (dtype, size, C-contiguity, writability) with the GIL held;
// the kernels then run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"
#include "kernels.h"
#include "simd.h"

namespace py = pybind11;
using namespace nlm;

namespace {

int parse_dtype(const std::string& s) {
    if (s == "float32") return F32;
    if (s == "float16") return F16;
    if (s == "bfloat16") return BF16;
    throw py::value_error("dtype must be 'float32', 'float16' or 'bfloat16', got '" + s + "'");
}

// channel_stats also reads float64.
int parse_stats_dtype(const std::string& s) {
    if (s == "float64") return F64;
    if (s == "float32" || s == "float16" || s == "bfloat16") return parse_dtype(s);
    throw py::value_error("dtype must be 'float32', 'float16', 'bfloat16' or 'float64', got '" + s + "'");
}

const char* dtype_name(int d) { return d == F32 ? "float32" : d == F16 ? "float16" : "bfloat16"; }

struct Buf {
    void* ptr = nullptr;
    int64_t size = 0;
    int ndim = 0;
    int64_t shape0 = 0, shape1 = 0;
};

Buf buffer(py::array a, const char* name, bool writable) {
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
    Buf b;
    b.ptr = writable ? a.mutable_data() : const_cast<void*>(a.data());
    b.size = int64_t(a.size());
    b.ndim = int(a.ndim());
    b.shape0 = b.ndim > 0 ? int64_t(a.shape(0)) : 1;
    b.shape1 = b.ndim > 1 ? int64_t(a.shape(1)) : 1;
    return b;
}

// A float data array of dtype d: float32 storage for F32, any 2-byte storage for F16/BF16.
Buf data_buffer(const py::array& a, int d, const char* name, bool writable) {
    const py::dtype dt = a.dtype();
    const char kind = dt.kind();
    bool ok;
    if (d == F32) {
        ok = kind == 'f' && dt.itemsize() == 4;
    } else {
        ok = dt.itemsize() == 2 && (kind == 'u' || kind == 'i' || (kind == 'f' && d == F16));
    }
    if (!ok) {
        throw py::value_error(std::string(name) + ": expected " + (d == F32 ? "a float32" : "a 2-byte (uint16)") +
                              " array for dtype " + dtype_name(d));
    }
    return buffer(a, name, writable);
}

Buf typed_buffer(const py::array& a, char kind, int itemsize, const char* name, bool writable) {
    const py::dtype dt = a.dtype();
    if (dt.kind() != kind || dt.itemsize() != itemsize) {
        throw py::value_error(std::string(name) + ": expected dtype kind '" + kind + "' with itemsize " +
                              std::to_string(itemsize));
    }
    return buffer(a, name, writable);
}

Buf tv_buffer(const py::array& a, int d) {
    Buf b = data_buffer(a, d, "tv", false);
    if (b.ndim != 2) throw py::value_error("tv must be 2-D [T, N]");
    return b;
}

void check_size(const Buf& b, int64_t n, const char* name) {
    if (b.size != n) {
        throw py::value_error(std::string(name) + " has " + std::to_string(b.size) + " elements, expected " +
                              std::to_string(n));
    }
}

// Outputs are fresh allocations: untouched memory that the first write faults in. In 4 KiB pages
// that costs more than the kernels themselves (64 MiB: 16 ms of faults vs 2.6 ms in 2 MiB pages on
// a 2-core VM), so ask for transparent huge pages on every whole 2 MiB page inside an output.
// Advice only: where it is refused, nothing changes.
void advise_huge_pages(void* ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t huge = uintptr_t(2) << 20;
    const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
    const uintptr_t begin = (start + huge - 1) & ~(huge - 1);
    const uintptr_t end = (start + uintptr_t(nbytes)) & ~(huge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)nbytes;
#endif
}

int64_t item_size(int d) { return d == F32 ? 4 : 2; }

// The `out` array of a kernel: n writable elements of dtype d, advised huge pages.
// The window histogram of count_window: int64 [1 + width], width >= 1, over the finite bit
// patterns [lo, lo + width) of fp32 magnitudes.
Buf window_buffer(const py::array& hist, int64_t lo) {
    Buf hb = typed_buffer(hist, 'i', 8, "hist", true);
    if (hb.size < 2) throw py::value_error("hist must have at least 2 bins (below the window, then the window)");
    if (lo < 0 || lo + (hb.size - 1) > 0x7F800000LL)
        throw py::value_error("the window [lo, lo + len(hist) - 1) must lie in the finite fp32 magnitudes [0, 0x7F800000)");
    return hb;
}

Buf output_buffer(const py::array& out, int d, int64_t n) {
    Buf b = data_buffer(out, d, "out", true);
    check_size(b, n, "out");
    advise_huge_pages(b.ptr, b.size * item_size(d));
    return b;
}

int threads(int requested) {
    if (requested > 0) return requested;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Optional per-element array (base): None or a data array of n elements.
const void* optional_data(const py::object& o, const std::string& dtype, int64_t n, const char* name, int& d) {
    d = F32;
    if (o.is_none()) return nullptr;
    d = parse_dtype(dtype);
    if (!py::isinstance<py::array>(o)) throw py::type_error(std::string(name) + " must be None or a numpy array");
    Buf b = data_buffer(py::reinterpret_borrow<py::array>(o), d, name, false);
    check_size(b, n, name);
    return b.ptr;
}

const float* per_task(const py::array& a, int64_t T, const char* name) {
    Buf b = typed_buffer(a, 'f', 4, name, false);
    check_size(b, T, name);
    return static_cast<const float*>(b.ptr);
}

// The base and T experts of a models kernel: n elements each of dtype d (n: the base's size).
struct Models {
    const void* base;
    std::vector<const void*> experts;
    int64_t n;
};

Models models_buffers(const py::array& base, const py::list& experts, int d) {
    Buf bb = data_buffer(base, d, "base", false);
    Models m{bb.ptr, {}, bb.size};
    const int64_t T = int64_t(experts.size());
    if (T < 1) throw py::value_error("experts must hold at least one array");
    for (int64_t t = 0; t < T; t++) {
        const std::string name = "experts[" + std::to_string(t) + "]";
        if (!py::isinstance<py::array>(experts[t])) throw py::type_error(name + " must be a numpy array");
        Buf eb = data_buffer(py::reinterpret_borrow<py::array>(experts[t]), d, name.c_str(), false);
        check_size(eb, m.n, name.c_str());
        m.experts.push_back(eb.ptr);
    }
    return m;
}

// The recorded keep flags of T tasks over N elements: None (nullptr), or a uint8 array of
// T * keep_row_bytes(N) bytes (writable for `out`).
uint8_t* parse_keep_bits(const py::object& bits, int64_t T, int64_t N, bool out) {
    if (bits.is_none()) return nullptr;
    if (!py::isinstance<py::array>(bits)) throw py::type_error("keep_bits must be None or a numpy array");
    Buf b = typed_buffer(py::reinterpret_borrow<py::array>(bits), 'u', 1, "keep_bits", out);
    check_size(b, T * keep_row_bytes(N), "keep_bits");
    return static_cast<uint8_t*>(b.ptr);
}

// DARE's random keep of a models kernel: None (nullptr), or (k0, k1, h, thresholds) with
// thresholds a uint32 array [T] of values in [0, 2^24] (alive as long as `keep`).
const RandomKeep* parse_keep(const py::object& keep, int64_t T, RandomKeep& k) {
    if (keep.is_none()) return nullptr;
    const py::tuple parts = keep.cast<py::tuple>();
    if (parts.size() != 4) throw py::value_error("keep must be None or (k0, k1, h, thresholds)");
    k.k0 = parts[0].cast<uint32_t>();
    k.k1 = parts[1].cast<uint32_t>();
    k.h = parts[2].cast<uint32_t>();
    if (!py::isinstance<py::array>(parts[3])) throw py::type_error("keep's thresholds must be a numpy array");
    Buf b = typed_buffer(py::reinterpret_borrow<py::array>(parts[3]), 'u', 4, "keep thresholds", false);
    check_size(b, T, "keep thresholds");
    k.thresholds = static_cast<const uint32_t*>(b.ptr);
    for (int64_t t = 0; t < T; t++)
        if (k.thresholds[t] > (uint32_t(1) << 24))
            throw py::value_error("keep thresholds[" + std::to_string(t) + "] = " + std::to_string(k.thresholds[t]) +
                                  " exceeds 2**24");
    return &k;
}

// The options of a TIES pass (checked), for T tasks of N elements: thresholds, weights, the
// divisors of "mean" (None: the weights), lam, modes, and the block selection: `blocks` None or
// int64 block indices (each in range), and
// `ambiguous_blocks` None or a writable uint8 [ceil(N / BLOCK)].
TiesArgs ties_args(int64_t T, int64_t N, const py::array& thresholds, const py::array& weights,
                   const py::object& divisors, double lam,
                   const std::string& sign_mode, const std::string& disjoint, int fill_sign, const py::object& blocks,
                   const py::object& ambiguous_blocks, int nthreads) {
    TiesArgs a{};
    a.thresholds = per_task(thresholds, T, "thresholds");
    a.weights = per_task(weights, T, "weights");
    if (!divisors.is_none()) {
        if (!py::isinstance<py::array>(divisors)) throw py::type_error("divisors must be None or a numpy array");
        a.divisors = per_task(py::reinterpret_borrow<py::array>(divisors), T, "divisors");
    }
    a.lam = float(lam);
    if (sign_mode == "mass") a.count_sign = false;
    else if (sign_mode == "count") a.count_sign = true;
    else throw py::value_error("sign_mode must be 'mass' or 'count', got '" + sign_mode + "'");
    if (disjoint == "mean") a.disjoint = MEAN;
    else if (disjoint == "sum") a.disjoint = SUM;
    else if (disjoint == "max") a.disjoint = MAX;
    else throw py::value_error("disjoint must be 'mean', 'sum' or 'max', got '" + disjoint + "'");
    if (fill_sign < -1 || fill_sign > 1) throw py::value_error("fill_sign must be -1, 0 or 1");
    a.fill_sign = fill_sign;
    const int64_t nblocks = (N + BLOCK - 1) / BLOCK;
    if (!blocks.is_none()) {
        if (!py::isinstance<py::array>(blocks)) throw py::type_error("blocks must be None or a numpy array");
        Buf lb = typed_buffer(py::reinterpret_borrow<py::array>(blocks), 'i', 8, "blocks", false);
        a.blocks = static_cast<const int64_t*>(lb.ptr);
        a.nblocks = lb.size;
        for (int64_t i = 0; i < lb.size; i++)  // never write outside the output
            if (a.blocks[i] < 0 || a.blocks[i] >= nblocks)
                throw py::value_error("blocks[" + std::to_string(i) + "] = " + std::to_string(a.blocks[i]) +
                                      " is outside [0, " + std::to_string(nblocks) + ")");
    }
    if (!ambiguous_blocks.is_none()) {
        if (!py::isinstance<py::array>(ambiguous_blocks))
            throw py::type_error("ambiguous_blocks must be None or a numpy array");
        Buf fb = typed_buffer(py::reinterpret_borrow<py::array>(ambiguous_blocks), 'u', 1, "ambiguous_blocks", true);
        check_size(fb, nblocks, "ambiguous_blocks");
        a.ambiguous_blocks = static_cast<uint8_t*>(fb.ptr);
    }
    a.nthreads = threads(nthreads);
    return a;
}

// One job of `permute`: element `k` of the batch, checked (GIL held).
PermuteJob permute_job(const py::handle& src, const py::handle& out, const int64_t* geom, const py::handle& idx0,
                       const py::handle& idx1, int64_t k) {
    const std::string at = "[" + std::to_string(k) + "]";
    if (!py::isinstance<py::array>(src) || !py::isinstance<py::array>(out))
        throw py::type_error("srcs" + at + " and outs" + at + " must be numpy arrays");
    py::array sa = py::reinterpret_borrow<py::array>(src), oa = py::reinterpret_borrow<py::array>(out);
    const int64_t itemsize = int64_t(sa.itemsize());
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8)
        throw py::value_error("srcs" + at + ": itemsize must be 1, 2, 4 or 8");
    if (int64_t(oa.itemsize()) != itemsize) throw py::value_error("outs" + at + " has another itemsize than srcs" + at);
    Buf sb = buffer(sa, ("srcs" + at).c_str(), false);
    Buf ob = buffer(oa, ("outs" + at).c_str(), true);
    PermuteJob jb{sb.ptr, ob.ptr, geom[0], geom[1], geom[2], geom[3], geom[4], itemsize, nullptr, nullptr};
    for (int d = 0; d < 5; d++)
        if (geom[d] < 0) throw py::value_error("geometry" + at + " has a negative extent");
    const int64_t n = jb.outer * jb.a0 * jb.mid * jb.a1 * jb.inner;
    check_size(sb, n, ("srcs" + at).c_str());
    check_size(ob, n, ("outs" + at).c_str());
    const py::handle idx[2] = {idx0, idx1};
    const int64_t len[2] = {jb.a0, jb.a1};
    for (int a = 0; a < 2; a++) {
        if (idx[a].is_none()) continue;
        const std::string name = std::string(a == 0 ? "idx0" : "idx1") + at;
        if (!py::isinstance<py::array>(idx[a])) throw py::type_error(name + " must be None or a numpy array");
        Buf ib = typed_buffer(py::reinterpret_borrow<py::array>(idx[a]), 'i', 8, name.c_str(), false);
        check_size(ib, len[a], name.c_str());
        const int64_t* p = static_cast<const int64_t*>(ib.ptr);
        for (int64_t q = 0; q < len[a]; q++)  // never read outside the source
            if (p[q] < 0 || p[q] >= len[a])
                throw py::value_error(name + " has index " + std::to_string(p[q]) + " outside [0, " +
                                      std::to_string(len[a]) + ")");
        (a == 0 ? jb.p0 : jb.p1) = p;
    }
    advise_huge_pages(ob.ptr, n * itemsize);
    return jb;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "nlmerge fused CPU kernels (see nlmerge/kernels/CONTRACT.md)";

    m.def(
        "hist_magnitude",
        [](py::array x, const std::string& dtype, py::array hist, int shift, int nthreads) {
            const int d = parse_dtype(dtype);
            Buf xb = data_buffer(x, d, "x", false);
            Buf hb = typed_buffer(hist, 'i', 8, "hist", true);
            check_size(hb, 1 << 15, "hist");
            const int min_shift = d == F32 ? 16 : 0;
            if (shift < min_shift || shift > (d == F32 ? 31 : 15)) {
                throw py::value_error("shift must be in [" + std::to_string(min_shift) + ", " +
                                      std::to_string(d == F32 ? 31 : 15) + "] for " + dtype_name(d));
            }
            py::gil_scoped_release release;
            hist_magnitude(xb.ptr, d, xb.size, static_cast<int64_t*>(hb.ptr), shift, threads(nthreads));
        },
        py::arg("x"), py::arg("dtype"), py::arg("hist"), py::arg("shift"), py::arg("nthreads") = 0,
        "hist[abs_bits(x) >> shift] += 1 (hist: int64 [32768], accumulated in place)");

    m.def(
        "hist_magnitude_low",
        [](py::array x, py::array hist, int64_t prefix, int nthreads) {
            Buf xb = data_buffer(x, F32, "x", false);
            Buf hb = typed_buffer(hist, 'i', 8, "hist", true);
            check_size(hb, 1 << 16, "hist");
            py::gil_scoped_release release;
            hist_magnitude_low(static_cast<const float*>(xb.ptr), xb.size, static_cast<int64_t*>(hb.ptr), prefix,
                               threads(nthreads));
        },
        py::arg("x"), py::arg("hist"), py::arg("prefix"), py::arg("nthreads") = 0,
        "fp32 x: hist[abs_bits & 0xffff] += 1 where abs_bits >> 16 == prefix (hist: int64 [65536])");

    m.def(
        "hist_magnitude_models",
        [](py::array base, py::array expert, const std::string& dtype, py::array hist, int nthreads) {
            const int d = parse_dtype(dtype);
            Buf bb = data_buffer(base, d, "base", false);
            Buf eb = data_buffer(expert, d, "expert", false);
            check_size(eb, bb.size, "expert");
            Buf hb = typed_buffer(hist, 'i', 8, "hist", true);
            check_size(hb, 1 << 15, "hist");
            py::gil_scoped_release release;
            hist_magnitude_models(bb.ptr, eb.ptr, d, bb.size, static_cast<int64_t*>(hb.ptr), threads(nthreads));
        },
        py::arg("base"), py::arg("expert"), py::arg("dtype"), py::arg("hist"), py::arg("nthreads") = 0,
        "hist[abs_bits(fp32(expert) - fp32(base)) >> 16] += 1 (hist: int64 [32768], in place)");

    m.def(
        "hist_magnitude_low_models",
        [](py::array base, py::array expert, const std::string& dtype, py::array hist, int64_t prefix, int nthreads) {
            const int d = parse_dtype(dtype);
            Buf bb = data_buffer(base, d, "base", false);
            Buf eb = data_buffer(expert, d, "expert", false);
            check_size(eb, bb.size, "expert");
            Buf hb = typed_buffer(hist, 'i', 8, "hist", true);
            check_size(hb, 1 << 16, "hist");
            py::gil_scoped_release release;
            hist_magnitude_low_models(bb.ptr, eb.ptr, d, bb.size, static_cast<int64_t*>(hb.ptr), prefix,
                                      threads(nthreads));
        },
        py::arg("base"), py::arg("expert"), py::arg("dtype"), py::arg("hist"), py::arg("prefix"),
        py::arg("nthreads") = 0,
        "x = fp32(expert) - fp32(base): hist[abs_bits & 0xffff] += 1 where abs_bits >> 16 == prefix (int64 [65536])");

    m.def(
        "count_window",
        [](py::array x, py::array hist, int64_t lo, int nthreads) {
            Buf xb = data_buffer(x, F32, "x", false);
            Buf hb = window_buffer(hist, lo);
            py::gil_scoped_release release;
            return count_window(static_cast<const float*>(xb.ptr), xb.size, uint32_t(lo), uint32_t(hb.size - 1),
                                static_cast<int64_t*>(hb.ptr), threads(nthreads));
        },
        py::arg("x"), py::arg("hist"), py::arg("lo"), py::arg("nthreads") = 0,
        "fp32 x, v = abs_bits(x): hist[0] += #(v < lo), hist[1 + v - lo] += 1 inside the window (hist: int64 "
        "[1 + width], in place); returns the number of non-finite elements");

    m.def(
        "count_window_models",
        [](py::array base, py::array expert, const std::string& dtype, py::array hist, int64_t lo, int nthreads) {
            const int d = parse_dtype(dtype);
            Buf bb = data_buffer(base, d, "base", false);
            Buf eb = data_buffer(expert, d, "expert", false);
            check_size(eb, bb.size, "expert");
            Buf hb = window_buffer(hist, lo);
            py::gil_scoped_release release;
            return count_window_models(bb.ptr, eb.ptr, d, bb.size, uint32_t(lo), uint32_t(hb.size - 1),
                                       static_cast<int64_t*>(hb.ptr), threads(nthreads));
        },
        py::arg("base"), py::arg("expert"), py::arg("dtype"), py::arg("hist"), py::arg("lo"), py::arg("nthreads") = 0,
        "count_window over x = fp32(expert) - fp32(base); returns the number of non-finite elements of x");

    m.def(
        "count_window_models_tasks",
        [](py::array base, py::list experts, const std::string& dtype, py::list hists, py::array lo, py::array nonfinite,
           int nthreads) {
            const int d = parse_dtype(dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size());
            Buf lb = typed_buffer(lo, 'i', 8, "lo", false);
            check_size(lb, T, "lo");
            Buf nb = typed_buffer(nonfinite, 'i', 8, "nonfinite", true);
            check_size(nb, T, "nonfinite");
            if (int64_t(py::len(hists)) != T) throw py::value_error("hists must hold one histogram per expert");
            const size_t nt = static_cast<size_t>(T);
            std::vector<uint32_t> los(nt), widths(nt);
            std::vector<int64_t*> hs(nt);
            for (int64_t t = 0; t < T; t++) {
                const int64_t l = static_cast<const int64_t*>(lb.ptr)[t];
                Buf hb = window_buffer(hists[size_t(t)].cast<py::array>(), l);
                los[size_t(t)] = uint32_t(l);
                widths[size_t(t)] = uint32_t(hb.size - 1);
                hs[size_t(t)] = static_cast<int64_t*>(hb.ptr);
            }
            py::gil_scoped_release release;
            count_window_models_tasks(mb.base, mb.experts.data(), d, T, mb.n, los.data(), widths.data(), hs.data(),
                                      static_cast<int64_t*>(nb.ptr), threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("hists"), py::arg("lo"), py::arg("nonfinite"),
        py::arg("nthreads") = 0,
        "count_window_models of T tasks in one pass: task t's window from lo[t] (int64 [T]) into hists[t] (int64 "
        "[1 + width_t], in place); nonfinite[t] (int64 [T]) += task t's non-finite count");

    m.def(
        "count_windows_models",
        [](py::array base, py::list experts, const std::string& dtype, py::array lo, py::array hi, py::array counts,
           py::array cand, int nthreads) {
            const int d = parse_dtype(dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size());
            Buf lb = typed_buffer(lo, 'u', 4, "lo", false), hb = typed_buffer(hi, 'u', 4, "hi", false);
            check_size(lb, T, "lo");
            check_size(hb, T, "hi");
            const uint32_t* l = static_cast<const uint32_t*>(lb.ptr);
            const uint32_t* h = static_cast<const uint32_t*>(hb.ptr);
            for (int64_t t = 0; t < T; t++)
                if (l[t] > h[t] || h[t] > 0x7F800000u)
                    throw py::value_error("window " + std::to_string(t) + " [" + std::to_string(l[t]) + ", " +
                                          std::to_string(h[t]) + "] must have lo <= hi <= 0x7F800000");
            Buf cb = typed_buffer(counts, 'i', 8, "counts", true);
            check_size(cb, 6 * T, "counts");
            Buf kb = typed_buffer(cand, 'u', 4, "cand", true);
            if (kb.ndim != 2 || kb.shape0 != T) throw py::value_error("cand must be uint32 [T, cap]");
            py::gil_scoped_release release;
            count_windows_models(mb.base, mb.experts.data(), d, T, mb.n, l, h, static_cast<int64_t*>(cb.ptr),
                                 static_cast<uint32_t*>(kb.ptr), kb.shape1, threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("lo"), py::arg("hi"), py::arg("counts"),
        py::arg("cand"), py::arg("nthreads") = 0,
        "Per task t, v = abs_bits(fp32(experts[t]) - fp32(base)): counts[t] = (#v < lo, #v == lo, candidates, "
        "#v == hi, any non-finite, overflow) and the v in (lo, hi) into cand[t] (uint32 [T, cap])");

    m.def(
        "ties_merge",
        [](py::array tv, const std::string& dtype, py::array thresholds, py::array weights, py::array out,
           const std::string& out_dtype, py::object base, const std::string& base_dtype, double lam,
           const std::string& sign_mode, const std::string& disjoint, int fill_sign, py::object blocks,
           py::object ambiguous_blocks, py::object divisors, int nthreads) {
            const int d = parse_dtype(dtype), od = parse_dtype(out_dtype);
            Buf tb = tv_buffer(tv, d);
            const int64_t T = tb.shape0, N = tb.shape1;
            TiesArgs a = ties_args(T, N, thresholds, weights, divisors, lam, sign_mode, disjoint, fill_sign, blocks,
                                   ambiguous_blocks, nthreads);
            Buf ob = output_buffer(out, od, N);
            a.out = ob.ptr;
            a.out_dtype = od;
            a.base = optional_data(base, base_dtype, N, "base", a.base_dtype);
            TiesResult r;
            {
                py::gil_scoped_release release;
                r = nlm::ties_merge(tb.ptr, d, T, N, a);
            }
            return py::make_tuple(r.sign_sum, r.ambiguous, r.nonfinite);
        },
        py::arg("tv"), py::arg("dtype"), py::arg("thresholds"), py::arg("weights"), py::arg("out"),
        py::arg("out_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("lam"), py::arg("sign_mode"),
        py::arg("disjoint"), py::arg("fill_sign"), py::arg("blocks") = py::none(),
        py::arg("ambiguous_blocks") = py::none(), py::arg("divisors") = py::none(), py::arg("nthreads") = 0,
        "Fused TIES pass (all blocks, or the listed ones); returns (sign_sum, ambiguous, nonfinite)");

    m.def(
        "ties_merge_models",
        [](py::array base, py::list experts, const std::string& dtype, py::array thresholds, py::array weights,
           py::array out, const std::string& out_dtype, bool include_base, double lam, const std::string& sign_mode,
           const std::string& disjoint, int fill_sign, py::object blocks, py::object ambiguous_blocks,
           py::object keep, py::object divisors, py::object keep_bits, int nthreads) {
            const int d = parse_dtype(dtype), od = parse_dtype(out_dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size()), N = mb.n;
            TiesArgs a = ties_args(T, N, thresholds, weights, divisors, lam, sign_mode, disjoint, fill_sign, blocks,
                                   ambiguous_blocks, nthreads);
            RandomKeep k;
            a.keep = parse_keep(keep, T, k);
            if (a.keep) k.bits = parse_keep_bits(keep_bits, T, N, false);
            Buf ob = output_buffer(out, od, N);
            a.out = ob.ptr;
            a.out_dtype = od;
            a.base = include_base ? mb.base : nullptr;
            a.base_dtype = d;
            TiesResult r;
            {
                py::gil_scoped_release release;
                r = nlm::ties_merge_models(mb.base, mb.experts.data(), d, T, N, a);
            }
            return py::make_tuple(r.sign_sum, r.ambiguous, r.nonfinite);
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("thresholds"), py::arg("weights"),
        py::arg("out"), py::arg("out_dtype"), py::arg("include_base"), py::arg("lam"), py::arg("sign_mode"),
        py::arg("disjoint"), py::arg("fill_sign"), py::arg("blocks") = py::none(),
        py::arg("ambiguous_blocks") = py::none(), py::arg("keep") = py::none(), py::arg("divisors") = py::none(),
        py::arg("keep_bits") = py::none(), py::arg("nthreads") = 0,
        "Fused TIES pass on fp32(experts[t]) - fp32(base) (DARE's dropped entries 0 with keep); returns "
        "(sign_sum, ambiguous, nonfinite)");

    m.def(
        "task_arithmetic",
        [](py::array tv, const std::string& dtype, py::array weights, py::array out, const std::string& out_dtype,
           py::object base, const std::string& base_dtype, double lam, int nthreads) {
            const int d = parse_dtype(dtype), od = parse_dtype(out_dtype);
            Buf tb = tv_buffer(tv, d);
            const int64_t T = tb.shape0, N = tb.shape1;
            const float* w = per_task(weights, T, "weights");
            Buf ob = output_buffer(out, od, N);
            int bd;
            const void* bp = optional_data(base, base_dtype, N, "base", bd);
            py::gil_scoped_release release;
            return nlm::task_arithmetic(tb.ptr, d, T, N, w, ob.ptr, od, bp, bd, float(lam), threads(nthreads));
        },
        py::arg("tv"), py::arg("dtype"), py::arg("weights"), py::arg("out"), py::arg("out_dtype"), py::arg("base"),
        py::arg("base_dtype"), py::arg("lam"), py::arg("nthreads") = 0,
        "out = base + lam * sum_t w_t tv[t]; returns the non-finite input and result count");

    m.def(
        "task_arithmetic_models",
        [](py::array base, py::list experts, const std::string& dtype, py::array weights, py::array out,
           const std::string& out_dtype, double lam, bool include_base, py::object keep, py::object keep_bits,
           int nthreads) {
            const int d = parse_dtype(dtype), od = parse_dtype(out_dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size());
            const float* w = per_task(weights, T, "weights");
            Buf ob = output_buffer(out, od, mb.n);
            RandomKeep k;
            const RandomKeep* kp = parse_keep(keep, T, k);
            if (kp) k.bits = parse_keep_bits(keep_bits, T, mb.n, false);
            py::gil_scoped_release release;
            return nlm::task_arithmetic_models(mb.base, mb.experts.data(), d, T, mb.n, w, ob.ptr, od, float(lam),
                                               include_base, kp, threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("weights"), py::arg("out"),
        py::arg("out_dtype"), py::arg("lam"), py::arg("include_base") = true, py::arg("keep") = py::none(),
        py::arg("keep_bits") = py::none(), py::arg("nthreads") = 0,
        "out = base + lam * sum_t w_t (fp32(experts[t]) - fp32(base)) (no base term unless include_base; DARE's "
        "dropped entries 0 with keep); returns the non-finite input and result count");

    m.def(
        "keep_l1_norms_models",
        [](py::array base, py::list experts, const std::string& dtype, py::object keep, py::array norms,
           py::object keep_bits, int nthreads) {
            const int d = parse_dtype(dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size());
            RandomKeep k;
            if (keep.is_none()) throw py::value_error("keep_l1_norms_models needs keep = (k0, k1, h, thresholds)");
            parse_keep(keep, T, k);
            Buf nb = typed_buffer(norms, 'f', 8, "norms", true);
            check_size(nb, 2 * T, "norms");
            uint8_t* bits = parse_keep_bits(keep_bits, T, mb.n, true);
            py::gil_scoped_release release;
            nlm::keep_l1_norms_models(mb.base, mb.experts.data(), d, T, mb.n, k, static_cast<double*>(nb.ptr),
                                      bits, threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("keep"), py::arg("norms"),
        py::arg("keep_bits") = py::none(), py::arg("nthreads") = 0,
        "norms [T, 2] float64: L1 of fp32(experts[t]) - fp32(base) and of its entries kept by keep (fixed "
        "blocked fp64 summation order), in place; the keep flags into keep_bits (uint8 [T, keep_row_bytes]) "
        "when given");

    m.def(
        "tall_masks",
        [](py::array tv, const std::string& dtype, py::array tau, const std::string& tau_dtype, py::array lam,
           py::array out, int nthreads) {
            const int d = parse_dtype(dtype), td = parse_dtype(tau_dtype);
            Buf tb = tv_buffer(tv, d);
            const int64_t T = tb.shape0, N = tb.shape1;
            Buf ub = data_buffer(tau, td, "tau_mtl", false);
            check_size(ub, N, "tau_mtl");
            const float* l = per_task(lam, T, "lam");
            Buf ob = typed_buffer(out, 'u', 1, "out", true);
            check_size(ob, T * ((N + 7) / 8), "out");
            advise_huge_pages(ob.ptr, ob.size);
            py::gil_scoped_release release;
            return nlm::tall_masks(tb.ptr, d, T, N, ub.ptr, td, l, static_cast<uint8_t*>(ob.ptr), threads(nthreads));
        },
        py::arg("tv"), py::arg("dtype"), py::arg("tau_mtl"), py::arg("tau_dtype"), py::arg("lam"), py::arg("out"),
        py::arg("nthreads") = 0, "Bit-packed TALL masks into out uint8 [T, ceil(N/8)]; returns the non-finite count");

    m.def(
        "consensus",
        [](py::array tv, const std::string& dtype, py::array tau, const std::string& tau_dtype, py::array lam,
           int64_t k, py::array out, const std::string& out_dtype, py::object base, const std::string& base_dtype,
           double alpha, int nthreads) {
            const int d = parse_dtype(dtype), td = parse_dtype(tau_dtype), od = parse_dtype(out_dtype);
            Buf tb = tv_buffer(tv, d);
            const int64_t T = tb.shape0, N = tb.shape1;
            Buf ub = data_buffer(tau, td, "tau_mtl", false);
            check_size(ub, N, "tau_mtl");
            const float* l = per_task(lam, T, "lam");
            Buf ob = output_buffer(out, od, N);
            int bd;
            const void* bp = optional_data(base, base_dtype, N, "base", bd);
            py::gil_scoped_release release;
            return nlm::consensus(tb.ptr, d, T, N, ub.ptr, td, l, k, ob.ptr, od, bp, bd, float(alpha),
                                  threads(nthreads));
        },
        py::arg("tv"), py::arg("dtype"), py::arg("tau_mtl"), py::arg("tau_dtype"), py::arg("lam"), py::arg("k"),
        py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("alpha"),
        py::arg("nthreads") = 0, "Consensus merge with on-the-fly TALL masks; returns the non-finite input and result count");

    m.def(
        "tall_masks_models",
        [](py::array base, py::list experts, const std::string& dtype, py::array tau, const std::string& tau_dtype,
           py::array lam, py::array out, int nthreads) {
            const int d = parse_dtype(dtype), td = parse_dtype(tau_dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size()), N = mb.n;
            Buf ub = data_buffer(tau, td, "tau_mtl", false);
            check_size(ub, N, "tau_mtl");
            const float* l = per_task(lam, T, "lam");
            Buf ob = typed_buffer(out, 'u', 1, "out", true);
            check_size(ob, T * ((N + 7) / 8), "out");
            advise_huge_pages(ob.ptr, ob.size);
            py::gil_scoped_release release;
            return nlm::tall_masks_models(mb.base, mb.experts.data(), d, T, N, ub.ptr, td, l,
                                          static_cast<uint8_t*>(ob.ptr), threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("tau_mtl"), py::arg("tau_dtype"),
        py::arg("lam"), py::arg("out"), py::arg("nthreads") = 0,
        "tall_masks on fp32(experts[t]) - fp32(base); returns the non-finite count");

    m.def(
        "consensus_models",
        [](py::array base, py::list experts, const std::string& dtype, py::array tau, const std::string& tau_dtype,
           py::array lam, int64_t k, py::array out, const std::string& out_dtype, double alpha, int nthreads) {
            const int d = parse_dtype(dtype), td = parse_dtype(tau_dtype), od = parse_dtype(out_dtype);
            const Models mb = models_buffers(base, experts, d);
            const int64_t T = int64_t(mb.experts.size()), N = mb.n;
            Buf ub = data_buffer(tau, td, "tau_mtl", false);
            check_size(ub, N, "tau_mtl");
            const float* l = per_task(lam, T, "lam");
            Buf ob = output_buffer(out, od, N);
            py::gil_scoped_release release;
            return nlm::consensus_models(mb.base, mb.experts.data(), d, T, N, ub.ptr, td, l, k, ob.ptr, od,
                                         float(alpha), threads(nthreads));
        },
        py::arg("base"), py::arg("experts"), py::arg("dtype"), py::arg("tau_mtl"), py::arg("tau_dtype"),
        py::arg("lam"), py::arg("k"), py::arg("out"), py::arg("out_dtype"), py::arg("alpha"), py::arg("nthreads") = 0,
        "consensus on fp32(experts[t]) - fp32(base), base added; returns the non-finite input and result count");

    m.def(
        "apply_mask",
        [](py::array packed, py::array tau, const std::string& tau_dtype, py::array out, const std::string& out_dtype,
           py::object base, const std::string& base_dtype, int nthreads) {
            const int td = parse_dtype(tau_dtype), od = parse_dtype(out_dtype);
            Buf ub = data_buffer(tau, td, "tau_mtl", false);
            const int64_t N = ub.size;
            Buf pb = typed_buffer(packed, 'u', 1, "packed", false);
            check_size(pb, (N + 7) / 8, "packed");
            Buf ob = output_buffer(out, od, N);
            int bd;
            const void* bp = optional_data(base, base_dtype, N, "base", bd);
            py::gil_scoped_release release;
            return nlm::apply_mask(static_cast<const uint8_t*>(pb.ptr), N, ub.ptr, td, ob.ptr, od, bp, bd,
                                   threads(nthreads));
        },
        py::arg("packed"), py::arg("tau_mtl"), py::arg("tau_dtype"), py::arg("out"), py::arg("out_dtype"),
        py::arg("base"), py::arg("base_dtype"), py::arg("nthreads") = 0,
        "out = base + (bit ? tau : 0) (without base: an exact masked copy); returns the non-finite result count");

    m.def(
        "convert",
        [](py::array src, const std::string& src_dtype, py::array dst, const std::string& dst_dtype, int nthreads) {
            const int sd = parse_dtype(src_dtype), dd = parse_dtype(dst_dtype);
            Buf sb = data_buffer(src, sd, "src", false);
            Buf db = data_buffer(dst, dd, "dst", true);
            check_size(db, sb.size, "dst");
            py::gil_scoped_release release;
            nlm::convert(sb.ptr, sd, db.ptr, dd, sb.size, threads(nthreads));
        },
        py::arg("src"), py::arg("src_dtype"), py::arg("dst"), py::arg("dst_dtype"), py::arg("nthreads") = 0,
        "dst = dtype(src) through fp32 (round to nearest even); for tests");

    m.def(
        "load_simd",
        [](py::array src, const std::string& src_dtype, py::array dst) {
            const int sd = parse_dtype(src_dtype);
            Buf sb = data_buffer(src, sd, "src", false);
            Buf db = data_buffer(dst, F32, "dst", true);
            check_size(db, sb.size, "dst");
            py::gil_scoped_release release;
            nlm::load_simd(sb.ptr, sd, static_cast<float*>(db.ptr), sb.size);
        },
        py::arg("src"), py::arg("src_dtype"), py::arg("dst"),
        "dst = fp32(src) through the kernels' vector loads; for tests");

    m.def(
        "permute",
        [](py::list srcs, py::list outs, py::array geometry, py::list idx0, py::list idx1, int nthreads) {
            const int64_t n = int64_t(srcs.size());
            if (int64_t(outs.size()) != n || int64_t(idx0.size()) != n || int64_t(idx1.size()) != n)
                throw py::value_error("srcs, outs, idx0 and idx1 must have the same length");
            Buf gb = typed_buffer(geometry, 'i', 8, "geometry", false);
            check_size(gb, 5 * n, "geometry");
            const int64_t* g = static_cast<const int64_t*>(gb.ptr);
            std::vector<PermuteJob> jobs;
            jobs.reserve(size_t(n));
            for (int64_t k = 0; k < n; k++) jobs.push_back(permute_job(srcs[k], outs[k], g + 5 * k, idx0[k], idx1[k], k));
            py::gil_scoped_release release;
            nlm::permute(jobs.data(), n, threads(nthreads));
        },
        py::arg("srcs"), py::arg("outs"), py::arg("geometry"), py::arg("idx0"), py::arg("idx1"),
        py::arg("nthreads") = 0,
        "outs[k][o,i,m,j,u] = srcs[k][o,idx0[k][i],m,idx1[k][j],u] over [outer,A0,mid,A1,inner] = geometry[k] "
        "(int64 [n, 5]); idx None = identity; raw words of any itemsize 1/2/4/8 (exact)");

    m.def(
        "channel_stats",
        [](py::array x, const std::string& dtype, int64_t outer, int64_t channels, int64_t inner, py::array shift,
           py::array sum, py::array sumsq, int nthreads) {
            if (outer < 0 || channels < 1 || inner < 1) {
                throw py::value_error("channel_stats: need outer >= 0, channels >= 1 and inner >= 1, got " +
                                      std::to_string(outer) + ", " + std::to_string(channels) + ", " +
                                      std::to_string(inner));
            }
            const int d = parse_stats_dtype(dtype);
            Buf xb = d == F64 ? typed_buffer(x, 'f', 8, "x", false) : data_buffer(x, d, "x", false);
            check_size(xb, outer * channels * inner, "x");
            Buf kb = typed_buffer(shift, 'f', 8, "shift", false);
            Buf sb = typed_buffer(sum, 'f', 8, "sum", true);
            Buf qb = typed_buffer(sumsq, 'f', 8, "sumsq", true);
            check_size(kb, channels, "shift");
            check_size(sb, channels, "sum");
            check_size(qb, channels, "sumsq");
            if (sb.ptr == qb.ptr) throw py::value_error("sum and sumsq must be different arrays");
            py::gil_scoped_release release;
            return nlm::channel_stats(xb.ptr, d, outer, channels, inner, static_cast<const double*>(kb.ptr),
                                      static_cast<double*>(sb.ptr), static_cast<double*>(qb.ptr), threads(nthreads));
        },
        py::arg("x"), py::arg("dtype"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("shift"),
        py::arg("sum"), py::arg("sumsq"), py::arg("nthreads") = 0,
        "x [outer, C, inner] (float32/float16/bfloat16/float64): sum[c] += sum(x - shift[c]), sumsq[c] += "
        "sum((x - shift[c])^2) in float64, in place; False (sum, sumsq unchanged) if a total is not finite");

    m.def(
        "random_draws",
        [](py::array out, uint32_t k0, uint32_t k1, uint32_t stream, uint32_t h, int64_t offset, int64_t threshold,
           int nthreads) {
            const py::dtype dt = out.dtype();
            const char kind = dt.kind();
            const int itemsize = int(dt.itemsize());
            Buf ob = buffer(out, "out", true);
            if (offset < 0 || offset > (int64_t(1) << 62) - ob.size) {
                throw py::value_error("random_draws: need 0 <= offset and offset + out.size <= 2**62, got offset " +
                                      std::to_string(offset) + " for " + std::to_string(ob.size) + " elements");
            }
            const PhiloxStream s{k0, k1, stream, h};
            const bool keep = (kind == 'b' || kind == 'u') && itemsize == 1;
            if (keep && (threshold < 0 || threshold > (int64_t(1) << 24))) {
                throw py::value_error("random_draws: a keep mask needs a threshold in [0, 2**24], got " +
                                      std::to_string(threshold));
            }
            if (!keep && !(kind == 'i' && itemsize == 8) && !(kind == 'f' && itemsize == 4)) {
                throw py::value_error("random_draws: out must be int64 (draws), float32 (uniforms) or bool/uint8 "
                                      "(keep mask), got dtype kind '" + std::string(1, kind) + "' itemsize " +
                                      std::to_string(itemsize));
            }
            advise_huge_pages(ob.ptr, ob.size * itemsize);
            py::gil_scoped_release release;
            if (keep) {
                nlm::random_keep(s, offset, ob.size, uint32_t(threshold), static_cast<uint8_t*>(ob.ptr), threads(nthreads));
            } else if (kind == 'i') {
                nlm::random_bits(s, offset, ob.size, static_cast<int64_t*>(ob.ptr), threads(nthreads));
            } else {
                nlm::random_uniform(s, offset, ob.size, static_cast<float*>(ob.ptr), threads(nthreads));
            }
        },
        py::arg("out"), py::arg("k0"), py::arg("k1"), py::arg("stream"), py::arg("h"), py::arg("offset"),
        py::arg("threshold") = -1, py::arg("nthreads") = 0,
        "Philox4x32-10 draws of elements [offset, offset + out.size) (counter (i/4 lo, i/4 hi, stream, h), key "
        "(k0, k1), lane i%4, top 24 bits) into out: int64 the draws, float32 draw * 2**-24, bool/uint8 "
        "draw < threshold");

    m.def("max_threads", []() { return threads(0); }, "OpenMP threads used when nthreads is 0");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    // bumped whenever a binding's signature changes; nlmerge/kernels/cpu.py refuses a stale build
    m.attr("api_version") = 11;
    m.attr("block") = BLOCK;
    m.attr("vector_bytes") = simd::VBYTES;
}
