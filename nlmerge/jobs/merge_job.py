"""``nlmerge merge CONFIG.yml OUT``: the large-model merge job (config -> plan -> stream -> write).

The job is planned before it runs: every input header is read and checked (keys, shapes, dtypes,
files), every parameter is resolved for every tensor (filters, gradients), the output shards are
planned from the headers, and only then are tensors streamed, one key at a time across the T+1
models, merged in fp32 on nlmerge's kernels and written at their planned offsets. Nothing is
written under a final name until it is complete; a manifest (sizes, content hashes) lets ``--resume``
skip finished shards and give byte-identical output.
"""
import contextlib
import errno
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
import yaml

from nlmerge import io as ckio
from nlmerge import ops
from nlmerge.ops import selection
from nlmerge.jobs import distributed
from nlmerge.jobs.config import ConfigError, count_layers, filter_matches, layer_position, load_config
from nlmerge.jobs.methods import merge_key, tall_key
from nlmerge.jobs.model_card import CARD_NAME, is_merge_card, model_card
from nlmerge.jobs.permutations import load_permutations
from nlmerge.merge._common import MERGE_DTYPES, Plan, is_running_stat, running_stat_values
from nlmerge.ops._checks import NonFiniteResultError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "vocab.txt",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json")
CONFIG_COPY = "nlmerge_config.yml"
INDEX_NAME = "model.safetensors.index.json"
TALL_BASENAME = "tall-masks"
TALL_INFO = "tall.json"
TALL_FORMAT = "nlmerge-tall/1"
PREVIOUS = ".nlmerge-previous"  # where --force keeps a previous job's outputs until this one completes
# files a previous job (nlmerge's or mergekit's) may have left in OUT, set aside by --force (with its task_<t> folders)
_OUTPUT_PATTERNS = ("model*.safetensors", INDEX_NAME, ".*.partial", ckio.MANIFEST_NAME, ckio.PART_PATTERN,
                    f"{TALL_BASENAME}*.safetensors", f"{TALL_BASENAME}.safetensors.index.json", TALL_INFO,
                    CONFIG_COPY, "mergekit_config.yml")


@dataclass
class KeyPlan:
    """One output tensor: merged (with its resolved parameters) or copied from ``source``."""

    key: str
    shape: tuple
    dtype: torch.dtype
    merged: bool
    shared: dict | None = None
    per_model: list | None = None
    running_stat: bool = False


@dataclass(frozen=True)
class Output:
    """One checkpoint the job writes: its ``folder`` under OUT ("" for OUT itself), what it holds
    (``role``: "model", ("task", t) or "masks"), its shard plans per step (None where a step
    writes nothing to it; names relative to the folder) and the name of its index file."""

    folder: str
    role: object
    plans: list
    index_name: str

    def file(self, step):
        """The plan of step ``step``'s file, named relative to OUT (None when there is none)."""
        plan = self.plans[step]
        if plan is None or not self.folder:
            return plan
        return replace(plan, name=f"{self.folder}/{plan.name}")


@dataclass
class MergePlan:
    """Everything the job needs before it reads a tensor (see :func:`plan_merge`).

    ``shards`` is the layout of the merged model; step ``i`` of the job merges the keys of
    ``shards[i]`` and writes step ``i``'s file of every output (one model, or a TALL job's task
    models and masks)."""

    config: object
    out: str
    checkpoints: list
    copy_source: int
    keys: dict
    shards: list
    outputs: list
    permutations: dict
    state: dict
    fingerprint: str
    global_ties: bool
    seed: int
    backend: str | None
    device: torch.device


