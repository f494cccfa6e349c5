"""DARE over the models: the random keep of each task vector, and the L1 norms of its rescale.

DARE (mergekit's ``dare_linear`` / ``dare_ties``) keeps element i of task vector t iff its draw
(:mod:`nlmerge.ops.random`: the seed, the tensor's name, stream t) is below
``keep_threshold(density_t)`` (exactly :func:`nlmerge.ops.random.keep_mask`; a dropped entry
becomes +0), then rescales the kept part by ``L1(tau_t) / L1(kept part)``. A :class:`RandomKeep`
names those draws. The models merge ops (``task_arithmetic_models``, ``ties_merge_models``,
``ties_merge_pass_models``) take it as ``random_keep=`` and drop the entries as they form the task
vectors; :func:`keep_l1_norms_models` gives both norms of every task from one read of the models.
The references build the masked fp32 task vectors (:func:`keep_task_vectors`).

The norms' rounding is defined (:func:`l1_norm`), so every backend and thread count gives the same
bits: the fp32 magnitudes are summed in fp64 in a fixed order (blocks of ``BLOCK`` elements, 16
lanes within a block, pairwise halving across lanes and across blocks). Each term passes through
at most ``68 + log2(n)`` fp64 additions of non-negative values, so the norm is within
``(68 + log2(n)) * 2**-53`` relative of the exact sum: far inside the fp32 rescale factor.

Backends (``backend=``): ``"cpu"`` (the default on CPU tensors when the extension is built) runs the
C++ kernel (``csrc/cpu/merge.cpp``, the draws of ``csrc/cpu/random.cpp``); ``"triton"`` (the default
on CUDA tensors) the Triton kernels (``nlmerge/kernels/triton_merge.py``: the draws by ``tl.philox``
with the same counters, the norms' block sums on the device, combined across blocks here);
``"torch"`` the reference. All give the same bits.
"""
from typing import NamedTuple

import torch

from nlmerge.ops._checks import check_models, first_nonfinite_model, model_task_vectors, raise_nonfinite_model
from nlmerge.ops._dispatch import resolve
from nlmerge.ops.random import UNIFORM_BITS, keep_mask, keep_threshold, stream_key

BLOCK = 1024  # elements per block of the norms' order: the C++ kernels' block
LANES = 16  # lanes within a block
_CHUNK_BLOCKS = 1024  # blocks per step of the reference (bounded fp64 temporaries)


class RandomKeep(NamedTuple):
    """DARE's keep draws of T task vectors of one tensor: task t keeps element i (flat index) iff
    ``keep_mask(seed, name, ..., densities[t], stream=t)`` does.

    ``seed``: int in [0, 2**64); ``name``: the tensor's key (str); ``densities``: T floats in
    [0, 1] (1 keeps everything). Checked by :meth:`draw_key`. ``bits``: None, or these draws'
    keep flags as ``keep_l1_norms_models(..., record=True)`` recorded them on the C++ backend
    (uint8 ``[T, keep_row_bytes(N)]``, bit ``i % 8`` of byte ``i // 8`` of row t: element i of
    task t kept): the C++ merge kernels read them instead of drawing them again (16% off a
    dare_ties key). Never set them by hand: they are trusted, not checked against the draws.
    """

    seed: int
    name: str
    densities: tuple
    bits: object = None

    def draw_key(self):
        """``(k0, k1, h, thresholds)``: the Philox key of ``(seed, name)`` and the T integer keep
        thresholds (list of int), as the kernels take them. Raises ValueError / TypeError for a
        bad seed, name or density."""
        k0, k1, h = stream_key(self.seed, self.name)
        return k0, k1, h, [keep_threshold(d) for d in self.densities]

    def mask(self, t, shape, device):
        """Task t's bool keep mask of ``shape`` on ``device``, or None when it keeps everything."""
        if keep_threshold(self.densities[t]) >= 1 << UNIFORM_BITS:
            return None
        return keep_mask(self.seed, self.name, shape, self.densities[t], stream=t, device=device)


