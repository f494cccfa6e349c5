"""``nlmerge align``: permutations that align one checkpoint on disk to another, the file the merge
job's ``permutations:`` key reads, and optionally the aligned checkpoint."""
import os
from collections.abc import Mapping

import torch

from nlmerge.align import activation_matching, spec_from_config, weight_matching
from nlmerge.align.hf_specs import LLAMA_FAMILY
from nlmerge.align.spec import check_int
from nlmerge.io import (WEIGHT_FILES, CheckpointError, check_apart, copy_file_atomic, open_checkpoint, parse_size,
                        write_checkpoint)
from nlmerge.io.permutations import save_permutations
from nlmerge.ops.permute import permute_tensors

METHODS = ("weight", "activation")
DATA_KEYS = ("input_ids", "attention_mask", "pixel_values")


class CheckpointTensors(Mapping):
    """A read-only mapping view of an open ``nlmerge.io.Checkpoint``: ``view[key]`` reads that one
    tensor; ``info(key)`` gives its shape and dtype from the header (what ``weight_matching``
    validates with, reading nothing)."""

    def __init__(self, checkpoint):
        self._ckpt = checkpoint

    def __getitem__(self, key):
        if key not in self._ckpt:
            raise KeyError(key)
        return self._ckpt.get(key)

    def __iter__(self):
        return iter(self._ckpt.keys())

    def __len__(self):
        return len(self._ckpt)

    def info(self, key):
        return self._ckpt.info(key)


def _check_output(path, force, what):
    """Refuse an existing ``path`` (a non-empty folder for a folder) unless ``force``."""
    if os.path.isdir(path) and what == "folder":
        if os.listdir(path) and not force:
            raise FileExistsError(f"{path}: the aligned-checkpoint folder exists and is not empty (use --force)")
    elif os.path.exists(path):
        if os.path.isdir(path) or not force:
            raise FileExistsError(f"{path}: the output exists (use --force to replace a file)")


def load_batches(path, batch_size):
    """Input batches from a safetensors data file: ``[{name: tensor[i:i + batch_size]}]``.

    The file holds ``input_ids`` (and ``attention_mask``) and/or ``pixel_values``, all with the same
    first (example) axis. ValueError naming the file and the tensor for another name, a missing
    input, or first axes that differ.
    """
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors data file ({err})") from None
    unknown = sorted(set(tensors) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown} are not model inputs (expected some of {list(DATA_KEYS)})")
    if "input_ids" not in tensors and "pixel_values" not in tensors:
        raise ValueError(f"{path}: holds neither input_ids nor pixel_values")
    counts = {k: v.shape[0] if v.dim() else 0 for k, v in tensors.items()}
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise ValueError(f"{path}: inputs must share a non-empty first (example) axis, got {counts}")
    n = next(iter(counts.values()))
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]


def _load_model(path, config):
    """The checkpoint as a float32 transformers model in eval mode (no code from the checkpoint)."""
    import transformers

    cls = transformers.AutoModelForCausalLM if config.get("model_type") in LLAMA_FAMILY else transformers.AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _activation_perms(reference, other, config, batches):
    ref_model, oth_model = _load_model(reference, config), _load_model(other, config)
    # sites are module names of the loaded model (transformers 5 renames some ViT checkpoint keys)
    spec, sites = spec_from_config(config, keys=ref_model.state_dict().keys())
    return activation_matching(spec, ref_model, oth_model, batches, sites)


def write_aligned(checkpoint, spec, perms, out_dir, *, out_shard_size="5B"):
    """Write ``checkpoint`` with ``perms`` applied (``w.index_select(axis, perm)`` on every axis of
    the spec) to ``out_dir`` in the Hugging Face layout: its keys, dtypes and order, shards of at
    most ``out_shard_size`` bytes (``plan_shards``), the other files of its folder (config,
    tokenizer) copied. Each tensor is read, permuted and written alone; every file appears under its
    final name only when complete."""
    os.makedirs(out_dir, exist_ok=True)

    def permuted(key):
        tensor = checkpoint.get(key)
        gathers = [(axis % tensor.dim(), perms[p]) for p, axis in spec.params.get(key, ()) if p in perms]
        return permute_tensors([tensor], [gathers])[0] if gathers else tensor

    write_checkpoint(out_dir, [(k, checkpoint.info(k).shape, checkpoint.info(k).dtype) for k in checkpoint.keys()],
                     permuted, parse_size(out_shard_size))
    if os.path.isdir(checkpoint.path):
        weights = {name for name, _ in WEIGHT_FILES} | {os.path.basename(f) for f in checkpoint.files}
        for name in sorted(os.listdir(checkpoint.path)):
            src = os.path.join(checkpoint.path, name)
            if os.path.isfile(src) and name not in weights and not name.startswith("."):
                copy_file_atomic(src, os.path.join(out_dir, name))