def run_merge(config, out, *, device="cpu", out_shard_size="5B", random_seed=None, copy_tokenizer=True,
              write_model_card=True, force=False, resume=False, progress=True, backend=None, log=None):
    """Merge the checkpoints a mergekit-style config names, into ``out`` in the Hugging Face layout.

    Parameters
    ----------
    config : str, os.PathLike or Mapping
        A YAML file (mergekit's ``models:`` form, see :mod:`nlmerge.jobs.config`) or its mapping.
    out : str or os.PathLike
        Output folder: safetensors shards of at most ``out_shard_size`` bytes (``model.safetensors``
        alone, or ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``),
        ``config.json`` with the output dtype, tokenizer files of the base, a ``README.md`` model
        card, the config as ``nlmerge_config.yml`` and ``nlmerge-manifest.json``.
    device : "cpu" or "cuda"
        Where the arithmetic runs (tensors are read on the CPU).
    out_shard_size : int or str
        mergekit's ``--out-shard-size`` ("5B", "500M", bytes per shard as mergekit's writer counts).
    random_seed : int, optional
        Seed of the random methods (DARE); drops depend only on (seed, tensor name, element), so
        the output does not depend on device, backend or process count. Default 0.
    copy_tokenizer : bool
        Copy the base's tokenizer files. ``tokenizer_source: base`` in the config copies them
        whatever this says (with a warning when False), as mergekit does; a base without a
        tokenizer is then a ConfigError.
    write_model_card : bool
        Write a ``README.md`` model card into each merged model's folder (as mergekit-yaml does):
        the Hub's metadata (``tags``), the method and its paper, the models' paths, the config.
    force : bool
        Write into an existing output folder: a previous job's outputs (nlmerge's or mergekit's)
        are moved into ``OUT/.nlmerge-previous``, removed when this job completes and moved back
        when it fails before finishing a shard; other files stay.
    resume : bool
        Continue an interrupted job with the same config and inputs: finished shards (sizes and
        content hash verified) are kept; the result is byte-identical to an uninterrupted run.
    progress : bool
        Show a progress bar (tensors done, bytes per second, time left).
    backend : None, "torch", "cpu" or "triton"
        Kernel backend of ``nlmerge.ops``.
    log : callable, optional
        Called (on rank 0) with one line of text where the job has something to report: with
        ``resume``, how many shards were verified and kept, e.g. ``"resuming: 3 of 5 shards
        verified and kept, 2 to merge"``.

    Under ``torchrun`` (or with ``torch.distributed`` initialized by the caller) every process
    runs this call: each merges a contiguous share of the output shards (split by bytes) and
    reads only their tensors; global TIES sums its histogram counts and zero-sign majority over
    the processes; rank 0 writes the index, config and manifest. The output is byte-identical to
    one process's (see :mod:`nlmerge.jobs.distributed`). With ``device="cuda"`` each process uses
    the GPU of its local rank.

    Returns
    -------
    str
        The output folder.

    Raises
    ------
    nlmerge.jobs.distributed.RankFailedError (a RuntimeError)
        Over several processes: another rank failed (naming the rank and its error); this rank
        stops too, and nothing is left under a final name half-written.
    ConfigError
        A config nlmerge cannot run (naming the key or parameter).
    nlmerge.io.CheckpointError
        Unreadable, truncated or corrupt inputs; keys, shapes or dtypes that differ between models
        (naming the key, both shapes and both files).
    FileExistsError
        ``out`` exists and neither ``force`` nor ``resume`` is set;
        ``nlmerge.io.OutputInUseError`` when another job is writing into ``out`` (a job holds
        ``OUT/.nlmerge.lock``, an exclusive ``flock``, from before it prepares ``out`` until it ends).
    ValueError
        A merged tensor that does not fit the output dtype (naming the key); non-finite inputs.
    """
    if force and resume:
        raise ValueError("--force starts the job again and --resume continues it: pass one of them")
    world = distributed.join(device)
    plan = None
    try:
        with world.step():
            plan = plan_merge(config, out, device=world.device, out_shard_size=out_shard_size,
                              random_seed=random_seed, backend=backend)
            if plan.config.tokenizer_source == "base":
                _check_base_tokenizer(plan.checkpoints[plan.copy_source])
                if not copy_tokenizer:
                    warnings.warn("tokenizer_source: base writes the base's tokenizer whatever --no-copy-tokenizer "
                                  "says, as mergekit does", stacklevel=2)
                    copy_tokenizer = True
        _run(plan, world, force=force, resume=resume, progress=progress and world.leader,
             copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
             log=log if world.leader and resume else None)  # what it reports is a resumed job's
    finally:
        for ckpt in plan.checkpoints if plan is not None else ():
            ckpt.close()
        world.close()
    return os.fspath(out)


def _run(plan, world, *, force, resume, progress, copy_tokenizer, write_model_card, log):
    """Run a planned job on this process: rank 0 locks and prepares OUT; every rank merges its
    share of the output shards (global TIES: histogram counts and the zero-sign majority summed
    over the ranks); rank 0 then records every rank's shards, writes the index and the other
    files, and unlocks OUT."""
    with contextlib.ExitStack() as lock:
        created, manifest = False, None
        with world.step():
            if world.leader:
                _check_out(plan, resume)
                created = lock.enter_context(ckio.lock_output(plan.out))
                try:
                    manifest = _prepare_out(plan, force=force, resume=resume)
                except KeyboardInterrupt as err:
                    err.shards_kept = resume  # what the command's message says: a resumed job's shards stay
                    raise
        _merge_into(plan, world, manifest, created, progress=progress, copy_tokenizer=copy_tokenizer,
                    write_model_card=write_model_card, log=log)


def _merge_into(plan, world, manifest, created, *, progress, copy_tokenizer, write_model_card, log):
    """The job once OUT is prepared (``manifest``: rank 0's; ``created``: whether the job made OUT;
    ``log``: where a resumed job reports the shards it keeps, None on other ranks or jobs)."""
    mine = world.share([s.nbytes for s in plan.shards])
    if not world.leader:  # rank 0's manifest, with this rank's own part (its share's shards)
        manifest = ckio.Manifest.load(plan.out)
        manifest.rank = world.rank
        manifest.share = {f.name for i in mine for f in _step_files(plan, i).values()}
    try:
        with world.step():  # each rank verifies (re-hashes) the recorded files of its share once
            verified = {f.name: manifest.is_done(f.name) for i in mine for f in _step_files(plan, i).values()
                        if f.name in manifest.shards}
            done = {i for i in mine if all(verified.get(f.name) for f in _step_files(plan, i).values())}
        kept = sum(world.gather(len(done)))
        failed = [name for names in world.gather([n for n, ok in verified.items() if not ok]) for name in names]
        if log is not None:
            log(f"resuming: {kept} of {len(plan.shards)} shards verified and kept, {len(plan.shards) - kept} to merge"
                + (f" (merged again, missing or no longer as recorded: {', '.join(failed)})"
                   if failed else ""))
        thresholds = _global_thresholds(plan, manifest, progress, world, mine) if plan.global_ties else None
        with world.step():
            sign_sum = _merge_shards(plan, manifest, thresholds, progress, mine, done)
        if thresholds is not None:
            total = world.sum(sign_sum)
            with world.step():
                _refill(plan, manifest, thresholds, ops.majority_sign(total), mine, progress)
    except BaseException as err:
        if world.leader:
            if isinstance(err, ValueError):  # the inputs or the config must change: a --resume could not reuse it
                _discard_job(plan, manifest)
            kept = not _forget_empty_job(plan, manifest, created)
            if not kept:
                restore_previous_outputs(plan.out)
            if isinstance(err, KeyboardInterrupt):
                err.shards_kept = kept  # what the command's message says (a restored output has its own manifest)
        raise
    recorded = world.gather(None if world.leader else manifest.own_shards())
    with world.step():
        if world.leader:
            for shards in recorded[1:]:
                manifest.shards.update(shards)
            manifest.save()
            manifest.remove_parts()
            _finish_out(plan, copy_tokenizer, write_model_card)
            shutil.rmtree(os.path.join(plan.out, PREVIOUS), ignore_errors=True)


