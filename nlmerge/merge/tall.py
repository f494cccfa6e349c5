"""TALL masks and consensus merging of state dicts (DESIGN.md, "Semantics")."""
import os
import uuid
from collections.abc import Mapping

import torch

from nlmerge import ops
from nlmerge.merge._common import (
    COMPUTE_DTYPE,
    assemble,
    cast_result,
    check_experts,
    check_lam,
    check_running_stats,
    check_scalar,
    copy_value,
    make_plan,
    model_tensors,
    naming_nonfinite,
    running_stat_values,
)
from nlmerge.merge.ties import check_ties_options, ties_vectors
from nlmerge.ops._checks import check_out_dtype
from nlmerge.ops.tall import check_k

MTL_METHODS = ("task_arithmetic", "ties")
TIES_OPTIONS = ("keep", "scope", "sign", "disjoint", "weights", "convention")
FORMAT = "nlmerge.TallMasks"
VERSION = 2  # 2: running statistics stored apart (version 1 merged them as task vectors)


def _mtl_setup(mtl, ties_kwargs, num_tasks):
    """Validate the multi-task vector's recipe; return the checked TIES options (or None)."""
    if mtl not in MTL_METHODS:
        raise ValueError(f"mtl must be one of {MTL_METHODS}, got {mtl!r}")
    ties_kwargs = dict(ties_kwargs or {})
    if mtl == "task_arithmetic":
        if ties_kwargs:
            raise ValueError('ties_kwargs apply only with mtl="ties"')
        return None
    unknown = sorted(set(ties_kwargs) - set(TIES_OPTIONS))
    if unknown:
        raise ValueError(f"ties_kwargs accepts {TIES_OPTIONS}, got unknown {unknown}")
    options = dict(keep=0.2, scope=None, sign="mass", disjoint="mean", weights=None, convention="ties")
    options.update(ties_kwargs)
    options["keep"], options["scope"], options["weights"] = check_ties_options(num_tasks, **options)
    return options


def _mtl_vectors(plan, base, experts, ties_options, backend):
    """Yield ``(key, models, tau_mtl)`` over the merged keys: the key's ``(base, experts)`` tensors
    and its multi-task vector (fp32), formed from the models (no task vector is stored).

    Task arithmetic and per-tensor TIES compute one key at a time; global TIES computes every
    key's multi-task vector first (its thresholds and majority sign span the model).
    """
    naming = lambda keys: naming_nonfinite(keys, base, experts)  # noqa: E731
    get_models = lambda key: model_tensors(key, base, experts)  # noqa: E731

    def ties_mtl(keys):
        return ties_vectors(keys, get_models, include_base=False, lam=1.0, backend=backend, naming=naming,
                            **ties_options)

    if ties_options is not None and ties_options["scope"] == "global":
        mtl = ties_mtl(plan.merged)
        for key in plan.merged:
            yield key, get_models(key), mtl.pop(key)
        return
    for key in plan.merged:
        models = get_models(key)
        if ties_options is None:
            with naming([key]):
                mtl = ops.task_arithmetic_models(*models, include_base=False, out_dtype=COMPUTE_DTYPE, backend=backend)
        else:
            mtl = ties_mtl([key])[key]
        yield key, models, mtl


