"""The merge methods a config can name: each declares its parameters once, here.

A :class:`Method` lists its parameters (name, type, shared or per model, default, range); config
validation and parameter resolution (filters, gradients) come from it. mergekit's family is
declared by :data:`nlmerge.merge.generalized.METHODS` and only translated here.
``merge_key`` computes one key from that key's tensors, never a whole model:

- mergekit's methods, with mergekit's semantics (``mergekit/merge_methods/registry.py``):
  ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
  ``breadcrumbs_ties`` (through :func:`nlmerge.merge.generalized.merge_tensor`, computed in fp32);
- nlmerge's additions: ``ties`` with ``scope: global`` (one exact threshold per task over the
  whole model: the job streams the model to find it) and ``convention: ties`` (the original TIES
  code's trim and zero-sign rule), ``consensus`` (TALL masks, keep where ``k`` tasks agree) and
  ``tall`` (TALL masks: one model per task, ``theta_base + m_t * tau_MTL``, and the bit-packed
  masks; :func:`tall_key`). Both form ``tau_MTL`` as ``nlmerge.merge.tall`` does: ``mtl:
  task_arithmetic`` (the unscaled sum of the task vectors) or ``mtl: ties`` (TIES with the
  original code's convention, per tensor, per-model ``density`` and ``weight``, no lambda).
"""
import math
from dataclasses import dataclass

import torch

from nlmerge import ops
from nlmerge.merge import generalized

REQUIRED = object()


class ConfigError(ValueError):
    """A merge configuration that nlmerge cannot run; the message names the key at fault."""


def _float(value):
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)  # YAML 1.1 reads 1e-3 as a string; mergekit accepts it as a number
    if not math.isfinite(number):
        raise ValueError(f"must be finite, got {value!r}")
    return number


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TypeError(f"expected true or false, got {value!r}")


def _int(value):
    if isinstance(value, bool) or not float(value).is_integer():
        raise TypeError(f"expected an integer, got {value!r}")
    return int(float(value))


def _choice(*choices):
    def convert(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return convert


@dataclass(frozen=True)
class Param:
    """One parameter: ``convert`` types a setting's value (raising TypeError/ValueError)."""

    name: str
    convert: object
    default: object = REQUIRED

    @property
    def required(self):
        return self.default is REQUIRED


@dataclass(frozen=True)
class Method:
    """A merge method: its shared and per-model parameters; ``uses_base``: the base model is
    subtracted (task vectors)."""

    name: str
    shared: tuple
    per_model: tuple
    uses_base: bool = True

    @property
    def draws(self):
        """Whether the method drops entries at random (DARE): only then does the seed matter."""
        spec = generalized.METHODS.get(self.name)
        return spec is not None and spec.sparsify == "random"

    def check(self, shared, per_model, key, models):
        """Range checks of the values resolved for tensor ``key`` (``per_model`` in the order of
        ``models``); ConfigError naming the tensor and, for a per-model value, the model."""
        experts = per_model[1:] if self.uses_base else per_model
        names = models[1:] if self.uses_base else models
        if self.name in generalized.METHODS:
            values = {k: v for k, v in shared.items() if k not in ("scope", "convention")}
            for p in self.per_model:
                values[p.name] = [e[p.name] for e in experts]
            try:
                options = {"gamma": 0.0, **generalized.METHODS[self.name].kwargs(values)}
                generalized.check_options(len(experts), seed=0, **options)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"tensor {key!r}: {err} (experts in order: {', '.join(names)})") from None
        for model, values in zip(names, experts):
            lam = values.get("tall_lambda")
            if lam is not None and lam < 0:
                raise ConfigError(f"tall_lambda of model {model!r} for tensor {key!r} must be >= 0, got {lam}")
        if self.name == "linear" and shared["normalize"] and abs(sum(e["weight"] for e in experts)) < 1e-8:
            raise ConfigError(f"linear with normalize: the weights for tensor {key!r} sum to 0 "
                              f"({[e['weight'] for e in experts]}); set normalize: false or change them")
        if shared.get("mtl") == "ties":
            for model, values in zip(names, experts):
                if not 0 < values["density"] <= 1:
                    raise ConfigError(f"density of model {model!r} for tensor {key!r} must be in (0, 1], "
                                      f"got {values['density']}")
        k = shared.get("k")
        if k is not None and not 1 <= k <= len(experts):
            raise ConfigError(f"k for tensor {key!r} must be in [1, {len(experts)}] (the number of experts), got {k}")
        if self.name == "ties" and shared.get("scope") == "global" and shared.get("convention") == "mergekit":
            raise ConfigError("ties with scope: global follows the original TIES code: set convention: ties "
                              "(mergekit's convention trims each tensor on its own)")


_CONVERT = {float: _float, bool: _bool, int: _int}
WEIGHT = Param("weight", _float)
TALL_LAMBDA = Param("tall_lambda", _float, 0.4)  # the task's TALL mask parameter
# how TALL and consensus form tau_MTL: the unscaled task-vector sum, or TIES (normalize: the
# disjoint mean, else the sum) trimmed to each model's density
MTL_SHARED = (Param("mtl", _choice("task_arithmetic", "ties"), "task_arithmetic"), Param("normalize", _bool, True))
MTL_PER_MODEL = (Param("density", _float, 1.0), Param("weight", _float, 1.0))


def _gta(name, extra_shared=()):
    """One of mergekit's generalized task arithmetic methods, declared by
    :data:`nlmerge.merge.generalized.METHODS` (switches, defaults, parameters); ``extra_shared``
    are nlmerge's additions."""
    spec = generalized.METHODS[name]
    params = [Param(p.name, _CONVERT[p.type], REQUIRED if p.required else p.default) for p in spec.parameters]
    shared = tuple(p for p, q in zip(params, spec.parameters) if not q.per_model) + extra_shared
    per_model = tuple(p for p, q in zip(params, spec.parameters) if q.per_model)
    return Method(name, shared, per_model)