def plan_merge(config, out, *, device="cpu", out_shard_size="5B", random_seed=None, backend=None):
    """Read and check every input header, resolve every parameter, plan the shards; read no tensor.

    Returns a :class:`MergePlan`; raises as :func:`run_merge` does, before anything is written.
    """
    cfg = load_config(config)
    device = _device(device)
    max_bytes = ckio.parse_size(out_shard_size)
    seed = 0 if random_seed is None else int(random_seed)
    paths = cfg.inputs()
    checkpoints = [ckio.open_checkpoint(p) for p in paths]
    try:
        source = paths.index(cfg.base_model) if cfg.base_model in paths else 0
        ref = checkpoints[source]
        _check_same_keys(ref, checkpoints)
        permutations = load_permutations(cfg.permutations, dict(zip(paths, checkpoints)))
        num_layers = count_layers(ref.keys(), ref.config)
        keys = {}
        for key in ref.keys():
            info = ref.info(key)
            excluded = any(fnmatch.fnmatchcase(key, p) for p in cfg.exclude)
            if info.dtype.is_floating_point and info.dtype not in MERGE_DTYPES and not excluded:
                raise ConfigError(f"tensor {key!r} of {info.file} is {info.dtype}: nlmerge merges float32, float16 "
                                  f"and bfloat16 tensors; add it to exclude: to copy it from {ref.path}")
            merged = info.dtype in MERGE_DTYPES and not excluded
            if not merged:
                keys[key] = KeyPlan(key, info.shape, info.dtype, False)
                continue
            dtype = cfg.out_dtype or cfg.dtype or info.dtype
            if is_running_stat(key):  # not a task vector: the models' plain mean (nlmerge.merge's rule)
                keys[key] = KeyPlan(key, info.shape, dtype, True, running_stat=True)
                continue
            shared, per_model = cfg.resolve(key, layer_position(key, num_layers))
            keys[key] = KeyPlan(key, info.shape, dtype, True, shared, per_model)
        for pattern in cfg.exclude:
            if not any(fnmatch.fnmatchcase(key, pattern) for key in keys):
                warnings.warn(f"exclude pattern {pattern!r} matches no tensor of {ref.path}", stacklevel=2)
        for where, name, flt in cfg.filters():
            if not any(filter_matches(flt, key) for key in keys):
                warnings.warn(f"{where}.{name}: filter {flt!r} matches no tensor of {ref.path}", stacklevel=2)
        global_ties = _uniform_scope(cfg, keys)
        shards = ckio.plan_shards([(k.key, k.shape, k.dtype) for k in keys.values()], max_bytes)
        outputs = _plan_outputs(cfg, keys, shards)
    except BaseException:
        for ckpt in checkpoints:
            ckpt.close()
        raise
    state = _job_state(cfg, checkpoints, permutations, max_bytes, seed)
    return MergePlan(cfg, os.fspath(out), checkpoints, source, keys, shards, outputs, permutations, state,
                     _fingerprint(state), global_ties, seed, backend, device)


def _plan_outputs(cfg, keys, shards):
    """The checkpoints the job writes, each with one file per step (step i: the keys of shard i).

    A merge writes one model (OUT). ``tall`` writes one model per task in ``OUT/task_<t>`` (unless
    ``output: masks``) and the masks in OUT: ``tall-masks*.safetensors`` holding, per merged key,
    ``mask.<key>`` (uint8 ``[T, ceil(numel / 8)]``, bit-packed as :func:`nlmerge.ops.pack_masks`)
    and ``tau_mtl.<key>`` (fp32, the key's shape), and per running statistic ``stat.<key>``
    (fp32): with the base, everything needed to rebuild every task's model.
    """
    if cfg.method.name != "tall":
        return [Output("", "model", shards, INDEX_NAME)]
    choices = {k.shared["output"] for k in _by_method(keys)}
    if len(choices) > 1:
        raise ConfigError("tall: output must be the same for every tensor (models or masks), not set by filters")
    num_tasks = len(cfg.experts)
    outputs = [] if choices == {"masks"} else [Output(f"task_{t}", ("task", t), shards, INDEX_NAME)
                                               for t in range(num_tasks)]
    entries = []
    for shard in shards:
        step = []
        for key in shard.keys:
            k = keys[key]
            if k.running_stat:
                step.append((f"stat.{key}", k.shape, torch.float32))
            elif k.merged:
                step.append((f"mask.{key}", (num_tasks, ops.packed_size(math.prod(k.shape))), torch.uint8))
                step.append((f"tau_mtl.{key}", k.shape, torch.float32))
        entries.append(step)
    filled = [i for i, step in enumerate(entries) if step]
    plans = [None] * len(shards)
    for n, i in enumerate(filled):
        basename = TALL_BASENAME if len(filled) == 1 else f"{TALL_BASENAME}-{n + 1:05d}-of-{len(filled):05d}"
        (plans[i],) = ckio.plan_shards(entries[i], 0, basename=basename)
    return outputs + [Output("", "masks", plans, f"{TALL_BASENAME}.safetensors.index.json")]