class TallMasks:
    """TALL masks of T tasks: rebuilds each task's model as ``theta_base + m_t * tau_MTL``.

    Holds the base state dict (every key, so that excluded keys and integer buffers come back),
    the multi-task vector ``tau_MTL`` (fp32) and the bit-packed masks (uint8 ``[T, ceil(N/8)]``)
    of every merged key, the values of the BatchNorm running statistics that every task model
    takes (``stats``, fp32: no mask and no ``tau_MTL`` for them, see :mod:`nlmerge.merge`), and
    ``lam`` (a float or one float per task). Build it with :func:`tall` or :meth:`load`.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict; its key order and dtypes are those of every rebuilt model (unless
        ``out_dtype`` says otherwise).
    tau_mtl : Mapping[str, Tensor]
        The multi-task vector of each merged key (a floating tensor of the base's shape).
    masks : Mapping[str, Tensor]
        The packed masks of each key of ``tau_mtl``.
    lam : float or list of float
        The TALL parameter the masks were computed with (finite, >= 0).
    stats : Mapping[str, Tensor], optional
        Keys of the base (not in ``tau_mtl``) whose value, the same in every task model, is given
        here (a floating tensor of the base's shape): the running statistics.
    num_tasks : int, optional
        T; inferred from the masks (or a per-task ``lam``) when not given.
    backend : None, "torch", "cpu" or "triton"
        Default backend of :meth:`task_state_dict`.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Default ``out_dtype`` of :meth:`task_state_dict`.
    copy : bool
        Clone the tensors (True), or keep them as given (False).
    """

    def __init__(self, base, tau_mtl, masks, lam, *, stats=None, num_tasks=None, backend=None, out_dtype=None, copy=True):
        stats = {} if stats is None else stats
        for name, value in (("base", base), ("tau_mtl", tau_mtl), ("masks", masks), ("stats", stats)):
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a mapping, got {type(value).__name__}")
        if set(masks) != set(tau_mtl):
            raise ValueError("masks and tau_mtl must have the same keys")
        for key, value in stats.items():
            if key not in base or key in tau_mtl:
                raise ValueError(f"key {key!r} of stats must be a key of the base and not of tau_mtl")
            ref = base[key]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != ref.shape:
                raise ValueError(f"key {key!r}: stats must be a floating tensor of the base's shape {tuple(ref.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"key {key!r}: stats contains NaN or Inf")
        for key, mtl in tau_mtl.items():
            if key not in base:
                raise ValueError(f"key {key!r} of tau_mtl is not in the base")
            ref, packed = base[key], masks[key]
            if not isinstance(mtl, torch.Tensor) or not mtl.is_floating_point() or mtl.shape != ref.shape:
                raise ValueError(f"key {key!r}: tau_mtl must be a floating tensor of the base's shape {tuple(ref.shape)}")
            if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
                raise ValueError(f"key {key!r}: masks must be uint8 [T, ceil(N/8)]")
            if packed.shape[1] != ops.packed_size(mtl.numel()):
                raise ValueError(
                    f"key {key!r}: masks have {packed.shape[1]} bytes per task for {mtl.numel()} elements"
                )
            if num_tasks is None:
                num_tasks = packed.shape[0]
            elif packed.shape[0] != num_tasks:
                raise ValueError(f"key {key!r}: masks for {packed.shape[0]} tasks, expected {num_tasks}")
        if num_tasks is None:
            if not isinstance(lam, (list, tuple)):
                raise ValueError("no merged keys: give num_tasks (or lam per task)")
            num_tasks = len(lam)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError("TALL masks need at least one task")
        clone = copy_value if copy else (lambda v: v)
        self._lam = check_lam(list(lam) if isinstance(lam, tuple) else lam, num_tasks, bound="nonnegative")
        self._num_tasks = num_tasks
        self._base = {key: clone(value) for key, value in base.items()}
        self._tau_mtl = {key: clone(tau_mtl[key]) for key in base if key in tau_mtl}
        self._masks = {key: clone(masks[key]) for key in base if key in masks}
        self._stats = {key: clone(stats[key]) for key in base if key in stats}
        self.backend = backend
        self.out_dtype = check_out_dtype(out_dtype)

    @property
    def num_tasks(self):
        """Number of tasks T."""
        return self._num_tasks

    @property
    def lam(self):
        """The TALL parameter: a float, or a list of one float per task."""
        return list(self._lam) if isinstance(self._lam, list) else self._lam

    @property
    def keys(self):
        """The keys of the rebuilt state dicts, in order."""
        return list(self._base)

    @property
    def merged_keys(self):
        """The keys that carry a mask and a multi-task vector, in order."""
        return list(self._tau_mtl)

    @property
    def base(self):
        """The base state dict (the stored tensors, not copies)."""
        return dict(self._base)

    @property
    def tau_mtl(self):
        """The multi-task vector of each merged key (the stored tensors, not copies)."""
        return dict(self._tau_mtl)

    @property
    def masks(self):
        """The packed masks, uint8 ``[T, ceil(N/8)]``, of each merged key (stored tensors)."""
        return dict(self._masks)

    @property
    def stats(self):
        """The running statistics every task model takes, by key (the stored tensors)."""
        return dict(self._stats)

    def mask(self, t, key):
        """Task ``t``'s mask of ``key`` as a bool tensor of the key's shape.

        Parameters
        ----------
        t : int
            Task index, ``0 <= t < num_tasks``.
        key : str
            A merged key.

        Returns
        -------
        Tensor
            bool, the shape of ``base[key]``.
        """
        t = self._task(t)
        if key not in self._masks:
            raise KeyError(f"{key!r} has no TALL mask (not a merged key)")
        shape = self._base[key].shape
        return ops.unpack_masks(self._masks[key][t], self._tau_mtl[key].numel()).reshape(shape)

    def _task(self, t):
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"task index must be an int, got {t!r}")
        if not 0 <= t < self._num_tasks:
            raise IndexError(f"task {t} out of range for {self._num_tasks} tasks")
        return t

    def task_state_dict(self, t, *, out_dtype=None, backend=None):
        """Task ``t``'s model: ``theta_base + m_t * tau_MTL`` on merged keys, the stored ``stats``
        on running statistics, the base elsewhere.

        Parameters
        ----------
        t : int
            Task index, ``0 <= t < num_tasks``.
        out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
            Dtype of the merged keys and running statistics (default: this object's
            ``out_dtype``, else the base's dtype of each key).
        backend : None, "torch", "cpu" or "triton"
            Passed to ``nlmerge.ops.apply_mask`` (default: the one this object was built with).

        Returns
        -------
        dict
            A new state dict in the base's key order (computed in fp32, rounded once).

        Raises
        ------
        NonFiniteResultError
            (a ValueError) A value does not fit its output dtype (it would be Inf): names the key.
        """
        t = self._task(t)
        backend = self.backend if backend is None else backend
        out_dtype = check_out_dtype(out_dtype) or self.out_dtype
        computed = {}
        with torch.no_grad():
            for key, mtl in self._tau_mtl.items():
                base = self._base[key]
                with naming_nonfinite([key]):
                    computed[key] = ops.apply_mask(
                        self._masks[key][t], mtl, base=base, out_dtype=out_dtype or base.dtype, backend=backend
                    )
            for key, value in self._stats.items():
                computed[key] = cast_result(key, value, out_dtype or self._base[key].dtype)
        return {key: computed[key] if key in computed else copy_value(value) for key, value in self._base.items()}

    def save(self, path):
        """Write everything needed to rebuild every task's model to ``path`` (``torch.save``).

        The file is written to a temporary file in the same directory, then moved into place with
        ``os.replace``: ``path`` never holds a half-written file. Non-tensor entries of the base
        must be plain values (numbers, strings, lists, dicts) for :meth:`load` to read them back.

        Parameters
        ----------
        path : str or os.PathLike
        """
        path = os.fspath(path)
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "num_tasks": self._num_tasks,
            "lam": self.lam,
            "base": self._base,
            "tau_mtl": self._tau_mtl,
            "masks": self._masks,
            "stats": self._stats,
        }
        directory, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path, *, map_location=None, backend=None, out_dtype=None):
        """Read a file written by :meth:`save` (``torch.load(weights_only=True)``).

        Files of version 1 (which merged running statistics as task vectors) are refused.

        Parameters
        ----------
        path : str or os.PathLike
        map_location : optional
            Passed to ``torch.load``.
        backend : None, "torch", "cpu" or "triton"
            Default backend of :meth:`task_state_dict`.
        out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
            Default ``out_dtype`` of :meth:`task_state_dict`.

        Returns
        -------
        TallMasks
        """
        payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a TallMasks file")
        if payload.get("version") != VERSION:
            raise ValueError(
                f"{os.fspath(path)!r}: unsupported TallMasks version {payload.get('version')!r} (this nlmerge reads "
                f"version {VERSION}; rebuild the file with merge.tall)"
            )
        try:
            return cls(
                payload["base"],
                payload["tau_mtl"],
                payload["masks"],
                payload["lam"],
                stats=payload["stats"],
                num_tasks=payload["num_tasks"],
                backend=backend,
                out_dtype=out_dtype,
                copy=False,
            )
        except KeyError as err:
            raise ValueError(f"{os.fspath(path)!r}: TallMasks file lacks {err}") from None

    def __repr__(self):
        return (
            f"TallMasks(num_tasks={self._num_tasks}, keys={len(self._base)}, merged={len(self._tau_mtl)}, "
            f"stats={len(self._stats)}, lam={self._lam})"
        )


