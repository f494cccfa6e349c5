"""CPU backend: the C++ kernels of ``nlmerge._C`` (built from ``csrc/cpu/``) on torch CPU tensors.

Functions and semantics follow ``CONTRACT.md``. Tensors are handed to the extension as NumPy
views of the same memory (no copies): fp32 as float32, fp16/bf16 as uint16 bit patterns plus a
dtype name. The kernels run with the GIL released on ``torch.get_num_threads()`` OpenMP threads;
results do not depend on the thread count.

``available`` tells whether the extension imported; ``load_error`` says why not (the dispatcher
logs it; this module never prints).
"""
import numpy as np
import torch

_API_VERSION = 11  # must match csrc/cpu/module.cpp

try:
    from nlmerge import _C
except Exception as exc:  # not built (no compiler at install time), or a broken build
    _C = None
    available = False
    load_error = f"{type(exc).__name__}: {exc}"
else:
    if getattr(_C, "api_version", None) == _API_VERSION:
        available = True
        load_error = None
    else:  # an extension built from older sources
        available = False
        load_error = (
            f"nlmerge._C at {getattr(_C, '__file__', '?')} is stale (api_version "
            f"{getattr(_C, 'api_version', None)}, expected {_API_VERSION}); rebuild it with `pip install -e .`"
        )
        _C = None

__all__ = [
    "available",
    "load_error",
    "hist_magnitude",
    "hist_magnitude_low",
    "hist_magnitude_models",
    "hist_magnitude_low_models",
    "count_window",
    "count_window_models",
    "count_windows_models",
    "count_window_models_tasks",
    "ties_merge",
    "ties_merge_models",
    "task_arithmetic",
    "task_arithmetic_models",
    "keep_l1_norms_models",
    "tall_masks",
    "tall_masks_models",
    "consensus",
    "consensus_models",
    "apply_mask",
    "permute",
    "channel_stats",
    "random_draws",
]

_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_STATS_NAMES = {**_NAMES, torch.float64: "float64"}


def _name(t):
    try:
        return _NAMES[t.dtype]
    except KeyError:
        raise ValueError(f"expected a float32, float16 or bfloat16 tensor, got {t.dtype}") from None


def _view(t):
    """NumPy view of a CPU tensor's memory: float32 / uint16 bits of fp16 and bf16 / as is."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _in(t):
    """Input tensor -> NumPy view (contiguous; a copy only if it was not)."""
    return _view(t.detach().contiguous())


def _out(t, name):
    """Output tensor -> writable NumPy view of its own memory (must be contiguous)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel writes it in place)")
    return _view(t.detach())


def _per_task(v):
    return v.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _base(base):
    return (None, "float32") if base is None else (_in(base), _name(base))


def _tv(tv):
    tv = tv.detach()
    if tv.dim() < 2:
        raise ValueError(f"task vectors must be [T, N], got shape {tuple(tv.shape)}")
    if tv.dim() > 2:
        tv = tv.reshape(tv.shape[0], -1)
    return _in(tv), _name(tv)


def _threads():
    return torch.get_num_threads()


def hist_magnitude(x, hist, shift):
    """``hist[abs_bits(x) >> shift] += 1`` for every element (hist: int64 [32768], in place)."""
    _C.hist_magnitude(_in(x.reshape(-1)), _name(x), _out(hist, "hist"), int(shift), _threads())


def hist_magnitude_low(x, hist, prefix):
    """fp32 x: ``hist[abs_bits & 0xffff] += 1`` where ``abs_bits >> 16 == prefix`` (int64 [65536])."""
    if x.dtype != torch.float32:
        raise ValueError(f"hist_magnitude_low takes float32, got {x.dtype}")
    _C.hist_magnitude_low(_in(x.reshape(-1)), _out(hist, "hist"), int(prefix), _threads())