def keep_row_bytes(numel):
    """Bytes per task of recorded keep flags (``RandomKeep.bits``) over ``numel`` elements: whole
    blocks of ``BLOCK`` flags."""
    return -(-numel // BLOCK) * (BLOCK // 8)


def check_random_keep(keep, num_tasks, numel):
    """``keep``: None or a :class:`RandomKeep` with ``num_tasks`` densities (and, when it carries
    recorded ``bits``, their shape for ``numel`` elements); returned as is."""
    if keep is None:
        return None
    if not isinstance(keep, RandomKeep):
        raise TypeError(f"random_keep must be None or an nlmerge.ops.RandomKeep, got {type(keep).__name__}")
    if len(keep.densities) != num_tasks:
        raise ValueError(f"random_keep has {len(keep.densities)} densities for {num_tasks} task vectors")
    keep.draw_key()  # checks seed, name and densities
    if keep.bits is not None:
        shape = (num_tasks, keep_row_bytes(numel))
        bits = keep.bits
        if not (isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8 and bits.device.type == "cpu"
                and tuple(bits.shape) == shape and bits.is_contiguous()):
            raise ValueError(f"random_keep.bits must be the contiguous CPU uint8 {list(shape)} that "
                             "keep_l1_norms_models(..., record=True) returns for these tensors")
    return keep


def keep_task_vectors(base, experts, keep):
    """The reference's task vectors: ``fp32(experts[t]) - fp32(base)`` with the entries that ``keep``
    drops set to +0.

    Parameters
    ----------
    base : Tensor [N]
        Flat, any float dtype (``check_models``'s output).
    experts : sequence of T flat tensors
    keep : RandomKeep or None (nothing dropped)

    Returns
    -------
    Tensor
        fp32 ``[T, N]``, new.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base, an expert or a task vector (named as in ``first_nonfinite_model``):
        checked before masking, which could hide them.
    """
    tv = model_task_vectors(base, experts)
    if keep is None:
        return tv
    if not bool(torch.isfinite(tv.sum())):  # one read; a finite sum that overflows only costs the exact check
        err = first_nonfinite_model(base, experts)
        if err is not None:
            raise err
    for t in range(tv.shape[0]):
        kept = keep.mask(t, tv.shape[1], tv.device)
        if kept is not None:
            tv[t].masked_fill_(~kept, 0.0)
    return tv


def _halving_sum(v):
    """Pairwise-halving sum of the fp64 vector ``v`` zero-padded to a power of two: while more
    than one entry, entry l += entry l + w (w: half the padded length)."""
    size = 1
    while size < v.numel():
        size *= 2
    v = torch.nn.functional.pad(v, (0, size - v.numel()))
    while v.numel() > 1:
        half = v.numel() // 2
        v = v[:half] + v[half:]
    return v[0]


def l1_norm(x):
    """The L1 norm of DARE's rescale, with its rounding defined: the fp64 sum of ``|x|``.

    Order: the flat ``|x|`` (each exact in fp64) zero-padded to whole blocks of ``BLOCK``
    elements; in a block, lane l (of ``LANES``) sums elements ``l, l + 16, ...`` in order from
    +0; the lanes combine by pairwise halving (lane l += lane l + w, w = 8, 4, 2, 1); the block sums
    combine by :func:`_halving_sum`. The C++ kernel sums in this order.

    Parameters
    ----------
    x : Tensor
        Any float tensor (fp32 task vectors here); any shape and device.

    Returns
    -------
    Tensor
        0-dim float64 on ``x``'s device (0 for an empty ``x``; NaN/Inf where ``x`` has them).
    """
    flat = x.reshape(-1)
    nblocks = -(-flat.numel() // BLOCK)
    if nblocks == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    sums = torch.empty(nblocks, dtype=torch.float64, device=x.device)
    for b0 in range(0, nblocks, _CHUNK_BLOCKS):
        b1 = min(nblocks, b0 + _CHUNK_BLOCKS)
        part = flat[b0 * BLOCK : b1 * BLOCK].abs().double()
        part = torch.nn.functional.pad(part, (0, (b1 - b0) * BLOCK - part.numel()))
        rows = part.view(b1 - b0, BLOCK // LANES, LANES)
        acc = torch.zeros((b1 - b0, LANES), dtype=torch.float64, device=x.device)
        for r in range(rows.shape[1]):
            acc += rows[:, r]
        w = LANES // 2
        while w:
            acc = acc[:, :w] + acc[:, w : 2 * w]
            w //= 2
        sums[b0:b1] = acc[:, 0]
    return _halving_sum(sums)


def keep_l1_norms_models(base, experts, keep, *, record=False, backend=None):
    """The L1 norms of DARE's rescale for every task, from the models.

    Parameters
    ----------
    base : Tensor
        The base's tensor (fp32, fp16 or bf16), any shape.
    experts : sequence of T tensors
        The base's shape and device (dtypes other than the base's: all converted to fp32 first).
    keep : RandomKeep
        T densities.
    record : bool
        Also return ``keep`` with its keep flags recorded (``RandomKeep.bits``) on the C++ backend,
        for the merge pass that follows (as it is on the others).
    backend : None, "torch", "cpu" or "triton"
        Every backend gives the same bits.

    Returns
    -------
    Tensor, or (Tensor, RandomKeep) with ``record``
        float64 ``[T, 2]`` on the CPU: ``[t, 0] = l1_norm(tau_t)``, ``[t, 1] = l1_norm`` of its entries
        that ``keep`` keeps, with ``tau_t = fp32(experts[t]) - fp32(base)``.

    Raises
    ------
    NonFiniteError
        NaN/Inf in the base (``"base"``), expert t (``"experts"``, ``task=t``), or a task vector
        overflowing fp32 (``"task_vectors"``, ``task=t``).
    ValueError, TypeError
        A bad ``keep`` (its number of densities, seed, name or a density), or backend.
    """
    flat_base, flat = check_models(base, experts)
    if keep is None:
        raise TypeError("keep must be an nlmerge.ops.RandomKeep")
    check_random_keep(keep, len(flat), flat_base.numel())
    name, kernels = resolve(backend, flat_base.device, "keep_l1_norms_models")
    if name == "cpu":
        norms = torch.empty((len(flat), 2), dtype=torch.float64)
        bits = torch.empty((len(flat), keep_row_bytes(flat_base.numel())), dtype=torch.uint8) if record else None
        kernels.keep_l1_norms_models(flat_base, flat, keep.draw_key(), norms, keep_bits=bits)
        keep = keep if bits is None else keep._replace(bits=bits)
    elif name == "triton":  # block sums on the device, combined across blocks here as l1_norm does
        sums = torch.empty((len(flat), 2, -(-flat_base.numel() // BLOCK)), dtype=torch.float64, device=flat_base.device)
        kernels.keep_l1_block_sums(flat_base, flat, keep.draw_key(), sums)
        norms = torch.stack([torch.stack([_halving_sum(row) for row in task]) for task in sums]).cpu()
    else:
        rows = []
        for t, tau in enumerate(model_task_vectors(flat_base, flat)):
            kept = keep.mask(t, tau.shape, tau.device)
            rows.append(torch.stack([l1_norm(tau), l1_norm(tau if kept is None else tau.masked_fill(~kept, 0.0))]))
        norms = torch.stack(rows).cpu()
    if not bool(torch.isfinite(norms).all()):
        raise_nonfinite_model(flat_base, flat)
    return (norms, keep) if record else norms
