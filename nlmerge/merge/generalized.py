"""mergekit's generalized task arithmetic family, one key at a time, on nlmerge's ops.

The methods of mergekit 0.1.5 (``merge_methods/generalized_task_arithmetic.py``) —
``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
``breadcrumbs_ties`` — are one recipe with two switches (:data:`METHODS`). For one tensor, with
``tau_t = expert_t - base`` in fp32, per expert weight ``w_t``, density ``d_t`` and gamma ``g_t``:

1. sparsify ``tau_t`` (``d_t = 1`` keeps every element and rescales nothing):

   - ``"magnitude"``: keep the ``k = max(1, int(d_t * n))`` largest ``|tau_t|``: ``|tau_t| >=``
     their exact k-th largest (radix selection, never a sort; where magnitudes tie at the
     threshold all are kept, mergekit's ``argsort`` keeps an arbitrary ``k`` of them);
   - ``"random"`` (DARE): keep element i iff ``u_i < d_t``, ``u`` drawn by
     ``nlmerge.ops.random`` from ``(seed, the tensor's name, i)`` on stream ``t``: the same drops
     on every backend, device and process count (mergekit draws ``torch.bernoulli``);
   - ``"magnitude_outliers"`` (breadcrumbs): with ``m = int(d_t * n)`` and
     ``b = max(0, n - m - int(g_t * n))``, keep the elements of ascending magnitude rank
     ``b + 1 .. b + m`` (drop the ``g_t`` largest fraction, then the smallest), as magnitudes
     between the exact rank-(b+1) and rank-(b+m) values (ties at either end all kept);

   ``rescale`` multiplies the kept values by ``L1(tau_t) / L1(kept)`` unless either is < 1e-7
   (DARE's norms: fp64 sums in the fixed order of ``nlmerge.ops.dare.l1_norm``, the same bits on
   every backend and thread count; the magnitude trims': fp32);
2. ``delta_t = w_t * sparsified_t``;
3. consensus ``"sum"`` (``"count"``): ``majority = +1`` where ``sum_t delta_t`` (the sum of
   ``sign(delta_t)``) is ``>= 0``, else -1; ``agree_t = sign(delta_t) == majority`` (zeros never
   agree); ``mixed = sum_t agree_t delta_t``, ``divisor = sum_t agree_t w_t`` (0 -> 1). Without
   consensus: ``mixed = sum_t delta_t``, ``divisor = sum_t w_t`` (``|divisor| < 1e-8`` -> 1);
4. ``result = base + lam * (mixed / divisor if normalize else mixed)``.

Where mergekit's numbers are exact (fp32 tensors, no tied magnitudes) the results equal
mergekit's to fp32 rounding. nlmerge computes in fp32 whatever the storage dtype; mergekit
computes in the storage dtype, so bf16/fp16 results differ from its by its rounding.

Decisions where mergekit accepts anything: ``density`` must be in (0, 1] (mergekit keeps every
element at ``>= 1`` and drops the whole task vector at ``<= 0``: refused, as a likely mistake);
``gamma`` in [0, 1]; negative weights are allowed, with mergekit's meaning (under consensus the
weighted delta votes, so a negated task votes with its negated sign).

Paths: the combination runs on the fused kernels — ``ops.task_arithmetic_models`` (the task
vectors formed as the kernel reads the models) without sparsification or consensus,
``ops.task_arithmetic`` on the masked fp32 task vectors with sparsification but no consensus;
``ops.ties_merge`` (trim, elect, disjoint sum or mean in one pass; magnitude thresholds applied
in the kernel) with consensus — with ``normalize`` the kernel's mean divides by the summed raw
weights ``w_t`` of the agreeing tasks (``divisors=``), mergekit's divisor, while electing and
summing with ``w_t`` times the rescale — except with ``normalize`` and a negative weight, whose
mergekit divisor subtracts: a plain-PyTorch formulation (:func:`_consensus_plain`) runs those.
Breadcrumbs' masks are applied in PyTorch before the kernel. DARE reads the models: one pass
for the rescale's norms (``ops.keep_l1_norms_models``), one merge pass
(``ops.task_arithmetic_models`` / ``ops.ties_merge_models`` with ``random_keep``: the draws,
drops and rescaled weights applied in the kernel's registers); only consensus with a zero or
negative weight merges the masked fp32 task vectors as above.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nlmerge import ops
from nlmerge.merge._common import (
    as_compute,
    assemble,
    cast_result,
    check_experts,
    check_running_stats,
    check_scalar,
    check_weights,
    make_plan,
    model_tensors,
    naming_nonfinite,
    running_stat_values,
    task_tensors,
)
from nlmerge.ops._checks import check_finite, check_float, check_out_dtype, layout_mismatch
from nlmerge.ops.random import keep_mask

SPARSIFY = (None, "magnitude", "random", "magnitude_outliers")
CONSENSUS = (None, "sum", "count")
RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this
DIVISOR_EPS = 1e-8  # mergekit: a summed weight below this (in magnitude) divides by 1


@dataclass(frozen=True)
class Param:
    """One mergekit parameter: its name in the config, type, whether it is given per model, and
    its default (``required`` when a config must set it)."""

    name: str
    type: type
    per_model: bool
    default: object = None
    required: bool = False


@dataclass(frozen=True)
class Method:
    """One mergekit method of the family: its switches, default ``normalize``/``rescale`` and the
    parameters mergekit accepts for it (``parameters``, in mergekit's order)."""

    sparsify: str | None
    consensus: str | None
    normalize: bool
    rescale: bool
    parameters: tuple

    def kwargs(self, values):
        """:func:`merge_tensor`'s keyword arguments from mergekit-named parameter ``values``.

        ``values`` maps a parameter's name to its value: a scalar for a shared parameter, a
        scalar or a sequence (one per expert, in order) for a per-model one. Missing ones take
        their defaults. Raises ValueError naming an unknown or a missing required parameter;
        values are checked by :func:`merge_tensor`.
        """
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; this method takes {sorted(known)}")
        got = {}
        for p in self.parameters:
            if p.name not in values and p.required:
                raise ValueError(f"parameter {p.name!r} is required (per model)")
            got[p.name] = values.get(p.name, p.default)
        out = dict(
            sparsify=self.sparsify,
            consensus=self.consensus,
            weights=got["weight"],
            density=got["density"],
            rescale=got["rescale"],
            normalize=got["normalize"],
            lam=got["lambda"],
        )
        if "gamma" in got:
            out["gamma"] = got["gamma"]
        return out  # int8_mask: accepted; masks are never materialized in a float dtype here


def _method(sparsify, consensus, normalize, rescale):
    parameters = (
        Param("int8_mask", bool, False, False),
        Param("normalize", bool, False, normalize),
        Param("rescale", bool, False, rescale),
        Param("lambda", float, False, 1.0),
        Param("weight", float, True, required=True),
        Param("density", float, True, 1.0),
    )
    if sparsify == "magnitude_outliers":
        parameters += (Param("gamma", float, True, 0.01),)
    return Method(sparsify, consensus, normalize, rescale, parameters)


METHODS = {
    "task_arithmetic": _method(None, None, False, False),
    "ties": _method("magnitude", "sum", True, False),
    "dare_ties": _method("random", "sum", False, True),
    "dare_linear": _method("random", None, False, True),
    "breadcrumbs": _method("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": _method("magnitude_outliers", "sum", False, False),
}


class Options(NamedTuple):
    """Checked options of one merge (per-expert lists for weights, density and gamma)."""

    sparsify: str | None
    consensus: str | None
    weights: list
    density: list
    gamma: list
    rescale: bool
    normalize: bool
    lam: float
    seed: int


def _per_expert(value, num, name, interval=None):
    """A list of ``num`` finite floats from a scalar or a sequence, each within ``interval``:
    ``(low, high, low_open)`` for ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, (str, bytes)):
        values = check_weights(value, num, what=name)
    else:
        values = [check_scalar(value, name)] * num
    if interval is None:
        return values
    low, high, low_open = interval
    for t, v in enumerate(values):
        if v > high or v < low or (low_open and v == low):
            label = name if len(set(values)) == 1 else f"{name}[{t}]"
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ValueError(f"{label} = {v} is outside {bounds}{_RANGE_HINT.get(name, '')}")
    return values


_RANGE_HINT = {
    "density": " (mergekit would keep every element at >= 1 and drop the whole task vector at <= 0;"
    " use 1, or leave the model out)",
    "gamma": " (the fraction of largest magnitudes that breadcrumbs drops)",
}


def check_options(num, *, sparsify, consensus, weights, density, gamma, rescale, normalize, lam, seed):
    """Validate the options of a merge of ``num`` experts; return :class:`Options`.

    Raises ValueError naming the parameter and its bad value (TypeError for a wrong type).
    """
    if sparsify not in SPARSIFY:
        raise ValueError(f"sparsify must be one of {SPARSIFY}, got {sparsify!r}")
    if consensus not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS}, got {consensus!r}")
    for name, flag in (("rescale", rescale), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return Options(
        sparsify,
        consensus,
        _per_expert(1.0 if weights is None else weights, num, "weights"),
        _per_expert(density, num, "density", (0.0, 1.0, True)),
        _per_expert(gamma, num, "gamma", (0.0, 1.0, False)),
        rescale,
        normalize,
        check_scalar(lam, "lam"),
        seed,
    )


def _kth(x, rank, backend):
    return ops.kth_smallest_magnitude(x, rank, backend=backend)


def magnitude_threshold(tau, density, *, backend=None):
    """mergekit's magnitude trim as a threshold: keep ``|tau| >=`` the returned 0-dim tensor.

    It is the exact ``k``-th largest ``|tau|`` with ``k = max(1, int(density * n))``, or 0 when
    ``density >= 1`` (everything kept). ``tau``: a non-empty float tensor; backend as in ops.
    """
    if density >= 1:
        return torch.zeros((), dtype=tau.dtype, device=tau.device)
    return _kth(tau, _trim_rank(tau.numel(), density), backend)


def _trim_rank(n, density):
    """The rank (1-based, smallest first) of mergekit's trim threshold among ``n`` magnitudes."""
    return n - max(1, int(density * n)) + 1


def sparsify_mask(tau, sparsify, density, *, gamma=0.01, seed=0, name=None, stream=0, backend=None):
    """The elements of one task vector that mergekit's sparsification keeps (module docstring).

    Parameters
    ----------
    tau : Tensor
        One task vector (fp32, fp16 or bf16), non-empty.
    sparsify : "magnitude", "random" or "magnitude_outliers"
    density : float in (0, 1]
    gamma : float in [0, 1]
        Breadcrumbs' fraction of dropped outliers.
    seed, name, stream
        DARE's draws (``nlmerge.ops.random.keep_mask``): ``name`` is the tensor's key (required
        for "random"), ``stream`` the expert's index.
    backend : None, "torch", "cpu" or "triton"
        For the exact magnitude selections (DARE's draws are the same on every backend).

    Returns
    -------
    Tensor or None
        bool, ``tau``'s shape; None when every element is kept (``density >= 1``).
    """
    if density >= 1:
        return None
    n = tau.numel()
    if sparsify == "magnitude":
        return tau.abs() >= magnitude_threshold(tau, density, backend=backend)
    if sparsify == "random":
        return keep_mask(seed, _dare_name(name), tau.shape, density, stream=stream, device=tau.device)
    if sparsify == "magnitude_outliers":
        kept = int(density * n)
        if kept == 0:
            return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
        bottom = max(0, n - kept - int(gamma * n))
        magnitudes = tau.abs()
        low, high = _kth(tau, bottom + 1, backend), _kth(tau, bottom + kept, backend)
        return (magnitudes >= low) & (magnitudes <= high)
    raise ValueError(f"sparsify must be one of {SPARSIFY[1:]}, got {sparsify!r}")


def _dare_name(name):
    """DARE's draws are keyed by the tensor's name: ``name``, or ValueError when it is None."""
    if name is None:
        raise ValueError("sparsify='random' needs the tensor's name: DARE's drops are keyed by it")
    return name


def _l1_rescale(before, after):
    """mergekit's L1 rescale factor ``L1(tau) / L1(kept part)`` (numbers or 0-dim tensors: fp32
    norms of the magnitude trims, fp64 ones of DARE), 1 when either is < 1e-7."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return float(before / after)


def _fused_consensus(o):
    """Whether ``ops.ties_merge`` forms mergekit's consensus result: with ``normalize``, mergekit
    divides by the summed ``w_t`` of the agreeing tasks, which the kernel's ``divisors`` (positive)
    hold unless a weight is negative."""
    return not o.normalize or all(w >= 0 for w in o.weights)


def _divisors(o, tasks):
    """The ``divisors=`` of the TIES kernel for ``tasks`` (the weights ``w_t``: mergekit's divisor
    under ``normalize``, whatever the rescale), or None without ``normalize``."""
    return [o.weights[t] for t in tasks] if o.normalize else None


def _merge_taus(key, taus, base, o, out_dtype, backend):
    """Key ``key``'s result in ``out_dtype`` from ``taus`` [T, *shape] (fp32, consumed: masked in
    place) and the base's tensor (any float dtype); magnitude sparsification (DARE: _dare_key)."""
    num = taus.shape[0]
    if taus[0].numel() == 0:
        return base.to(out_dtype, copy=True)
    # magnitude trims without rescale are left to the TIES kernel's threshold (no masking pass)
    in_kernel = o.consensus is not None and o.sparsify == "magnitude" and not o.rescale and _fused_consensus(o)
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    thresholds, scales = [zero] * num, [1.0] * num
    for t in range(num):
        if in_kernel:
            thresholds[t] = magnitude_threshold(taus[t], o.density[t], backend=backend)
            continue
        if o.sparsify is None:
            continue
        kept = sparsify_mask(taus[t], o.sparsify, o.density[t], gamma=o.gamma[t], backend=backend)
        if kept is None:
            continue
        before = torch.linalg.vector_norm(taus[t], 1) if o.rescale else None
        taus[t].masked_fill_(~kept, 0.0)
        if o.rescale:  # L1 norms in one read each, no masked copy
            scales[t] = _l1_rescale(before, torch.linalg.vector_norm(taus[t], 1))
    return _combine(key, taus, base, o, scales, thresholds, out_dtype, backend)


def _combine(key, taus, base, o, scales, thresholds, out_dtype, backend):
    """Steps 2-4 of the rule on the sparsified fp32 ``taus`` [T, *shape] (consumed) with the
    rescale factors ``scales`` and the TIES kernel's trim ``thresholds`` (0-dim tensors)."""
    num = taus.shape[0]
    weights = [w * c for w, c in zip(o.weights, scales)]
    common = dict(base=base, out_dtype=out_dtype, backend=backend)
    if o.consensus is None:
        return ops.task_arithmetic(taus, weights=weights, lam=_summed_lam(o), **common)
    if not _fused_consensus(o):
        return cast_result(key, _consensus_plain(taus, weights, o, base), out_dtype)
    # the kernel takes positive weights: a zero weight never agrees (drop it), a negative one
    # votes and adds with its task vector negated
    live = [t for t in range(num) if weights[t] != 0]
    if not live:
        return cast_result(key, as_compute(base), out_dtype)
    for t in live:
        if weights[t] < 0:
            taus[t].neg_()
    if len(live) < num:
        taus = taus[live]
    return ops.ties_merge(
        taus,
        torch.stack([thresholds[t] for t in live]),
        sign=_sign_mode(o),
        disjoint="mean" if o.normalize else "sum",
        weights=[abs(weights[t]) for t in live],
        divisors=_divisors(o, live),
        lam=o.lam,
        zero_sign="positive",
        **common,
    )


def _summed_lam(o):
    """The scale of the weighted sum without consensus: ``lam``, over the summed weights with
    ``normalize`` (unless they sum to about 0)."""
    if not o.normalize:
        return o.lam
    total = math.fsum(o.weights)
    return o.lam / total if abs(total) >= DIVISOR_EPS else o.lam


def _consensus_plain(taus, weights, o, base):
    """Consensus with ``normalize`` where the kernel's divisor does not fit (plain PyTorch, fp32).

    ``taus`` [T, *shape] are sparsified, ``weights`` are ``w_t * rescale_t``; follows the
    module's rule step by step.
    """
    check_finite([("task_vectors", taus, True), ("base", base, False)])
    shape = (-1,) + (1,) * (taus.dim() - 1)
    deltas = taus * torch.tensor(weights, dtype=taus.dtype, device=taus.device).view(shape)
    signs = deltas.sign()
    vote = deltas.sum(dim=0) if o.consensus == "sum" else signs.sum(dim=0)
    agree = signs == torch.where(vote >= 0, 1.0, -1.0)
    mixed = torch.where(agree, deltas, torch.zeros_like(deltas)).sum(dim=0)
    raw = torch.tensor(o.weights, dtype=taus.dtype, device=taus.device).view(shape)
    divisor = torch.where(agree, raw, torch.zeros_like(raw)).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return as_compute(base) + o.lam * (mixed / divisor)


def merge_tensor(
    base,
    experts,
    *,
    sparsify=None,
    consensus=None,
    weights=None,
    density=1.0,
    gamma=0.01,
    rescale=False,
    normalize=False,
    lam=1.0,
    seed=0,
    name=None,
    out_dtype=torch.float32,
    backend=None,
):
    """One key of a generalized task arithmetic merge (mergekit's semantics: module docstring).

    Parameters
    ----------
    base : Tensor
        The base's tensor (fp32, fp16 or bf16).
    experts : sequence of Tensor
        The T experts' tensors of this key: the base's shape, dtype and device.
    sparsify : None, "magnitude", "random" or "magnitude_outliers"
    consensus : None, "sum" or "count"
    weights : number, sequence of T numbers, or None (all 1)
        Finite; zero and negative allowed.
    density : number or sequence of T numbers in (0, 1]
    gamma : number or sequence of T numbers in [0, 1] (used by "magnitude_outliers")
    rescale, normalize : bool
    lam : float
        mergekit's ``lambda``.
    seed : int in [0, 2**64)
        DARE's seed.
    name : str
        The key (DARE's draws are keyed by it; also names the key in errors).
    out_dtype : torch.float32 (default), torch.float16 or torch.bfloat16
        The result's dtype: computed in fp32, rounded once.
    backend : None, "torch", "cpu" or "triton"
        Passed to the ops (the fused path is in the module docstring).

    Returns
    -------
    Tensor
        The base's shape and device, in ``out_dtype``; a new tensor (inputs are never modified).

    Raises
    ------
    ValueError
        A bad option (naming it), a tensor whose layout differs from the base's, NaN/Inf in an
        input (naming the key and the expert); ``NonFiniteResultError`` (a ValueError) naming the
        key when the result does not fit ``out_dtype``.
    """
    check_float(base, "base")
    if isinstance(experts, torch.Tensor) or not isinstance(experts, Sequence) or not experts:
        raise TypeError("experts must be a non-empty sequence of tensors (one per expert)")
    for t, x in enumerate(experts):
        check_float(x, f"experts[{t}]")
        mismatch = layout_mismatch(x, base)
        if mismatch:
            raise ValueError(f"key {name!r}: expert {t} has {mismatch[0]} {mismatch[1]} but the base has {mismatch[2]}")
    o = check_options(
        len(experts),
        sparsify=sparsify,
        consensus=consensus,
        weights=weights,
        density=density,
        gamma=gamma,
        rescale=rescale,
        normalize=normalize,
        lam=lam,
        seed=seed,
    )
    check_out_dtype(out_dtype)
    key = name if name is not None else "tensor"
    with torch.no_grad():
        return _merge_key(key, name, {key: base}, [{key: x} for x in experts], o, out_dtype or torch.float32, backend)


def _merge_key(key, name, base, experts, o, out_dtype, backend):
    """Merge ``key`` of state dicts ``base`` and ``experts``; errors name the key (and the expert)."""
    with naming_nonfinite([key], base, experts):
        if o.sparsify is None and o.consensus is None:  # plain task arithmetic: task vectors formed in the kernel
            return ops.task_arithmetic_models(
                base[key].detach(),
                [sd[key].detach() for sd in experts],
                weights=o.weights,
                lam=_summed_lam(o),
                out_dtype=out_dtype,
                backend=backend,
            )
        if _ties_in_kernel(o) and base[key].numel():
            return _ties_models(*model_tensors(key, base, experts), o, out_dtype, backend)
        if o.sparsify == "random" and base[key].numel():
            return _dare_key(key, name, *model_tensors(key, base, experts), o, out_dtype, backend)
        return _merge_taus(key, task_tensors(key, base, experts), base[key].detach(), o, out_dtype, backend)


def _dare_key(key, name, base, experts, o, out_dtype, backend):
    """DARE on one key's tensors (non-empty): the keep draws and the rescale's L1 norms are taken
    from the models (``ops.keep_l1_norms_models``: one read, the C++ kernel on CPU tensors); the
    merge reads the models too, the drops and weights applied in the kernel's registers
    (:func:`_dare_fused`); else it runs on the masked fp32 task vectors (:func:`_combine`)."""
    keep = ops.RandomKeep(o.seed, _dare_name(name), tuple(o.density))
    scales = [1.0] * len(experts)
    if o.rescale and any(d < 1 for d in o.density):
        # the flags drawn for the norms are recorded: the merge pass reads them, not draws again
        norms, keep = ops.keep_l1_norms_models(base, experts, keep, record=True, backend=backend)
        norms = norms.tolist()
        scales = [_l1_rescale(*norms[t]) if d < 1 else 1.0 for t, d in enumerate(o.density)]
    common = dict(random_keep=keep, out_dtype=out_dtype, backend=backend)
    if not _dare_fused(o):
        taus = ops.keep_task_vectors(base.reshape(-1), [x.reshape(-1) for x in experts], keep)
        zero = torch.zeros((), device=base.device)
        return _combine(key, taus.view(-1, *base.shape), base, o, scales, [zero] * len(experts), out_dtype, backend)
    weights = [w * c for w, c in zip(o.weights, scales)]
    if o.consensus is None:
        return ops.task_arithmetic_models(base, experts, weights=weights, lam=_summed_lam(o), **common)
    return ops.ties_merge_models(base, experts, thresholds=torch.zeros(len(experts)), sign=_sign_mode(o),
                                 disjoint="mean" if o.normalize else "sum", weights=weights,
                                 divisors=_divisors(o, range(len(experts))), lam=o.lam, zero_sign="positive",
                                 **common)


def _dare_fused(o):
    """Whether DARE's merge runs on the models kernels: task arithmetic (any weights), or consensus
    over positive weights (the kernel's weights; its divisors are mergekit's: ``_divisors``)."""
    return o.consensus is None or all(w > 0 for w in o.weights)


def _sign_mode(o):
    """The TIES kernels' election for mergekit's consensus method."""
    return "mass" if o.consensus == "sum" else "count"


def _ties_in_kernel(o):
    """Whether the TIES kernel over the models computes the merge: consensus, a magnitude trim (or
    none) without rescale, positive weights (the kernel's weights; zero or negative ones need the
    task vectors, see _merge_taus)."""
    return (o.consensus is not None and o.sparsify in (None, "magnitude") and not o.rescale
            and all(w > 0 for w in o.weights))


def _ties_models(base, experts, o, out_dtype, backend):
    """TIES with mergekit's consensus on one tensor of the models: thresholds and the merge read
    the models, the task vectors formed in the kernels (bit-identical to _merge_taus). The trimmed
    experts' thresholds come from one read of the models (``ops.kth_smallest_magnitudes_models``)."""
    thresholds = torch.zeros(len(experts), device=base.device)
    trimmed = [t for t, density in enumerate(o.density) if o.sparsify is not None and density < 1]
    if trimmed:
        ranks = [_trim_rank(base.numel(), o.density[t]) for t in trimmed]
        thresholds[trimmed] = ops.kth_smallest_magnitudes_models(base, [experts[t] for t in trimmed], ranks,
                                                                 backend=backend)
    return ops.ties_merge_models(base, experts, thresholds=thresholds, sign=_sign_mode(o),
                                 disjoint="mean" if o.normalize else "sum", weights=list(o.weights), lam=o.lam,
                                 zero_sign="positive", out_dtype=out_dtype, backend=backend)


def generalized_task_arithmetic(
    base,
    experts,
    *,
    sparsify=None,
    consensus=None,
    weights=None,
    density=1.0,
    gamma=0.01,
    rescale=False,
    normalize=False,
    lam=1.0,
    seed=0,
    exclude=(),
    running_stats="average",
    out_dtype=None,
    backend=None,
):
    """mergekit's generalized task arithmetic on state dicts, key by key (:func:`merge_tensor`).

    Parameters
    ----------
    base : Mapping[str, Tensor]
    experts : sequence of Mapping[str, Tensor]
        The base's keys, shapes and dtypes.
    sparsify, consensus, weights, density, gamma, rescale, normalize, lam, seed, backend
        As in :func:`merge_tensor` (DARE's draws are keyed by each state-dict key).
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics: the plain mean of the experts' values (default) or the
        base's (see :mod:`nlmerge.merge`).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of every computed key (default: the base's dtype of the key).

    Returns
    -------
    dict
        A new state dict in the base's key order (computed in fp32, rounded once).

    Raises
    ------
    ValueError
        Bad options (naming the parameter), structural mismatches or NaN/Inf inputs (naming the
        key and the model); ``NonFiniteResultError`` when a result does not fit its dtype.
    """
    experts = check_experts(experts)
    o = check_options(
        len(experts),
        sparsify=sparsify,
        consensus=consensus,
        weights=weights,
        density=density,
        gamma=gamma,
        rescale=rescale,
        normalize=normalize,
        lam=lam,
        seed=seed,
    )
    mode = check_running_stats(running_stats)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    with torch.no_grad():
        merged = running_stat_values(plan, base, experts, mode, backend=backend)
        for key in plan.merged:
            merged[key] = _merge_key(key, key, base, experts, o, plan.out_dtype[key], backend)
    return assemble(plan, base, merged)


def dare_linear(base, experts, *, density, weights=None, rescale=True, normalize=False, lam=1.0, seed=0, **options):
    """mergekit's ``dare_linear``: DARE drops (keep each element with probability ``density``,
    counter-based draws keyed by ``(seed, key, element)``, stream = expert index), L1 rescale,
    weighted sum. Arguments (``exclude``, ``running_stats``, ``out_dtype``, ``backend`` among
    ``options``) as in :func:`generalized_task_arithmetic`; ``density`` has no default here
    (mergekit's 1.0 drops nothing)."""
    return generalized_task_arithmetic(
        base, experts, sparsify="random", consensus=None, weights=weights, density=density,
        rescale=rescale, normalize=normalize, lam=lam, seed=seed, **options,
    )


def dare_ties(base, experts, *, density, weights=None, rescale=True, normalize=False, lam=1.0, seed=0, **options):
    """mergekit's ``dare_ties``: DARE drops and L1 rescale as in :func:`dare_linear`, then the
    sign consensus ("sum") of TIES. Arguments as in :func:`dare_linear`."""
    return generalized_task_arithmetic(
        base, experts, sparsify="random", consensus="sum", weights=weights, density=density,
        rescale=rescale, normalize=normalize, lam=lam, seed=seed, **options,
    )


def breadcrumbs(base, experts, *, density, gamma=0.01, weights=None, rescale=False, normalize=False, lam=1.0, **options):
    """mergekit's ``breadcrumbs``: per tensor and expert, drop the ``gamma`` fraction of largest
    magnitudes and the smallest, keeping ``int(density * n)``; weighted sum. Arguments as in
    :func:`dare_linear`."""
    return generalized_task_arithmetic(
        base, experts, sparsify="magnitude_outliers", consensus=None, weights=weights, density=density,
        gamma=gamma, rescale=rescale, normalize=normalize, lam=lam, **options,
    )


def breadcrumbs_ties(base, experts, *, density, gamma=0.01, weights=None, rescale=False, normalize=False, lam=1.0, **options):
    """mergekit's ``breadcrumbs_ties``: :func:`breadcrumbs`'s selection, then the sign consensus
    ("sum") of TIES. Arguments as in :func:`dare_linear`."""
    return generalized_task_arithmetic(
        base, experts, sparsify="magnitude_outliers", consensus="sum", weights=weights, density=density,
        gamma=gamma, rescale=rescale, normalize=normalize, lam=lam, **options,
    )