def _device(device):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to this process (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return device


def _check_same_keys(ref, checkpoints):
    """Every model holds the reference's keys with its shapes and dtypes, and no other key."""
    ref_keys = set(ref.keys())
    for ckpt in checkpoints:
        if ckpt is ref:
            continue
        missing = [k for k in ref.keys() if k not in ckpt]
        if missing:
            raise ckio.CheckpointError(f"{ckpt.path} lacks {len(missing)} key(s) that {ref.path} has, "
                                       f"e.g. {missing[0]!r}")
        extra = [k for k in ckpt.keys() if k not in ref_keys]
        if extra:
            raise ckio.CheckpointError(f"{ckpt.path} has {len(extra)} key(s) that {ref.path} lacks, e.g. {extra[0]!r}")
        for key in ref.keys():
            a, b = ckpt.info(key), ref.info(key)
            if tuple(a.shape) != tuple(b.shape):
                raise ckio.CheckpointError(f"key {key!r}: shape {tuple(a.shape)} in {a.file} but {tuple(b.shape)} "
                                           f"in {b.file}")
            if a.dtype != b.dtype and not (a.dtype in MERGE_DTYPES and b.dtype in MERGE_DTYPES):
                raise ckio.CheckpointError(f"key {key!r}: dtype {a.dtype} in {a.file} but {b.dtype} in {b.file}")


def _uniform_scope(cfg, keys):
    """Whether the job is a global TIES; ``scope`` must not vary between tensors."""
    if cfg.method.name != "ties":
        return False
    scopes = {k.shared["scope"] for k in _by_method(keys)}
    if len(scopes) > 1:
        raise ConfigError("ties: scope must be the same for every tensor (global or tensor), not set by filters")
    if scopes == {"global"}:
        first = next(_by_method(keys))
        for k in _by_method(keys):
            if k.shared["normalize"] != first.shared["normalize"]:
                raise ConfigError("ties with scope: global merges with one rule over the whole model: normalize "
                                  f"must be the same for every tensor ({k.key!r} resolves another)")
            if [p.get("density") for p in k.per_model] != [p.get("density") for p in first.per_model]:
                raise ConfigError(f"ties with scope: global keeps one density per model over the whole model; "
                                  f"tensor {k.key!r} resolves another (filters and gradients of density are per-tensor)")
        return True
    return False


def _by_method(keys):
    """The key plans the merge method computes (not copied, not running statistics)."""
    return (k for k in keys.values() if k.merged and not k.running_stat)


# what a job's output depends on (_job_state's keys), as --resume names a change
_STATE_NAMES = {"config": "config", "inputs": "input model", "modified": "input file modified since",
                "shard_bytes": "--out-shard-size", "seed": "--random-seed", "permutations": "permutations file",
                "version": "nlmerge version"}


def _state_changes(before, now, paths):
    """What differs between a recorded job state and this one's, in words: the config's top-level
    keys, the inputs (by path; a model whose identity changed is not also said to be modified),
    the options with both values."""
    changes = []
    identity_changed = [a != b for a, b in zip(before.get("inputs") or [None] * len(paths), now["inputs"])]
    for key, name in _STATE_NAMES.items():
        old, new = before.get(key), now[key]
        if old == new:
            continue
        if key == "config" and isinstance(old, dict):
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            changes.append(f"config ({', '.join(keys)})")
        elif key in ("inputs", "modified") and isinstance(old, list) and len(old) == len(new):
            which = [p for p, a, b, other in zip(paths, old, new, identity_changed)
                     if a != b and (key == "inputs" or not other)]
            if which:
                changes.append(f"{name} ({', '.join(which)})")
        elif key in ("shard_bytes", "seed", "version"):
            changes.append(f"{name} ({old} before, {new} now)")
        else:
            changes.append(name)
    return changes


def _job_state(cfg, checkpoints, permutations, max_bytes, seed):
    """Everything the output bytes depend on (config, inputs, options (the seed only for a method
    that draws), version), as JSON gives it back. The inputs by their identity (headers and
    sampled bytes: a different model) and each data file's modification time: a file rewritten in
    place since (a few bytes changed, which the sample can miss) makes ``--resume`` refuse rather
    than keep shards merged from the old bytes."""
    from nlmerge import __version__

    modified = [[os.stat(f).st_mtime_ns for f in sorted(c.files)] for c in checkpoints]
    state = {"config": cfg.source, "inputs": [c.identity() for c in checkpoints], "modified": modified,
             "shard_bytes": max_bytes, "seed": seed if cfg.method.draws else None,
             "permutations": [ckio.file_digest(f) for f in permutations.files], "version": __version__}
    return json.loads(json.dumps(state, sort_keys=True, default=str))


def _fingerprint(state):
    """The digest of a job's state (``_job_state``), which the manifest records."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _check_out(plan, resume):
    """Refused before the output folder is touched: one that is, holds or lies inside an input
    (``--force`` would delete it); a file; a file system without the space the shards need."""
    out = os.path.realpath(plan.out)
    ckio.check_apart(plan.out, [c.path for c in plan.checkpoints] + list(plan.permutations.files),
                     "write the merge elsewhere")
    ckio.check_output_folder(plan.out)  # before its free space is looked up as a folder's
    _check_free_space(plan, out, resume)


def _prepare_out(plan, *, force, resume):
    """Prepare the output folder, which this job has locked (its lock file is not counted), and
    return the job's manifest (a new one, or with ``--resume`` the one found there).

    Refused: a non-empty folder without ``--force`` or ``--resume`` (the temporary files that a
    killed job left, ``.NAME.partial``, are removed first); ``--resume`` on a folder that holds no
    nlmerge job. With ``--force``, a previous job's outputs are set aside, and moved back if the
    preparation fails after that.
    """
    out = os.path.realpath(plan.out)
    for name in ckio.output_entries(out):
        if fnmatch.fnmatchcase(name, ".*.partial") and os.path.isfile(os.path.join(out, name)):
            # a killed job's temporary file: this job holds OUT's lock, no other writes there
            os.remove(os.path.join(out, name))
    if ckio.output_entries(out):
        if resume:
            if ckio.Manifest.load(out) is None:
                raise FileExistsError(f"--resume: {plan.out!r} holds no nlmerge job ({ckio.MANIFEST_NAME} is missing); "
                                      "pass --force to write into it")
        elif not force:
            raise FileExistsError(f"output folder {plan.out!r} exists and is not empty; pass --force to write into "
                                  "it or --resume to continue an interrupted job")
        else:
            set_aside_previous_outputs(out)
    try:
        for output in plan.outputs:
            os.makedirs(os.path.join(out, output.folder), exist_ok=True)
        return _manifest(plan, resume)
    except BaseException:
        if not resume:  # OUT holds nothing of a previous job now, only this one's new manifest
            restore_previous_outputs(plan.out)
        raise


def _check_free_space(plan, out, resume):
    """OSError naming both sizes when the file system of ``out`` has less free space than the shards
    still to write (all of them; with ``resume``, those not written yet; files are not
    preallocated, so this is the early check), or when it is read-only or not writable."""
    needed = sum(f.size for o in plan.outputs for f in map(o.file, range(len(plan.shards)))
                 if f is not None and not (resume and os.path.exists(os.path.join(out, f.name))))
    existing = out
    while not os.path.exists(existing):  # OUT may not exist yet: its file system is its nearest ancestor's
        existing = os.path.dirname(existing)
    stat = os.statvfs(existing)
    if stat.f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"output {plan.out!r}: {existing!r} is "
                              f"{'on a read-only file system' if stat.f_flag & os.ST_RDONLY else 'not writable'}")
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        raise OSError(errno.ENOSPC, f"output {plan.out!r}: the merge writes {needed / 1e9:.2f} GB of shards but "
                      f"its file system has {free / 1e9:.2f} GB free")


def previous_outputs(out):
    """A previous job's files in OUT (nlmerge's or mergekit's: data files, config copies, a merge's
    model card) and its ``task_<t>`` folders, as paths relative to OUT; other files are the user's."""
    found = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isdir(path) and fnmatch.fnmatchcase(name, "task_[0-9]*"):
            found.append(name)
        elif os.path.isfile(path) and (any(fnmatch.fnmatchcase(name, p) for p in _OUTPUT_PATTERNS)
                                       or (name == CARD_NAME and _is_card(path))):
            found.append(name)
    return found


