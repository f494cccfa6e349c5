"""The merge job's configuration: mergekit's YAML (the ``models:`` form) plus nlmerge's extra keys.

A mergekit user's file runs unchanged::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert_a
        parameters: {weight: 1.0, density: 0.5}
      - model: ./expert_b
        parameters:
          weight: [0.2, 0.8]                # a gradient over layer depth
          density:
            - {filter: mlp, value: 0.3}     # the first filter contained in the key wins
            - {value: 0.6}
    parameters: {normalize: true}
    dtype: bfloat16

Parameter settings follow mergekit's rules (``mergekit/config.py``, ``parameter_resolver.py``):
a scalar; a list of scalars (a *gradient*: numbers are interpolated linearly at ``t``, other
values pick the entry ``int(t * (n - 1))``); a ``{filter, value}`` mapping or a list of them
(the first whose ``filter`` is unset, ``"*"`` or a substring of the tensor name gives the value;
none matching falls through). A model's own ``parameters`` come before the top-level ones, which
come before the method's default. ``t`` is ``i / (L - 1)`` for a tensor of decoder layer ``i`` of
``L`` (``1`` when ``L = 1``) and ``0`` for tensors outside the layers (embeddings, final norm,
head), as in mergekit.

nlmerge's extra top-level keys: ``exclude`` (glob patterns of keys copied from the base) and
``permutations`` (alignment files applied to models as they are read, see :mod:`nlmerge.io`).
Keys that mergekit has and nlmerge does not do are refused by name before any work.
"""
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
import yaml

from nlmerge.jobs.methods import METHODS, ConfigError, Param

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_REFUSED = {
    "slices": "layer slices (frankenmerges)",
    "modules": "per-module configs",
    "tokenizer": "tokenizer merging",
    "chat_template": "chat templates",
}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "exclude", "permutations", "name")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModelEntry:
    """One input model: its local path and its own ``parameters`` (settings, unresolved)."""

    path: str
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PermutationEntry:
    """A permutations file (from the alignment step) and the models it applies to."""

    file: str
    models: tuple


@dataclass
class MergeConfig:
    """A validated merge configuration (see the module docstring).

    ``models`` are the listed models in order; ``experts`` are those that are not the base
    (for methods with a base); ``base_model`` is None for ``linear`` without one.
    """

    method: object
    base_model: str | None
    models: list
    parameters: dict
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: str | None
    exclude: tuple
    permutations: list
    source: dict

    @property
    def experts(self):
        """Input models other than the base, in the config's order."""
        return [m for m in self.models if m.path != self.base_model]

    def inputs(self):
        """The models whose tensors a key's merge reads: (base first, then experts) or the listed models."""
        if self.method.uses_base:
            return [self.base_model] + [m.path for m in self.experts]
        return [m.path for m in self.models]

    def filters(self):
        """``(where, parameter, filter)`` for every ``filter`` of a conditional setting of a
        parameter the method takes (``where``: ``parameters`` or ``models[i] (PATH).parameters``);
        unset and ``"*"`` filters, which match every tensor, are left out."""
        names = {p.name for p in self.method.shared + self.method.per_model}
        scopes = [("parameters", self.parameters)] + [(f"models[{i}] ({m.path}).parameters", m.parameters)
                                                      for i, m in enumerate(self.models)]
        for where, settings in scopes:
            for name, setting in settings.items():
                if name not in names or _scalar(setting):
                    continue
                for cond in [setting] if isinstance(setting, dict) else setting:
                    if isinstance(cond, dict) and cond.get("filter") not in (None, "*"):
                        yield where, name, cond["filter"]

    def resolve(self, key, t):
        """Resolve every parameter of the method for tensor ``key`` at depth ``t``.

        Returns ``(shared, per_model)``: a dict of shared values and one dict per input model of
        :meth:`inputs` (for methods with a base, the base's dict is empty). Raises ConfigError
        naming the parameter, the model and the key when a value is missing or out of range.
        """
        shared = {p.name: _resolve(p, [self.parameters], key, t, None) for p in self.method.shared}
        entries = {m.path: m for m in self.models}
        per_model = []
        for path in self.inputs():
            if self.method.uses_base and path == self.base_model:
                per_model.append({})
                continue
            own = entries[path].parameters if path in entries else {}
            per_model.append({p.name: _resolve(p, [own, self.parameters], key, t, path) for p in self.method.per_model})
        self.method.check(shared, per_model, key, self.inputs())
        return shared, per_model


