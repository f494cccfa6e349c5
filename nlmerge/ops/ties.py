"""Fused TIES merging and task arithmetic over T stacked task vectors; task arithmetic over the
models themselves (``task_arithmetic_models``: the task vectors are formed as the kernel reads).

TIES (DESIGN.md, "Semantics"), per element with ``x_t`` the task vectors in fp32:
trim ``x_t`` to 0 where ``|x_t| < thr_t``; elect ``s = sign(sum_t w_t x_t)`` ("mass") or
``sign(sum_t sign(x_t))`` ("count"); zero signs take ``fill_sign``; keep the entries that agree
with ``s`` and merge them ("mean": weighted sum over the summed weights, or over the summed
``divisors`` when given, "sum", "max": largest magnitude times ``s``); return ``base + lam *
merged``. The fast kernels read every input element once per pass and allocate only the output.

The ``*_models`` ops take the base and the experts themselves (their storage dtype) and form the
task vectors ``fp32(expert) - fp32(base)`` as they read them (the C++ and Triton kernels; the
reference builds the fp32 task vectors first): bit-identical to the stacked-task-vector ops on
``model_task_vectors(base, experts)``, which define them. With ``random_keep`` (DARE's draws,
:mod:`nlmerge.ops.dare`) the task vectors' dropped entries are +0: bit-identical to the same ops on
``keep_task_vectors(base, experts, random_keep)``.

The zero-sign rule of TIES ("majority": the sign of the sum of all elected signs over the scope)
needs the whole scope before any element can be finished. A pass also returns the scope's sign
sum, how many elements were ambiguous (zero sign, some non-zero trimmed entry) and which blocks of
``BLOCK`` elements hold them; only when there are some, and the majority's fill would write
something else than the pass's fill (``same_fill_result``), are those blocks recomputed with the
majority sign (``complete_ties_pass``). A pass with ``fill_sign="sample"`` fills with the majority
of a sample of its blocks: right whenever the tensor's majority is clear.

Results are written in ``out_dtype`` (default: the base's dtype, else the task vectors'); a result
that is not finite there (an overflow: inputs are checked) raises ``NonFiniteResultError``. The
fast kernels count such results as they store them, so the check costs no extra read.
"""
from typing import NamedTuple

import torch

from nlmerge.ops._checks import (
    NonFiniteError,
    check_finite,
    check_models,
    check_out_dtype,
    check_finite_result,
    finite_scalar,
    first_nonfinite_model,
    flat_like,
    per_task,
    raise_counted,
    result_error,
    stack_task_vectors,
    via_task_vectors,
)
from nlmerge.ops._dispatch import resolve
from nlmerge.ops.dare import check_random_keep, keep_task_vectors
from nlmerge.ops.selection import magnitude_thresholds_models

SIGN_MODES = ("mass", "count")
DISJOINT_MODES = ("mean", "sum", "max")
BLOCK = 1024  # elements of a block of a TIES pass (``ambiguous_blocks``, ``blocks=``): the fast kernels' block
SAMPLE_BLOCKS = 256  # blocks whose elected signs predict a tensor's majority sign (``fill_sign="sample"``)


class TiesPass(NamedTuple):
    """One TIES pass: the merged tensor, the sum of elected signs, the count of ambiguous elements,
    whether the result overflowed its dtype (only ever True with ``check_result=False``), and the
    indices (a tuple of ascending ints: passes compare as tuples) of the blocks of ``BLOCK``
    elements of the flat tensor that hold an ambiguous element (None for a pass run with
    ``blocks=``), and the sign that filled zero elections (``fill_sign``, or the sample's majority
    for ``fill_sign="sample"``)."""

    merged: torch.Tensor
    sign_sum: int
    ambiguous: int
    overflow: bool = False
    ambiguous_blocks: tuple = None
    fill_sign: int = 0


