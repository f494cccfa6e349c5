"""Exact magnitude selection: the TIES trim threshold.

``magnitude_threshold(x, keep)`` is the k-th smallest |x| with ``k = d - int(d * keep)`` over all
``d`` elements of ``x`` (one tensor or several taken together), as in the original TIES code.
The reference concatenates and calls ``kthvalue``; the fast backends never sort: they count the
bit patterns of |x| (for non-negative floats, integer order is float order) in radix histograms —
one pass over the 15 magnitude bits of fp16/bf16; two passes for fp32 (high 16 bits, then the low
16 bits of the elements in the selected high bin). Several tensors add into one histogram, so a
global threshold never concatenates the model.

The ``*_models`` forms select among the magnitudes of the task vectors ``fp32(expert) -
fp32(base)`` (fp32 values), which the C++ and Triton kernels form as they count; the reference
builds each fp32 task vector first.

fp32 magnitudes in one read (the C++ and Triton backends):

1. *sample*: a deterministic stratified sample of about ``SAMPLE_SIZE`` elements — one position
   drawn in each run of ``stride`` consecutive elements by a generator seeded from (seed, size,
   stride) (:func:`sample_positions`) — counted into a histogram of the high 16 bits of its
   magnitudes (``counts``: int64 [HIGH_BINS + 1], the last entry the number of elements the
   sample was drawn from). Reading the sample costs a few cache lines per thousand elements.
2. *bracket*: :func:`bracket` takes the sample ranks ``k * m / d -+ SAMPLE_SIGMAS`` standard
   deviations and returns the window of bit patterns ``[lo, lo + width)`` spanning their high-bit
   bins (at most ``WINDOW_BINS`` patterns; a wider span keeps the bins around the sample's own
   estimate).
3. *one pass* (:func:`count_window`): count the elements below the window and histogram, one bin
   per bit pattern, the elements inside it (int64 [1 + width]: a bounded, exact collection of the
   values in the bracket, whose counts add across tensors and processes).
4. *select*: when the window holds the k-th element (``below < k <= below + inside``) it is found
   exactly in the window (:func:`window_bits`); otherwise — the sample missed, which happens for
   about one input in 10^4 of ordinary data, for ranks near 1 or d, or for data built against the
   sample — the two histogram passes run (logged at debug level).
"""
import math
from collections.abc import Sequence

import numpy as np
import torch

from nlmerge.ops._checks import (
    check_finite,
    check_float,
    check_models,
    finite_scalar,
    first_nonfinite_model,
    model_task_vectors,
    raise_nonfinite,
    raise_nonfinite_model,
)
from nlmerge.ops._dispatch import log, resolve

