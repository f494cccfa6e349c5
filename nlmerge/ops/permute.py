"""Batched permutation gathers: apply the permutations of an alignment to many tensors at once.

``permute_tensors(tensors, perms)`` returns, for every tensor ``w`` with its (up to two)
``(axis, index)`` pairs, ``w.index_select(a0, p0).index_select(a1, p1)`` as a new contiguous
tensor (DESIGN.md, "Alignment": ``perms[p][i] = j`` means unit i of the aligned model is unit j of
the original). Values are moved, never computed: every backend is exact, NaN payloads included.

The reference (``"torch"``) is that ``index_select`` chain: one pass and one intermediate tensor
per axis. The fast kernels read and write each tensor once, viewing it as a contiguous
``[outer, A0, mid, A1, inner]`` block: ``out[o, i, m, j, u] = w[o, p0[i], m, p1[j], u]`` (the order of
the two ``index_select`` on distinct axes does not matter, so the pairs are sorted by axis).
``"cpu"`` copies contiguous inner runs in one OpenMP loop over all tensors of the call;
``"triton"`` is one kernel launch for all tensors of the call.
"""
from collections.abc import Sequence
from math import prod

import torch

from nlmerge.ops._checks import check_float
from nlmerge.ops._dispatch import resolve

__all__ = ["permute_tensors", "permute_reference"]