def load_config(source):
    """Read and validate a merge configuration.

    Parameters
    ----------
    source : str, os.PathLike or Mapping
        A YAML file's path, or the already-parsed mapping.

    Returns
    -------
    MergeConfig

    Raises
    ------
    ConfigError
        Unknown or unsupported keys and methods (naming them, and saying where mergekit does
        them), missing models, malformed parameter settings, unknown dtypes.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as err:
            raise ConfigError(f"cannot read the config {os.fspath(source)!r}: {err}") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ConfigError(f"{os.fspath(source)!r} is not valid YAML{at}: "
                              f"{getattr(err, 'problem', None) or ' '.join(str(err).split())}") from None
    else:
        raw = source
    if not isinstance(raw, dict):
        raise ConfigError(f"a merge config is a mapping with merge_method and models, got {type(raw).__name__}")
    for key in raw:
        if key in _REFUSED:
            raise ConfigError(f"config key {key!r} ({_REFUSED[key]}) is not supported by nlmerge; mergekit does it "
                              "(mergekit-yaml). nlmerge merges whole models listed under 'models:'")
        if key not in _TOP_KEYS:
            raise ConfigError(f"unknown config key {key!r}; nlmerge knows {', '.join(_TOP_KEYS)}")
    name = raw.get("merge_method")
    if name not in METHODS:
        raise ConfigError(f"merge_method {name!r} is not supported; nlmerge runs {', '.join(METHODS)} "
                          "(other mergekit methods: use mergekit-yaml)")
    method = METHODS[name]
    models = [_model_entry(i, m) for i, m in enumerate(_list(raw, "models", required=True))]
    base = raw.get("base_model")
    if base is not None:
        base = _local_path(base, "base_model")
    if method.uses_base:
        if base is None:
            raise ConfigError(f"merge_method {name!r} needs base_model")
        if not [m for m in models if m.path != base]:
            raise ConfigError(f"merge_method {name!r}: models lists no model other than base_model")
    elif base is not None and base not in {m.path for m in models}:
        raise ConfigError(f"merge_method {name!r} merges the listed models; base_model {base!r} is not among them "
                          "(list it with a weight, or remove base_model)")
    paths = [m.path for m in models]
    for p in paths:
        if paths.count(p) > 1:
            raise ConfigError(f"model {p!r} is listed {paths.count(p)} times under 'models'")
    parameters = _settings(raw.get("parameters"), "parameters")
    known = {p.name for p in method.shared + method.per_model}
    for where, settings in [("parameters", parameters)] + [(f"models[{i}] ({m.path}).parameters", m.parameters)
                                                           for i, m in enumerate(models)]:
        for pname in settings:
            if pname not in known:  # mergekit ignores them silently; say so, but run the config as it does
                warnings.warn(f"{where}: {name} takes no parameter {pname!r}; it is ignored "
                              f"({name} takes {', '.join(sorted(known))})", stacklevel=2)
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise ConfigError(f"tokenizer_source {tokenizer_source!r} is not supported (only 'base' or unset: the "
                          "base's tokenizer files are copied); mergekit builds union tokenizers and takes another "
                          "model's tokenizer, resizing the embeddings to it")
    return MergeConfig(
        method=method, base_model=base, models=models, parameters=parameters,
        dtype=_dtype(raw, "dtype"), out_dtype=_dtype(raw, "out_dtype"), tokenizer_source=tokenizer_source,
        exclude=_exclude(raw.get("exclude")), permutations=_permutations(raw.get("permutations")), source=raw,
    )


def layer_position(key, num_layers):
    """mergekit's gradient position ``t`` of tensor ``key`` (see the module docstring)."""
    match = _LAYER.search(key)
    if match is None or not num_layers:
        return 0.0
    return 1.0 if num_layers == 1 else int(match.group(1)) / (num_layers - 1)


