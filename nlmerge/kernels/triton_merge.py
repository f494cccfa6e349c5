"""Triton backend of the fused merging kernels (see CONTRACT.md for the exact semantics).

Every public function is a thin launcher: it picks compile-time variants (dtypes, modes), views
bfloat16 tensors as int16 bit patterns, launches one Triton kernel over blocks of elements and,
where the contract returns counters, reads back a small int64 device tensor.

Design notes (for the GPU):
- Offsets are int64 where they can exceed 2**31: each program offsets its scalar base pointers by
  ``pid * BLOCK`` (int64) and steps the 64-bit row pointer by ``N`` per task (``T * N`` may exceed
  2**31), then adds an int32 ``tl.arange``. (A runtime ``for t in range(T)`` gives a python int in
  the interpreter, so the row pointer is bumped instead of computing ``t.to(tl.int64) * N``.)
- All arithmetic is fp32. Kernels are launched with ``enable_fp_fusion=False`` (plain multiply then
  add, as the contract requires; Triton contracts ``a * b + c`` into FMA by default) and divide
  with ``tl.div_rn`` (Triton's ``/`` on fp32 is the approximate ``div.full.f32`` on NVIDIA).
- bfloat16 is read as int16 bits (``bits << 16`` is the fp32 value) and written by rounding the
  fp32 bits to nearest even in integer arithmetic, with NaN -> 0x7FC0 like torch's CPU ``.to``.
  The same code runs in the interpreter (whose bf16 cast is not round-to-nearest-even) and on GPU.
- Reductions over tasks run ``for t in range(T)`` in order. TIES reads each task row twice (elect,
  then merge); the first read asks L2 to keep the lines (``evict_last``) so the second one hits.
- Counters: per-program ``tl.sum`` then one relaxed int64 atomic per program and counter. The
  non-finite counter of a merge counts NaN/Inf inputs and stored results that are NaN/Inf in the
  output dtype (an fp32 value that overflows fp16 or bf16 when rounded), which ops turns into an
  error: a merge never hands back Inf.
- Histograms: one relaxed int64 atomic per element, except that each program first counts the
  elements of its smallest bin (zeros, or the single value of constant data) and adds them with
  one atomic, which removes the worst same-address contention.
"""
import contextlib

import torch
import triton
import triton.language as tl

available = True
load_error = None

_BLOCK = 1024  # elements per program (4 warps: 8 fp32 = two 16-byte vectors per thread)
_NUM_WARPS = 4
_LAUNCH = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)

# compile-time dtype codes of data tensors
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
_SIGN_MODES = {"mass": 0, "count": 1}
_DISJOINT = {"mean": 0, "sum": 1, "max": 2}


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _load_f32(ptr, mask, KIND: tl.constexpr, EVICT: tl.constexpr):
    """Load elements of a KIND tensor as fp32 (bf16 arrives as int16 bits)."""
    if KIND == 2:
        bits = tl.load(ptr, mask=mask, other=0, eviction_policy=EVICT)
        x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return x