HIGH_BINS = 1 << 15  # magnitude bits above the low 16 of fp32, or all 15 of a 16-bit float
LOW_BINS = 1 << 16
# first histogram bin of a non-finite magnitude (exponent all ones)
_NONFINITE_BIN = {torch.float32: 0x7F80, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SAMPLE_SIZE = 1 << 15  # elements in the one-read sample of an op (about; at least one per tensor;
# under torch's parallel grain, so that the sampling ops stay on one thread)
SAMPLE_SIGMAS = 4.0  # half-width of the bracket in standard deviations of the sample rank
WINDOW_BINS = 1 << 20  # most bit patterns in a window (its int64 histogram: 8 MiB)
# below this many elements the window's fixed cost (allocating and summing up to 8 MiB) outweighs
# the read it saves: the two histogram passes are faster (benchmarks/RESULTS.md, "one read")
ONE_READ_MIN_ELEMENTS = 1 << 25
_FINITE_HIGH = 0x7F80  # high-bit bins of finite fp32 magnitudes: [0, 0x7F80)


def _as_list(x):
    """Return ``(tensors, named)``: the tensors of ``x`` and ``(name, tensor, False)`` triples."""
    xs = [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, Sequence) else None
    if not xs:
        raise ValueError("x must be a tensor or a non-empty sequence of tensors")
    names = ["x"] if isinstance(x, torch.Tensor) else [f"x[{i}]" for i in range(len(xs))]
    for name, t in zip(names, xs):
        check_float(t, name)
        for what in ("dtype", "device"):
            if getattr(t, what) != getattr(xs[0], what):
                raise ValueError(f"{name} has {what} {getattr(t, what)} but x[0] has {what} {getattr(xs[0], what)}")
    if sum(t.numel() for t in xs) == 0:
        raise ValueError("x has no elements")
    return xs, [(name, t, False) for name, t in zip(names, xs)]


def kth_smallest_magnitude_reference(xs, k):
    """The specification: concatenate all |x| (exact in fp32) and take the k-th smallest."""
    magnitudes = torch.cat([t.detach().reshape(-1).float().abs() for t in xs])
    return magnitudes.kthvalue(k).values.to(xs[0].dtype)


def _radix_select(xs, k, kernels, names):
    dtype, device = xs[0].dtype, xs[0].device
    flat = [t.detach().reshape(-1).contiguous() for t in xs]
    if dtype == torch.float32 and hasattr(kernels, "count_window") and sum(t.numel() for t in flat) >= ONE_READ_MIN_ELEMENTS:
        def count(t, hist, lo):
            if count_window(kernels, t, hist, lo):
                raise_nonfinite(names)

        found = _one_read(flat, [t.numel() for t in flat], k, add_sample, count, device)
        if found is not None:
            return torch.tensor(found, dtype=torch.int32).view(torch.float32).to(device)
    high = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
    shift = 16 if dtype == torch.float32 else 0
    for t in flat:
        kernels.hist_magnitude(t, high, shift)
    if int(high[_NONFINITE_BIN[dtype]:].sum()):
        raise_nonfinite(names)
    bin_, rank = _locate(high, k)
    if dtype == torch.float32:
        low = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
        for t in flat:
            kernels.hist_magnitude_low(t, low, bin_)
        low_bin, _ = _locate(low, rank)
        bin_ = (bin_ << 16) | low_bin
    bits = torch.tensor(bin_, dtype=_INT_VIEW[dtype])
    return bits.view(dtype).to(device)


def _locate(hist, k):
    """Return ``(bin, rank)``: the bin holding the k-th counted element and its rank inside it."""
    cumulative = hist.cumsum(0)
    bin_ = int(torch.searchsorted(cumulative, torch.tensor([k], device=hist.device)))
    below = int(cumulative[bin_ - 1]) if bin_ else 0
    return bin_, k - below


def sample_stride(d):
    """Stride of the one-read sample over ``d`` elements: about ``SAMPLE_SIZE`` samples."""
    return max(1, d // SAMPLE_SIZE)


def sample_positions(n, stride, seed=0):
    """Positions of the sample of a flat tensor of ``n`` elements: int64 [ceil(n / stride)] on the
    CPU, one drawn uniformly in each run ``[j * stride, min((j + 1) * stride, n))``. A function of
    ``(n, stride, seed)`` only (a generator seeded from them): the same in every run and process."""
    m = -(-n // stride)
    generator = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + n * 0xBF58476D1CE4E5B9 + stride) % (1 << 63))
    start = torch.arange(m, dtype=torch.int64) * stride
    span = (n - start).clamp(max=stride)
    return start + (torch.rand(m, dtype=torch.float64, generator=generator) * span).to(torch.int64)


def _count_sample(counts, values, n):
    """Add sampled magnitudes ``values`` (fp32, drawn from ``n`` elements) to ``counts``."""
    counts[:HIGH_BINS] += torch.bincount(_fp32_bits(values) >> 16, minlength=HIGH_BINS)[:HIGH_BINS].to(counts.device)
    counts[HIGH_BINS] += n


def add_sample(counts, x, stride, seed=0):
    """Add the sample of ``x`` (any float dtype and device; its magnitudes in fp32) to ``counts``
    (int64 [HIGH_BINS + 1]: the high-16-bit histogram of the sampled magnitudes, then the number of
    elements sampled from). Reads ``ceil(numel / stride)`` elements; non-finite ones are counted
    like others (the counting pass refuses them)."""
    flat = x.detach().reshape(-1)
    pos = sample_positions(flat.numel(), stride, seed).to(flat.device)
    _count_sample(counts, flat.index_select(0, pos).float(), flat.numel())


def add_sample_models(counts, base, expert, stride, seed=0):
    """``add_sample`` of the task vector ``fp32(expert) - fp32(base)`` (flat tensors of one size),
    reading only the sampled elements of both."""
    add_sample_models_tasks([counts], base, [expert], stride, seed)


def add_sample_models_tasks(counts, base, experts, stride, seed=0):
    """``add_sample_models(counts[t], base, experts[t], stride, seed)`` for the T tasks of one key,
    reading the base's sampled elements once (every task samples the same positions)."""
    for c, values in zip(counts, _sampled_task_vectors(base, experts, stride, seed)):
        _count_sample(c, values, base.numel())


def _sampled_task_vectors(base, experts, stride, seed=0):
    """The T task vectors ``fp32(experts[t]) - fp32(base)`` at the sample positions of ``base``'s
    size (:func:`sample_positions`), reading only those elements: fp32 [T, ceil(numel / stride)]."""
    b = base.detach().reshape(-1)
    pos = sample_positions(b.numel(), stride, seed).to(b.device)
    ref = b.index_select(0, pos).float()
    return torch.stack([e.detach().reshape(-1).index_select(0, pos).float() - ref for e in experts])


def bracket(counts, k):
    """The window ``(lo, width)`` of fp32 magnitude bit patterns ``[lo, lo + width)`` that holds
    the k-th smallest magnitude (``1 <= k <= d``) unless the sample misled.

    ``counts``: int64 [HIGH_BINS + 1] from ``add_sample*`` (``d`` is its last entry, at least one
    sample). The window spans the high-16-bit bins of the sample ranks ``k * m / d -+
    (SAMPLE_SIGMAS * sqrt(m p (1 - p)) + 1)`` (``p = k / d``; from bin 0 / to the last finite bin
    where a rank falls outside the sample), at most ``WINDOW_BINS`` patterns: a wider span keeps
    the bins around the sample's estimate, rank ``k * m / d``. Finite magnitudes only.
    """
    counts = counts.cpu()
    d, hist = int(counts[HIGH_BINS]), counts[:HIGH_BINS]
    m = int(hist.sum())
    if m < 1 or not 1 <= k <= d:
        raise ValueError(f"bracket needs a sample and 1 <= k <= d = {d}, got {m} samples and k = {k}")
    cumulative = hist.cumsum(0)

    def bin_of(rank):  # the high-bit bin of the sample's rank-th smallest magnitude, finite
        rank = min(max(rank, 1), m)
        return min(int(torch.searchsorted(cumulative, torch.tensor([rank]))), _FINITE_HIGH - 1)

    p = k / d
    rank = k * m / d
    margin = SAMPLE_SIGMAS * math.sqrt(m * p * (1 - p)) + 1
    first = 0 if rank - margin < 1 else bin_of(math.floor(rank - margin))
    last = _FINITE_HIGH - 1 if rank + margin > m else bin_of(math.ceil(rank + margin))
    bins = min(last - first + 1, WINDOW_BINS >> 16)
    first = min(max(bin_of(round(rank)) - bins // 2, first), last - bins + 1)
    return first << 16, bins << 16


def count_window(kernels, x, hist, lo):
    """The one-read pass over the fp32 magnitudes ``v`` of ``x`` (flat, any float dtype):
    ``hist[0] += #(v < lo)``, ``hist[1 + v - lo] += 1`` for ``v`` in the window ``[lo, lo + len(hist)
    - 1)`` (hist int64 on x's device, in place). Returns the number of non-finite elements.
    ``kernels`` with ``count_window`` (C++ and Triton, fp32 x): fused; else torch ops."""
    if kernels is not None and hasattr(kernels, "count_window") and x.dtype == torch.float32:
        return kernels.count_window(x, hist, lo)
    bits = _fp32_bits(x)
    width = hist.numel() - 1
    hist[0] += (bits < lo).sum()
    inside = bits[(bits >= lo) & (bits < lo + width)] - lo
    hist[1:] += torch.bincount(inside, minlength=width)
    return int((bits >= 0x7F800000).sum())


def count_window_models(kernels, base, expert, hist, lo):
    """``count_window`` over the task vector ``fp32(expert) - fp32(base)`` (flat, one dtype), which
    the C++ and Triton kernels form as they count."""
    if kernels is not None and hasattr(kernels, "count_window_models"):
        return kernels.count_window_models(base, expert, hist, lo)
    return count_window(None, expert.float() - base.float(), hist, lo)


def window_bits(hist, lo, k):
    """The bit pattern (int) of the k-th smallest magnitude counted by ``count_window`` into
    ``hist`` with window start ``lo``, or None when the window does not hold it."""
    below = int(hist[0])
    cumulative = hist[1:].cumsum(0)
    if k <= below or below + int(cumulative[-1]) < k:
        return None
    return lo + int(torch.searchsorted(cumulative, torch.tensor([k - below], device=hist.device)))


def _one_read(sources, sizes, k, add, count, device=None):
    """The k-th smallest fp32 magnitude's bit pattern over ``sources`` (of ``sizes`` elements, on
    ``device``, default the CPU) in one read, or None when the sample's bracket misses. ``add(counts, source,
    stride)`` samples a source, ``count(source, hist, lo)`` counts it (raising on non-finite values)."""
    stride = sample_stride(sum(sizes))
    counts = torch.zeros(HIGH_BINS + 1, dtype=torch.int64)
    for source in sources:
        add(counts, source, stride)
    lo, width = bracket(counts, k)
    hist = torch.zeros(width + 1, dtype=torch.int64, device=device)  # where the kernels count
    for source in sources:
        count(source, hist, lo)
    found = window_bits(hist, lo, k)
    if found is None:
        log.debug("nlmerge.ops.selection: the sample's bracket missed the k-th magnitude (k = %d, %d below "
                  "[%#x, %#x)); two histogram passes", k, int(hist[0]), lo, lo + width)
    return found


def kth_smallest_magnitude(x, k, *, backend=None):
    """Exact k-th smallest magnitude (1-based) of a tensor or of several tensors taken together.

    Parameters
    ----------
    x : Tensor or sequence of Tensor
        fp32, fp16 or bf16, one dtype and device; any shapes.
    k : int
        Rank, ``1 <= k <= d`` with ``d`` the total number of elements.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        0-dim, in ``x``'s dtype and device, bit-identical across backends.
    """
    xs, named = _as_list(x)
    d = sum(t.numel() for t in xs)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
    name, kernels = resolve(backend, xs[0].device, "kth_smallest_magnitude")
    if kernels is None:
        check_finite(named)
        return kth_smallest_magnitude_reference(xs, k)
    return _radix_select(xs, k, kernels, named)


def magnitude_threshold(x, keep, *, backend=None):
    """The TIES trim threshold: keep the ``keep`` fraction of largest magnitudes.

    Returns the k-th smallest ``|x|`` with ``k = d - int(d * keep)`` over all ``d`` elements of
    ``x`` taken together; the TIES mask is then ``|x| >= threshold``. ``keep >= 1`` returns 0
    (everything kept); so does a ``keep`` so close to 1 that ``int(d * keep) == d``.

    Parameters
    ----------
    x : Tensor or sequence of Tensor
        One task vector, or all tensors of one task for a global threshold (never concatenated
        on the fast backends: their histograms are summed).
    keep : float
        Fraction kept, in (0, 1]; ``<= 0`` or non-finite raises ValueError.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        0-dim threshold in ``x``'s dtype, exact (bit-identical across backends).
    """
    xs, named = _as_list(x)
    keep = _keep_fraction(keep, "keep")
    d = sum(t.numel() for t in xs)
    k = d - int(d * keep)
    if k < 1:
        # still refuse NaN/Inf: a threshold of 0 must not let a non-finite tensor through
        check_finite(named)
        return torch.zeros((), dtype=xs[0].dtype, device=xs[0].device)
    return kth_smallest_magnitude(x, k, backend=backend)


def _keep_fraction(value, name):
    """``value`` as the fraction of magnitudes a TIES trim keeps: a finite float > 0 (errors name ``name``)."""
    value = finite_scalar(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (the fraction of magnitudes kept), got {value}")
    return value


def _fp32_bits(x):
    """The fp32 magnitudes of ``x`` as int64 bit patterns (integer order is float order)."""
    return x.detach().reshape(-1).float().abs().view(torch.int32).to(torch.int64)


def count_models(kernels, base, expert, hist, prefix=None):
    """Add the magnitudes of the task vector ``fp32(expert) - fp32(base)`` (flat tensors of one
    dtype) to ``hist``: the high 16 bits (``prefix`` None; int64 [HIGH_BINS]) or, of the elements
    whose high bits are ``prefix``, the low 16 bits (int64 [LOW_BINS]). ``kernels`` None: the
    reference (``torch.bincount`` of the fp32 task vector); the C++ and Triton kernels form the task
    vector as they count."""
    if kernels is not None:
        if prefix is None:
            kernels.hist_magnitude_models(base, expert, hist)
        else:
            kernels.hist_magnitude_low_models(base, expert, hist, prefix)
        return
    bits = _fp32_bits(expert.float() - base.float())
    if prefix is None:
        hist += torch.bincount(bits >> 16, minlength=HIGH_BINS)[:HIGH_BINS]
    else:
        hist += torch.bincount(bits[(bits >> 16) == prefix] & 0xFFFF, minlength=LOW_BINS)[:LOW_BINS]


def _model_pairs(base, expert):
    """``[(flat base, flat expert), ...]`` of one tensor pair or of paired sequences (checked)."""
    bases = [base] if isinstance(base, torch.Tensor) else list(base) if isinstance(base, Sequence) else None
    experts = [expert] if isinstance(expert, torch.Tensor) else list(expert) if isinstance(expert, Sequence) else None
    if not bases or experts is None or len(bases) != len(experts):
        raise ValueError("base and expert must be two tensors, or two sequences of as many tensors")
    pairs = []
    for i, (b, e) in enumerate(zip(bases, experts)):
        try:
            flat_base, (flat,) = check_models(b, [e])
        except ValueError as err:
            raise ValueError(f"pair {i}: {err}") from None
        pairs.append((flat_base.contiguous(), flat.contiguous()))
    if sum(b.numel() for b, _ in pairs) == 0:
        raise ValueError("the task vector has no elements")
    return pairs


def _check_pairs(pairs):
    """Raise NonFiniteError for the first non-finite base, expert or task vector of ``pairs``."""
    for b, e in pairs:
        err = first_nonfinite_model(b, [e], ["expert"])
        if err is not None:
            raise err


def kth_smallest_magnitude_models(base, expert, k, *, backend=None):
    """Exact k-th smallest magnitude (1-based) of the task vector ``fp32(expert) - fp32(base)``.

    Parameters
    ----------
    base, expert : Tensor, or two sequences of as many Tensors
        fp32, fp16 or bf16; each expert tensor has its base tensor's shape and device (several
        pairs: the task vector of several tensors taken together, never concatenated).
    k : int
        Rank, ``1 <= k <= d`` with ``d`` the total number of elements.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        0-dim fp32 on the tensors' device: bit-identical to ``kth_smallest_magnitude`` of the fp32
        task vectors (the reference, ``backend="torch"``).

    Raises
    ------
    NonFiniteError
        NaN/Inf in a base (``"base"``), an expert (``"expert"``) or a difference overflowing fp32.
    """
    pairs = _model_pairs(base, expert)
    d = sum(b.numel() for b, _ in pairs)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
    device = pairs[0][0].device
    _, kernels = resolve(backend, device, "kth_smallest_magnitude_models")
    if kernels is None:
        _check_pairs(pairs)
        return kth_smallest_magnitude_reference([model_task_vectors(b, [e])[0] for b, e in pairs], k)
    if hasattr(kernels, "count_window_models") and sum(b.numel() for b, _ in pairs) >= ONE_READ_MIN_ELEMENTS:
        def count(pair, hist, lo):
            if count_window_models(kernels, *pair, hist, lo):
                _check_pairs([pair])
                raise AssertionError("a kernel counted non-finite values that torch.isfinite does not see")

        found = _one_read(pairs, [b.numel() for b, _ in pairs], k, lambda c, pair, stride: add_sample_models(c, *pair, stride),
                          count, device)
        if found is not None:
            return _as_fp32(found, device)
    return _two_passes_models(kernels, pairs, k)


def _two_passes_models(kernels, pairs, k):
    """The exact k-th smallest magnitude of the task vector of ``pairs`` by the two histogram passes
    (high 16 bits, then the low 16 bits in the selected bin): 0-dim fp32 on the pairs' device."""
    device = pairs[0][0].device
    high = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
    for b, e in pairs:
        count_models(kernels, b, e, high)
    if int(high[_NONFINITE_BIN[torch.float32]:].sum()):
        _check_pairs(pairs)
        raise AssertionError("a kernel counted non-finite values that torch.isfinite does not see")
    bin_, rank = _locate(high, k)
    low = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
    for b, e in pairs:
        count_models(kernels, b, e, low, bin_)
    low_bin, _ = _locate(low, rank)
    return _as_fp32((bin_ << 16) | low_bin, device)


def _as_fp32(bits, device):
    """The fp32 value of the bit pattern ``bits`` (int), 0-dim on ``device``."""
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(device)


def magnitude_threshold_models(base, expert, keep, *, backend=None):
    """The TIES trim threshold of the task vector ``fp32(expert) - fp32(base)``: the k-th smallest
    magnitude with ``k = d - int(d * keep)`` (0 when ``k < 1``, after the finiteness check), as
    ``magnitude_threshold`` of the fp32 task vector, bit for bit.

    Parameters
    ----------
    base, expert : as in ``kth_smallest_magnitude_models``
    keep : float
        Fraction kept, > 0.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        0-dim fp32 threshold.
    """
    pairs = _model_pairs(base, expert)
    keep = _keep_fraction(keep, "keep")
    d = sum(b.numel() for b, _ in pairs)
    k = d - int(d * keep)
    if k < 1:
        _check_pairs(pairs)  # a threshold of 0 must not let a non-finite input through
        return torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    return kth_smallest_magnitude_models([b for b, _ in pairs], [e for _, e in pairs], k, backend=backend)


def magnitude_thresholds_models(base, experts, keep, *, backend=None):
    """The TIES trim thresholds of T task vectors ``fp32(experts[t]) - fp32(base)``, each over one
    tensor or several taken together (a global threshold), in one read of the base and the experts.

    Entry t is bit-identical to ``magnitude_threshold_models(base, experts[t], keep[t])``: the k-th
    smallest magnitude with ``k = d - int(d * keep)`` over the task's ``d`` elements (0 when ``k <
    1``, after the finiteness check), selected by :func:`kth_smallest_magnitudes_models`.

    Parameters
    ----------
    base, experts, backend : as in :func:`kth_smallest_magnitudes_models` (one tensor, or several
        taken together; T tasks)
    keep : float or sequence of T float
        Fraction of magnitudes kept (> 0), one for all tasks or one per task.

    Returns
    -------
    Tensor
        fp32 [T] on the tensors' device.

    Raises
    ------
    ValueError, NonFiniteError
        As :func:`kth_smallest_magnitudes_models`; ValueError for a bad ``keep``.
    """
    tensors = _task_tensors(base, experts)
    keeps = list(keep) if isinstance(keep, Sequence) and not isinstance(keep, str) else [keep] * len(experts)
    if len(keeps) != len(experts):
        raise ValueError(f"keep must be one fraction or {len(experts)} (one per task), got {len(keeps)}")
    keeps = [_keep_fraction(value, f"keep[{t}]") for t, value in enumerate(keeps)]
    d = sum(b.numel() for b, _ in tensors)
    if d == 0:
        raise ValueError("the task vectors have no elements")
    ranks = [d - int(d * value) for value in keeps]
    trimmed = [t for t, k in enumerate(ranks) if k >= 1]
    if len(trimmed) < len(ranks):  # a threshold of 0 must not let a non-finite input through
        err = _first_nonfinite([(b, [xs[t] for t in range(len(ranks)) if ranks[t] < 1]) for b, xs in tensors])
        if err is not None:
            raise err
    thresholds = torch.zeros(len(ranks), dtype=torch.float32, device=tensors[0][0].device)
    if trimmed:
        thresholds[trimmed] = _kth_smallest_magnitudes([(b, [xs[t] for t in trimmed]) for b, xs in tensors],
                                                       [ranks[t] for t in trimmed], backend)
    return thresholds


# Several tasks' thresholds over one tensor of the models in one read (kth_smallest_magnitudes_models).
# Per task, a window ``lo <= hi`` of magnitude bits is taken from a sample's sorted magnitudes (the
# sample ranks ``k * m / d -+`` SAMPLE_SIGMAS standard deviations); one pass over the base and the
# T experts counts, per task, the magnitudes below lo, equal to lo and equal to hi (ties at the edges
# are counted, never collected), and collects those strictly between; the k-th is then lo, hi, or the
# right candidate (``torch.kthvalue``). Candidates are about ``2 * margin / m`` of the elements (2 % at
# p = 0.7 with 2^15 samples), so the fixed costs scale with the tensor; a window that misses or whose
# candidates overflow the buffer (sized from the sample: twice its estimate) falls back to the two passes.
WINDOWS_SAMPLE = 1 << 14  # sampled elements (about): fewer than one-read's, the gathers cost more than
# the candidates they save (about 3 % of the elements at p = 0.7)
WINDOWS_MIN_STRIDE = 256  # a sample of at most 1 element in 256: its gathers stay a small part of a read
_CANDIDATE_FACTOR = 2  # candidate slots: this many times the sample's estimate, plus
_CANDIDATE_SLACK = 1 << 12  # (the threads' shares of the buffer vary)
PARTITION_MAX = 1 << 18  # candidates selected among by introselect; more: by radix histograms


def _sorted_sample_models(tensors, stride):
    """The sorted fp32 magnitude bits (int32 [T, m]) of the task vectors at the sample positions of
    every tensor (``tensors``: ``[(flat base, [flat expert of each task])]``)."""
    rows = [_sampled_task_vectors(base, experts, stride).abs().view(torch.int32) for base, experts in tensors]
    bits = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    if bits.device.type == "cpu":  # numpy's sort: 0.25 ms for [3, 2^15], torch's (2.13): 8 ms
        return torch.from_numpy(np.sort(bits.numpy(), axis=1))
    return bits.sort(dim=1).values


def _window(sample, k, d):
    """``(lo, hi, inside)``: the window of magnitude bits for rank ``k`` of ``d`` from one task's sorted
    sample bits (int32 [m], finite), and how many sampled magnitudes lie strictly between lo and hi."""
    m = sample.numel()
    p = k / d
    rank = k * m / d
    margin = SAMPLE_SIGMAS * math.sqrt(m * p * (1 - p)) + 1
    first, last = math.floor(rank - margin), math.ceil(rank + margin)
    lo = int(sample[first - 1]) if first >= 1 else 0
    hi = int(sample[last - 1]) if last <= m else _FINITE_HIGH << 16
    after_lo = torch.searchsorted(sample, torch.tensor([lo], dtype=torch.int32, device=sample.device), right=True)
    before_hi = torch.searchsorted(sample, torch.tensor([hi], dtype=torch.int32, device=sample.device))
    return lo, hi, max(0, int(before_hi) - int(after_lo))


def _window_bits(counts, cand, lo, hi, k, kernels):
    """The k-th smallest magnitude's bits from one task's window count (``counts``: the six counts of
    ``count_windows_models``, ``cand`` its candidate row), or None when the window does not hold it."""
    below, at_lo, inside, at_hi, _, overflow = counts
    if overflow or k <= below:
        return None
    if k <= below + at_lo:
        return lo
    r = k - below - at_lo
    if r <= inside:
        if cand.device.type != "cpu":
            return int(cand[:inside].kthvalue(r).values)
        if inside <= PARTITION_MAX:  # numpy's introselect: 0.07 ms for 150K, torch.kthvalue (2.13): 1.7 ms
            return int(np.partition(cand[:inside].numpy(), r - 1)[r - 1])
        # many candidates (a 16-bit model's task vectors take few values, each very often): the
        # radix histograms, threaded, of the bits as the fp32 magnitudes they are (1.3M of 1.9K
        # distinct values: 4 ms, introselect 19 ms)
        inside_bits = cand[:inside].view(torch.float32)  # finite: below hi
        return int(_radix_select([inside_bits], r, kernels, [("candidates", inside_bits, False)]).view(torch.int32))
    return hi if r <= inside + at_hi else None


def _check_ranks(ks, num, d):
    ks = list(ks) if isinstance(ks, Sequence) else None
    if ks is None or len(ks) != num:
        raise ValueError(f"ks must be a sequence of {num} ranks, one per expert, got {ks!r}")
    for t, k in enumerate(ks):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise ValueError(f"ks[{t}] must be an integer in [1, {d}], got {k!r}")
    return ks


def _task_tensors(base, experts):
    """``[(flat base, [flat expert of each task])]``, one entry per tensor: ``base`` a Tensor (each of
    the T ``experts`` a Tensor) or a sequence of N tensors (each of the T experts a sequence of N)."""
    if isinstance(experts, torch.Tensor) or not isinstance(experts, Sequence) or not experts:
        raise ValueError("experts must be a non-empty sequence with one entry per task")
    if isinstance(base, torch.Tensor):
        return [check_models(base, list(experts))]
    bases = list(base) if isinstance(base, Sequence) else []
    if not bases:
        raise ValueError("base must be a tensor or a non-empty sequence of tensors")
    for t, task in enumerate(experts):
        if isinstance(task, torch.Tensor) or not isinstance(task, Sequence) or len(task) != len(bases):
            raise ValueError(f"experts[{t}] must be a sequence of {len(bases)} tensors, paired with the base's")
    tensors = []
    for i, b in enumerate(bases):
        try:
            tensors.append(check_models(b, [task[i] for task in experts]))
        except ValueError as err:
            raise ValueError(f"tensor {i}: {err}") from None
    return tensors


def kth_smallest_magnitudes_models(base, experts, ks, *, backend=None):
    """Exact k-th smallest magnitudes of T task vectors ``fp32(experts[t]) - fp32(base)``, one per
    task with its own rank ``ks[t]``, each over one tensor or several taken together (never
    concatenated), in one read of the base and the T experts.

    Each entry is bit-identical to ``kth_smallest_magnitude_models(base, experts[t], ks[t])``. The C++
    and Triton backends count all tasks' sample-bracketed windows in one pass
    (``count_windows_models`` per tensor, the candidates of all tensors selected among together; a
    task whose window misses runs the two histogram passes); the reference (``backend="torch"``)
    selects in each fp32 task vector.

    Parameters
    ----------
    base : Tensor or sequence of Tensor
        fp32, fp16 or bf16, any shapes (d > 0 elements in all).
    experts : sequence of T
        T >= 1 entries, each what ``base`` is: a Tensor of ``base``'s shape and device, or a sequence
        of as many tensors, paired with the base's (a dtype other than the base's: that tensor's
        models in fp32).
    ks : sequence of int
        T ranks, ``1 <= ks[t] <= d``.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        fp32 [T] on the tensors' device.

    Raises
    ------
    ValueError
        Mismatched shapes or devices (naming the tensor and the expert), no elements, ``ks`` not T
        ranks in [1, d].
    NonFiniteError
        NaN/Inf in the base (``"base"``), expert t (``"experts"``, task t) or a difference overflowing
        fp32 (``"task_vectors"``, task t).
    """
    tensors = _task_tensors(base, experts)
    d = sum(b.numel() for b, _ in tensors)
    if d == 0:
        raise ValueError("the task vectors have no elements")
    return _kth_smallest_magnitudes(tensors, _check_ranks(ks, len(experts), d), backend)


def _kth_smallest_magnitudes(tensors, ks, backend):
    """``kth_smallest_magnitudes_models`` of checked ``tensors`` (as ``_task_tensors`` gives) and ranks."""
    device = tensors[0][0].device
    _, kernels = resolve(backend, device, "kth_smallest_magnitudes_models")
    if kernels is None:
        err = _first_nonfinite(tensors)
        if err is not None:
            raise err
        tvs = [model_task_vectors(b, xs) for b, xs in tensors]
        return torch.stack([kth_smallest_magnitude_reference([tv[t] for tv in tvs], k) for t, k in enumerate(ks)])
    tensors = [(b.contiguous(), [x.contiguous() for x in xs]) for b, xs in tensors]
    found = [None] * len(ks)
    if hasattr(kernels, "count_windows_models"):
        found = _windows_models(kernels, tensors, ks)
    return torch.stack([
        _as_fp32(bits, device) if bits is not None else _two_passes_models(kernels, [(b, xs[t]) for b, xs in tensors], k)
        for t, (k, bits) in enumerate(zip(ks, found))])


def _first_nonfinite(tensors):
    """NonFiniteError for the first tensor whose base, expert t or task vector t is not finite, or None."""
    return next((err for err in (first_nonfinite_model(b, xs) for b, xs in tensors) if err is not None), None)


def _raise_counted_nonfinite(tensors):
    """A kernel counted non-finite values: raise naming the first (an AssertionError if none is)."""
    err = _first_nonfinite(tensors[:-1])
    if err is not None:
        raise err
    raise_nonfinite_model(*tensors[-1])


def _windows_models(kernels, tensors, ks):
    """The bit patterns of the T k-th magnitudes over ``tensors`` (as ``_task_tensors`` gives, flat
    and contiguous) from one window pass (None for a task whose window missed); raises
    NonFiniteError on NaN/Inf in the sample or the pass."""
    d = sum(b.numel() for b, _ in tensors)
    num = len(ks)
    stride = max(WINDOWS_MIN_STRIDE, d // WINDOWS_SAMPLE)
    sample = _sorted_sample_models(tensors, stride)
    if int(sample[:, -1].max()) >= _FINITE_HIGH << 16:
        _raise_counted_nonfinite(tensors)
    windows = [_window(row, k, d) for row, k in zip(sample, ks)]
    m = sample.shape[1]
    cap = min(d, max(_CANDIDATE_FACTOR * inside * d // m for _, _, inside in windows)) + _CANDIDATE_SLACK
    device = tensors[0][0].device
    lo, hi = [w[0] for w in windows], [w[1] for w in windows]
    cand = torch.empty(num, cap, dtype=torch.int32, device=device)
    part = torch.empty(num, 6, dtype=torch.int64, device=device)
    if len(tensors) == 1:  # the kernel collects into cand itself
        kernels.count_windows_models(tensors[0][0], tensors[0][1], lo, hi, part, cand)
        counts = part.tolist()
    else:  # each tensor's candidates into a scratch buffer, appended to its task's row of cand
        scratch = torch.empty(num * min(cap, max(b.numel() for b, _ in tensors)), dtype=torch.int32, device=device)
        counts = [[0] * 6 for _ in range(num)]
        for b, xs in tensors:
            room = min(cap, b.numel())
            rows = scratch[:num * room].view(num, room)
            kernels.count_windows_models(b, xs, lo, hi, part, rows)
            for t, (total, got) in enumerate(zip(counts, part.tolist())):
                if got[5] or total[2] + got[2] > cap:
                    total[5] = 1  # this task's candidates do not fit: it falls back
                elif got[2] and not total[5]:
                    cand[t, total[2]:total[2] + got[2]] = rows[t, :got[2]]
                for j in range(4):
                    total[j] += got[j]
                total[4] |= got[4]
    if any(c[4] for c in counts):
        _raise_counted_nonfinite(tensors)
    found = [_window_bits(c, row, lo_t, hi_t, k, kernels) for c, row, lo_t, hi_t, k in zip(counts, cand, lo, hi, ks)]
    for t, bits in enumerate(found):
        if bits is None:
            log.debug("nlmerge.ops.selection: task %d's window [%#x, %#x] missed the k-th magnitude (k = %d, "
                      "counts %s); two histogram passes", t, lo[t], hi[t], ks[t], counts[t])
    return found