def run_align(reference, other, out, *, method="weight", data=None, restarts=1, seed=0, max_iter=100,
              batch_size=8, aligned=None, out_shard_size="5B", force=False):
    """Align checkpoint ``other`` to ``reference`` and write the permutations file ``out``.

    Parameters
    ----------
    reference, other : str or PathLike
        Hugging Face folders (``config.json`` with a supported ``model_type``, see
        ``nlmerge.align.spec_from_config``) of one architecture and size.
    out : str or PathLike
        The permutations file (``nlmerge.io.permutations``: the merge job's ``permutations:``
        key), with both checkpoints' identities in its metadata.
    method : {"weight", "activation"}
        Weight matching on the checkpoints read lazily (one tensor of each model at a time, the
        cost of each permutation accumulated tensor by tensor), or activation matching: both models
        loaded with transformers (float32, eval mode) and run on ``data``.
    data : str or PathLike, optional
        Activation matching's inputs: a safetensors file of ``input_ids`` (and
        ``attention_mask``) and/or ``pixel_values`` (see :func:`load_batches`).
    restarts, seed, max_iter : int
        Weight matching's visiting orders (the best objective is kept), their seed, and the sweeps
        per order.
    batch_size : int
        Examples per forward pass (activation matching).
    aligned : str or PathLike, optional
        Also write the aligned ``other`` there (:func:`write_aligned`).
    out_shard_size : int or str
        Shard size of the aligned checkpoint (bytes; ``"5B"`` style as ``nlmerge merge``).
    force : bool
        Replace an existing ``out`` file, write into a non-empty ``aligned`` folder.

    Returns
    -------
    dict
        ``{"spec": PermutationSpec, "perms": {name: int64 tensor}, "info": weight matching's info
        or None}``.

    Raises
    ------
    ValueError
        An unknown method, activation matching without data, a bad data file, checkpoints of
        different model types or shapes, an unsupported model type, an output that is an input.
    FileExistsError
        ``out`` (or a non-empty ``aligned``) exists without ``force``.
    CheckpointError
        An unreadable checkpoint (named).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "activation" and data is None:
        raise ValueError("activation matching needs --data (a safetensors file of model inputs)")
    batch_size = check_int(batch_size, "batch_size", 1)
    reference, other, out = os.fspath(reference), os.fspath(other), os.fspath(out)
    for path in (out, aligned):
        if path is not None:
            check_apart(path, [reference, other] + ([data] if data is not None else []), "write it elsewhere")
    _check_output(out, force, "file")
    if aligned is not None:
        _check_output(os.fspath(aligned), force, "folder")
    batches = load_batches(data, batch_size) if method == "activation" else None
    with open_checkpoint(reference) as ref, open_checkpoint(other) as oth:
        configs = {path: ckpt.config for path, ckpt in ((reference, ref), (other, oth))}
        for path, config in configs.items():
            if config is None:
                raise CheckpointError(f"{path}: no config.json (a Hugging Face folder is needed to know the architecture)")
        types = {path: config.get("model_type") for path, config in configs.items()}
        if types[reference] != types[other]:
            raise ValueError(f"model types differ: {reference} is {types[reference]!r}, {other} is {types[other]!r}")
        spec, _ = spec_from_config(ref.config, keys=ref.keys())
        for key in spec.params:
            if key not in oth:
                raise CheckpointError(f"{other}: no tensor {key!r} (the reference has it)")
            if ref.info(key).shape != oth.info(key).shape:
                raise ValueError(f"tensor {key!r}: shapes differ, {ref.info(key).shape} in {reference} vs "
                                 f"{oth.info(key).shape} in {other}")
        info = None
        if method == "weight":
            perms, info = weight_matching(spec, CheckpointTensors(ref), CheckpointTensors(oth), restarts=restarts,
                                          seed=seed, max_iter=max_iter, return_info=True)
        else:
            perms = _activation_perms(reference, other, ref.config, batches)
        save_permutations(out, spec, perms, reference=ref.identity(), other=oth.identity())
        if aligned is not None:
            write_aligned(oth, spec, perms, os.fspath(aligned), out_shard_size=out_shard_size)
    return {"spec": spec, "perms": perms, "info": info}