@triton.jit
def _nonfinite(x):
    """1 where fp32 ``x`` is NaN or +-Inf (exponent bits all ones), else 0 (int32)."""
    return ((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000).to(tl.int32)


@triton.jit
def _store_f32(ptr, x, mask, KIND: tl.constexpr):
    """Store fp32 ``x`` rounded to nearest even into a KIND tensor (bf16 as int16 bits); return 1
    where the stored value is NaN or +-Inf (int32): a finite ``x`` that overflows KIND counts."""
    if KIND == 2:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptr, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        bad = ((r & 0x7F80) == 0x7F80).to(tl.int32)
    elif KIND == 1:
        h = x.to(tl.float16)
        tl.store(ptr, h, mask=mask)
        bad = _nonfinite(h.to(tl.float32))
    else:
        tl.store(ptr, x, mask=mask)
        bad = _nonfinite(x)
    return bad


@triton.jit
def _add_counter(ptr, value):
    """One relaxed int64 atomic add of a per-program scalar."""
    tl.atomic_add(ptr, value.to(tl.int64), sem="relaxed")


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    """This program's block of a length-N array: int64 ``start``, ``offs`` (int32 [BLOCK]) and the
    in-bounds mask."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    return start, offs, offs < N - start


@triton.jit
def _packed_block(N, BYTES: tl.constexpr):
    """This program's block of ``8 * BYTES`` elements seen as packed mask bytes: int64 ``start`` and
    ``byte_start``, byte ``rows`` [BYTES], ``bit`` [8], element ``offs`` [BYTES, 8] within the
    block, and the in-bounds mask of the elements."""
    pid = tl.program_id(0).to(tl.int64)
    start, byte_start = pid * (BYTES * 8), pid * BYTES
    rows, bit = tl.arange(0, BYTES), tl.arange(0, 8)
    offs = rows[:, None] * 8 + bit[None, :]
    return start, byte_start, rows, bit, offs, offs < N - start


@triton.jit
def _tall_keep(x, mtl, lam):
    """TALL's mask predicate ``|x| > lam * |mtl - x|`` (fp32)."""
    return tl.abs(x) > lam * tl.abs(mtl - x)


@triton.jit
def _store_with_base(res, bad, out_ptr, base_ptr, offs, inb, cnt_ptr, OUT_KIND: tl.constexpr,
                     BASE_KIND: tl.constexpr, HAS_BASE: tl.constexpr):
    """Store ``base + res`` (``res`` without base) and add the block's non-finite count (``bad``,
    plus the base's and the stored results') to the counter at ``cnt_ptr``. ``out_ptr``/``base_ptr``
    point at the block."""
    if HAS_BASE:
        b = _load_f32(base_ptr + offs, inb, BASE_KIND, "evict_first")
        bad += _nonfinite(b)
        res = b + res
    bad += _store_f32(out_ptr + offs, res, inb, OUT_KIND)
    _add_counter(cnt_ptr, tl.sum(tl.where(inb, bad, 0), axis=0))


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _hist_kernel(
    x_ptr,  # int32 (fp32 bits) or int16 (fp16/bf16 bits), [N]
    hist_ptr,  # int64 [32768] or [65536]
    N,
    prefix,
    ABS_MASK: tl.constexpr,  # 0x7FFFFFFF or 0x7FFF
    SHIFT: tl.constexpr,
    LOW: tl.constexpr,  # hist_magnitude_low: select abs >> 16 == prefix, bin abs & 0xFFFF
    BLOCK: tl.constexpr,
):
    start, offs, inb = _block(N, BLOCK)
    bits = tl.load(x_ptr + start + offs, mask=inb, other=0, eviction_policy="evict_first")
    mag = bits.to(tl.int32) & ABS_MASK
    if LOW:
        valid = inb & ((mag >> 16) == prefix)
        b = mag & 0xFFFF
    else:
        valid = inb
        b = mag >> SHIFT
    # the smallest bin of the block (zeros, or the one value of constant data) gets one atomic
    hot = tl.min(tl.where(valid, b, 0x7FFFFFFF), axis=0)
    is_hot = valid & (b == hot)
    n_hot = tl.sum(is_hot.to(tl.int32), axis=0)
    tl.atomic_add(hist_ptr + tl.where(n_hot > 0, hot, 0), n_hot.to(tl.int64), mask=n_hot > 0, sem="relaxed")
    ones = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_add(hist_ptr + b, ones, mask=valid & (b != hot), sem="relaxed")


@triton.jit
def _ties_kernel(
    tv_ptr,  # [T, N]
    thr_ptr,  # fp32 [T]
    w_ptr,  # fp32 [T]
    out_ptr,  # [N]
    base_ptr,  # [N] or dummy
    cnt_ptr,  # int64 [3]: sign_sum, ambiguous, nonfinite
    N,
    T,
    lam,
    fill_sign,
    TV_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    HAS_BASE: tl.constexpr,
    COUNT: tl.constexpr,  # sign election by count (else by mass)
    DISJOINT: tl.constexpr,  # 0 mean, 1 sum, 2 max
    BLOCK: tl.constexpr,
):
    start, offs, inb = _block(N, BLOCK)
    tv_blk = tv_ptr + start

    # pass 1: elect the sign, count non-finite and non-zero trimmed entries
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    nz = tl.zeros([BLOCK], dtype=tl.int32)
    m = tl.zeros([BLOCK], dtype=tl.float32)
    row = tv_blk
    for t in range(T):
        x = _load_f32(row + offs, inb, TV_KIND, "evict_last")
        row += N
        bad += _nonfinite(x)
        thr = tl.load(thr_ptr + t)
        tr = tl.where(tl.abs(x) >= thr, x, 0.0)
        nz = nz | (tr != 0).to(tl.int32)
        if COUNT:
            m = m + ((tr > 0).to(tl.float32) - (tr < 0).to(tl.float32))
        else:
            w = tl.load(w_ptr + t)
            m = m + w * tr
    s0 = (m > 0).to(tl.int32) - (m < 0).to(tl.int32)
    s = tl.where(s0 == 0, fill_sign, s0)
    pos = s > 0

    # pass 2: disjoint merge of the entries agreeing with s
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    row = tv_blk
    for t in range(T):
        x = _load_f32(row + offs, inb, TV_KIND, "evict_first")
        row += N
        thr = tl.load(thr_ptr + t)
        tr = tl.where(tl.abs(x) >= thr, x, 0.0)
        agree = tl.where(pos, tr > 0, tr < 0)
        if DISJOINT == 2:
            num = tl.maximum(num, tl.where(agree, tl.abs(tr), 0.0))
        else:
            w = tl.load(w_ptr + t)
            num = num + tl.where(agree, w * tr, 0.0)
            if DISJOINT == 0:
                den = den + tl.where(agree, w, 0.0)
    if DISJOINT == 0:
        merged = tl.where(den != 0, tl.div_rn(num, tl.where(den != 0, den, 1.0)), 0.0)
    elif DISJOINT == 1:
        merged = num
    else:
        merged = num * s.to(tl.float32)
    _store_with_base(lam * merged, bad, out_ptr + start, base_ptr + start, offs, inb, cnt_ptr + 2, OUT_KIND,
                     BASE_KIND, HAS_BASE)
    _add_counter(cnt_ptr + 0, tl.sum(tl.where(inb, s0, 0), axis=0))
    _add_counter(cnt_ptr + 1, tl.sum(((s0 == 0) & (nz != 0) & inb).to(tl.int32), axis=0))


@triton.jit
def _task_arith_kernel(
    tv_ptr,
    w_ptr,
    out_ptr,
    base_ptr,
    cnt_ptr,  # int64 [1]: nonfinite
    N,
    T,
    lam,
    TV_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, offs, inb = _block(N, BLOCK)
    tv_blk = tv_ptr + start
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    row = tv_blk
    for t in range(T):
        x = _load_f32(row + offs, inb, TV_KIND, "evict_first")
        row += N
        bad += _nonfinite(x)
        w = tl.load(w_ptr + t)
        acc = acc + w * x
    _store_with_base(lam * acc, bad, out_ptr + start, base_ptr + start, offs, inb, cnt_ptr, OUT_KIND, BASE_KIND,
                     HAS_BASE)


@triton.jit
def _tall_masks_kernel(
    tv_ptr,  # [T, N]
    mtl_ptr,  # [N]
    lam_ptr,  # fp32 [T]
    out_ptr,  # uint8 [T, NB]
    cnt_ptr,  # int64 [1]: nonfinite
    N,
    NB,
    T,
    TV_KIND: tl.constexpr,
    MTL_KIND: tl.constexpr,
    BYTES: tl.constexpr,  # output bytes per program; BLOCK = 8 * BYTES elements
):
    start, byte_start, rows, bit, offs, inb = _packed_block(N, BYTES)
    byte_inb = rows < NB - byte_start
    weights = (1 << bit)[None, :]

    mtl = _load_f32(mtl_ptr + start + offs, inb, MTL_KIND, "evict_first")  # kept in registers
    bad = _nonfinite(mtl)
    tv_blk = tv_ptr + start
    out_row = out_ptr + byte_start
    row = tv_blk
    for t in range(T):
        x = _load_f32(row + offs, inb, TV_KIND, "evict_first")
        row += N
        bad += _nonfinite(x)
        lam = tl.load(lam_ptr + t)
        keep = _tall_keep(x, mtl, lam) & inb  # padding bits are 0
        packed = tl.sum(keep.to(tl.int32) * weights, axis=1)
        tl.store(out_row + rows, packed.to(tl.uint8), mask=byte_inb)
        out_row += NB
    _add_counter(cnt_ptr, tl.sum(tl.sum(tl.where(inb, bad, 0), axis=1), axis=0))


@triton.jit
def _consensus_kernel(
    tv_ptr,
    mtl_ptr,
    lam_ptr,
    out_ptr,
    base_ptr,
    cnt_ptr,  # int64 [1]: nonfinite
    N,
    T,
    k,
    alpha,
    TV_KIND: tl.constexpr,
    MTL_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, offs, inb = _block(N, BLOCK)
    mtl = _load_f32(mtl_ptr + start + offs, inb, MTL_KIND, "evict_first")
    bad = _nonfinite(mtl)
    tv_blk = tv_ptr + start
    c = tl.zeros([BLOCK], dtype=tl.int32)
    row = tv_blk
    for t in range(T):
        x = _load_f32(row + offs, inb, TV_KIND, "evict_first")
        row += N
        bad += _nonfinite(x)
        lam = tl.load(lam_ptr + t)
        c += _tall_keep(x, mtl, lam).to(tl.int32)
    _store_with_base(alpha * tl.where(c >= k, mtl, 0.0), bad, out_ptr + start, base_ptr + start, offs, inb, cnt_ptr,
                     OUT_KIND, BASE_KIND, HAS_BASE)


@triton.jit
def _apply_mask_kernel(
    packed_ptr,  # uint8 [NB]
    mtl_ptr,
    out_ptr,
    base_ptr,
    cnt_ptr,  # int64 [1]: non-finite results
    N,
    NB,
    MTL_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    HAS_BASE: tl.constexpr,
    COPY: tl.constexpr,  # no base and out has tau_mtl's dtype: copy the bits where the mask is set
    BYTES: tl.constexpr,
):
    start, byte_start, rows, bit, offs, inb = _packed_block(N, BYTES)
    byte = tl.load(packed_ptr + byte_start + rows, mask=rows < NB - byte_start, other=0)
    on = ((byte.to(tl.int32)[:, None] >> bit[None, :]) & 1) != 0
    if COPY:
        v = tl.load(mtl_ptr + start + offs, mask=inb, other=0, eviction_policy="evict_first")
        tl.store(out_ptr + start + offs, tl.where(on, v, tl.zeros_like(v)), mask=inb)
    else:
        mtl = _load_f32(mtl_ptr + start + offs, inb, MTL_KIND, "evict_first")
        res = tl.where(on, mtl, 0.0)
        if HAS_BASE:
            b = _load_f32(base_ptr + start + offs, inb, BASE_KIND, "evict_first")
            res = b + res
        bad = _store_f32(out_ptr + start + offs, res, inb, OUT_KIND)
        _add_counter(cnt_ptr, tl.sum(tl.sum(tl.where(inb, bad, 0), axis=1), axis=0))


# ----------------------------------------------------------------------------- launchers


def _kind(t):
    try:
        return _KIND[t.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {t.dtype}; expected float32, float16 or bfloat16") from None


def _arg(t):
    """The tensor as the kernel reads it: bf16 as its int16 bits (None stays None)."""
    if t is None:
        return None
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _device(t):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _grid(n, block):
    return (triton.cdiv(n, block),)


def _tasks(tv):
    num_tasks = tv.shape[0]
    return num_tasks, (tv.numel() // num_tasks if num_tasks else 0)


def hist_magnitude(x, hist, shift):
    """``hist[abs_bits(x) >> shift] += 1`` for every element (hist int64 [32768], in place)."""
    n = x.numel()
    if n == 0:
        return
    if x.dtype == torch.float32:
        bits, abs_mask = x.view(torch.int32), 0x7FFFFFFF
    else:
        bits, abs_mask = x.view(torch.int16), 0x7FFF
    with _device(x):
        _hist_kernel[_grid(n, _BLOCK)](
            bits, hist, n, 0, ABS_MASK=abs_mask, SHIFT=int(shift), LOW=False, BLOCK=_BLOCK, **_LAUNCH
        )


def hist_magnitude_low(x, hist, prefix):
    """For fp32 elements with ``abs_bits(x) >> 16 == prefix``: ``hist[abs_bits(x) & 0xffff] += 1``."""
    n = x.numel()
    if n == 0:
        return
    with _device(x):
        _hist_kernel[_grid(n, _BLOCK)](
            x.view(torch.int32), hist, n, int(prefix), ABS_MASK=0x7FFFFFFF, SHIFT=0, LOW=True, BLOCK=_BLOCK, **_LAUNCH
        )


def ties_merge(tv, thresholds, weights, out, base, lam, sign_mode, disjoint, fill_sign):
    """Fused TIES pass; returns ``(sign_sum, ambiguous, nonfinite)`` as python ints (``nonfinite``:
    NaN/Inf inputs plus results that are NaN/Inf in ``out``'s dtype)."""
    if sign_mode not in _SIGN_MODES:
        raise ValueError(f"sign_mode must be one of {tuple(_SIGN_MODES)}, got {sign_mode!r}")
    if disjoint not in _DISJOINT:
        raise ValueError(f"disjoint must be one of {tuple(_DISJOINT)}, got {disjoint!r}")
    num_tasks, n = _tasks(tv)
    if n == 0:
        return 0, 0, 0
    counters = torch.zeros(3, dtype=torch.int64, device=tv.device)
    with _device(tv):
        _ties_kernel[_grid(n, _BLOCK)](
            _arg(tv), thresholds, weights, _arg(out), _arg(base if base is not None else out), counters,
            n, num_tasks, float(lam), int(fill_sign),
            TV_KIND=_kind(tv), OUT_KIND=_kind(out), BASE_KIND=_kind(base if base is not None else out),
            HAS_BASE=base is not None, COUNT=_SIGN_MODES[sign_mode] == 1, DISJOINT=_DISJOINT[disjoint],
            BLOCK=_BLOCK, **_LAUNCH,
        )  # fmt: skip
    sign_sum, ambiguous, nonfinite = counters.tolist()
    return sign_sum, ambiguous, nonfinite


def task_arithmetic(tv, weights, out, base, lam):
    """``out = base + lam * sum_t weights[t] * tv[t]``; returns the count of NaN/Inf inputs and results."""
    num_tasks, n = _tasks(tv)
    if n == 0:
        return 0
    counters = torch.zeros(1, dtype=torch.int64, device=tv.device)
    with _device(tv):
        _task_arith_kernel[_grid(n, _BLOCK)](
            _arg(tv), weights, _arg(out), _arg(base if base is not None else out), counters,
            n, num_tasks, float(lam),
            TV_KIND=_kind(tv), OUT_KIND=_kind(out), BASE_KIND=_kind(base if base is not None else out),
            HAS_BASE=base is not None, BLOCK=_BLOCK, **_LAUNCH,
        )  # fmt: skip
    return int(counters.item())


def tall_masks(tv, tau_mtl, lam, out):
    """Bit-packed TALL masks into ``out`` uint8 [T, ceil(N/8)]; returns the non-finite count."""
    num_tasks, n = _tasks(tv)
    if n == 0:
        return 0
    nb = (n + 7) // 8
    counters = torch.zeros(1, dtype=torch.int64, device=tv.device)
    nbytes = _BLOCK // 8
    with _device(tv):
        _tall_masks_kernel[_grid(n, _BLOCK)](
            _arg(tv), _arg(tau_mtl), lam, out, counters, n, nb, num_tasks,
            TV_KIND=_kind(tv), MTL_KIND=_kind(tau_mtl), BYTES=nbytes, **_LAUNCH,
        )  # fmt: skip
    return int(counters.item())


def consensus(tv, tau_mtl, lam, k, out, base, alpha):
    """``out = base + alpha * (#t with m_t >= k ? tau_mtl : 0)``; returns the count of NaN/Inf inputs
    and results."""
    num_tasks, n = _tasks(tv)
    if n == 0:
        return 0
    counters = torch.zeros(1, dtype=torch.int64, device=tv.device)
    with _device(tv):
        _consensus_kernel[_grid(n, _BLOCK)](
            _arg(tv), _arg(tau_mtl), lam, _arg(out), _arg(base if base is not None else out), counters,
            n, num_tasks, int(k), float(alpha),
            TV_KIND=_kind(tv), MTL_KIND=_kind(tau_mtl), OUT_KIND=_kind(out),
            BASE_KIND=_kind(base if base is not None else out), HAS_BASE=base is not None,
            BLOCK=_BLOCK, **_LAUNCH,
        )  # fmt: skip
    return int(counters.item())


def apply_mask(packed, tau_mtl, out, base):
    """``out = base + (bit n of packed ? tau_mtl : 0)``; without base an exact masked copy.
    Returns how many results are NaN/Inf in ``out``'s dtype (the inputs are checked by the caller)."""
    n = tau_mtl.numel()
    if n == 0:
        return 0
    nb = (n + 7) // 8
    nbytes = _BLOCK // 8
    counters = torch.zeros(1, dtype=torch.int64, device=tau_mtl.device)
    with _device(tau_mtl):
        _apply_mask_kernel[_grid(n, _BLOCK)](
            packed, _arg(tau_mtl), _arg(out), _arg(base if base is not None else out), counters, n, nb,
            MTL_KIND=_kind(tau_mtl), OUT_KIND=_kind(out), BASE_KIND=_kind(base if base is not None else out),
            HAS_BASE=base is not None, COPY=base is None and out.dtype == tau_mtl.dtype,
            BYTES=nbytes, **_LAUNCH,
        )  # fmt: skip
    return int(counters.item())