def tall(
    base,
    experts,
    *,
    lam=0.4,
    mtl="task_arithmetic",
    ties_kwargs=None,
    exclude=(),
    running_stats="average",
    out_dtype=None,
    backend=None,
):
    """TALL masks: per task, the entries of ``tau_MTL`` that matter to it.

    ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|``; task t's model is ``theta_base + m_t * tau_MTL``.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    lam : float or sequence of float
        TALL parameter, one for all tasks or one per task (finite, >= 0).
    mtl : "task_arithmetic" or "ties"
        ``tau_MTL``: the sum of the task vectors (unscaled), or the TIES merged vector (no lam).
    ties_kwargs : dict, optional
        Options of :func:`nlmerge.merge.ties` for ``mtl="ties"``: keep, scope, sign, disjoint,
        weights, convention.
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics get no mask: every task model takes the plain mean of the
        experts' values (default) or the base's values, stored in :attr:`TallMasks.stats`.
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Default dtype of the computed keys of :meth:`TallMasks.task_state_dict` (default: the
        base's dtype of each key).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``; also the default of :meth:`TallMasks.task_state_dict`.

    Returns
    -------
    TallMasks

    Raises
    ------
    ValueError
        Bad arguments, structural mismatches or NaN/Inf inputs (naming the key and the model);
        ``NonFiniteResultError`` (a ValueError) when ``tau_MTL`` overflows fp32.
    """
    experts = check_experts(experts)
    lam = check_lam(lam, len(experts), bound="nonnegative")
    ties_options = _mtl_setup(mtl, ties_kwargs, len(experts))
    mode = check_running_stats(running_stats)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    tau_mtl, masks = {}, {}
    with torch.no_grad():
        stats = running_stat_values(plan, base, experts, mode, dtype=COMPUTE_DTYPE, backend=backend)
        for key, models, mtl_vector in _mtl_vectors(plan, base, experts, ties_options, backend):
            with naming_nonfinite([key], base, experts):
                masks[key] = ops.tall_masks_models(*models, mtl_vector, lam, backend=backend)
            tau_mtl[key] = mtl_vector
        stored_base = {key: copy_value(value) for key, value in base.items()}
    return TallMasks(
        stored_base,
        tau_mtl,
        masks,
        lam,
        stats=stats,
        num_tasks=len(experts),
        backend=backend,
        out_dtype=out_dtype,
        copy=False,
    )


