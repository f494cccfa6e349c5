"""Triton backend of the fused merging kernels (see CONTRACT.md for the exact semantics).

Every public function is a thin launcher: it picks compile-time variants (dtypes, modes), views
bfloat16 tensors as int16 bit patterns, launches one Triton kernel over blocks of elements and,
where the contract returns counters, reads back a small int64 device tensor.

Design notes (for the GPU):
- The T task rows reach a kernel as a *tuple of tensors* (Triton >= 3.2), one pointer argument
  each: the experts themselves (``*_models``: the task vector ``fp32(expert) - fp32(base)`` is
  formed in registers and never written), or the rows of stacked task vectors. The loop over tasks
  is ``tl.static_range`` (unrolled; T is the tuple's length, so a kernel is compiled per T). Why a
  tuple rather than a stacked copy (T x the model in the storage dtype, written and read again) or
  a table of ``data_ptr()`` addresses: each tuple element is an ordinary pointer argument, so
  Triton specializes it on 16-byte alignment and emits vector loads (an address loaded from memory
  carries no alignment, and scalar loads cost bandwidth); and it runs unchanged in the interpreter.
- Offsets are int64 where they can exceed 2**31: each program offsets its scalar pointers by
  ``start = block * BLOCK`` (int64), then adds an int32 ``tl.arange``.
- All arithmetic is fp32. Kernels are launched with ``enable_fp_fusion=False`` (plain multiply then
  add, as the contract requires; Triton contracts ``a * b + c`` into FMA by default) and divide
  with ``tl.div_rn`` (Triton's ``/`` on fp32 is the approximate ``div.full.f32`` on NVIDIA).
- bfloat16 is read as int16 bits (``bits << 16`` is the fp32 value) and written by rounding the
  fp32 bits to nearest even in integer arithmetic, with NaN -> 0x7FC0 like torch's CPU ``.to``.
  The same code runs in the interpreter (whose bf16 cast is not round-to-nearest-even) and on GPU.
- Reductions over tasks run t = 0, 1, ..., T-1 in order. TIES keeps each task's trimmed values in
  registers between the election and the merge (one read of every input); above 8 tasks the
  kernels run 8 warps, halving the registers each thread holds per task.
- TIES passes take an optional list of blocks to run (the zero-sign rerun) and write one uint8
  flag per block that holds an ambiguous element (``ambiguous_blocks``), like the C++ kernels.
- DARE's random keep (``keep``): each program draws its block's Philox4x32-10 words with
  ``tl.philox`` (counter ``(j mod 2**32, j >> 32, task, h)`` for the 4 elements ``4j .. 4j + 3``;
  the key ``(k0, k1)`` as the seed ``k1 << 32 | k0``; nlmerge.ops.random), one call per 4 elements,
  interleaved into element order with ``tl.join``; bit-identical to the torch and C++ draws.
- Counters: per-program ``tl.sum`` then one relaxed int64 atomic per program and counter. The
  non-finite counter of a merge counts NaN/Inf inputs and stored results that are NaN/Inf in the
  output dtype (an fp32 value that overflows fp16 or bf16 when rounded), which ops turns into an
  error: a merge never hands back Inf.
- Histograms: one relaxed int64 atomic per element, except that each program first counts the
  elements of its smallest bin (zeros, or the single value of constant data) and adds them with
  one atomic, which removes the worst same-address contention. The window count of the one-read
  selection (``count_window*``) is a mode of the same kernel: the elements below the window and
  the non-finite ones are added with one atomic per program each. The T tasks' windows of
  ``count_windows_models`` collect the magnitudes inside each window: one atomic per program and
  task claims the block's slots, ``tl.cumsum`` gives each candidate its place.
"""
import contextlib

import torch
import triton
import triton.language as tl

available = True
load_error = None