def hist_magnitude_models(base, expert, hist):
    """``hist[abs_bits(fp32(expert) - fp32(base)) >> 16] += 1`` (hist: int64 [32768], in place);
    ``base`` and ``expert`` of one dtype and size."""
    _C.hist_magnitude_models(_in(base.reshape(-1)), _in(expert.reshape(-1)), _name(base), _out(hist, "hist"), _threads())


def hist_magnitude_low_models(base, expert, hist, prefix):
    """With ``x = fp32(expert) - fp32(base)``: ``hist[abs_bits(x) & 0xffff] += 1`` where
    ``abs_bits(x) >> 16 == prefix`` (hist: int64 [65536], in place)."""
    _C.hist_magnitude_low_models(
        _in(base.reshape(-1)), _in(expert.reshape(-1)), _name(base), _out(hist, "hist"), int(prefix), _threads()
    )


def count_window(x, hist, lo):
    """fp32 x, ``v = abs_bits(x)``: ``hist[0] += #(v < lo)``, ``hist[1 + v - lo] += 1`` for ``lo <= v <
    lo + len(hist) - 1`` (hist: int64, in place; the window within the finite magnitudes); returns
    the number of non-finite elements as an int."""
    if x.dtype != torch.float32:
        raise ValueError(f"count_window takes float32, got {x.dtype}")
    return _C.count_window(_in(x.reshape(-1)), _out(hist, "hist"), int(lo), _threads())


def count_window_models(base, expert, hist, lo):
    """``count_window`` over ``x = fp32(expert) - fp32(base)`` (one dtype and size), formed as it is
    counted; returns the number of non-finite elements of ``x``."""
    return _C.count_window_models(_in(base.reshape(-1)), _in(expert.reshape(-1)), _name(base), _out(hist, "hist"),
                                  int(lo), _threads())


def count_window_models_tasks(base, experts, hists, los):
    """``count_window_models`` of T tasks in one pass over the base and the T experts (one dtype and
    size): task t's window from ``los[t]`` (int) into ``hists[t]`` (int64 [1 + width_t], in place).
    Returns the T non-finite counts (a list of ints)."""
    nonfinite = np.zeros(len(experts), dtype=np.int64)
    _C.count_window_models_tasks(_in(base.reshape(-1)), [_in(x.reshape(-1)) for x in experts], _name(base),
                                 [_out(h, "hist") for h in hists], np.asarray(los, dtype=np.int64), nonfinite,
                                 _threads())
    return nonfinite.tolist()


def count_windows_models(base, experts, lo, hi, counts, cand):
    """The one-read selections of T tasks in one pass over the base and the T experts (one dtype
    and size): with ``v`` the fp32 magnitude bits of ``fp32(experts[t]) - fp32(base)`` and the
    window ``lo[t] <= hi[t] <= 0x7F800000`` (ints), ``counts[t]`` (int64 [T, 6], overwritten) =
    ``(#(v < lo), #(v == lo), candidates, #(v == hi) (0 when hi == lo), any non-finite v (0/1),
    overflow (0/1))`` and the candidates, the ``v`` with ``lo < v < hi``, in ``cand[t, :counts[t, 2]]``
    (int32 [T, cap], in no particular order; unusable where overflow is 1: they did not fit)."""
    _C.count_windows_models(
        _in(base.reshape(-1)),
        [_in(x.reshape(-1)) for x in experts],
        _name(base),
        np.asarray(lo, dtype=np.uint32),
        np.asarray(hi, dtype=np.uint32),
        _out(counts, "counts"),
        _out(cand, "cand").view(np.uint32),
        _threads(),
    )


def _blocks(blocks, ambiguous_blocks):
    """The block selection of a TIES pass: int64 indices (or None: every block) and the uint8
    flags [ceil(N / 1024)] to write (or None)."""
    return (
        None if blocks is None else _in(blocks.to(torch.int64)),
        None if ambiguous_blocks is None else _out(ambiguous_blocks, "ambiguous_blocks"),
    )


