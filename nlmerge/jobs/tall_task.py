"""``nlmerge tall-task``: one task's model rebuilt from a TALL job's masks and the base.

A TALL merge with ``output: masks`` stores the base's multi-task vector ``tau_MTL`` (fp32) and the
bit-packed masks of all T tasks (about ``T / 16`` of a bf16 model on top of ``tau_MTL``) instead of
T models (Wang et al., 2024, *Localizing Task Information for Improved Model Merging and
Compression*). Task ``t``'s model is ``base + m_t * tau_MTL``, rounded once to the dtype the job
recorded: the shards, index, config.json and tokenizer files are byte for byte what the same job
with ``output: models`` writes in ``task_<t>`` (which also holds a model card).
"""
import json
import os
import shutil

import torch

from nlmerge import io as ckio
from nlmerge import ops
from nlmerge.jobs.merge_job import (PREVIOUS, TALL_BASENAME, TALL_FORMAT, TALL_INFO, restore_previous_outputs,
                                    set_aside_previous_outputs, write_model_files)


def run_tall_task(masks, task, out, *, base=None, out_shard_size="5B", copy_tokenizer=True, force=False,
                  backend=None):
    """Write task ``task``'s model of the TALL job whose masks are in the folder ``masks``.

    Parameters
    ----------
    masks : str or os.PathLike
        The folder of a ``merge_method: tall`` job (``tall.json``, ``tall-masks*.safetensors``).
    task : int
        The task, ``0 <= task < num_tasks`` (the experts' order in the job's config).
    out : str or os.PathLike
        Output folder: the task model in the Hugging Face layout (shards of at most
        ``out_shard_size`` bytes, index, ``config.json`` and tokenizer files of the base).
    base : str or os.PathLike, optional
        The base checkpoint (default: the path ``tall.json`` records).
    out_shard_size : int or str
        As ``nlmerge merge``'s (bytes per shard; "5B" is 5e9).
    copy_tokenizer : bool
        Copy the base's tokenizer files.
    force : bool
        Write into an existing non-empty folder: a previous job's outputs wait in
        ``OUT/.nlmerge-previous`` until this one completes, and are moved back if it fails.
    backend : None, "torch", "cpu" or "triton"
        Kernel backend of ``ops.apply_mask``.

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    ValueError
        ``masks`` holds no TALL job (no or another ``tall.json``), ``task`` is out of range, the
        base is not the job's (its weights' fingerprint, ``Checkpoint.identity``, differs), or does
        not fit the masks (a key missing from either, or a shape that differs: named).
    nlmerge.io.CheckpointError
        Unreadable or corrupt files (named).
    FileExistsError
        ``out`` overlaps an input, or exists, is not empty and ``force`` is not set;
        ``nlmerge.io.OutputInUseError`` when another job holds ``out``'s lock (``out`` is locked
        while the task model is written, as ``nlmerge merge`` locks its output).
    """
    masks, out = os.fspath(masks), os.fspath(out)
    info = _read_info(masks)
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < info["num_tasks"]:
        raise ValueError(f"task must be an integer in [0, {info['num_tasks']}) for the TALL job in {masks!r}, "
                         f"got {task!r}")
    if base is None and not os.path.exists(info["base_model"]):
        raise ValueError(f"the base {info['base_model']!r} that {os.path.join(masks, TALL_INFO)} names does not "
                         "exist (moved?): pass its path with --base")
    base = os.fspath(base) if base is not None else info["base_model"]
    with ckio.open_checkpoint(base) as base_ckpt, ckio.open_checkpoint(masks, basename=TALL_BASENAME) as stored:
        if base_ckpt.identity() != info["base_identity"]:
            raise ValueError(f"{base!r} is not the base of the TALL job in {masks!r} (its weights differ from "
                             f"{info['base_model']!r}'s, which the job merged)")
        dtypes = _check_fits(base_ckpt, stored, info, masks)
        ckio.check_apart(out, [base, masks], "write the task model elsewhere")
        with ckio.lock_output(out):
            if ckio.output_entries(out):
                if not force:
                    raise FileExistsError(f"output folder {out!r} exists and is not empty; pass --force to write "
                                          "into it")
                set_aside_previous_outputs(out)
            try:
                _write(out, task, base_ckpt, stored, dtypes, out_shard_size, copy_tokenizer, backend)
            except BaseException:
                restore_previous_outputs(out)
                raise
            shutil.rmtree(os.path.join(out, PREVIOUS), ignore_errors=True)
    return out


def _write(out, task, base_ckpt, stored, dtypes, out_shard_size, copy_tokenizer, backend):
    """Task ``task``'s tensors (shards and index), then config.json and the tokenizer files."""

    def tensor_of(key):
        if f"mask.{key}" in stored:
            tau_mtl = stored.get(f"tau_mtl.{key}")
            row = stored.get(f"mask.{key}")[task]
            return ops.apply_mask(row, tau_mtl, base=base_ckpt.get(key), out_dtype=dtypes[key],
                                  backend=backend).view(tau_mtl.shape)
        if f"stat.{key}" in stored:
            return stored.get(f"stat.{key}").to(dtypes[key])
        return base_ckpt.get(key)

    ckio.write_checkpoint(out, [(k, base_ckpt.info(k).shape, dtypes[k]) for k in base_ckpt.keys()], tensor_of,
                          ckio.parse_size(out_shard_size))
    merged = {dtypes[k[len("tau_mtl."):]] for k in stored.keys() if k.startswith("tau_mtl.")}
    write_model_files(base_ckpt, merged, out, copy_tokenizer)


def _read_info(masks):
    path = os.path.join(masks, TALL_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{masks!r} holds no TALL job ({TALL_INFO} is missing): run nlmerge merge with "
                         "merge_method: tall first") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it: {err}") from None
    if not isinstance(info, dict) or info.get("format") != TALL_FORMAT or not {"dtypes", "base_identity"} <= set(info):
        raise ValueError(f"{path}: not a {TALL_FORMAT} file with the tensors' dtypes (written by another version "
                         "of nlmerge: run the merge again)")
    return info


def _check_fits(base, stored, info, masks):
    """The dtype of every output key; ValueError naming the key when the base and the masks differ."""
    keys = set(base.keys())
    if set(info["dtypes"]) != keys:
        extra = sorted(keys.symmetric_difference(info["dtypes"]))
        raise ValueError(f"the base {base.path!r} does not have the keys of the TALL job in {masks!r}: "
                         f"{extra[:5]} are in one only")
    for name in stored.keys():
        kind, _, key = name.partition(".")
        want = base.info(key).shape if key in keys else None
        got = stored.info(name).shape
        if kind == "mask":
            want = None if want is None else (info["num_tasks"], -(-_numel(want) // 8))
        if want is None or tuple(got) != tuple(want):
            raise ValueError(f"{masks!r}: {name!r} has shape {tuple(got)}, but the base {base.path!r} needs "
                             f"{want} for {key!r}")
    return {key: getattr(torch, name) for key, name in info["dtypes"].items()}


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