_BLOCK = 1024  # elements per program (4 warps: 8 fp32 = two 16-byte vectors per thread); ops.ties.BLOCK
_NUM_WARPS = 4
_LAUNCH = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)
_MANY_TASKS = 8  # above this many task rows, 8 warps (fewer registers per thread per task)
_SUM_GROUP = 16  # blocks per program of DARE's norms: loads of [16 blocks, 16 lanes]

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
def _block(N, blocks_ptr, HAS_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of a length-N array (the program's index, or the ``blocks_ptr`` entry it
    is given): the block index and int64 ``start``, ``offs`` (int32 [BLOCK]) and the in-bounds mask."""
    if HAS_BLOCKS:
        blk = tl.load(blocks_ptr + tl.program_id(0))
    else:
        blk = tl.program_id(0).to(tl.int64)
    start = blk * BLOCK
    offs = tl.arange(0, BLOCK)
    return blk, start, offs, offs < N - start


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
def _base_values(base_ptr, offs, inb, KIND: tl.constexpr, LOAD: tl.constexpr):
    """fp32 base values at ``base_ptr + offs`` (zeros when the kernel has no base: ``LOAD`` False)."""
    if LOAD:
        b = _load_f32(base_ptr + offs, inb, KIND, "evict_first")
    else:
        b = tl.zeros(offs.shape, dtype=tl.float32)
    return b


@triton.jit
def _keep_flags(keys_ptr, j, t: tl.constexpr):
    """DARE's keep flags of task t for the 4 elements ``4j .. 4j + 3`` of each Philox counter ``j``
    (int64, any shape): their 24-bit draws on stream t below the task's threshold, as bool
    ``[*j.shape, 2, 2]`` whose entry ``[..., p, q]`` is element ``4j + 2p + q``. ``keys_ptr``: int64
    ``[k0, k1, h, threshold_0, ..., threshold_{T-1}]``."""
    seed = (tl.load(keys_ptr + 1).to(tl.uint64) << 32) | tl.load(keys_ptr).to(tl.uint64)
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.full(j.shape, t, tl.uint32)
    c3 = tl.full(j.shape, 0, tl.uint32) + tl.load(keys_ptr + 2).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # the outer join adds q: lane 2p + q
    return (words >> 8).to(tl.int32) < tl.load(keys_ptr + 3 + t).to(tl.int32)


@triton.jit
def _task_row(rows, t: tl.constexpr, b, start, offs, inb, keys_ptr, KIND: tl.constexpr, SUB: tl.constexpr,
              KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """Task t's fp32 values of the block and their non-finite flags: ``rows[t]`` (a stacked task
    vector row), or ``fp32(rows[t]) - b`` (``SUB``: an expert minus the base), with DARE's dropped
    entries +0 (``KEEP``; the flags cover every entry, dropped or not)."""
    x = _load_f32(rows[t] + start + offs, inb, KIND, "evict_first")
    if SUB:
        x = x - b
    bad = _nonfinite(x)
    if KEEP:  # start is a multiple of 4: one counter per 4 elements of the block
        kept = _keep_flags(keys_ptr, start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64), t)
        x = tl.where(tl.reshape(kept, [BLOCK]), x, 0.0)
    return x, bad


@triton.jit
def _tall_keep(x, mtl, lam):
    """TALL's mask predicate ``|x| > lam * |mtl - x|`` (fp32)."""
    return tl.abs(x) > lam * tl.abs(mtl - x)


@triton.jit
def _store_result(res, b, bad, out_ptr, offs, inb, cnt_ptr, OUT_KIND: tl.constexpr, ADD: tl.constexpr):
    """Store ``b + res`` (``res`` alone without ``ADD``) at ``out_ptr + offs`` and add the block's
    non-finite count (``bad``, plus the added base's and the stored results') to ``cnt_ptr``."""
    if ADD:
        bad += _nonfinite(b)
        res = b + res
    bad += _store_f32(out_ptr + offs, res, inb, OUT_KIND)
    _add_counter(cnt_ptr, tl.sum(tl.where(inb, bad, 0), axis=0))


# ----------------------------------------------------------------------------- kernels
#
# Common arguments: ``rows`` the tuple of T task rows (ROW_KIND); ``base_ptr`` the base (BASE_KIND),
# subtracted from every row (``SUB``: rows are experts, BASE_KIND == ROW_KIND) and/or added to the
# result (``ADD``); a dummy pointer when neither.


