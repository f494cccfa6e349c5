"""Permutation specs: which (parameter, axis) pairs each permutation acts on, and applying them."""
import operator
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class AttentionGroup:
    """Four head-structured permutations of one attention layer that must move together.

    Attention with ``heads`` query heads and ``kv_heads`` key/value heads (grouped-query attention:
    query heads ``j * g .. j * g + g - 1`` read key/value head ``j``, ``g = heads // kv_heads``;
    ``kv_heads == heads`` is plain multi-head attention) keeps its function exactly under

    - ``pi``: a permutation of the key/value heads, each carrying its group of query heads;
    - ``rho[j]``: a permutation of the query heads within group j;
    - ``tau[j]``: a permutation of the units within the q and k heads of group j (the same one
      on q and k, so that every dot product ``q . k`` is a sum of the same terms) — only when
      ``qk_units`` is True: rotary embeddings rotate each pair of q/k dimensions by its own
      frequency, so with them no permutation of q/k units but the identity keeps the function;
    - ``sigma[j]``: a permutation of the units within value head j, and of the matching columns
      of the output projection for every query head of group j.

    The permutations are stored as four flat index tensors (the spec's ``q``, ``k``, ``v``, ``o``
    permutations, applied like any other): unit ``(j, r, u)`` of the aligned q rows is unit
    ``(pi[j], rho[j][r], tau[j][u])`` of the original, k rows ``(pi[j], tau[j][u])``, v rows
    ``(pi[j], sigma[j][u])``, o columns ``(pi[j], rho[j][r], sigma[j][u])``. With one query head
    per key/value head, ``q`` may equal ``k`` (one permutation on both) and ``v`` may equal ``o``.
    """
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    qk_units: bool = False

    @property
    def group(self):
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def roles(self):
        """``(role, perm name, head count)`` of q, k, v, o."""
        return (("q", self.q, self.heads), ("k", self.k, self.kv_heads),
                ("v", self.v, self.kv_heads), ("o", self.o, self.heads))


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
    attention : Mapping[str, AttentionGroup], optional
        ``{group_name: AttentionGroup}``: tied head-structured permutations of attention layers
        (their head counts are entered in ``heads``; they are matched and checked together).
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
    attention : dict
        ``{group_name: AttentionGroup}``.
    grouped : dict
        ``{perm_name: group_name}`` of the permutations in an attention group.
    """

    def __init__(self, perms, *, heads=None, attention=None, state_dict=None):
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
        self.attention, self.grouped = {}, {}
        for group_name, group in dict(attention or {}).items():
            self._add_group(str(group_name), group)
        if state_dict is not None:
            self.validate(state_dict)

    def _add_group(self, name, group):
        if not isinstance(group, AttentionGroup):
            raise TypeError(f"attention group {name!r} must be an AttentionGroup, got {type(group).__name__}")
        heads = check_int(group.heads, f"heads of attention group {name!r}", 1)
        kv_heads = check_int(group.kv_heads, f"kv_heads of attention group {name!r}", 1)
        if heads % kv_heads:
            raise ValueError(f"attention group {name!r}: {kv_heads} key/value heads do not divide {heads} query heads")
        if {group.q, group.k} & {group.v, group.o}:
            raise ValueError(f"attention group {name!r}: q/k and v/o permutations must differ")
        for a, b in ((group.q, group.k), (group.v, group.o)):
            if a == b and heads != kv_heads:
                raise ValueError(f"attention group {name!r}: {a!r} serves two roles, which needs as many "
                                 f"key/value heads as query heads ({kv_heads} vs {heads})")
        for role, perm, count in group.roles:
            if perm not in self.perms:
                raise ValueError(f"attention group {name!r}: its {role} permutation {perm!r} is not in the spec")
            if self.grouped.get(perm, name) != name:
                raise ValueError(f"permutation {perm!r} is in two attention groups: {self.grouped[perm]!r} and {name!r}")
            if self.heads.setdefault(perm, count) != count:
                raise ValueError(f"attention group {name!r}: permutation {perm!r} has {self.heads[perm]} heads, "
                                 f"the group's {role} needs {count}")
            self.grouped[perm] = name
        self.attention[name] = group

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
        for name, group in self.attention.items():
            dims = {r: sizes[p] // c for r, p, c in group.roles}
            if dims["q"] != dims["k"] or dims["v"] != dims["o"]:
                raise ValueError(f"attention group {name!r}: head sizes differ, q {dims['q']} k {dims['k']} "
                                 f"v {dims['v']} o {dims['o']}")
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


def compose_heads(pi, rho, within):
    """The flat index of a head-structured axis laid out ``[kv_heads, group, head_dim]``.

    ``index[(j * g + r) * d + u] = (pi[j] * g + rho[j, r]) * d + within[j, u]`` for ``pi`` of shape
    ``[kv_heads]``, ``rho`` ``[kv_heads, g]``, ``within`` ``[kv_heads, d]`` (int64); returns an int64
    tensor of ``kv_heads * g * d`` entries (see :class:`AttentionGroup`).
    """
    g, d = rho.shape[1], within.shape[1]
    return ((pi[:, None, None] * g + rho[:, :, None]) * d + within[:, None, :]).reshape(-1)


def split_heads(name, perm, kv_heads, group):
    """The factors ``(pi, rho, within)`` of :func:`compose_heads` of the bijection ``perm``.

    ValueError naming the permutation when it is not of that form: a block of query heads that
    does not stay with one key/value head, or heads of one group with different unit orders.
    """
    d = perm.numel() // (kv_heads * group)
    view = perm.view(kv_heads, group, d)
    blocks = view // d  # original (kv head * g + r) of every unit
    if not bool((blocks == blocks[:, :, :1]).all()):
        raise ValueError(f"permutation {name!r} does not move whole heads")
    blocks = blocks[:, :, 0]
    pi = blocks[:, 0] // group
    if not bool((blocks // group == pi[:, None]).all()):
        raise ValueError(f"permutation {name!r} moves a query head out of its key/value group")
    within = view - blocks[:, :, None] * d
    if not bool((within == within[:, :1]).all()):
        raise ValueError(f"permutation {name!r} orders the units of the heads of one key/value group differently")
    return pi, blocks % group, within[:, 0]


def check_group(name, group, perms, sizes):
    """Check that the permutations of an attention group move together (:class:`AttentionGroup`).

    ``perms`` holds checked bijections (missing members are the identity), ``sizes`` every member's
    size. ValueError naming the group and the permutation that breaks it: heads not moved with their
    key/value head, q and k (or v and o) ordered differently, or q/k units moved within a head where
    the group has rotary embeddings (``qk_units`` False).
    """
    factors = {}
    for role, perm, count in group.roles:
        index = perms.get(perm)
        if index is None:
            index = torch.arange(sizes[perm])
        factors[role] = split_heads(perm, index.cpu(), group.kv_heads, count // group.kv_heads)
    pi = factors["k"][0]
    for role, perm, _ in group.roles:
        if not torch.equal(factors[role][0], pi):
            raise ValueError(f"attention group {name!r}: {perm!r} moves the key/value heads unlike {group.k!r}")
    for a, b, what in (("q", "o", "query heads"), ("q", "k", "q/k units"), ("v", "o", "v/o units")):
        i = 1 if what == "query heads" else 2
        if not torch.equal(factors[a][i], factors[b][i]):
            raise ValueError(f"attention group {name!r}: {getattr(group, a)!r} and {getattr(group, b)!r} "
                             f"order the {what} differently")
    if not group.qk_units and not torch.equal(factors["q"][2], torch.arange(factors["q"][2].shape[1]).expand_as(
            factors["q"][2])):
        raise ValueError(f"attention group {name!r}: {group.q!r} moves q/k units within a head; with rotary "
                         "embeddings only whole heads may move")


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
        A permutation not in the spec, one that is not a bijection of the right length, an
        attention group whose permutations do not move together (see :func:`check_group`), or a
        permuted parameter that is not float32, float16 or bfloat16.
    """
    sizes = spec.validate(state_dict)
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise ValueError(f"permutations not in the spec: {unknown}")
    checked = {name: check_permutation(name, perms[name], sizes[name], spec.heads.get(name)) for name in perms}
    for name, group in spec.attention.items():
        check_group(name, group, checked, sizes)
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