def permute_reference(tensor, pairs):
    """The specification for one tensor: the ``index_select`` chain over its ``(axis, index)`` pairs.

    Returns a new contiguous tensor (a copy when ``pairs`` is empty).
    """
    out = tensor
    for axis, index in pairs:
        out = out.index_select(axis, index)
    if not pairs:
        out = tensor.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _normalize(tensors, perms):
    """Check the arguments; return the device and, per tensor, its sorted ``[(axis, index)]``."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError("tensors must be a sequence of tensors")
    if isinstance(perms, torch.Tensor) or not isinstance(perms, Sequence):
        raise TypeError("perms must be a sequence (one entry of (axis, index) pairs per tensor)")
    if len(perms) != len(tensors):
        raise ValueError(f"perms has {len(perms)} entries for {len(tensors)} tensors")
    device = None
    plans = []
    for i, (w, spec) in enumerate(zip(tensors, perms)):
        check_float(w, f"tensors[{i}]")
        if device is None:
            device = w.device
        elif w.device != device:
            raise ValueError(f"tensors[{i}] is on {w.device} but tensors[0] is on {device}")
        if isinstance(spec, torch.Tensor) or not isinstance(spec, Sequence):
            raise TypeError(f"perms[{i}] must be a sequence of (axis, index) pairs")
        if len(spec) > 2:
            raise ValueError(f"perms[{i}] has {len(spec)} (axis, index) pairs; at most two are allowed")
        pairs = []
        for pair in spec:
            if isinstance(pair, torch.Tensor) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"perms[{i}] must hold (axis, index) pairs, got {pair!r}")
            axis, index = pair
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"perms[{i}]: axis must be an int, got {axis!r}")
            if not -w.dim() <= axis < w.dim():
                raise ValueError(f"perms[{i}]: axis {axis} is out of range for tensors[{i}] of shape {tuple(w.shape)}")
            axis %= w.dim()
            if any(axis == a for a, _ in pairs):
                raise ValueError(f"perms[{i}]: axis {axis} appears twice")
            if not isinstance(index, torch.Tensor):
                raise TypeError(f"perms[{i}]: the index of axis {axis} must be a tensor, got {type(index).__name__}")
            if index.dtype != torch.int64:
                raise ValueError(f"perms[{i}]: the index of axis {axis} must be int64, got {index.dtype}")
            if index.dim() != 1 or index.numel() != w.shape[axis]:
                raise ValueError(
                    f"perms[{i}]: the index of axis {axis} has shape {tuple(index.shape)}; tensors[{i}] has "
                    f"{w.shape[axis]} units on that axis (expected shape ({w.shape[axis]},))"
                )
            if index.device != w.device:
                raise ValueError(f"perms[{i}]: the index of axis {axis} is on {index.device} but tensors[{i}] is on {w.device}")
            pairs.append((axis, index))
        plans.append(sorted(pairs, key=lambda p: p[0]))
    _check_bijections(plans)
    return device, plans


def _check_bijections(plans):
    """Every index must be a permutation of its axis: all values in range and each hit once.

    All distinct index tensors of the call (an index shared by many tensors, as a BN vector shares
    its conv's permutation, counts once) are checked together on their device: concatenated,
    each value offset into its own segment of bins, one scatter-add of hits, per-segment counts
    of out-of-range values and of bins not hit exactly once, and one host synchronization.
    """
    first_use, uniq = {}, []
    for i, pairs in enumerate(plans):
        for axis, index in pairs:
            if id(index) not in first_use:
                first_use[id(index)] = (i, axis, index.numel())
                uniq.append(index)
    if not uniq:
        return
    device = uniq[0].device
    lens = torch.tensor([t.numel() for t in uniq], dtype=torch.int64)
    total = int(lens.sum())
    if total == 0:
        return
    offsets = (torch.cumsum(lens, 0) - lens).to(device)
    lens_d = lens.to(device)
    seg = torch.repeat_interleave(torch.arange(len(uniq), device=device), lens_d)  # segment of each value/bin
    values = torch.cat(uniq)
    inside = (values >= 0) & (values < lens_d[seg])
    bins = torch.where(inside, values + offsets[seg], torch.full_like(values, total))  # out of range: a spare bin
    hits = torch.zeros(total + 1, dtype=torch.int32, device=device)
    hits.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.int32))
    bad = (~inside).to(torch.int32) + (hits[:total] != 1).to(torch.int32)
    per_segment = torch.zeros(len(uniq), dtype=torch.int32, device=device).index_add_(0, seg, bad)
    for count, (i, axis, n) in zip(per_segment.tolist(), first_use.values()):
        if count:
            raise ValueError(f"perms[{i}]: the index of axis {axis} is not a permutation of range({n}) (not a bijection)")


def _geometry(shape, pairs):
    """``[outer, A0, mid, A1, inner]`` of a contiguous tensor of ``shape`` for its sorted pairs."""

    if not pairs:
        return (1, 1, 1, 1, prod(shape)), None, None
    a0, p0 = pairs[0]
    if len(pairs) == 1:  # in the inner slot: rows of `outer`, each gathering A runs of `inner`
        return (prod(shape[:a0]), 1, 1, shape[a0], prod(shape[a0 + 1 :])), None, p0
    a1, p1 = pairs[1]
    return (prod(shape[:a0]), shape[a0], prod(shape[a0 + 1 : a1]), shape[a1], prod(shape[a1 + 1 :])), p0, p1


def permute_tensors(tensors, perms, *, backend=None):
    """Apply permutations to many tensors: ``w.index_select(a0, p0).index_select(a1, p1)`` for each.

    Parameters
    ----------
    tensors : sequence of Tensor
        fp32, fp16 or bf16, any shape, contiguous or not, all on one device.
    perms : sequence
        One entry per tensor: a sequence of at most two ``(axis, index)`` pairs with distinct axes
        (negative axes count from the end); ``index`` is a 1-D int64 tensor on the tensor's device
        holding a permutation of ``range(tensor.shape[axis])``. An empty entry copies the tensor.
    backend : None, "torch", "cpu" or "triton"
        None picks one (DESIGN.md, "Backends"); all give identical results.

    Returns
    -------
    list of Tensor
        New contiguous tensors, same shapes and dtypes as the inputs, in order.

    Raises
    ------
    ValueError
        Naming ``perms[i]`` and the axis: an index that is not a permutation (not a bijection), of
        the wrong length, dtype or device, an axis out of range or given twice; or a tensor on
        another device than ``tensors[0]``. TypeError for arguments of the wrong kind.

    Notes
    -----
    The fast backends read and write each tensor once (a non-contiguous input is first made
    contiguous, one extra pass) and do not record autograd history; the reference does.
    """
    device, plans = _normalize(tensors, perms)
    if not plans:
        return []
    # the C++ gathers live in the CPU backend module; the Triton ones in their own module
    _, kernels = resolve(backend, device, "permute_tensors", triton_module="triton_permute")
    if kernels is None:
        return [permute_reference(w, pairs) for w, pairs in zip(tensors, plans)]
    srcs, outs, geometry, idx0, idx1 = [], [], [], [], []
    for w, pairs in zip(tensors, plans):
        w = (w.detach() if w.requires_grad else w).contiguous()
        geom, p0, p1 = _geometry(tuple(w.shape), pairs)
        srcs.append(w)
        outs.append(torch.empty_like(w, memory_format=torch.contiguous_format))
        geometry.append(geom)
        idx0.append(None if p0 is None else p0.contiguous())
        idx1.append(None if p1 is None else p1.contiguous())
    kernels.permute(srcs, outs, geometry, idx0, idx1)
    return outs