def ties_merge(tv, thresholds, weights, out, base, lam, sign_mode, disjoint, fill_sign, blocks=None,
               ambiguous_blocks=None, divisors=None):
    """Fused TIES pass into ``out``; returns ``(sign_sum, ambiguous, nonfinite)`` as Python ints
    (``nonfinite``: NaN/Inf inputs plus results that are NaN/Inf in ``out``'s dtype), counted over
    the blocks run: every block, or the ``blocks`` listed (int64 indices of 1024-element blocks;
    the others of ``out`` are left as they are). ``ambiguous_blocks`` (uint8 [ceil(N / 1024)]):
    set to 1 for each run block holding an ambiguous element, 0 for the other run blocks.
    ``divisors`` (fp32 [T] or None: the weights): "mean" divides by their sum over the agreeing
    tasks."""
    tv_np, dtype = _tv(tv)
    base_np, base_dtype = _base(base)
    sign_sum, ambiguous, nonfinite = _C.ties_merge(
        tv_np,
        dtype,
        _per_task(thresholds),
        _per_task(weights),
        _out(out, "out"),
        _name(out),
        base_np,
        base_dtype,
        float(lam),
        sign_mode,
        disjoint,
        int(fill_sign),
        *_blocks(blocks, ambiguous_blocks),
        _divisors(divisors),
        _threads(),
    )
    return int(sign_sum), int(ambiguous), int(nonfinite)


def ties_merge_models(base, experts, thresholds, weights, out, include_base, lam, sign_mode, disjoint, fill_sign,
                      blocks=None, ambiguous_blocks=None, keep=None, divisors=None, keep_bits=None):
    """``ties_merge`` on the task vectors ``fp32(experts[t]) - fp32(base)`` formed in registers
    (bit-identical to ``ties_merge`` on them precomputed in fp32), adding ``base`` to the result when
    ``include_base``; ``base`` and the T ``experts``: one dtype, ``out``'s element count. ``keep``:
    None, or DARE's draws ``(k0, k1, h, thresholds)`` (``RandomKeep.draw_key()``): entry i of task t
    is +0 unless its draw on stream t is below ``thresholds[t]``. The non-finite count covers the
    task vector entries (dropped or not), the base where it is added, and results. ``divisors``:
    as in ``ties_merge``. ``keep_bits``: None, or ``keep``'s flags as ``keep_l1_norms_models``
    recorded them (read instead of drawn again)."""
    sign_sum, ambiguous, nonfinite = _C.ties_merge_models(
        _in(base.reshape(-1)),
        [_in(x.reshape(-1)) for x in experts],
        _name(base),
        _per_task(thresholds),
        _per_task(weights),
        _out(out, "out"),
        _name(out),
        bool(include_base),
        float(lam),
        sign_mode,
        disjoint,
        int(fill_sign),
        *_blocks(blocks, ambiguous_blocks),
        _keep(keep),
        _divisors(divisors),
        _keep_bits(keep_bits),
        _threads(),
    )
    return int(sign_sum), int(ambiguous), int(nonfinite)


def _divisors(divisors):
    """The divisors of "mean" as the extension takes them: None (the weights), or fp32 [T]."""
    return None if divisors is None else _per_task(divisors)


def _keep(keep):
    """DARE's draws as the extension takes them: None, or ``(k0, k1, h, uint32 thresholds)``."""
    if keep is None:
        return None
    k0, k1, h, thresholds = keep
    return k0, k1, h, np.asarray(thresholds, dtype=np.uint32)


def task_arithmetic(tv, weights, out, base, lam):
    """``out = base + lam * sum_t weights[t] * tv[t]`` (fp32, task order); returns the count of NaN/Inf
    inputs and results (in ``out``'s dtype)."""
    tv_np, dtype = _tv(tv)
    base_np, base_dtype = _base(base)
    return int(
        _C.task_arithmetic(
            tv_np, dtype, _per_task(weights), _out(out, "out"), _name(out), base_np, base_dtype, float(lam), _threads()
        )
    )