def set_aside_previous_outputs(out):
    """--force: move a previous job's outputs into ``OUT/.nlmerge-previous`` (removed when this job
    completes, moved back if it fails before finishing a shard: see restore_previous_outputs).
    They are moved into ``.nlmerge-previous.partial`` first, renamed when all are there: a move cut
    short (by an error or a signal here, or by a kill, found by the next forced job) is undone, its
    files moved back into OUT. A folder already set aside by an earlier forced job that never
    completed is kept as it is, and that job's own files are removed."""
    aside = os.path.join(out, PREVIOUS)
    moving = aside + ".partial"
    if os.path.isdir(moving):
        _move_entries(moving, out)
    if os.path.isdir(aside):
        remove_previous_outputs(out)
        return
    names = previous_outputs(out)
    if not names:
        return
    os.makedirs(moving)
    try:
        for name in names:
            os.replace(os.path.join(out, name), os.path.join(moving, name))
    except BaseException:
        _move_entries(moving, out)
        raise
    os.replace(moving, aside)


def _move_entries(folder, out):
    """Move every entry of ``folder`` back into ``out``, then remove ``folder``."""
    for name in os.listdir(folder):
        os.replace(os.path.join(folder, name), os.path.join(out, name))
    os.rmdir(folder)


def restore_previous_outputs(out):
    """After a failure that left no shard of this job worth keeping: remove this job's outputs and
    move what --force set aside back into OUT."""
    if not os.path.isdir(out):  # removed under the job
        return
    remove_previous_outputs(out)
    aside = os.path.join(out, PREVIOUS)
    if os.path.isdir(aside):
        _move_entries(aside, out)


def remove_previous_outputs(out):
    """Remove a previous job's outputs from OUT (see previous_outputs); other files stay."""
    for name in previous_outputs(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _is_card(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return is_merge_card(f.read())


def _discard_job(plan, manifest):
    """After an error that the same job cannot get past (a non-finite input, a result that does not
    fit its dtype: the config or the inputs must change, and their fingerprint with them), remove
    every file the job recorded, so that no incomplete model is left in OUT."""
    for name in ckio.Manifest.load(plan.out).shards:  # rank 0's shards and the other ranks' parts
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(plan.out, name))
    manifest.remove_parts()
    manifest.shards = {}


def _forget_empty_job(plan, manifest, created):
    """After a failure before any shard was finished, leave nothing of the job behind (OUT itself,
    when the job made it, goes with its lock): a rerun after fixing the input then needs neither
    --force nor --resume. Returns whether nothing was kept."""
    if manifest is None or manifest.shards or glob.glob(os.path.join(glob.escape(plan.out), ckio.PART_PATTERN)):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest.path)
    if created:
        for folder in {o.folder for o in plan.outputs if o.folder}:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(plan.out, folder))
    return True


def _manifest(plan, resume):
    previous = ckio.Manifest.load(plan.out) if resume else None
    if previous is not None and previous.fingerprint == plan.fingerprint:
        return previous
    if resume and previous is not None:
        changed = _state_changes(previous.job.get("state", {}), plan.state, [c.path for c in plan.checkpoints])
        raise ValueError(f"--resume: {plan.out!r} holds a job with another {'; another '.join(changed)} "
                         "(fingerprints differ); use --force to start over")
    manifest = ckio.Manifest(plan.out, plan.fingerprint, job={"state": plan.state})
    manifest.save()
    return manifest


