"""Permutation specs: which (parameter, axis) pairs each permutation acts on, and applying them."""
import operator
from collections.abc import Mapping

import torch

from nlmerge.ops.permute import permute_tensors


def check_int(value, name, minimum=None):
    """``value`` as an int: TypeError naming ``name`` unless it is an integer (not a bool), ValueError
    naming it and the value when it is below ``minimum`` (None: no bound)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class PermutationSpec:
    """Map each permutation name to the ``(param_name, axis)`` pairs it acts on.

    Parameters
    ----------
    perms : Mapping[str, sequence of (str, int)]
        ``{perm_name: [(param_name, axis), ...]}``. A parameter may be touched on at most two
        axes (the limit of ``permute_tensors``); one ``(param, axis)`` belongs to one permutation.
    heads : Mapping[str, int], optional
        ``{perm_name: num_heads}`` for attention permutations, which permute whole heads (blocks of
        ``size // num_heads`` consecutive units) and then units within each head.
    state_dict : Mapping[str, Tensor], optional
        When given, the spec is validated against it on construction (see :meth:`validate`).

    Attributes
    ----------
    perms : dict
        ``{perm_name: [(param_name, axis), ...]}``.
    params : dict
        The inverse map ``{param_name: [(perm_name, axis), ...]}``.
    heads : dict
        ``{perm_name: num_heads}`` of the head-structured permutations.
    """

    def __init__(self, perms, *, heads=None, state_dict=None):
        self.perms = {}
        self.params = {}
        for name, pairs in perms.items():
            name = str(name)
            entries = []
            for pair in pairs:
                param, axis = pair
                if not isinstance(axis, int) or isinstance(axis, bool):
                    raise ValueError(f"permutation {name!r}: axis of {param!r} must be an int, got {axis!r}")
                entries.append((str(param), axis))
            if not entries:
                raise ValueError(f"permutation {name!r} acts on no parameter")
            self.perms[name] = entries
            for param, axis in entries:
                self.params.setdefault(param, []).append((name, axis))
        for param, pairs in self.params.items():
            if len(pairs) > 2:
                raise ValueError(f"parameter {param!r} is touched on {len(pairs)} axes (at most 2): {pairs}")
        self.heads = {}
        for name, count in dict(heads or {}).items():
            if name not in self.perms:
                raise ValueError(f"heads given for unknown permutation {name!r}")
            self.heads[name] = check_int(count, f"num_heads of permutation {name!r}", 1)
        if state_dict is not None:
            self.validate(state_dict)

    def __repr__(self):
        return f"PermutationSpec({len(self.perms)} permutations over {len(self.params)} parameters)"

    def validate(self, state_dict):
        """Check the spec against a state dict and return the size of every permutation.

        Parameters
        ----------
        state_dict : Mapping[str, Tensor]
            The model's parameters (extra keys are allowed).

        Returns
        -------
        dict
            ``{perm_name: size}``.

        Raises
        ------
        ValueError
            A parameter name not in the state dict, an axis out of range, two entries on one axis of
            a parameter, axes of one permutation with different sizes, or a head count that does
            not divide the size.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        for param, pairs in self.params.items():
            if param not in state_dict:
                raise ValueError(f"parameter {param!r} of the spec (permutations {[p for p, _ in pairs]}) "
                                 "is not in the state dict")
            ndim = state_dict[param].dim()
            seen = set()
            for perm, axis in pairs:
                if not -ndim <= axis < ndim:
                    raise ValueError(f"permutation {perm!r}: axis {axis} out of range for {param!r} "
                                     f"with shape {tuple(state_dict[param].shape)}")
                if axis % ndim in seen:
                    raise ValueError(f"parameter {param!r}: axis {axis % ndim} is permuted twice")
                seen.add(axis % ndim)
        sizes = {}
        for perm, pairs in self.perms.items():
            found = {(param, axis): state_dict[param].shape[axis] for param, axis in pairs}
            if len(set(found.values())) != 1:
                raise ValueError(f"permutation {perm!r}: axes of different sizes {found}")
            sizes[perm] = next(iter(found.values()))
            heads = self.heads.get(perm)
            if heads is not None and sizes[perm] % heads:
                raise ValueError(f"permutation {perm!r}: {heads} heads do not divide size {sizes[perm]}")
        return sizes


def check_permutation(name, perm, size, heads=None):
    """Return ``perm`` as an int64 tensor after checking that it permutes ``range(size)``.

    Parameters
    ----------
    name : str
        The permutation's name (for errors).
    perm : Tensor or sequence of int
        The permutation.
    size : int
        Its required length.
    heads : int, optional
        Head count of a head-structured permutation: every head's block must map onto one block.

    Returns
    -------
    Tensor
        The permutation, 1-D int64 on its own device (CPU for sequences); may be ``perm`` itself
        when that already is one.

    Raises
    ------
    ValueError
        Not 1-D integer, wrong length, not a bijection, or (with ``heads``) breaking head blocks;
        ``size`` < 0, ``heads`` < 1 or not dividing ``size``.
    TypeError
        ``size`` or ``heads`` not an int.
    """
    size = check_int(size, f"size of permutation {name!r}", 0)
    if heads is not None:
        heads = check_int(heads, f"heads of permutation {name!r}", 1)
        if size % heads:
            raise ValueError(f"permutation {name!r}: {heads} heads do not divide size {size}")
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise ValueError(f"permutation {name!r} must be a 1-D integer tensor, got {perm.dtype} "
                         f"of shape {tuple(perm.shape)}")
    perm = perm.long()
    if perm.numel() != size:
        raise ValueError(f"permutation {name!r} has length {perm.numel()}, expected {size}")
    if size and (perm.min() < 0 or perm.max() >= size
                 or not torch.equal(torch.sort(perm).values, torch.arange(size, device=perm.device))):
        raise ValueError(f"permutation {name!r} is not a bijection of range({size})")
    if heads is not None and size:
        blocks = perm.view(heads, size // heads) // (size // heads)
        if not bool((blocks == blocks[:, :1]).all()):
            raise ValueError(f"permutation {name!r} does not move whole heads ({heads} heads)")
    return perm


def apply_permutations(spec, perms, state_dict, *, backend=None):
    """Apply permutations to a state dict: ``aligned[w] = w.index_select(axis, perms[p])``.

    Parameters
    ----------
    spec : PermutationSpec
        Which (parameter, axis) pairs each permutation acts on.
    perms : Mapping[str, Tensor]
        ``{perm_name: index}`` with ``index[i] = j``: unit i of the result is unit j of the input.
        Permutations of the spec missing here are the identity.
    state_dict : Mapping[str, Tensor]
        The model to permute; not modified.
    backend : str, optional
        Backend of ``nlmerge.ops.permute.permute_tensors``.

    Returns
    -------
    dict
        A new state dict in the input's key order: every touched parameter gathered by one
        ``permute_tensors`` call per device, the other entries copied (``clone``).

    Raises
    ------
    ValueError
        A permutation not in the spec, one that is not a bijection of the right length, or a
        permuted parameter that is not float32, float16 or bfloat16.
    """
    sizes = spec.validate(state_dict)
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise ValueError(f"permutations not in the spec: {unknown}")
    checked = {name: check_permutation(name, perms[name], sizes[name], spec.heads.get(name)) for name in perms}
    jobs = {}  # device -> (keys, tensors, axis/index pairs)
    for param, pairs in spec.params.items():
        w = state_dict[param]
        moves = [(axis % w.dim(), checked[p].to(w.device)) for p, axis in pairs if p in checked]
        if moves:
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"parameter {param!r} has dtype {w.dtype}; permutations apply to "
                                 "float32, float16 and bfloat16 tensors")
            keys, tensors, plans = jobs.setdefault(w.device, ([], [], []))
            keys.append(param)
            tensors.append(w.detach())
            plans.append(moves)
    permuted = {}
    for keys, tensors, plans in jobs.values():
        permuted.update(zip(keys, permute_tensors(tensors, plans, backend=backend)))
    out = {}
    for key, value in state_dict.items():
        out[key] = permuted[key] if key in permuted else (value.detach().clone()
                                                          if torch.is_tensor(value) else value)
    return out