def _ties_reference_elements(tv, thresholds, weights, base, lam, sign, disjoint, fill_sign, dtype, divisors=None):
    """The TIES pass written out on ``tv`` [T, N]: ``(out, s0, ambiguous)`` with the elected signs
    ``s0`` before filling and the bool mask of ambiguous elements; "mean" divides by the summed
    ``divisors`` of the agreeing tasks (None: the weights)."""
    divisors = weights if divisors is None else divisors
    x = tv.float()
    trimmed = torch.where(x.abs() >= thresholds[:, None], x, torch.zeros_like(x))
    election = torch.zeros_like(x[0])
    for t in range(x.shape[0]):  # fixed task order: the kernels add in this order too
        election = election + (weights[t] * trimmed[t] if sign == "mass" else torch.sign(trimmed[t]))
    s0 = torch.sign(election)
    ambiguous = (s0 == 0) & (trimmed != 0).any(dim=0)
    s = torch.where(s0 == 0, torch.full_like(s0, fill_sign), s0)
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    if disjoint == "max":
        merged = torch.where(agree, trimmed.abs(), torch.zeros_like(x)).amax(dim=0) * s
    else:
        num, den = torch.zeros_like(s), torch.zeros_like(s)
        for t in range(x.shape[0]):
            num = num + torch.where(agree[t], weights[t] * trimmed[t], torch.zeros_like(s))
            den = den + torch.where(agree[t], divisors[t], torch.zeros_like(s))
        merged = num if disjoint == "sum" else torch.where(den != 0, num / den, torch.zeros_like(s))
    return _finish(merged, base, lam, dtype), s0, ambiguous


def ties_reference(tv, thresholds, weights, base, lam, sign, disjoint, fill_sign, dtype, divisors=None):
    """The specification of one TIES pass on ``tv`` [T, N]; returns ``(out, sign_sum, ambiguous)``
    with ``out`` in ``dtype``."""
    out, s0, ambiguous = _ties_reference_elements(tv, thresholds, weights, base, lam, sign, disjoint, fill_sign, dtype,
                                                  divisors)
    return out, int(s0.to(torch.int64).sum()), int(ambiguous.sum())


def task_arithmetic_reference(tv, weights, base, lam, dtype):
    """The specification of task arithmetic on ``tv`` [T, N]: ``base + lam * sum_t w_t x_t`` in ``dtype``."""
    acc = torch.zeros(tv.shape[1], dtype=torch.float32, device=tv.device)
    for t in range(tv.shape[0]):
        acc = acc + weights[t] * tv[t].float()
    return _finish(acc, base, lam, dtype)


def result_dtype(data, base, out_dtype=None):
    """``out_dtype`` when given (checked), else the base's dtype when there is a base (it is the
    model), else the data's."""
    if check_out_dtype(out_dtype) is not None:
        return out_dtype
    return data.dtype if base is None else base.dtype


def _finish(merged, base, lam, dtype):
    """``base + lam * merged`` in fp32 (lam rounded to fp32 as the kernels do), in ``dtype``."""
    scaled = torch.tensor(lam, dtype=torch.float32, device=merged.device) * merged
    return (scaled if base is None else base.float() + scaled).to(dtype)


def _check_options(sign, disjoint, fill_sign):
    if sign not in SIGN_MODES:
        raise ValueError(f"sign must be one of {SIGN_MODES}, got {sign!r}")
    if disjoint not in DISJOINT_MODES:
        raise ValueError(f"disjoint must be one of {DISJOINT_MODES}, got {disjoint!r}")
    valid = fill_sign == "sample" if isinstance(fill_sign, str) else (
        isinstance(fill_sign, int) and not isinstance(fill_sign, bool) and fill_sign in (-1, 0, 1))
    if not valid:
        raise ValueError(f"fill_sign must be -1, 0, 1 or 'sample', got {fill_sign!r}")


def _check_divisors(divisors, disjoint, num_tasks, device):
    """``divisors``: None, or T positive finite numbers for ``disjoint="mean"`` (fp32 [T] on ``device``)."""
    if divisors is None:
        return None
    if disjoint != "mean":
        raise ValueError(f"divisors are what disjoint='mean' divides by; disjoint is {disjoint!r}")
    return per_task(divisors, num_tasks, "divisors", device, bound="positive")


def _keep_bits(random_keep):
    """The keep flags a kernel may read instead of drawing them (``RandomKeep.bits``), or None."""
    return None if random_keep is None else random_keep.bits