def _read_inputs(plan, key, copy_stream):
    """The key's tensors of every input, permuted where an alignment applies, and an event that
    marks their arrival on a CUDA device (None on the CPU). For a CUDA job they are copied from
    pinned buffers on ``copy_stream``, so the copy overlaps the merge running on the default stream."""
    tensors = [plan.permutations.apply(ckpt.path, key, ckpt.get(key)) for ckpt in plan.checkpoints]
    if copy_stream is None:
        return tensors, None
    with torch.cuda.stream(copy_stream):
        moved = [x.pin_memory().to(plan.device, non_blocking=True) for x in tensors]
        arrived = torch.cuda.Event()
        arrived.record(copy_stream)
    return moved, arrived


def _stream(plan, keys):
    """Yield ``(key, tensors)`` for ``keys``, reading the next key on a thread while one is merged."""
    copy_stream = torch.cuda.Stream(plan.device) if plan.device.type == "cuda" else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-read") as pool:
        pending = [pool.submit(_read_inputs, plan, k, copy_stream) for k in keys[:1]]
        for i, key in enumerate(keys):
            tensors, arrived = pending[i].result()
            if arrived is not None:  # the merge waits for the copy; the allocator learns who uses the memory
                current = torch.cuda.current_stream(plan.device)
                current.wait_event(arrived)
                for x in tensors:
                    x.record_stream(current)
            if i + 1 < len(keys):  # one key ahead: memory stays at two keys' inputs
                pending.append(pool.submit(_read_inputs, plan, keys[i + 1], copy_stream))
            pending[i] = None
            yield key, tensors


def _bar(total, desc, progress):
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def _global_thresholds(plan, manifest, progress, world, steps):
    """Exact per-task TIES thresholds over the whole model, each rank reading the keys of its
    ``steps`` (its share of the output shards), the integer counts summed over the ranks; rank 0
    records them in the manifest (``job["thresholds"]``), where a resumed job finds them and
    reads nothing for them.

    The one-read protocol of :func:`nlmerge.ops.kth_smallest_magnitudes_streaming`: a sample pass
    (only sampled elements of the mapped tensors are read), a bracket of each task's k-th magnitude,
    one counting pass (every task of a key in one read); for a task whose bracket missed (rare),
    the two histogram passes.
    """
    recorded = manifest.job.get("thresholds")
    if recorded is not None:  # fp32 values, exact in JSON's float64
        return torch.tensor(recorded, dtype=torch.float32, device=plan.device)
    merged = list(_by_method(plan.keys))
    keys = [key for i in steps for key in plan.shards[i].file_order
            if plan.keys[key].merged and not plan.keys[key].running_stat]
    d = sum(math.prod(k.shape) for k in merged)  # every task counts the same elements
    ranks = [d - int(d * p["density"]) for p in merged[0].per_model[1:]]
    labels = [ckpt.path for ckpt in plan.checkpoints[1:]]

    def one_pass(what, count):
        with world.step(), _bar(sum(_nbytes(plan.keys[key]) for key in keys), f"TIES thresholds ({what})",
                                progress) as bar:
            for key, tensors in _stream(plan, keys):
                with _naming(key, plan, tensors):
                    count(tensors[0], tensors[1:], labels)
                if bar is not None:
                    bar.update(_nbytes(plan.keys[key]))

    thresholds = ops.kth_smallest_magnitudes_streaming(ranks, one_pass, device=plan.device, backend=plan.backend,
                                                       sample_stride=selection.sample_stride(d), sum_=world.sum_)
    if world.leader:
        manifest.job["thresholds"] = thresholds.tolist()
        manifest.save()
    return thresholds


def _nbytes(k):
    numel = 1
    for s in k.shape:
        numel *= s
    return numel * k.dtype.itemsize


@contextlib.contextmanager
def _naming(key, plan, tensors):
    """Re-raise a non-finite input or result as a ValueError naming the key and the model's path
    (or, for a result that does not fit the output dtype, the config's remedy)."""
    try:
        yield
    except NonFiniteResultError as err:
        hint = "set out_dtype: float32 in the config" if err.fits is not None else "fp32 overflows too"
        raise ValueError(f"tensor {key!r}: the merged result does not fit {err.dtype} (it would be Inf); "
                         f"{hint}") from err
    except (ops.NonFiniteError, ValueError) as err:
        if not isinstance(err, ops.NonFiniteError) and not isinstance(err.__cause__, ops.NonFiniteError):
            raise  # another error, already named (merge.generalized names the model by its index only)
        for ckpt, x in zip(plan.checkpoints, tensors):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"tensor {key!r}: {ckpt.path} contains NaN or Inf; non-finite values are never "
                                 "merged") from err
        raise ValueError(f"tensor {key!r}: {err}") from err


def _merge_one(plan, k, tensors, thresholds, fill):
    """One key's result in its output dtype (on the CPU), and the TIES pass of a global TIES (or
    None). A result that does not fit the output dtype raises NonFiniteResultError naming the key
    (``out_dtype: float32`` in the config writes it wider)."""
    method = plan.config.method
    if k.running_stat:
        return _running_stat(plan, k, tensors, k.dtype).cpu(), None
    with _naming(k.key, plan, tensors):
        if thresholds is None:
            result = merge_key(method, k.key, tensors, k.shared, k.per_model, out_dtype=k.dtype, seed=plan.seed,
                               backend=plan.backend)
            return result.cpu(), None
        experts = k.per_model[1:]
        result = ops.ties_merge_pass_models(
            tensors[0], tensors[1:], thresholds, fill_sign=fill, weights=[p["weight"] for p in experts],
            lam=k.shared["lambda"], disjoint="mean" if k.shared["normalize"] else "sum", out_dtype=k.dtype,
            backend=plan.backend)
        return result.merged.cpu(), result


