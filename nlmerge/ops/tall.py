"""TALL masks, consensus merging, and rebuilding one task's tensor from its packed mask.

TALL (DESIGN.md): ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|`` (strict, fp32), stored bit-packed:
bit ``n % 8`` of byte ``n // 8`` of row t is ``m_t[n]`` (little-endian within each byte, like
``numpy.packbits(..., bitorder="little")``). Task t's tensor is ``base + m_t * tau_MTL``.
Consensus keeps ``tau_MTL`` where at least ``k`` masks are set: ``base + alpha * (count >= k) *
tau_MTL``; its fused kernel computes the masks on the fly and never stores them.

The ``*_models`` forms take the base and the experts and form the task vectors ``fp32(expert) -
fp32(base)`` as the C++ and Triton kernels read them (bit-identical to the stacked forms on
``model_task_vectors(base, experts)``, which define them and which the reference builds).

``lam`` is finite and >= 0 per task (a negative one would set every mask); consensus needs
``1 <= k <= T``. Results are written in ``out_dtype`` (default: the base's dtype, else tau_MTL's)
and a result that is not finite there raises ``NonFiniteResultError`` (counted by the kernels as
they store it).
"""
import torch

from nlmerge.ops._checks import (
    check_finite,
    check_models,
    first_nonfinite_model,
    via_task_vectors,
    check_finite_result,
    finite_scalar,
    flat_like,
    model_task_vectors,
    per_task,
    raise_counted,
    raise_nonfinite,
    result_error,
    stack_task_vectors,
)
from nlmerge.ops._dispatch import resolve
from nlmerge.ops.ties import _finish, result_dtype

_BIT_WEIGHTS = [1 << j for j in range(8)]