@triton.jit(do_not_specialize=["prefix", "lo", "width"])
def _hist_kernel(
    x_ptr,  # int32 (fp32 bits) or int16 (fp16/bf16 bits) [N]; with SUB an expert (KIND)
    base_ptr,  # with SUB: the base (KIND); the counted magnitudes are |fp32(x) - fp32(base)|
    hist_ptr,  # int64: [32768], [65536] or [1 + width]
    cnt_ptr,  # int64 [1]: non-finite magnitudes (MODE 2)
    N,
    prefix,
    lo,
    width,
    ABS_MASK: tl.constexpr,  # 0x7FFFFFFF or 0x7FFF
    SHIFT: tl.constexpr,
    MODE: tl.constexpr,  # 0: bin abs >> SHIFT; 1: abs >> 16 == prefix, bin abs & 0xFFFF; 2: window (count_window)
    SUB: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, start, offs, inb = _block(N, x_ptr, False, BLOCK)
    if SUB:
        x = _load_f32(x_ptr + start + offs, inb, KIND, "evict_first")
        x = x - _load_f32(base_ptr + start + offs, inb, KIND, "evict_first")
        mag = x.to(tl.int32, bitcast=True) & ABS_MASK
    else:
        bits = tl.load(x_ptr + start + offs, mask=inb, other=0, eviction_policy="evict_first")
        mag = bits.to(tl.int32) & ABS_MASK
    if MODE == 2:  # bin 0 counts the magnitudes below the window, bin 1 + v - lo those inside it
        rel = mag - lo  # no overflow: 0 <= mag, lo < 2**31
        valid = inb & (rel >= 0) & (rel < width)
        b = rel + 1
        _add_counter(hist_ptr, tl.sum((inb & (rel < 0)).to(tl.int32), axis=0))
        _add_counter(cnt_ptr, tl.sum((inb & (mag >= 0x7F800000)).to(tl.int32), axis=0))
    elif MODE == 1:
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


@triton.jit(do_not_specialize=["cap"])
def _windows_kernel(
    experts,  # tuple of T experts (KIND; bf16 as int16 bits)
    base_ptr,  # the base (KIND)
    lo_ptr,  # int32 [T]: window lower edges (magnitude bits)
    hi_ptr,  # int32 [T]: upper edges, lo <= hi <= 0x7F800000
    counts_ptr,  # int64 [T, 6]: below, at lo, inside (claimed slots), at hi, non-finite, (unused)
    cand_ptr,  # int32 [T, cap]: the magnitudes strictly inside each window
    N,
    cap,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, start, offs, inb = _block(N, base_ptr, False, BLOCK)
    b = _load_f32(base_ptr + start + offs, inb, KIND, "evict_first")
    for t in tl.static_range(len(experts)):
        x = _load_f32(experts[t] + start + offs, inb, KIND, "evict_first") - b
        mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        lo = tl.load(lo_ptr + t)
        hi = tl.load(hi_ptr + t)
        c = counts_ptr + 6 * t
        _add_counter(c, tl.sum((inb & (mag < lo)).to(tl.int32), axis=0))
        _add_counter(c + 1, tl.sum((inb & (mag == lo)).to(tl.int32), axis=0))
        _add_counter(c + 3, tl.sum((inb & (mag == hi) & (hi != lo)).to(tl.int32), axis=0))
        _add_counter(c + 4, tl.sum((inb & (mag >= 0x7F800000)).to(tl.int32), axis=0))
        inside = (inb & (mag > lo) & (mag < hi)).to(tl.int32)
        # one atomic claims the block's slots; each candidate goes to its rank among them
        first = tl.atomic_add(c + 2, tl.sum(inside, axis=0).to(tl.int64), sem="relaxed")
        slot = first + (tl.cumsum(inside, axis=0) - 1).to(tl.int64)
        tl.store(cand_ptr + t * cap + slot, mag, mask=(inside != 0) & (slot < cap))


@triton.jit(do_not_specialize=["fill_sign", "count_mode", "disjoint"])  # values 0/1: one compile for all modes
def _ties_kernel(
    rows,
    base_ptr,
    thr_ptr,  # fp32 [T]
    w_ptr,  # fp32 [T]
    div_ptr,  # fp32 [T]: what "mean" divides by (the weights unless divisors are given)
    out_ptr,  # [N]
    cnt_ptr,  # int64 [3]: sign_sum, ambiguous, nonfinite
    blocks_ptr,  # int64 [programs]: the blocks to run (HAS_BLOCKS)
    flags_ptr,  # uint8 [ceil(N / BLOCK)]: 1 where a run block holds an ambiguous element (HAS_FLAGS)
    keys_ptr,  # int64 [3 + T]: DARE's Philox key and keep thresholds (KEEP)
    N,
    lam,
    fill_sign,
    count_mode,  # 1: sign election by count, 0: by mass
    disjoint,  # 0 mean, 1 sum (MAX: unused)
    ROW_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    SUB: tl.constexpr,
    ADD: tl.constexpr,
    KEEP: tl.constexpr,
    MAX: tl.constexpr,  # disjoint "max"
    HAS_BLOCKS: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The sign mode and the choice of mean or sum are run-time values (uniform selects, a few ALU
    # operations on a memory-bound kernel): two compiled variants per T and dtypes instead of six
    # (compile time on a GPU). "max" stays a compile-time branch (its own accumulator).
    blk, start, offs, inb = _block(N, blocks_ptr, HAS_BLOCKS, BLOCK)
    b = _base_values(base_ptr + start, offs, inb, BASE_KIND, SUB or ADD)
    by_count = count_mode != 0

    # elect the sign, count non-finite and non-zero trimmed entries; keep the trimmed rows
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    nz = tl.zeros([BLOCK], dtype=tl.int32)
    m = tl.zeros([BLOCK], dtype=tl.float32)
    trimmed = ()
    for t in tl.static_range(len(rows)):
        x, bad_t = _task_row(rows, t, b, start, offs, inb, keys_ptr, ROW_KIND, SUB, KEEP, BLOCK)
        bad += bad_t
        tr = tl.where(tl.abs(x) >= tl.load(thr_ptr + t), x, 0.0)
        trimmed = trimmed + (tr,)
        nz = nz | (tr != 0).to(tl.int32)
        sign_t = (tr > 0).to(tl.float32) - (tr < 0).to(tl.float32)
        m = m + tl.where(by_count, sign_t, tl.load(w_ptr + t) * tr)
    s0 = (m > 0).to(tl.int32) - (m < 0).to(tl.int32)
    s = tl.where(s0 == 0, fill_sign, s0)
    pos = s > 0

    # disjoint merge of the entries agreeing with s
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(len(rows)):
        tr = trimmed[t]
        agree = tl.where(pos, tr > 0, tr < 0)
        if MAX:
            num = tl.maximum(num, tl.where(agree, tl.abs(tr), 0.0))
        else:
            num = num + tl.where(agree, tl.load(w_ptr + t) * tr, 0.0)
            den = den + tl.where(agree, tl.load(div_ptr + t), 0.0)
    if MAX:
        merged = num * s.to(tl.float32)
    else:  # mean (0) or sum (1)
        merged = tl.where(disjoint == 0, tl.where(den != 0, tl.div_rn(num, tl.where(den != 0, den, 1.0)), 0.0), num)
    _store_result(lam * merged, b, bad, out_ptr + start, offs, inb, cnt_ptr + 2, OUT_KIND, ADD)
    ambiguous = tl.sum(((s0 == 0) & (nz != 0) & inb).to(tl.int32), axis=0)
    _add_counter(cnt_ptr + 0, tl.sum(tl.where(inb, s0, 0), axis=0))
    _add_counter(cnt_ptr + 1, ambiguous)
    if HAS_FLAGS:
        tl.store(flags_ptr + blk, (ambiguous > 0).to(tl.uint8))


@triton.jit
def _task_arith_kernel(
    rows,
    base_ptr,
    w_ptr,  # fp32 [T]
    out_ptr,
    cnt_ptr,  # int64 [1]: nonfinite
    keys_ptr,  # int64 [3 + T] (KEEP)
    N,
    lam,
    ROW_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    SUB: tl.constexpr,
    ADD: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, start, offs, inb = _block(N, w_ptr, False, BLOCK)
    b = _base_values(base_ptr + start, offs, inb, BASE_KIND, SUB or ADD)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(len(rows)):
        x, bad_t = _task_row(rows, t, b, start, offs, inb, keys_ptr, ROW_KIND, SUB, KEEP, BLOCK)
        bad += bad_t
        acc = acc + tl.load(w_ptr + t) * x
    _store_result(lam * acc, b, bad, out_ptr + start, offs, inb, cnt_ptr, OUT_KIND, ADD)


@triton.jit
def _tall_masks_kernel(
    rows,
    base_ptr,
    mtl_ptr,  # [N]
    lam_ptr,  # fp32 [T]
    out_ptr,  # uint8 [T, NB]
    cnt_ptr,  # int64 [1]: nonfinite
    N,
    NB,
    ROW_KIND: tl.constexpr,
    MTL_KIND: tl.constexpr,
    SUB: tl.constexpr,
    BYTES: tl.constexpr,  # output bytes per program; BLOCK = 8 * BYTES elements
):
    start, byte_start, rows_, bit, offs, inb = _packed_block(N, BYTES)
    byte_inb = rows_ < NB - byte_start
    weights = (1 << bit)[None, :]
    b = _base_values(base_ptr + start, offs, inb, ROW_KIND, SUB)
    mtl = _load_f32(mtl_ptr + start + offs, inb, MTL_KIND, "evict_first")  # kept in registers
    bad = _nonfinite(mtl)
    out_row = out_ptr + byte_start
    for t in tl.static_range(len(rows)):
        x, bad_t = _task_row(rows, t, b, start, offs, inb, lam_ptr, ROW_KIND, SUB, False, 8 * BYTES)
        bad += bad_t
        keep = _tall_keep(x, mtl, tl.load(lam_ptr + t)) & inb  # padding bits are 0
        packed = tl.sum(keep.to(tl.int32) * weights, axis=1)
        tl.store(out_row + rows_, packed.to(tl.uint8), mask=byte_inb)
        out_row += NB
    _add_counter(cnt_ptr, tl.sum(tl.sum(tl.where(inb, bad, 0), axis=1), axis=0))


@triton.jit
def _consensus_kernel(
    rows,
    base_ptr,
    mtl_ptr,
    lam_ptr,  # fp32 [T]
    out_ptr,
    cnt_ptr,  # int64 [1]: nonfinite
    N,
    k,
    alpha,
    ROW_KIND: tl.constexpr,
    BASE_KIND: tl.constexpr,
    MTL_KIND: tl.constexpr,
    OUT_KIND: tl.constexpr,
    SUB: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, start, offs, inb = _block(N, lam_ptr, False, BLOCK)
    b = _base_values(base_ptr + start, offs, inb, BASE_KIND, SUB or ADD)
    mtl = _load_f32(mtl_ptr + start + offs, inb, MTL_KIND, "evict_first")
    bad = _nonfinite(mtl)
    c = tl.zeros([BLOCK], dtype=tl.int32)
    for t in tl.static_range(len(rows)):
        x, bad_t = _task_row(rows, t, b, start, offs, inb, lam_ptr, ROW_KIND, SUB, False, BLOCK)
        bad += bad_t
        c += _tall_keep(x, mtl, tl.load(lam_ptr + t)).to(tl.int32)
    _store_result(alpha * tl.where(c >= k, mtl, 0.0), b, bad, out_ptr + start, offs, inb, cnt_ptr, OUT_KIND, ADD)


@triton.jit
def _halve(x, G: tl.constexpr, W: tl.constexpr):
    """``x[:, :W/2] + x[:, W/2:]`` of ``x`` [G, W]: lane l += lane l + W/2."""
    a, b = tl.split(tl.permute(tl.reshape(x, [G, 2, W // 2]), (0, 2, 1)))
    return a + b


@triton.jit
def _lane_total(x, G: tl.constexpr):
    """The 16 lanes of ``x`` [G, 16] combined by pairwise halving (ops.dare.l1_norm's order): [G]."""
    return tl.reshape(_halve(_halve(_halve(_halve(x, G, 16), G, 8), G, 4), G, 2), [G])


@triton.jit
def _l1_sums_kernel(
    rows,  # the T experts
    base_ptr,
    sums_ptr,  # fp64 [T, 2, NBLK]: per block, the L1 of x_t and of its kept entries
    keys_ptr,  # int64 [3 + T]: DARE's Philox key and keep thresholds
    N,
    NBLK,
    KIND: tl.constexpr,
    G: tl.constexpr,  # blocks per program
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G).to(tl.int64)
    lane = tl.arange(0, LANES)
    for t in tl.static_range(len(rows)):
        full = tl.zeros([G, LANES], dtype=tl.float64)
        kept = tl.zeros([G, LANES], dtype=tl.float64)
        for r in range(BLOCK // LANES):  # lane l of a block sums its elements l, l + 16, ... in order
            first = blk * BLOCK + r * LANES  # [G]
            idx = first[:, None] + lane[None, :]
            inb = idx < N  # past the end: +0, as the reference's zero padding
            x = _load_f32(rows[t] + idx, inb, KIND, "evict_first") - _load_f32(base_ptr + idx, inb, KIND, "evict_first")
            mag = tl.abs(x).to(tl.float64)
            full = full + mag
            keep = _keep_flags(keys_ptr, first[:, None] // 4 + tl.arange(0, LANES // 4).to(tl.int64)[None, :], t)
            kept = kept + tl.where(tl.reshape(keep, [G, LANES]), mag, 0.0)
        row = sums_ptr + (2 * t) * NBLK + blk
        tl.store(row, _lane_total(full, G), mask=blk < NBLK)
        tl.store(row + NBLK, _lane_total(kept, G), mask=blk < NBLK)


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


def _launch(num_rows):
    """Launch options for a kernel over ``num_rows`` task rows."""
    return dict(_LAUNCH, num_warps=_NUM_WARPS if num_rows <= _MANY_TASKS else 2 * _NUM_WARPS)


class _Rows:
    """A kernel's task rows and base: the rows of stacked task vectors ``tv`` [T, N] with an
    optional base added, or the experts with their base (subtracted; added when ``add``).
    ``args`` are the tuple of rows and the base pointer (a dummy when there is none), ``flags``
    the ROW_KIND, BASE_KIND, SUB and ADD compile-time arguments."""

    def __init__(self, tv=None, base=None, experts=None, add=True):
        if experts is None:
            rows, sub, add = tuple(tv.unbind(0)), False, base is not None
        else:
            rows, sub = tuple(experts), True
        self.num, self.n = len(rows), rows[0].numel()
        self.device = rows[0].device
        dummy = base if base is not None else rows[0]
        self.args = (tuple(_arg(r) for r in rows), _arg(dummy))
        self.flags = dict(ROW_KIND=_kind(rows[0]), BASE_KIND=_kind(dummy), SUB=sub, ADD=add)

    def counters(self, size):
        return torch.zeros(size, dtype=torch.int64, device=self.device)


def _keys(keep, rows):
    """DARE's draws ``(k0, k1, h, thresholds)`` as the kernels read them: int64 [3 + T] on the
    rows' device (a dummy when ``keep`` is None)."""
    words = [0, 0, 0] if keep is None else [keep[0], keep[1], keep[2], *keep[3]]
    return torch.tensor(words, dtype=torch.int64, device=rows.device)


def _hist(x, base, hist, abs_mask=0x7FFFFFFF, shift=0, mode=0, prefix=0, lo=0):
    """Launch ``_hist_kernel`` over ``x`` (bit view; with ``base``: an expert, its difference
    counted); returns the non-finite count of a window count (``mode`` 2), else 0."""
    n = x.numel()
    counters = torch.zeros(1, dtype=torch.int64, device=x.device)
    if n:
        with _device(x):
            _hist_kernel[_grid(n, _BLOCK)](
                x, x if base is None else _arg(base), hist, counters, n, int(prefix), int(lo), hist.numel() - 1,
                ABS_MASK=abs_mask, SHIFT=shift, MODE=mode, SUB=base is not None,
                KIND=_F32 if base is None else _kind(base), BLOCK=_BLOCK, **_LAUNCH,
            )  # fmt: skip
    return int(counters.item()) if mode == 2 else 0


def hist_magnitude(x, hist, shift):
    """``hist[abs_bits(x) >> shift] += 1`` for every element (hist int64 [32768], in place)."""
    if x.dtype == torch.float32:
        _hist(x.view(torch.int32), None, hist, shift=int(shift))
    else:
        _hist(x.view(torch.int16), None, hist, 0x7FFF, int(shift))


def hist_magnitude_low(x, hist, prefix):
    """For fp32 elements with ``abs_bits(x) >> 16 == prefix``: ``hist[abs_bits(x) & 0xffff] += 1``."""
    _hist(x.view(torch.int32), None, hist, mode=1, prefix=prefix)


def hist_magnitude_models(base, expert, hist):
    """``hist_magnitude(fp32(expert) - fp32(base), hist, 16)`` with the difference formed in registers."""
    _hist(_arg(expert), base, hist, shift=16)


def hist_magnitude_low_models(base, expert, hist, prefix):
    """``hist_magnitude_low(fp32(expert) - fp32(base), hist, prefix)`` with the difference formed in registers."""
    _hist(_arg(expert), base, hist, mode=1, prefix=prefix)


def count_window(x, hist, lo):
    """fp32 x, ``v = abs_bits(x)``: ``hist[0] += #(v < lo)``, ``hist[1 + v - lo] += 1`` for ``lo <= v < lo +
    len(hist) - 1`` (hist int64, in place; the window within the finite magnitudes); returns the
    number of non-finite elements as an int."""
    if x.dtype != torch.float32:
        raise ValueError(f"count_window takes float32, got {x.dtype}")
    return _hist(x.view(torch.int32), None, hist, mode=2, lo=lo)


def count_window_models(base, expert, hist, lo):
    """``count_window`` over ``x = fp32(expert) - fp32(base)`` (one dtype and size), formed in registers."""
    return _hist(_arg(expert), base, hist, mode=2, lo=lo)


def count_windows_models(base, experts, lo, hi, counts, cand):
    """The one-read selections of T tasks in one pass (the C++ contract): with ``v`` the fp32
    magnitude bits of ``fp32(experts[t]) - fp32(base)`` (formed in registers) and the window ``lo[t]
    <= hi[t] <= 0x7F800000`` (ints), ``counts[t]`` (int64 [T, 6] on the data's device, overwritten) =
    ``(#(v < lo), #(v == lo), candidates, #(v == hi) (0 when hi == lo), any non-finite v (0/1),
    overflow (0/1))``, the candidates (``lo < v < hi``) in ``cand[t, :counts[t, 2]]`` (int32 [T, cap],
    in no particular order; unusable where overflow is 1)."""
    n, cap = base.numel(), cand.shape[1]
    counts.zero_()
    if n:
        edges = torch.tensor([list(lo), list(hi)], dtype=torch.int32, device=base.device)
        with _device(base):
            _windows_kernel[_grid(n, _BLOCK)](
                tuple(_arg(x) for x in experts), _arg(base), edges[0], edges[1], counts, cand, n, cap,
                KIND=_kind(base), BLOCK=_BLOCK, **_launch(len(experts)),
            )  # fmt: skip
    counts[:, 5] = (counts[:, 2] > cap).to(torch.int64)
    counts[:, 2].clamp_(max=cap)
    counts[:, 4] = (counts[:, 4] > 0).to(torch.int64)


def _ties(rows, thresholds, weights, out, lam, sign_mode, disjoint, fill_sign, blocks, ambiguous_blocks, keep,
          divisors):
    if sign_mode not in _SIGN_MODES:
        raise ValueError(f"sign_mode must be one of {tuple(_SIGN_MODES)}, got {sign_mode!r}")
    if disjoint not in _DISJOINT:
        raise ValueError(f"disjoint must be one of {tuple(_DISJOINT)}, got {disjoint!r}")
    counters = rows.counters(3)
    if blocks is not None:
        blocks = blocks.to(device=rows.device, dtype=torch.int64)
    programs = _grid(rows.n, _BLOCK)[0] if blocks is None else blocks.numel()
    if rows.n and programs:
        with _device(out):
            _ties_kernel[(programs,)](
                *rows.args, thresholds, weights, weights if divisors is None else divisors.to(weights), _arg(out),
                counters, blocks if blocks is not None else counters,
                ambiguous_blocks if ambiguous_blocks is not None else counters, _keys(keep, rows), rows.n, float(lam),
                int(fill_sign), _SIGN_MODES[sign_mode], _DISJOINT[disjoint], OUT_KIND=_kind(out), KEEP=keep is not None,
                MAX=disjoint == "max", HAS_BLOCKS=blocks is not None, HAS_FLAGS=ambiguous_blocks is not None,
                BLOCK=_BLOCK, **rows.flags, **_launch(rows.num),
            )  # fmt: skip
    sign_sum, ambiguous, nonfinite = counters.tolist()
    return sign_sum, ambiguous, nonfinite


def ties_merge(tv, thresholds, weights, out, base, lam, sign_mode, disjoint, fill_sign, blocks=None,
               ambiguous_blocks=None, divisors=None):
    """Fused TIES pass; returns ``(sign_sum, ambiguous, nonfinite)`` as python ints (``nonfinite``:
    NaN/Inf inputs plus results that are NaN/Inf in ``out``'s dtype), counted over the blocks run:
    every block, or the ``blocks`` listed (int64 indices of 1024-element blocks, any device; the
    other elements of ``out`` are left as they are). ``ambiguous_blocks`` (uint8 [ceil(N / 1024)]
    on the device): set to 1 for each run block holding an ambiguous element, 0 for the others run.
    ``divisors`` (fp32 [T] or None: the weights): "mean" divides by their sum over the agreeing tasks."""
    return _ties(_Rows(tv, base), thresholds, weights, out, lam, sign_mode, disjoint, fill_sign, blocks,
                 ambiguous_blocks, None, divisors)


def ties_merge_models(base, experts, thresholds, weights, out, include_base, lam, sign_mode, disjoint, fill_sign,
                      blocks=None, ambiguous_blocks=None, keep=None, divisors=None, keep_bits=None):
    """``ties_merge`` on the task vectors ``fp32(experts[t]) - fp32(base)`` formed in registers, adding
    ``base`` to the result when ``include_base``; ``base`` and the T ``experts``: one dtype, ``out``'s
    element count. ``keep``: None, or DARE's draws ``(k0, k1, h, thresholds)``: entry i of task t is
    +0 unless its draw on stream t is below ``thresholds[t]``. ``divisors``: as in ``ties_merge``.
    ``keep_bits`` (flags recorded on the CPU) are not read: the device draws again, cheap next to
    its memory traffic."""
    return _ties(_Rows(base=base, experts=experts, add=bool(include_base)), thresholds, weights, out, lam, sign_mode,
                 disjoint, fill_sign, blocks, ambiguous_blocks, keep, divisors)


def _task_arithmetic(rows, weights, out, lam, keep):
    counters = rows.counters(1)
    if rows.n:
        with _device(out):
            _task_arith_kernel[_grid(rows.n, _BLOCK)](
                *rows.args, weights, _arg(out), counters, _keys(keep, rows), rows.n, float(lam),
                OUT_KIND=_kind(out), KEEP=keep is not None, BLOCK=_BLOCK, **rows.flags, **_launch(rows.num),
            )  # fmt: skip
    return int(counters.item())


def task_arithmetic(tv, weights, out, base, lam):
    """``out = base + lam * sum_t weights[t] * tv[t]``; returns the count of NaN/Inf inputs and results."""
    return _task_arithmetic(_Rows(tv, base), weights, out, lam, None)


def task_arithmetic_models(base, experts, weights, out, lam, include_base=True, keep=None, keep_bits=None):
    """``task_arithmetic`` on ``fp32(experts[t]) - fp32(base)`` formed in registers (the ``base +``
    term only when ``include_base``; ``keep`` and ``keep_bits`` as in ``ties_merge_models``);
    returns the count of NaN/Inf task vector entries (dropped or not), added base values and
    results."""
    return _task_arithmetic(_Rows(base=base, experts=experts, add=bool(include_base)), weights, out, lam, keep)


def _tall_masks(rows, tau_mtl, lam, out):
    counters = rows.counters(1)
    if rows.n:
        with _device(out):
            _tall_masks_kernel[_grid(rows.n, _BLOCK)](
                *rows.args, _arg(tau_mtl), lam, out, counters, rows.n, (rows.n + 7) // 8,
                ROW_KIND=rows.flags["ROW_KIND"], MTL_KIND=_kind(tau_mtl), SUB=rows.flags["SUB"], BYTES=_BLOCK // 8,
                **_launch(rows.num),
            )  # fmt: skip
    return int(counters.item())


def tall_masks(tv, tau_mtl, lam, out):
    """Bit-packed TALL masks into ``out`` uint8 [T, ceil(N/8)]; returns the non-finite count."""
    return _tall_masks(_Rows(tv), tau_mtl, lam, out)


def tall_masks_models(base, experts, tau_mtl, lam, out):
    """``tall_masks`` on ``fp32(experts[t]) - fp32(base)`` formed in registers."""
    return _tall_masks(_Rows(base=base, experts=experts, add=False), tau_mtl, lam, out)


def _consensus(rows, tau_mtl, lam, k, out, alpha):
    counters = rows.counters(1)
    if rows.n:
        with _device(out):
            _consensus_kernel[_grid(rows.n, _BLOCK)](
                *rows.args, _arg(tau_mtl), lam, _arg(out), counters, rows.n, int(k), float(alpha),
                MTL_KIND=_kind(tau_mtl), OUT_KIND=_kind(out), BLOCK=_BLOCK, **rows.flags, **_launch(rows.num),
            )  # fmt: skip
    return int(counters.item())


def consensus(tv, tau_mtl, lam, k, out, base, alpha):
    """``out = base + alpha * (#t with m_t >= k ? tau_mtl : 0)``; returns the count of NaN/Inf inputs
    and results."""
    return _consensus(_Rows(tv, base), tau_mtl, lam, k, out, alpha)


def consensus_models(base, experts, tau_mtl, lam, k, out, alpha):
    """``consensus`` on ``fp32(experts[t]) - fp32(base)`` formed in registers, with this base added."""
    return _consensus(_Rows(base=base, experts=experts), tau_mtl, lam, k, out, alpha)


def keep_l1_block_sums(base, experts, keep, sums):
    """DARE's rescale norms per block: ``sums`` fp64 [T, 2, ceil(N / 1024)] on the device, written:
    ``[t, 0, b]`` the L1 of block b of x_t = fp32(experts[t]) - fp32(base) (formed in registers),
    ``[t, 1, b]`` that of its entries that ``keep`` ``(k0, k1, h, thresholds)`` keeps; each in
    ``nlmerge.ops.dare.l1_norm``'s order within a block (16 lanes summed in element order from +0,
    then combined by pairwise halving). NaN/Inf in x_t makes its sums non-finite."""
    rows = _Rows(base=base, experts=experts, add=False)
    nblk = sums.shape[2]
    if nblk:
        with _device(sums):
            _l1_sums_kernel[_grid(nblk, _SUM_GROUP)](
                *rows.args, sums, _keys(keep, rows), rows.n, nblk, KIND=rows.flags["ROW_KIND"], G=_SUM_GROUP,
                BLOCK=_BLOCK, LANES=16, **_LAUNCH,
            )  # fmt: skip


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