def _running_stat(plan, k, tensors, dtype):
    """A BatchNorm running statistic: the models' plain mean (nlmerge.merge's rule), in ``dtype``."""
    experts = tensors[1:] if plan.config.method.uses_base else tensors
    stats = running_stat_values(Plan([k.key], [], [k.key], {k.key: dtype}), {k.key: tensors[0]},
                                [{k.key: x} for x in experts], "average", backend=plan.backend)
    return stats[k.key]


def _tall_writes(plan, k, tensors):
    """A TALL key's tensors: ``[(role, name, tensor)]`` for the task models and the masks file."""
    tasks = [o.role for o in plan.outputs if o.role != "masks"]  # none with output: masks
    if k.running_stat:
        value = _running_stat(plan, k, tensors, torch.float32).cpu()  # each task model rounds it once
        models, masks = [value.to(k.dtype)] * len(tasks), [(f"stat.{k.key}", value)]
    else:
        with _naming(k.key, plan, tensors):
            tau_mtl, packed, models = tall_key(tensors, k.shared, k.per_model, out_dtype=k.dtype,
                                               backend=plan.backend)
        masks = [(f"mask.{k.key}", packed.cpu()), (f"tau_mtl.{k.key}", tau_mtl.cpu())]
    return ([(role, k.key, x.cpu()) for role, x in zip(tasks, models or [])]
            + [("masks", name, x) for name, x in masks])


def _step_files(plan, step):
    """``{role: ShardPlan}`` of the files step ``step`` writes (names relative to OUT)."""
    return {o.role: o.file(step) for o in plan.outputs if o.plans[step] is not None}


def _finish_files(writers, manifest, extra):
    """Finish a step's writers in turn (aborting the rest when one fails), each file recorded in
    ``manifest`` with ``extra`` before it is renamed into place."""
    record = functools.partial(manifest.record, extra=extra)
    for done, writer in enumerate(writers):
        try:
            writer.finish(record=record)
        except BaseException:
            for rest in writers[done + 1:]:
                rest.abort()
            raise


def _merge_shards(plan, manifest, thresholds, progress, steps, done):
    """The merge pass over ``steps`` (this rank's share): the keys of every step not in ``done``
    (the steps whose files the manifest verified) are streamed (one key read ahead, across step
    boundaries), merged and written to the step's files; a step's filled files are finished
    (fsync, hash, rename) on a thread while the next step is merged, and recorded in the
    manifest before they are renamed into place: on that thread, which no signal interrupts
    (Python runs signal handlers on the main thread), so a file under its final name is always
    recorded. A step is done when all its files are.

    Global TIES fills a zero elected sign with the majority of the signs merged so far (before
    any: a sample's; the model-wide majority is only known at the end): the step's manifest
    entry records each key where that happened with the fill it got (``extra["fills"]``), for
    :func:`_refill`, and the step's sum of elected signs. Returns the sum of the elected signs
    over ``steps``."""
    todo = [i for i in steps if i not in done]
    sign_sum = sum(manifest.extra(plan.shards[i].name).get("sign_sum", 0) for i in done)
    step_of = {key: i for i in todo for key in plan.shards[i].file_order}
    keys = list(step_of)  # step by step: one step's files are open at a time
    last_keys = {plan.shards[i].file_order[-1] for i in todo}
    tall = plan.config.method.name == "tall"
    writers, finishing = None, []
    try:
        with _bar(sum(plan.shards[i].nbytes for i in todo), "merge", progress) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-finish") as finisher:
            for done, (key, tensors) in enumerate(_stream(plan, keys), start=1):
                step, k = step_of[key], plan.keys[key]
                if writers is None:
                    writers = {role: ckio.ShardWriter(f, plan.out) for role, f in _step_files(plan, step).items()}
                    shard_sum, fills = 0, {}
                if not k.merged:
                    source = tensors[plan.copy_source].cpu()
                    writes = [(role, key, source) for role in writers if role != "masks"]
                elif tall:
                    writes = _tall_writes(plan, k, tensors)
                else:
                    fill = ops.majority_sign(sign_sum + shard_sum) or "sample"
                    out, info = _merge_one(plan, k, tensors, thresholds, fill)
                    writes = [("model", key, out)]
                    if info is not None:
                        shard_sum += info.sign_sum
                        if info.ambiguous:
                            fills[key] = int(info.fill_sign)
                for role, name, tensor in writes:
                    writers[role].write(name, tensor)
                if key in last_keys:  # the step is complete: finish its files in the background
                    sign_sum += shard_sum
                    # taken over in one statement (no call: a signal comes before or after it), so
                    # that the finally never aborts a writer that the finisher is finishing
                    step_writers, writers = writers, None
                    extra = {"sign_sum": shard_sum, "fills": fills} if thresholds is not None else None
                    finishing.append(finisher.submit(_finish_files, list(step_writers.values()), manifest, extra))
                    _check_finished(finishing, wait=False)
                if bar is not None:
                    bar.set_postfix_str(f"{done}/{len(keys)} tensors", refresh=False)
                    bar.update(_nbytes(k))
    finally:
        for writer in (writers or {}).values():
            writer.abort()
        _check_finished(finishing, wait=True)
    return sign_sum


def _check_finished(finishing, *, wait):
    """Re-raise the error of a failed finish among the finished steps (or, with ``wait``, all)."""
    while finishing and (wait or finishing[0].done()):
        finishing.pop(0).result()