def packed_size(numel):
    """Bytes of one task's packed mask for ``numel`` elements (an integer >= 0)."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
    return (numel + 7) // 8


def pack_masks(masks):
    """Pack a bool tensor ``[..., N]`` into uint8 ``[..., ceil(N/8)]`` (little-endian bits)."""
    pad = packed_size(masks.shape[-1]) * 8 - masks.shape[-1]
    bits = torch.nn.functional.pad(masks.to(torch.uint8), (0, pad)).reshape(*masks.shape[:-1], -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=masks.device)
    return (bits * weights).sum(dim=-1).to(torch.uint8)


def unpack_masks(packed, numel):
    """Unpack uint8 ``[..., ceil(numel/8)]`` (from ``tall_masks``) into bool ``[..., numel]``."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != packed_size(numel):
        raise ValueError(
            f"packed masks must be uint8 [..., {packed_size(numel)}] for {numel} elements, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :numel]


def tall_masks_reference(tv, tau_mtl, lam):
    """The specification: bool masks ``[T, N]``."""
    x, mtl = tv.float(), tau_mtl.float()
    return x.abs() > lam[:, None] * (mtl - x).abs()


def consensus_reference(tv, mtl, lam, k, base, alpha, dtype):
    """The specification of consensus on ``tv`` [T, N]: ``base + alpha * (#masks >= k ? mtl : 0)``."""
    keep = tall_masks_reference(tv, mtl, lam).sum(dim=0) >= k
    return _finish(torch.where(keep, mtl.float(), torch.zeros_like(mtl, dtype=torch.float32)), base, alpha, dtype)


def _prepare(task_vectors, tau_mtl, lam):
    tv, shape = stack_task_vectors(task_vectors)
    mtl = flat_like(tau_mtl, "tau_mtl", tv, shape)
    if mtl is None:
        raise ValueError("tau_mtl is required")
    lam = per_task(lam, tv.shape[0], "lam", tv.device, bound="nonnegative")
    return tv, shape, mtl, lam


def tall_masks(task_vectors, tau_mtl, lam, *, backend=None):
    """Bit-packed TALL masks ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|``.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    tau_mtl : Tensor
        The multi-task vector (e.g. the task-arithmetic sum), shape and dtype of one task vector.
    lam : float or sequence of T floats
        Finite, >= 0.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        uint8 ``[T, ceil(N/8)]`` with N the elements of one task vector (see ``unpack_masks``).
    """
    tv, _, mtl, lam = _prepare(task_vectors, tau_mtl, lam)
    checked = [("task_vectors", tv, True), ("tau_mtl", mtl, False)]
    _, kernels = resolve(backend, tv.device, "tall_masks")
    if kernels is None:
        check_finite(checked)
        return pack_masks(tall_masks_reference(tv, mtl, lam))
    out = torch.empty(tv.shape[0], packed_size(tv.shape[1]), dtype=torch.uint8, device=tv.device)
    if kernels.tall_masks(tv, mtl, lam, out):
        raise_nonfinite(checked)
    return out


def check_k(k, num_tasks):
    """Consensus's ``k``: an integer in ``[1, num_tasks]`` (0 would keep everything, more than T
    nothing)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_tasks:
        raise ValueError(f"k must be an integer in [1, {num_tasks}] (the number of tasks), got {k!r}")
    return k


def consensus_merge(task_vectors, tau_mtl, lam, *, k=2, base=None, alpha=1.0, out_dtype=None, backend=None):
    """Consensus merge: ``base + alpha * (sum_t m_t >= k) * tau_MTL`` with TALL masks ``m_t``.

    Parameters
    ----------
    task_vectors : Tensor [T, *shape] or sequence of T tensors
    tau_mtl : Tensor
    lam : float or sequence of T floats
        TALL mask parameter per task (finite, >= 0).
    k : int
        Minimum number of tasks whose mask must be set, ``1 <= k <= T``.
    base : Tensor, optional
    alpha : float
        Finite.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else tau_mtl's).
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of ``tau_mtl``, in ``out_dtype``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the task vectors, tau_mtl or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    tv, shape, mtl, lam = _prepare(task_vectors, tau_mtl, lam)
    k = check_k(k, tv.shape[0])
    base = flat_like(base, "base", tv, shape)
    alpha = finite_scalar(alpha, "alpha")
    dtype = result_dtype(mtl, base, out_dtype)
    checked = [("task_vectors", tv, True), ("tau_mtl", mtl, False), ("base", base, False)]

    def reference(dt):
        return consensus_reference(tv, mtl, lam, k, base, alpha, dt)

    _, kernels = resolve(backend, tv.device, "consensus_merge")
    if kernels is None:
        check_finite(checked)
        out = reference(dtype)
        check_finite_result(out, lambda: reference(torch.float32))
    else:
        out = torch.empty(mtl.shape, dtype=dtype, device=mtl.device)
        if kernels.consensus(tv, mtl, lam, k, out, base, alpha):
            raise_counted(checked, dtype, lambda: reference(torch.float32))
    return out.view(shape)


def _models_with_mtl(base, experts, tau_mtl, lam):
    """Checked flat models, tau_MTL (of the base's shape) and lam of a ``*_models`` op."""
    flat_base, flat = check_models(base, experts)
    mtl = flat_like(tau_mtl, "tau_mtl", flat_base.view(1, -1), tuple(base.shape), "the base")
    if mtl is None:
        raise ValueError("tau_mtl is required")
    return flat_base, flat, mtl, per_task(lam, len(flat), "lam", base.device, bound="nonnegative")


def _raise_models_input(flat_base, flat, mtl):
    """A models kernel counted non-finite inputs: raise naming the model (or tau_MTL)."""
    err = first_nonfinite_model(flat_base, flat)
    if err is not None:
        raise err
    raise_nonfinite([("tau_mtl", mtl, False)])


def tall_masks_models(base, experts, tau_mtl, lam, *, backend=None):
    """``tall_masks`` of the task vectors ``fp32(experts[t]) - fp32(base)``, formed in the kernel.

    Parameters
    ----------
    base : Tensor
        The base model's tensor (fp32, fp16 or bf16).
    experts : sequence of T tensors
        The base's shape and device (other dtypes than the base's: all converted to fp32 first).
    tau_mtl : Tensor
        The multi-task vector, the base's shape (any float dtype).
    lam : float or sequence of T floats
        Finite, >= 0.
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        uint8 ``[T, ceil(N/8)]``, equal to ``tall_masks(model_task_vectors(...), tau_mtl, lam)``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base, an expert, a task vector (overflowing fp32) or tau_mtl.
    """
    flat_base, flat, mtl, lam = _models_with_mtl(base, experts, tau_mtl, lam)
    _, kernels = resolve(backend, base.device, "tall_masks_models")
    if kernels is None:
        return via_task_vectors(flat_base, flat, lambda tv: tall_masks(tv, mtl, lam, backend="torch"))
    out = torch.empty(len(flat), packed_size(flat_base.numel()), dtype=torch.uint8, device=base.device)
    if kernels.tall_masks_models(flat_base, flat, mtl, lam, out):
        _raise_models_input(flat_base, flat, mtl)
    return out


def consensus_merge_models(base, experts, tau_mtl, lam, *, k=2, alpha=1.0, out_dtype=None, backend=None):
    """Consensus merge over the models: ``base + alpha * (sum_t m_t >= k) * tau_MTL`` with the TALL
    masks of the task vectors ``fp32(experts[t]) - fp32(base)``, formed in the kernel.

    Parameters
    ----------
    base, experts, tau_mtl, lam : as in ``tall_masks_models``
    k : int
        ``1 <= k <= T``.
    alpha : float
        Finite.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's).
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        The base's shape, in ``out_dtype``; bit-identical to ``consensus_merge(model_task_vectors(...),
        tau_mtl, lam, k=k, base=base, alpha=alpha)``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base, an expert, a task vector or tau_mtl.
    NonFiniteResultError
        The result does not fit ``out_dtype``.
    """
    flat_base, flat, mtl, lam = _models_with_mtl(base, experts, tau_mtl, lam)
    k = check_k(k, len(flat))
    alpha = finite_scalar(alpha, "alpha")
    dtype = result_dtype(base, base, out_dtype)
    _, kernels = resolve(backend, base.device, "consensus_merge_models")
    if kernels is None:
        out = via_task_vectors(flat_base, flat, lambda tv: consensus_merge(
            tv, mtl, lam, k=k, base=flat_base, alpha=alpha, out_dtype=dtype, backend="torch"))
        return out.view(base.shape)
    out = torch.empty(flat_base.shape[0], dtype=dtype, device=base.device)
    if kernels.consensus_models(flat_base, flat, mtl, lam, k, out, alpha):
        if first_nonfinite_model(flat_base, flat) is not None or not bool(torch.isfinite(mtl).all()):
            _raise_models_input(flat_base, flat, mtl)
        tv = model_task_vectors(flat_base, flat)
        raise result_error(dtype, lambda: consensus_reference(tv, mtl, lam, k, flat_base, alpha, torch.float32))
    return out.view(base.shape)


def apply_mask_reference(packed_row, mtl, base, dtype):
    """The specification: ``base + m_t * tau_MTL`` in fp32, in ``dtype``; without base and in
    tau_MTL's dtype an exact masked copy."""
    mask = unpack_masks(packed_row, mtl.numel())
    if base is None and dtype == mtl.dtype:
        return torch.where(mask, mtl, torch.zeros_like(mtl))
    kept = torch.where(mask, mtl.float(), torch.zeros_like(mtl, dtype=torch.float32))
    return (kept if base is None else base.float() + kept).to(dtype)


def apply_mask(packed_row, tau_mtl, *, base=None, out_dtype=None, backend=None):
    """Rebuild one task's tensor from its packed TALL mask: ``base + m_t * tau_MTL``.

    Parameters
    ----------
    packed_row : Tensor
        uint8 ``[ceil(N/8)]``: one row of ``tall_masks``.
    tau_mtl : Tensor
    base : Tensor, optional
        Without it, the masked ``tau_MTL`` itself (an exact copy where the mask is set).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of the result (default: the base's if given, else tau_mtl's).
    backend : None, "torch", "cpu" or "triton"

    Returns
    -------
    Tensor
        Shape of ``tau_mtl``, in ``out_dtype``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in tau_mtl or the base.
    NonFiniteResultError
        The result does not fit ``out_dtype`` (it would be Inf).
    """
    flat_mtl, shape = stack_task_vectors([tau_mtl], "tau_mtl")
    mtl = flat_mtl[0]
    base = flat_like(base, "base", flat_mtl, shape, "tau_mtl")
    numel = mtl.numel()
    if not isinstance(packed_row, torch.Tensor) or packed_row.dtype != torch.uint8 or packed_row.shape != (packed_size(numel),):
        got = f"{packed_row.dtype} {tuple(packed_row.shape)}" if isinstance(packed_row, torch.Tensor) else type(packed_row).__name__
        raise ValueError(f"packed_row must be uint8 [{packed_size(numel)}] for tau_mtl of {numel} elements, got {got}")
    if packed_row.device != mtl.device:
        raise ValueError(f"packed_row is on {packed_row.device} but tau_mtl is on {mtl.device}")
    check_finite([("tau_mtl", mtl, False), ("base", base, False)])
    dtype = result_dtype(mtl, base, out_dtype)

    def reference(dt):
        return apply_mask_reference(packed_row, mtl, base, dt)

    _, kernels = resolve(backend, mtl.device, "apply_mask")
    if kernels is None:
        out = reference(dtype)
        check_finite_result(out, lambda: reference(torch.float32))
    else:
        out = torch.empty(mtl.shape, dtype=dtype, device=mtl.device)
        if kernels.apply_mask(packed_row.contiguous(), mtl, out, base):
            raise result_error(dtype, lambda: reference(torch.float32))
    return out.view(shape)