def count_layers(keys, model_config):
    """Number of decoder layers: ``num_hidden_layers`` (or ``n_layer``) of config.json, else from key names."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = (model_config or {}).get(attr)
        if isinstance(value, int) and value > 0:
            return value
    found = [int(m.group(1)) for m in map(_LAYER.search, keys) if m]
    return max(found) + 1 if found else 0


def _list(raw, key, required=False):
    value = raw.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value:
        raise ConfigError(f"config key {key!r} must be a non-empty list")
    return value


def _local_path(value, where):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path, got {value!r}")
    if "+" in value and not os.path.exists(value):
        raise ConfigError(f"{where}: {value!r} looks like mergekit's model+LoRA syntax, which nlmerge does not do")
    if not os.path.exists(value):
        raise ConfigError(f"{where}: {value!r} does not exist; nlmerge reads local checkpoints only "
                          "(download a hub model first, e.g. `hf download ORG/NAME --local-dir DIR`)")
    return os.path.normpath(value)


def _model_entry(i, entry):
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"models[{i}] must be a mapping with a 'model' path, got {entry!r}")
    for key in entry:
        if key not in ("model", "parameters"):
            raise ConfigError(f"models[{i}] has unknown key {key!r} (a model entry takes model and parameters)")
    return ModelEntry(_local_path(entry["model"], f"models[{i}].model"),
                      _settings(entry.get("parameters"), f"models[{i}].parameters"))


def _settings(value, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of parameter names to settings, got {value!r}")
    for name, setting in value.items():
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


def _check_setting(setting, where):
    if _scalar(setting):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise ConfigError(f"{where}: a setting is a scalar, a list of scalars (gradient) or {{filter, value}} "
                          f"entries, got {setting!r}")
    if all(_scalar(e) for e in setting):
        return
    for e in setting:
        if not isinstance(e, dict) or "value" not in e or set(e) - {"value", "filter"}:
            raise ConfigError(f"{where}: conditional entries need 'value' (and optionally 'filter'), got {e!r}")
        if e.get("filter") is not None and not isinstance(e["filter"], str):
            raise ConfigError(f"{where}: filter must be a string, got {e['filter']!r}")
        if not (_scalar(e["value"]) or (isinstance(e["value"], list) and e["value"] and all(map(_scalar, e["value"])))):
            raise ConfigError(f"{where}: value must be a scalar or a list of scalars, got {e['value']!r}")


def _scalar(x):
    return isinstance(x, (bool, int, float, str))


def _evaluate(setting, key, t, convert):
    """mergekit's ``evaluate_setting``: the value of one setting for ``key`` at ``t``, or None."""
    if _scalar(setting):
        return convert(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if all(_scalar(e) for e in setting):
        values = [convert(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return convert((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if filter_matches(cond.get("filter"), key):
            return _evaluate(cond["value"], key, t, convert)
    return None


def filter_matches(flt, key):
    """Whether a conditional setting's ``filter`` applies to tensor ``key`` (mergekit's rule: unset,
    ``"*"`` or a substring of the name)."""
    return flt is None or flt == "*" or bool(key and flt in key)


def _resolve(param: Param, scopes, key, t, model):
    where = f"parameter {param.name!r}" + (f" of model {model!r}" if model else "") + f" for tensor {key!r}"

    def convert(value):
        try:
            return param.convert(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from None

    for scope in scopes:
        if param.name in scope:
            value = _evaluate(scope[param.name], key, t, convert)
            if value is not None:
                return value
    if param.required:
        raise ConfigError(f"missing {where}")
    return param.default


def _dtype(raw, key):
    value = raw.get(key)
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{key} {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _exclude(value):
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"exclude must be a glob pattern or a list of them, got {value!r}")
    return tuple(value)


def _permutations(value):
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"permutations must be a list of {{file, models}} entries, got {value!r}")
    out = []
    for i, e in enumerate(value):
        if not isinstance(e, dict) or set(e) != {"file", "models"}:
            raise ConfigError(f"permutations[{i}] must have exactly 'file' and 'models', got {e!r}")
        models = e["models"] if isinstance(e["models"], list) else [e["models"]]
        out.append(PermutationEntry(_local_path(e["file"], f"permutations[{i}].file"),
                                    tuple(_local_path(m, f"permutations[{i}].models") for m in models)))
    return out