def consensus(
    base,
    experts,
    *,
    k=2,
    lam=0.4,
    alpha=1.0,
    mtl="task_arithmetic",
    ties_kwargs=None,
    exclude=(),
    running_stats="average",
    out_dtype=None,
    backend=None,
):
    """Consensus merge: keep ``tau_MTL`` where at least ``k`` tasks' TALL masks are set.

    ``theta_base + alpha * (sum_t m_t >= k) * tau_MTL``.

    Parameters
    ----------
    base : Mapping[str, Tensor]
        The base state dict.
    experts : sequence of Mapping[str, Tensor]
        Expert state dicts with the base's keys, shapes and dtypes.
    k : int
        Minimum number of tasks whose mask must be set, ``1 <= k <= T``.
    lam : float or sequence of float
        TALL parameter, one for all tasks or one per task (finite, >= 0).
    alpha : float
        Scale of the kept multi-task vector (finite).
    mtl : "task_arithmetic" or "ties"
        ``tau_MTL``: the sum of the task vectors (unscaled), or the TIES merged vector (no lam).
    ties_kwargs : dict, optional
        Options of :func:`nlmerge.merge.ties` for ``mtl="ties"``.
    exclude : str or sequence of str
        Glob patterns of keys copied from the base (as are integer/bool buffers).
    running_stats : "average" or "base"
        BatchNorm running statistics: the plain mean of the experts' values (default) or the
        base's values (see :mod:`nlmerge.merge`).
    out_dtype : None, torch.float32, torch.float16 or torch.bfloat16
        Dtype of every computed key (default: the base's dtype of the key).
    backend : None, "torch", "cpu" or "triton"
        Passed to ``nlmerge.ops``.

    Returns
    -------
    dict
        A new state dict in the base's key order.

    Raises
    ------
    ValueError
        Bad arguments, structural mismatches or NaN/Inf inputs (naming the key and the model);
        ``NonFiniteResultError`` (a ValueError) when a result does not fit its output dtype.
    """
    experts = check_experts(experts)
    k = check_k(k, len(experts))
    lam = check_lam(lam, len(experts), bound="nonnegative")
    alpha = check_scalar(alpha, "alpha")
    ties_options = _mtl_setup(mtl, ties_kwargs, len(experts))
    mode = check_running_stats(running_stats)
    plan = make_plan(base, experts, exclude, out_dtype=out_dtype)
    with torch.no_grad():
        merged = running_stat_values(plan, base, experts, mode, backend=backend)
        for key, models, mtl_vector in _mtl_vectors(plan, base, experts, ties_options, backend):
            with naming_nonfinite([key], base, experts):
                merged[key] = ops.consensus_merge_models(
                    *models,
                    mtl_vector,
                    lam,
                    k=k,
                    alpha=alpha,
                    out_dtype=plan.out_dtype[key],
                    backend=backend,
                )
    return assemble(plan, base, merged)