def _refill(plan, manifest, thresholds, majority, steps, progress):
    """Global TIES, once the model-wide ``majority`` sign is known: in the files of ``steps`` (this
    rank's share, kept from an interrupted run or merged now), the keys whose result depends on
    the fill they got (an elected sign of exactly 0 with a kept entry: common on 16-bit models,
    whose task vectors cancel exactly; see ``_merge_shards``) are merged again with ``majority``
    and replace their bytes in the file, reopened under its temporary name; the file is hashed
    again, recorded with its new fills and renamed back. A job killed meanwhile loses that file
    only (``--resume`` merges it again)."""
    disjoint = "mean" if next(_by_method(plan.keys)).shared["normalize"] else "sum"  # one for all (_uniform_scope)
    stale = {}
    for step in steps:
        fills = manifest.extra(plan.shards[step].name).get("fills", {})
        keys = [key for key, fill in fills.items() if not ops.same_fill_result(fill, majority, disjoint)]
        if keys:
            stale[step] = keys
    if not stale:
        return
    with _bar(sum(_nbytes(plan.keys[key]) for keys in stale.values() for key in keys), "zero-sign fill",
              progress) as bar:
        for step, keys in stale.items():
            shard = plan.shards[step]
            extra = manifest.extra(shard.name)
            with ckio.ShardWriter(shard, plan.out, reopen=True) as writer:
                for key, tensors in _stream(plan, keys):
                    fixed, _ = _merge_one(plan, plan.keys[key], tensors, thresholds, majority)
                    writer.write(key, fixed, replace=True)
                    if bar is not None:
                        bar.update(_nbytes(plan.keys[key]))
                fills = {**extra["fills"], **dict.fromkeys(keys, majority)}
                _finish_files([writer], manifest, {**extra, "fills": fills})


def _finish_out(plan, copy_tokenizer, write_model_card):
    """Write what follows the shards: each output's index, each model folder's config.json,
    tokenizer files and model card, a TALL job's ``tall.json``, and the config as
    ``nlmerge_config.yml``."""
    out = plan.out
    for output in plan.outputs:
        index = ckio.shard_index([p for p in output.plans if p is not None])
        if index is not None:
            ckio.write_json_atomic(os.path.join(out, output.folder, output.index_name), index)
        if output.role == "masks":
            continue
        write_model_files(plan.checkpoints[plan.copy_source], {k.dtype for k in plan.keys.values() if k.merged},
                          os.path.join(out, output.folder), copy_tokenizer)
        if write_model_card:
            task = output.role[1] if isinstance(output.role, tuple) else None
            card = model_card(plan.config, [c.path for c in plan.checkpoints], task)
            ckio.write_text_atomic(os.path.join(out, output.folder, CARD_NAME), card)
    if plan.config.method.name == "tall":
        tasks = [c.path for c in plan.checkpoints[1:]]
        info = {"format": TALL_FORMAT, "base_model": os.path.abspath(plan.checkpoints[0].path),
                "base_identity": plan.checkpoints[0].identity(), "num_tasks": len(tasks),
                "tasks": tasks, "task_folders": [o.folder for o in plan.outputs if o.role != "masks"],
                "dtypes": {k.key: str(k.dtype).removeprefix("torch.") for k in plan.keys.values()},
                "masks": "mask.<key>: uint8 [num_tasks, ceil(numel / 8)], bit i of byte j is element 8 j + i of "
                         "task t's mask (row t); tau_mtl.<key>: float32; stat.<key>: float32 running statistic; "
                         "task t's tensor = base + mask_t * tau_mtl (fp32, rounded once), running statistics "
                         "= stat, other keys = the base's"}
        ckio.write_json_atomic(os.path.join(out, TALL_INFO), info)
    ckio.write_text_atomic(os.path.join(out, CONFIG_COPY), yaml.safe_dump(plan.config.source, sort_keys=False))


# the files that hold a tokenizer itself (the other TOKENIZER_FILES configure one)
_TOKENIZER_DATA = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_base_tokenizer(ref):
    """``tokenizer_source: base`` asks for the base's tokenizer: ConfigError naming the base when
    it has none to copy (mergekit fails there too), before any work."""
    if not (os.path.isdir(ref.path) and any(os.path.isfile(os.path.join(ref.path, n)) for n in _TOKENIZER_DATA)):
        raise ConfigError(f"tokenizer_source: base, but {ref.path} has no tokenizer ({', '.join(_TOKENIZER_DATA)}); "
                          "remove tokenizer_source to merge without one")


def write_model_files(ref, dtypes, folder, copy_tokenizer):
    """config.json of the checkpoint ``ref`` and ``ref``'s tokenizer files, into ``folder``; a
    warning when ``ref`` has no config.json.

    When ``dtypes`` (the merged tensors' dtypes) holds one dtype, it is written in the dtype keys
    ``ref``'s config.json has: ``dtype`` (newer transformers) and/or ``torch_dtype``, or
    ``torch_dtype`` (as mergekit writes) when it has neither."""
    dtypes = set(dtypes)
    if ref.config is None:
        warnings.warn(f"{ref.path} has no config.json beside it: {folder} holds the merged tensors only (copy a "
                      "config.json there to load it with transformers)", stacklevel=2)
    else:
        config = dict(ref.config)
        if len(dtypes) == 1:
            name = str(dtypes.pop()).removeprefix("torch.")
            # one key per name the base uses: a second, added key would be a second source of truth
            for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
                config[key] = name
        ckio.write_json_atomic(os.path.join(folder, "config.json"), config)
    if copy_tokenizer and os.path.isdir(ref.path):
        for name in TOKENIZER_FILES:
            src = os.path.join(ref.path, name)
            if os.path.isfile(src):
                ckio.copy_file_atomic(src, os.path.join(folder, name))