def _check_blocks(blocks, numel, out):
    """``blocks``: None, or block indices (a sequence or an integer tensor) in ``[0, ceil(numel /
    BLOCK))``, with ``out`` given (the blocks not listed keep its values); as int64 on the CPU."""
    if blocks is None:
        return None
    if out is None:
        raise ValueError("blocks= recomputes part of an earlier result: pass that result as out=")
    blocks = torch.as_tensor(blocks, device="cpu").reshape(-1)
    if blocks.numel() == 0:  # nothing to recompute (an empty list is a float tensor)
        return blocks.to(torch.int64)
    if blocks.is_floating_point() or blocks.dtype == torch.bool:
        raise ValueError(f"blocks must hold integer block indices, got {blocks.dtype}")
    blocks = blocks.to(torch.int64)
    count = (numel + BLOCK - 1) // BLOCK
    bad = (blocks < 0) | (blocks >= count)
    if bool(bad.any()):
        raise ValueError(f"blocks holds {int(blocks[bad][0])}, outside [0, {count}) for {numel} elements")
    return blocks


def _block_elements(blocks, numel, device):
    """The flat element indices of ``blocks``."""
    idx = (blocks.to(device)[:, None] * BLOCK + torch.arange(BLOCK, device=device)).reshape(-1)
    return idx[idx < numel]


def _blocks_of(mask):
    """Indices (a tuple of ints) of the blocks of ``BLOCK`` elements where the flat bool ``mask`` is set."""
    pad = (-mask.numel()) % BLOCK
    padded = torch.nn.functional.pad(mask.reshape(-1), (0, pad))
    return tuple(padded.reshape(-1, BLOCK).any(dim=1).nonzero().reshape(-1).tolist())


class _Inputs:
    """The inputs of a TIES pass: stacked task vectors with a base to add (``models=None``), or a
    base and its experts (``models=(base, experts, include_base, random_keep)``). ``tv()`` gives the
    fp32 (or stored) task vectors that define the pass, ``added`` the base added to the result."""

    def __init__(self, tv=None, base=None, models=None):
        self.stacked, self.models = tv, models
        if models is None:
            self.added = base
            self.numel, self.num_tasks, self.device = tv.shape[1], tv.shape[0], tv.device
        else:
            flat_base, flat, include_base, _ = models
            self.added = flat_base if include_base else None
            self.numel, self.num_tasks, self.device = flat_base.shape[0], len(flat), flat_base.device

    def tv(self):
        return self.stacked if self.models is None else keep_task_vectors(*self.models[:2], self.models[3])

    def raise_nonfinite(self):
        """Raise for a non-finite input (naming it); return when all are finite."""
        if self.models is None:
            check_finite([("task_vectors", self.stacked, True), ("base", self.added, False)])
        else:
            err = first_nonfinite_model(*self.models[:2])
            if err is not None:
                raise err

    def run_kernel(self, kernels, args, flat, blocks, flags):
        """The fast pass into ``flat``: ``(sign_sum, ambiguous, nonfinite)``."""
        thresholds, weights, divisors, lam, sign, disjoint, fill_sign = args
        if self.models is not None:
            base, experts, include_base, random_keep = self.models
            return kernels.ties_merge_models(base, experts, thresholds, weights, flat, include_base, lam, sign,
                                             disjoint, fill_sign, blocks, flags,
                                             keep=None if random_keep is None else random_keep.draw_key(),
                                             divisors=divisors, keep_bits=_keep_bits(random_keep))
        return kernels.ties_merge(self.stacked, thresholds, weights, flat, self.added, lam, sign, disjoint,
                                  fill_sign, blocks, flags, divisors=divisors)