def task_arithmetic_models(base, experts, weights, out, lam, include_base=True, keep=None, keep_bits=None):
    """``out = base + lam * sum_t weights[t] * (fp32(experts[t]) - fp32(base))`` (the task vectors formed in
    registers; bit-identical to ``task_arithmetic`` on them precomputed in fp32); without the ``base +``
    term unless ``include_base``; ``keep`` and ``keep_bits`` as in ``ties_merge_models``. ``base``
    and the T ``experts``: one dtype, ``out``'s element count. Returns the count of NaN/Inf task
    vector entries (dropped or not), base values (where added) and results (in ``out``'s dtype)."""
    return int(
        _C.task_arithmetic_models(
            _in(base.reshape(-1)),
            [_in(x.reshape(-1)) for x in experts],
            _name(base),
            _per_task(weights),
            _out(out, "out"),
            _name(out),
            float(lam),
            bool(include_base),
            _keep(keep),
            _keep_bits(keep_bits),
            _threads(),
        )
    )


def keep_l1_norms_models(base, experts, keep, norms, keep_bits=None):
    """DARE's L1 norms into ``norms`` (float64 [T, 2], in place): ``[t, 0]`` the L1 norm of
    ``fp32(experts[t]) - fp32(base)``, ``[t, 1]`` that of its entries that ``keep`` (as in
    ``ties_merge_models``, required) keeps, each summed in fp64 in ``nlmerge.ops.dare.l1_norm``'s
    order; non-finite where the task vector has NaN/Inf. ``base`` and the T ``experts``: one dtype.
    ``keep_bits`` (uint8 [T, keep_row_bytes(N)], optional): the keep flags are recorded there."""
    _C.keep_l1_norms_models(
        _in(base.reshape(-1)), [_in(x.reshape(-1)) for x in experts], _name(base), _keep(keep), _out(norms, "norms"),
        _keep_bits(keep_bits), _threads(),
    )


def _keep_bits(bits):
    """Recorded keep flags as the extension takes them: None, or uint8 (row t: task t's flags)."""
    return None if bits is None else _out(bits, "keep_bits")


def tall_masks(tv, tau_mtl, lam, out):
    """Bit-packed TALL masks into ``out`` uint8 [T, ceil(N/8)]; returns the non-finite count."""
    tv_np, dtype = _tv(tv)
    return int(
        _C.tall_masks(
            tv_np, dtype, _in(tau_mtl.reshape(-1)), _name(tau_mtl), _per_task(lam), _out(out, "out"), _threads()
        )
    )


def consensus(tv, tau_mtl, lam, k, out, base, alpha):
    """``out = base + alpha * (#masks >= k ? tau_mtl : 0)``; returns the count of NaN/Inf inputs and
    results (in ``out``'s dtype)."""
    tv_np, dtype = _tv(tv)
    base_np, base_dtype = _base(base)
    return int(
        _C.consensus(
            tv_np,
            dtype,
            _in(tau_mtl.reshape(-1)),
            _name(tau_mtl),
            _per_task(lam),
            int(k),
            _out(out, "out"),
            _name(out),
            base_np,
            base_dtype,
            float(alpha),
            _threads(),
        )
    )


def tall_masks_models(base, experts, tau_mtl, lam, out):
    """``tall_masks`` on ``fp32(experts[t]) - fp32(base)`` (formed in registers); returns the count of
    NaN/Inf task vector entries and tau_mtl values."""
    return int(
        _C.tall_masks_models(
            _in(base.reshape(-1)),
            [_in(x.reshape(-1)) for x in experts],
            _name(base),
            _in(tau_mtl.reshape(-1)),
            _name(tau_mtl),
            _per_task(lam),
            _out(out, "out"),
            _threads(),
        )
    )