METHODS = {m.name: m for m in (
    Method("linear", (Param("normalize", _bool, True),), (WEIGHT,), uses_base=False),
    _gta("task_arithmetic"),
    _gta("ties", extra_shared=(
        Param("scope", _choice("tensor", "global"), "tensor"),  # trim per tensor or over the whole model
        Param("convention", _choice("mergekit", "ties"), "mergekit"),  # mergekit's or the TIES code's rules
    )),
    _gta("dare_ties"),
    _gta("dare_linear"),
    _gta("breadcrumbs"),
    _gta("breadcrumbs_ties"),
    Method("consensus", (Param("k", _int, 2),  # minimum number of agreeing TALL masks
                         Param("lambda", _float, 1.0),  # alpha: scale of the kept multi-task vector
                         *MTL_SHARED),
           (TALL_LAMBDA, *MTL_PER_MODEL)),
    Method("tall", (Param("output", _choice("models", "masks"), "models"), *MTL_SHARED),
           (TALL_LAMBDA, *MTL_PER_MODEL)),
)}


def _ties_convention(tensors, shared, experts_params, *, lam, include_base, out_dtype, backend):
    """TIES with the original code's convention on one key of the models (``tensors``: the base,
    then the experts): per-task thresholds over the tensor (each model's ``density``), the
    zero-sign majority over the tensor; task vectors formed in the kernels."""
    base, experts = tensors[0], tensors[1:]
    thresholds = ops.magnitude_thresholds_models(base, experts, [p["density"] for p in experts_params], backend=backend)
    return ops.ties_merge_models(base, experts, thresholds=thresholds, weights=[p["weight"] for p in experts_params],
                                 lam=lam, disjoint="mean" if shared["normalize"] else "sum", zero_sign="majority",
                                 include_base=include_base, out_dtype=out_dtype, backend=backend)


def multitask_vector(tensors, shared, experts_params, backend):
    """``tau_MTL`` of TALL and consensus on one key of the models (fp32, the key's shape), as
    ``nlmerge.merge.tall`` forms it: ``mtl: task_arithmetic`` sums the task vectors; ``mtl: ties``
    merges them with TIES (lambda 1, no base)."""
    if shared["mtl"] == "task_arithmetic":
        return ops.task_arithmetic_models(tensors[0], tensors[1:], include_base=False, out_dtype=torch.float32,
                                          backend=backend)
    return _ties_convention(tensors, shared, experts_params, lam=1.0, include_base=False, out_dtype=torch.float32,
                            backend=backend)


def tall_key(tensors, shared, per_model, *, out_dtype, backend):
    """TALL on one key: ``(tau_mtl, masks, models)``.

    ``tau_mtl`` is the fp32 multi-task vector (the key's shape), ``masks`` the bit-packed TALL
    masks ``m_t = |tau_t| > tall_lambda_t * |tau_MTL - tau_t|`` (uint8 ``[T, ceil(numel / 8)]``,
    :func:`nlmerge.ops.tall_masks_models`), ``models`` each task's tensor ``base + m_t * tau_MTL`` in
    ``out_dtype`` (None when ``output: masks``). ``tensors``: the base first, then the experts.
    """
    experts_params = per_model[1:]
    tau_mtl = multitask_vector(tensors, shared, experts_params, backend)
    masks = ops.tall_masks_models(tensors[0], tensors[1:], tau_mtl, [p["tall_lambda"] for p in experts_params],
                                  backend=backend)
    if shared["output"] == "masks":
        return tau_mtl, masks, None
    models = [ops.apply_mask(row, tau_mtl, base=tensors[0], out_dtype=out_dtype, backend=backend) for row in masks]
    return tau_mtl, masks, models


def merge_key(method, key, tensors, shared, per_model, *, out_dtype, seed, backend):
    """Merge one key with a per-tensor method (global TIES is driven by the job).

    ``tensors`` are the inputs of ``MergeConfig.inputs()`` (base first when the method has one)
    in their storage dtypes; ``shared``/``per_model`` the resolved parameters. Computed in fp32,
    returned in ``out_dtype`` (NonFiniteResultError naming the key when it does not fit).
    """
    if len({x.dtype for x in tensors}) > 1:  # models stored in different float dtypes
        tensors = [x.float() for x in tensors]
    common = dict(out_dtype=out_dtype, backend=backend)
    if method.name == "linear":
        weights = [p["weight"] for p in per_model]
        if shared["normalize"]:  # a zero sum is refused when the job is planned (Method.check)
            total = sum(weights)
            weights = [w / total for w in weights]
        return ops.task_arithmetic(tensors, weights=weights, **common)
    base, experts, experts_params = tensors[0], tensors[1:], per_model[1:]
    if method.name == "consensus":
        tau_mtl = multitask_vector(tensors, shared, experts_params, backend)
        return ops.consensus_merge_models(base, list(experts), tau_mtl, [p["tall_lambda"] for p in experts_params],
                                          k=shared["k"], alpha=shared["lambda"], **common)
    if method.name == "ties" and shared["convention"] == "ties":
        return _ties_convention(tensors, shared, experts_params, lam=shared["lambda"], include_base=True, **common)
    values = {k: v for k, v in shared.items() if k not in ("scope", "convention")}
    values.update({p.name: [e[p.name] for e in experts_params] for p in method.per_model})
    return generalized.merge_tensor(base, list(experts), **generalized.METHODS[method.name].kwargs(values),
                                    seed=seed, name=key, **common)