def _ties_pass(inputs, thresholds, weights, divisors, lam, sign, disjoint, fill_sign, dtype, shape, out, check_result,
               blocks, backend, op):
    """One TIES pass on ``inputs`` (see ``ties_merge_pass``); ``thresholds``, ``weights`` and
    ``divisors`` checked."""
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != inputs.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {inputs.device}")
    blocks = _check_blocks(blocks, inputs.numel, out)
    _, kernels = resolve(backend, inputs.device, op)
    flat = torch.empty(inputs.numel, dtype=dtype, device=inputs.device) if out is None else out.view(-1)
    options = (thresholds, weights, divisors, lam, sign, disjoint)
    if fill_sign == "sample":
        if blocks is not None:
            raise ValueError("fill_sign='sample' predicts a whole tensor's majority: a blocks= rerun takes the "
                             "fill sign it needs (-1, 0 or 1)")
        fill_sign = 0 if kernels is None else _sampled_majority(inputs, kernels, options, flat)
    args = (*options, fill_sign)

    def reference(dt):
        return _ties_reference_elements(inputs.tv(), thresholds, weights, inputs.added, lam, sign, disjoint, fill_sign,
                                        dt, divisors)

    amb_blocks = None
    if kernels is None:
        inputs.raise_nonfinite()
        merged, s0, ambiguous = reference(dtype)
        idx = None if blocks is None else _block_elements(blocks, inputs.numel, flat.device)
        if idx is not None:
            merged, s0, ambiguous = merged[idx], s0[idx], ambiguous[idx]
            flat[idx] = merged
        else:
            flat.copy_(merged)
            amb_blocks = _blocks_of(ambiguous)
        sign_sum, ambiguous_count = int(s0.to(torch.int64).sum()), int(ambiguous.sum())
        overflow = not bool(torch.isfinite(merged).all())
    else:
        flags = None
        if blocks is None:
            flags = torch.empty((inputs.numel + BLOCK - 1) // BLOCK, dtype=torch.uint8, device=inputs.device)
        sign_sum, ambiguous_count, nonfinite = inputs.run_kernel(kernels, args, flat, blocks, flags)
        if nonfinite:
            inputs.raise_nonfinite()  # a non-finite input raises here; else the result overflowed
        overflow = nonfinite > 0
        if flags is not None:
            amb_blocks = tuple(flags.nonzero().reshape(-1).tolist())
    if overflow and check_result:
        raise result_error(dtype, lambda: reference(torch.float32)[0])
    return TiesPass(flat.view(shape), sign_sum, ambiguous_count, overflow, amb_blocks, fill_sign)


def _sampled_majority(inputs, kernels, options, flat):
    """The majority of the elected signs in a sample of the tensor's blocks (``SAMPLE_BLOCKS``
    evenly spaced ones, at most 1/16 of the tensor), passed on ``kernels`` into ``flat`` (which the
    pass then overwrites); 0 under 16 blocks, whose rerun is cheap. A pass filled with it reruns
    nothing when the tensor's majority is clear, whatever its sign (a fill of 0 is right for -1
    only). Not for the reference, which would compute every element for the sample."""
    count = -(-inputs.numel // BLOCK)
    sampled = min(SAMPLE_BLOCKS, count // 16)
    if not sampled:
        return 0
    blocks = torch.arange(sampled, dtype=torch.int64) * count // sampled
    sign_sum = inputs.run_kernel(kernels, (*options, 0), flat, blocks, None)[0]  # non-finite: the pass raises
    return majority_sign(sign_sum)


def ties_merge_pass(
    task_vectors,
    thresholds,
    *,
    fill_sign,
    sign="mass",
    disjoint="mean",
    weights=None,
    base=None,
    lam=1.0,
    out_dtype=None,
    out=None,
    check_result=True,
    blocks=None,
    divisors=None,
    backend=None,
):
    """One fused TIES pass with a given sign for elements whose elected sign is zero.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    thresholds : sequence of T numbers or Tensor [T]
        Trim thresholds (``magnitude_threshold`` per task); ``|x_t| >= thr_t`` is kept.
    fill_sign : -1, 0, 1 or "sample"
        Sign given to elements whose elected sign is zero; "sample": the majority sign of the
        elected signs in ``SAMPLE_BLOCKS`` evenly spaced blocks (at most 1/16 of the tensor; 0
        under 16 blocks and on the reference backend), returned as ``fill_sign`` (not with
        ``blocks``).
    sign, disjoint, weights, base, lam, out_dtype, divisors, backend
        As in ``ties_merge``.
    out : Tensor, optional
        Where to write the result (contiguous, the result's shape and dtype), e.g. an earlier
        pass's ``merged`` when rerunning with the majority sign: no second buffer.
    check_result : bool
        Raise ``NonFiniteResultError`` when the result does not fit its dtype (True), or report
        it in ``overflow`` (False: for a caller that reruns the pass, e.g. with the majority sign,
        and checks the final one).
    blocks : None, or a sequence / integer tensor of block indices
        Recompute only these blocks of ``BLOCK`` elements of the flat tensor (an earlier pass's
        ``ambiguous_blocks``) into ``out`` (required), leaving its other elements as they are; the
        counts and the overflow check then cover these blocks only.

    Returns
    -------
    TiesPass
        ``merged`` (shape of one task vector, dtype as in ``ties_merge``), ``sign_sum`` (sum of the elected signs
        before filling), ``ambiguous`` (elements with zero elected sign and a non-zero
        trimmed entry: those whose result depends on ``fill_sign``), ``overflow`` and
        ``ambiguous_blocks`` (the blocks holding the ambiguous elements; None with ``blocks=``),
        ``fill_sign`` (the fill used).

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base (naming which).
    NonFiniteResultError
        With ``check_result``: the result does not fit its dtype.
    ValueError
        Bad options, ``out`` or ``blocks``.
    """
    _check_options(sign, disjoint, fill_sign)
    tv, shape = stack_task_vectors(task_vectors)
    num_tasks = tv.shape[0]
    thresholds = per_task(thresholds, num_tasks, "thresholds", tv.device, bound="nonnegative")
    weights = per_task(weights, num_tasks, "weights", tv.device, default=1.0, bound="positive")
    divisors = _check_divisors(divisors, disjoint, num_tasks, tv.device)
    base = flat_like(base, "base", tv, shape)
    lam = finite_scalar(lam, "lam")
    dtype = result_dtype(tv, base, out_dtype)
    return _ties_pass(_Inputs(tv, base), thresholds, weights, divisors, lam, sign, disjoint, fill_sign, dtype, shape,
                      out, check_result, blocks, backend, "ties_merge")


def ties_merge_pass_models(
    base,
    experts,
    thresholds,
    *,
    fill_sign,
    sign="mass",
    disjoint="mean",
    weights=None,
    lam=1.0,
    include_base=True,
    out_dtype=None,
    out=None,
    check_result=True,
    blocks=None,
    random_keep=None,
    divisors=None,
    backend=None,
):
    """``ties_merge_pass`` over the models: the task vectors ``fp32(experts[t]) - fp32(base)`` are
    formed as the C++ or Triton kernel reads the models (no fp32 copy of them); bit-identical to
    ``ties_merge_pass(model_task_vectors(base, experts), thresholds, base=base, ...)``, which
    defines it (the "torch" backend runs that).

    Parameters
    ----------
    base : Tensor
        The base model's tensor (fp32, fp16 or bf16), any shape.
    experts : sequence of T tensors
        The experts' tensors (the base's shape and device; dtypes other than the base's: every
        input is converted to fp32 first).
    thresholds, fill_sign, sign, disjoint, weights, lam, out, check_result, blocks, divisors, backend
        As in ``ties_merge_pass`` (thresholds of the task vectors, e.g. ``magnitude_threshold_models``).
    include_base : bool
        Return ``base + lam * merged`` (True) or ``lam * merged`` alone (the merged task vector).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's).
    random_keep : None or nlmerge.ops.RandomKeep
        DARE's draws (T densities): the task vectors' dropped entries are +0, in the kernel's
        registers (the reference: ``keep_task_vectors``).

    Returns
    -------
    TiesPass
        As ``ties_merge_pass``; ``merged`` has the base's shape.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base (``"base"``), in expert t (``"experts"``, ``task=t``), or a task vector
        that overflows fp32 (``"task_vectors"``, ``task=t``).
    NonFiniteResultError
        With ``check_result``: the result does not fit its dtype.
    """
    _check_options(sign, disjoint, fill_sign)
    flat_base, flat = check_models(base, experts)
    thresholds = per_task(thresholds, len(flat), "thresholds", base.device, bound="nonnegative")
    weights = per_task(weights, len(flat), "weights", base.device, default=1.0, bound="positive")
    divisors = _check_divisors(divisors, disjoint, len(flat), base.device)
    lam = finite_scalar(lam, "lam")
    dtype = result_dtype(base, base, out_dtype)
    inputs = _Inputs(models=(flat_base, flat, bool(include_base),
                             check_random_keep(random_keep, len(flat), flat_base.numel())))
    return _ties_pass(inputs, thresholds, weights, divisors, lam, sign, disjoint, fill_sign, dtype, tuple(base.shape),
                      out, check_result, blocks, backend, "ties_merge_models")


def complete_ties_pass(first, fill_sign, majority, disjoint, rerun):
    """Finish a TIES pass that ran with ``fill_sign`` once the scope's majority sign is known.

    ``first`` is that pass (a ``TiesPass``, run with ``check_result=False``); ``rerun(fill_sign=,
    blocks=)`` runs the same pass again into ``first.merged`` (``out=first.merged``), checked.
    Nothing reruns when no ambiguous element would change (``same_fill_result``); else only
    ``first.ambiguous_blocks`` rerun with the majority (every block where the backend did not
    report them). A first pass whose result overflowed reruns whole with the final sign, checked:
    it raises ``NonFiniteResultError`` unless the new signs removed the overflow.

    Returns
    -------
    Tensor
        ``first.merged``, now final.
    """
    final = majority if first.ambiguous and not same_fill_result(fill_sign, majority, disjoint) else fill_sign
    if first.overflow:
        rerun(fill_sign=final, blocks=None)
    elif final != fill_sign:
        rerun(fill_sign=final, blocks=first.ambiguous_blocks)
    return first.merged


def _majority_merge(run_pass, zero_sign, disjoint):
    """TIES with the zero-sign rule over one tensor; ``run_pass(**kw)`` runs the pass."""
    if zero_sign not in ("majority", "positive"):
        raise ValueError(f"zero_sign must be 'majority' or 'positive', got {zero_sign!r}")
    if zero_sign == "positive":
        return run_pass(fill_sign=1).merged
    first = run_pass(fill_sign="sample", check_result=False)
    return complete_ties_pass(first, first.fill_sign, majority_sign(first.sign_sum), disjoint,
                              lambda **kw: run_pass(out=first.merged, **kw))


def ties_merge(
    task_vectors,
    thresholds,
    *,
    sign="mass",
    disjoint="mean",
    weights=None,
    base=None,
    lam=1.0,
    zero_sign="majority",
    out_dtype=None,
    divisors=None,
    backend=None,
):
    """Fused TIES merge of T task vectors of one tensor: trim, elect sign, disjoint merge.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
        fp32, fp16 or bf16 (one dtype); stacked when given as a sequence.
    thresholds : sequence of T numbers or Tensor [T]
        Per-task trim thresholds, e.g. ``magnitude_threshold(task_vectors[t], keep)``.
    sign : "mass" or "count"
        Elect ``sign(sum_t w_t * trimmed_t)`` or the sign of the count of signs.
    disjoint : "mean", "sum" or "max"
        How agreeing entries combine ("mean": weighted sum over summed weights).
    weights : None, number or sequence of T positive numbers
        Weigh the election ("mass") and the sum of the agreeing entries.
    base : Tensor, optional
        Added to the result (``base + lam * merged``); shape of one task vector, any float dtype.
    lam : float
        Scale of the merged task vector.
    zero_sign : "majority" or "positive"
        Sign for zero elections: the majority sign over this tensor (TIES), or + (mergekit).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else the task vectors').
    divisors : None, number or sequence of T positive numbers
        With ``disjoint="mean"``: divide by the sum of these over the agreeing tasks instead of
        the weights' sum (mergekit's ``normalize`` after DARE's rescale: the weights are ``w_t``
        times the rescale, the divisors ``w_t``). ValueError with another ``disjoint``.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of one task vector, in ``out_dtype`` (computed in fp32, rounded once).

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    if isinstance(task_vectors, (list, tuple)):  # stacked once, not per pass
        task_vectors, shape = stack_task_vectors(task_vectors)
        task_vectors = task_vectors.view(task_vectors.shape[0], *shape)
    kwargs = dict(sign=sign, disjoint=disjoint, weights=weights, base=base, lam=lam, out_dtype=out_dtype,
                  divisors=divisors, backend=backend)
    return _majority_merge(lambda **kw: ties_merge_pass(task_vectors, thresholds, **kwargs, **kw), zero_sign, disjoint)


def ties_merge_models(
    base,
    experts,
    *,
    keep=None,
    thresholds=None,
    sign="mass",
    disjoint="mean",
    weights=None,
    lam=1.0,
    zero_sign="majority",
    include_base=True,
    out_dtype=None,
    random_keep=None,
    divisors=None,
    backend=None,
):
    """TIES over one tensor of the models: ``ties_merge`` of the task vectors ``fp32(experts[t]) -
    fp32(base)`` formed in the kernel (see ``ties_merge_pass_models``), with ``base`` added.

    Parameters
    ----------
    base, experts : as in ``ties_merge_pass_models``
    keep : float, optional
        The per-tensor TIES trim: threshold t is ``magnitude_threshold_models(base, experts[t],
        keep)``. Give ``keep`` or ``thresholds``, not both.
    thresholds : sequence of T numbers or Tensor [T], optional
        Trim thresholds given directly (e.g. global ones).
    sign, disjoint, weights, lam, zero_sign, divisors, backend
        As in ``ties_merge``.
    include_base : bool
        ``base + lam * merged`` (True) or ``lam * merged`` (the merged task vector).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's).
    random_keep : None or nlmerge.ops.RandomKeep
        DARE's draws, as in ``ties_merge_pass_models`` (with ``thresholds``, not ``keep``).

    Returns
    -------
    Tensor
        The base's shape, in ``out_dtype``; bit-identical to ``ties_merge(keep_task_vectors(...),
        thresholds, base=base, ...)``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base, an expert, or a task vector overflowing fp32 (named as in
        ``ties_merge_pass_models``).
    NonFiniteResultError
        The result does not fit ``out_dtype``.
    """
    if (keep is None) == (thresholds is None):
        raise ValueError("give keep (per-tensor thresholds) or thresholds, not both or neither")
    if keep is not None and random_keep is not None:
        raise ValueError("random_keep takes thresholds, not keep (whose trim would ignore the drops)")
    if keep is not None:
        flat_base, flat = check_models(base, experts)
        try:
            thresholds = magnitude_thresholds_models(flat_base, flat, keep, backend=backend)
        except NonFiniteError as err:  # name the expert by its index
            raise (first_nonfinite_model(flat_base, flat) or err) from None
    kwargs = dict(sign=sign, disjoint=disjoint, weights=weights, lam=lam, include_base=include_base,
                  out_dtype=out_dtype, random_keep=random_keep, divisors=divisors, backend=backend)
    return _majority_merge(lambda **kw: ties_merge_pass_models(base, experts, thresholds, **kwargs, **kw), zero_sign,
                           disjoint)


def majority_sign(sign_sum):
    """The zero-sign rule's majority: the sign (-1, 0 or 1) of a scope's sum of elected signs
    (``TiesPass.sign_sum``, added over the tensors of a global scope)."""
    return (sign_sum > 0) - (sign_sum < 0)


def same_fill_result(fill_a, fill_b, disjoint):
    """Whether TIES passes with these two ``fill_sign`` values write the same result.

    An element whose sign stays 0 merges its negative entries (the original ``where(s > 0, x > 0,
    x < 0)``), exactly as under fill -1, and "mean"/"sum" never multiply by the sign itself
    ("max" does): so fills 0 and -1 agree there, and a pass with fill 0 needs no majority rerun
    when the majority is -1.
    """
    return fill_a == fill_b or (disjoint != "max" and {fill_a, fill_b} <= {0, -1})


def task_arithmetic(task_vectors, *, weights=None, base=None, lam=1.0, out_dtype=None, backend=None):
    """Fused task arithmetic: ``base + lam * sum_t w_t * tau_t`` (``lam * sum`` without base).

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    weights : None, number or sequence of T finite numbers (negative allowed: task negation)
    base : Tensor, optional
    lam : float
        Finite.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else the task vectors').
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of one task vector, in ``out_dtype``; accumulated in fp32 in task order.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    tv, shape = stack_task_vectors(task_vectors)
    weights = per_task(weights, tv.shape[0], "weights", tv.device, default=1.0)
    base = flat_like(base, "base", tv, shape)
    lam = finite_scalar(lam, "lam")
    dtype = result_dtype(tv, base, out_dtype)
    checked = [("task_vectors", tv, True), ("base", base, False)]

    def reference(dt):
        return task_arithmetic_reference(tv, weights, base, lam, dt)

    _, kernels = resolve(backend, tv.device, "task_arithmetic")
    if kernels is None:
        check_finite(checked)
        out = reference(dtype)
        check_finite_result(out, lambda: reference(torch.float32))
    else:
        out = torch.empty(tv.shape[1], dtype=dtype, device=tv.device)
        if kernels.task_arithmetic(tv, weights, out, base, lam):
            raise_counted(checked, dtype, lambda: reference(torch.float32))
    return out.view(shape)


def task_arithmetic_models(base, experts, *, weights=None, lam=1.0, include_base=True, out_dtype=None,
                           random_keep=None, backend=None):
    """Task arithmetic from the models: ``base + lam * sum_t w_t * (experts[t] - base)``.

    Bit-identical to ``task_arithmetic(fp32 task vectors, base=base, ...)`` with the task vectors
    ``fp32(experts[t]) - fp32(base)`` (each rounded to fp32), accumulated in fp32 in task order;
    the C++ and Triton kernels form them in registers instead of writing and re-reading them (a
    third of the memory traffic for 16-bit models); the reference (``"torch"``) builds them.

    Parameters
    ----------
    base : Tensor
        The base model's tensor (fp32, fp16 or bf16), any shape.
    experts : sequence of T tensors
        The experts' tensors: the base's shape and device. When their dtypes are not all the
        base's, every input is converted to fp32 first (the same values: conversions are exact).
    weights : None, number or sequence of T finite numbers (negative allowed: task negation)
    lam : float
        Finite.
    include_base : bool
        ``base + lam * sum`` (True) or ``lam * sum`` alone (e.g. TALL's multi-task vector).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's).
    random_keep : None or nlmerge.ops.RandomKeep
        DARE's draws (T densities): the dropped task vector entries are +0 (bit-identical to
        ``task_arithmetic`` on ``keep_task_vectors(base, experts, random_keep)``).
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        The base's shape, in ``out_dtype``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base (``tensor="base"``), in expert t (``"experts"``, ``task=t``), or a task
        vector that overflows fp32 (``"task_vectors"``, ``task=t``).
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    flat_base, flat = check_models(base, experts)
    dtype = result_dtype(base, base, out_dtype)
    weights = per_task(weights, len(experts), "weights", base.device, default=1.0)
    lam = finite_scalar(lam, "lam")
    added = flat_base if include_base else None
    random_keep = check_random_keep(random_keep, len(flat), flat_base.numel())

    _, kernels = resolve(backend, base.device, "task_arithmetic_models")
    if kernels is None:
        out = via_task_vectors(flat_base, flat, lambda tv: task_arithmetic(
            tv, weights=weights, base=added, lam=lam, out_dtype=dtype, backend="torch"),
            lambda b, e: keep_task_vectors(b, e, random_keep))
        return out.view(base.shape)
    out = torch.empty(flat_base.shape[0], dtype=dtype, device=base.device)
    draw_key = None if random_keep is None else random_keep.draw_key()
    if kernels.task_arithmetic_models(flat_base, flat, weights, out, lam, include_base, draw_key,
                                      keep_bits=_keep_bits(random_keep)):
        err = first_nonfinite_model(flat_base, flat)
        if err is not None:
            raise err
        tv = keep_task_vectors(flat_base, flat, random_keep)
        raise result_error(dtype, lambda: task_arithmetic_reference(tv, weights, added, lam, torch.float32))
    return out.view(base.shape)