def consensus_models(base, experts, tau_mtl, lam, k, out, alpha):
    """``consensus`` on ``fp32(experts[t]) - fp32(base)`` (formed in registers) with this base added:
    ``out = base + alpha * (#masks >= k ? tau_mtl : 0)``; returns the count of NaN/Inf task vector
    entries, tau_mtl and base values, and results (in ``out``'s dtype)."""
    return int(
        _C.consensus_models(
            _in(base.reshape(-1)),
            [_in(x.reshape(-1)) for x in experts],
            _name(base),
            _in(tau_mtl.reshape(-1)),
            _name(tau_mtl),
            _per_task(lam),
            int(k),
            _out(out, "out"),
            _name(out),
            float(alpha),
            _threads(),
        )
    )


def apply_mask(packed, tau_mtl, out, base):
    """``out = base + (bit ? tau_mtl : 0)``; without base an exact masked copy of ``tau_mtl``.
    Returns how many results are NaN/Inf in ``out``'s dtype (the inputs are checked by the caller)."""
    base_np, base_dtype = _base(base)
    return int(
        _C.apply_mask(
            _in(packed.reshape(-1)),
            _in(tau_mtl.reshape(-1)),
            _name(tau_mtl),
            _out(out, "out"),
            _name(out),
            base_np,
            base_dtype,
            _threads(),
        )
    )


def permute(srcs, outs, geometry, idx0, idx1):
    """Batched permutation gathers (CONTRACT.md, "Permutation gathers"), one C++ call for all.

    ``outs[k][o, i, m, j, u] = srcs[k][o, idx0[k][i], m, idx1[k][j], u]`` with both tensors viewed
    as contiguous ``[outer, A0, mid, A1, inner] = geometry[k]``; ``idx0[k]`` / ``idx1[k]`` are int64
    CPU tensors of length A0 / A1, or None for the identity. Values are copied as raw 2- or 4-byte
    words (exact, NaN payloads included).
    """
    geom = np.ascontiguousarray(np.asarray(geometry, dtype=np.int64).reshape(-1, 5))
    _C.permute(
        [_words(s.contiguous()) for s in srcs],
        [_words(o) for o in outs],  # the binding refuses a non-contiguous output
        geom,
        [None if p is None else _words(p.contiguous()) for p in idx0],
        [None if p is None else _words(p.contiguous()) for p in idx1],
        _threads(),
    )


def _words(t):
    """NumPy view of a CPU tensor's memory as whatever words it holds (raw copies need no dtype:
    16-bit floats become int16, the cheapest view); no copy."""
    if t.requires_grad:
        t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def channel_stats(x, outer, inner, shift, s, ss):
    """Per-channel shifted sums, in place (CONTRACT.md, "Channel statistics").

    ``x`` contiguous (float32, float16, bfloat16 or float64), viewed as ``[outer, C, inner]``;
    ``shift``, ``s``, ``ss`` contiguous float64 [C] CPU tensors. ``s[c] += sum(x - shift[c])``,
    ``ss[c] += sum((x - shift[c])**2)`` in float64; returns False, with ``s`` and ``ss``
    unchanged, when a new total is not finite (NaN/Inf in ``x``). Kept lean: it runs once per
    hooked activation.
    """
    return _C.channel_stats(
        _view(x), _STATS_NAMES[x.dtype], outer, shift.shape[0], inner, shift.numpy(), s.numpy(), ss.numpy(), _threads()
    )


def random_draws(out, key, stream, offset, threshold=None):
    """Philox4x32-10 draws of elements ``offset .. offset + out.numel() - 1`` into ``out``, in place
    (CONTRACT.md, "Random draws").

    ``out``: a contiguous CPU tensor whose dtype says what to write: int64 the 24-bit draws, float32
    their uniforms ``draw * 2**-24``, bool the keep flags ``draw < threshold`` (``threshold`` an int
    in [0, 2**24]). ``key``: ``(k0, k1, h)`` of ``nlmerge.ops.random.stream_key``; ``stream`` an int
    in [0, 2**32). The same values for any thread count and any cut of the range.
    """
    k0, k1, h = key
    _C.random_draws(
        _out(out, "out"), k0, k1, stream, h, offset, -1 if threshold is None else int(threshold), _threads()
    )

