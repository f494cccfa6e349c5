"""``nlmerge merge CONFIG.yml OUT``: the large-model merge job (config -> plan -> stream -> write).

The job is planned before it runs: every input header is read and checked (keys, shapes, dtypes,
files), every parameter is resolved for every tensor (filters, gradients), the output shards are
planned from the headers, and only then are tensors streamed, one key at a time across the T+1
models, merged in fp32 on nlmerge's kernels and written at their planned offsets. Nothing is
written under a final name until it is complete; a manifest (sizes, sha256) lets ``--resume``
skip finished shards and give byte-identical output.
"""
import contextlib
import fnmatch
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from nlmerge import io as ckio
from nlmerge import ops
from nlmerge.jobs.config import ConfigError, count_layers, layer_position, load_config
from nlmerge.jobs.methods import merge_key, task_vectors
from nlmerge.jobs.permutations import load_permutations
from nlmerge.merge._common import MERGE_DTYPES, Plan, is_running_stat, running_stat_values
from nlmerge.ops._checks import NonFiniteResultError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "vocab.txt",
                   "generation_config.json", "chat_template.jinja")
CONFIG_COPY = "nlmerge_config.yml"
INDEX_NAME = "model.safetensors.index.json"
# data files a previous job may have left in OUT, removed by --force before writing
_OUTPUT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", ".*.partial", ckio.MANIFEST_NAME)


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


@dataclass
class MergePlan:
    """Everything the job needs before it reads a tensor (see :func:`plan_merge`)."""

    config: object
    out: str
    checkpoints: list
    copy_source: int
    keys: dict
    shards: list
    permutations: dict
    fingerprint: str
    global_ties: bool
    seed: int
    backend: str | None
    device: torch.device


def run_merge(config, out, *, device="cpu", out_shard_size="5B", random_seed=None, copy_tokenizer=True,
              force=False, resume=False, progress=True, backend=None):
    """Merge the checkpoints a mergekit-style config names, into ``out`` in the Hugging Face layout.

    Parameters
    ----------
    config : str, os.PathLike or Mapping
        A YAML file (mergekit's ``models:`` form, see :mod:`nlmerge.jobs.config`) or its mapping.
    out : str or os.PathLike
        Output folder: safetensors shards of at most ``out_shard_size`` bytes (``model.safetensors``
        alone, or ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``),
        ``config.json`` with the output dtype, tokenizer files of the base, the config as
        ``nlmerge_config.yml`` and ``nlmerge-manifest.json``.
    device : "cpu" or "cuda"
        Where the arithmetic runs (tensors are read on the CPU).
    out_shard_size : int or str
        mergekit's ``--out-shard-size`` ("5B", "500M", bytes per shard as mergekit's writer counts).
    random_seed : int, optional
        Seed of the random methods (DARE); drops depend only on (seed, tensor name, element), so
        the output does not depend on device, backend or process count. Default 0.
    copy_tokenizer : bool
        Copy the base's tokenizer files.
    force : bool
        Write into an existing output folder (replacing a previous job's files).
    resume : bool
        Continue an interrupted job with the same config and inputs: finished shards (sizes and
        sha256 verified) are kept; the result is byte-identical to an uninterrupted run.
    progress : bool
        Show a progress bar (tensors done, bytes per second, time left).
    backend : None, "torch", "cpu" or "triton"
        Kernel backend of ``nlmerge.ops``.

    Returns
    -------
    str
        The output folder.

    Raises
    ------
    ConfigError
        A config nlmerge cannot run (naming the key or parameter).
    nlmerge.io.CheckpointError
        Unreadable, truncated or corrupt inputs; keys, shapes or dtypes that differ between models
        (naming the key, both shapes and both files).
    FileExistsError
        ``out`` exists and neither ``force`` nor ``resume`` is set.
    ValueError
        A merged tensor that does not fit the output dtype (naming the key); non-finite inputs.
    """
    plan = plan_merge(config, out, device=device, out_shard_size=out_shard_size, random_seed=random_seed,
                      backend=backend)
    try:
        created = _prepare_out(plan, force=force, resume=resume)
        manifest = _manifest(plan, resume)
        try:
            thresholds = _global_thresholds(plan, progress) if plan.global_ties else None
            _merge_shards(plan, manifest, thresholds, progress)
        except BaseException:
            _forget_empty_job(plan, manifest, created)
            raise
        _finish_out(plan, copy_tokenizer)
    finally:
        for ckpt in plan.checkpoints:
            ckpt.close()
    return os.fspath(out)


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
            merged = info.dtype in MERGE_DTYPES and not any(fnmatch.fnmatchcase(key, p) for p in cfg.exclude)
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
        global_ties = _uniform_scope(cfg, keys)
        shards = ckio.plan_shards([(k.key, k.shape, k.dtype) for k in keys.values()], max_bytes)
    except BaseException:
        for ckpt in checkpoints:
            ckpt.close()
        raise
    fingerprint = _fingerprint(cfg, checkpoints, permutations, max_bytes, seed)
    return MergePlan(cfg, os.fspath(out), checkpoints, source, keys, shards, permutations, fingerprint,
                     global_ties, seed, backend, device)


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
            if [p.get("density") for p in k.per_model] != [p.get("density") for p in first.per_model]:
                raise ConfigError(f"ties with scope: global keeps one density per model over the whole model; "
                                  f"tensor {k.key!r} resolves another (filters and gradients of density are per-tensor)")
        return True
    return False


def _by_method(keys):
    """The key plans the merge method computes (not copied, not running statistics)."""
    return (k for k in keys.values() if k.merged and not k.running_stat)


def _fingerprint(cfg, checkpoints, permutations, max_bytes, seed):
    """A digest of everything the output bytes depend on (config, inputs, options, version)."""
    from nlmerge import __version__

    h = hashlib.sha256()
    state = {"config": cfg.source, "inputs": [c.identity() for c in checkpoints], "shard_bytes": max_bytes,
             "seed": seed, "permutations": [ckio.file_sha256(f) for f in permutations.files], "version": __version__}
    h.update(json.dumps(state, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _prepare_out(plan, *, force, resume):
    """Check and create the output folder; returns whether this job created it.

    Refused, before anything is touched: an output folder that is, holds or lies inside an input
    (``--force`` would delete it); a non-empty folder without ``--force`` or ``--resume``;
    ``--resume`` on a folder that holds no nlmerge job.
    """
    out = os.path.realpath(plan.out)
    for path in [c.path for c in plan.checkpoints] + list(plan.permutations.files):
        src = os.path.realpath(path)
        if src == out or src.startswith(out + os.sep) or out.startswith(src + os.sep):
            raise FileExistsError(f"output {plan.out!r} overlaps the input {path!r}; write the merge elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output {plan.out!r} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if resume:
            if ckio.Manifest.load(out) is None:
                raise FileExistsError(f"--resume: {plan.out!r} holds no nlmerge job ({ckio.MANIFEST_NAME} is missing); "
                                      "pass --force to write into it")
            return False
        if not force:
            raise FileExistsError(f"output folder {plan.out!r} exists and is not empty; pass --force to write into "
                                  "it or --resume to continue an interrupted job")
        for name in os.listdir(out):
            if any(fnmatch.fnmatchcase(name, p) for p in _OUTPUT_PATTERNS):
                os.remove(os.path.join(out, name))
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    return created


def _forget_empty_job(plan, manifest, created):
    """After a failure before any shard was finished, leave nothing behind: a rerun after fixing
    the input then needs neither --force nor --resume."""
    if manifest.shards:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest.path)
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(plan.out)


def _manifest(plan, resume):
    previous = ckio.Manifest.load(plan.out) if resume else None
    if previous is not None and previous.fingerprint == plan.fingerprint:
        return previous
    if resume and previous is not None:
        raise ValueError(f"--resume: {plan.out!r} holds a job with another config, inputs or options "
                         "(fingerprints differ); use --force to start over")
    manifest = ckio.Manifest(plan.out, plan.fingerprint)
    manifest.save()
    return manifest


def _read_inputs(plan, key):
    """The key's tensors of every input, permuted where an alignment applies, on the job's device."""
    tensors = []
    for ckpt in plan.checkpoints:
        x = plan.permutations.apply(ckpt.path, key, ckpt.get(key))
        tensors.append(x.to(plan.device, non_blocking=True))
    return tensors


def _stream(plan, keys):
    """Yield ``(key, tensors)`` for ``keys``, reading the next key on a thread while one is merged."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-read") as pool:
        pending = [pool.submit(_read_inputs, plan, k) for k in keys[:1]]
        for i, key in enumerate(keys):
            tensors = pending[i].result()
            if i + 1 < len(keys):  # one key ahead: memory stays at two keys' inputs
                pending.append(pool.submit(_read_inputs, plan, keys[i + 1]))
            pending[i] = None
            yield key, tensors


def _bar(total, desc, progress):
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def _global_thresholds(plan, progress):
    """Exact per-task TIES thresholds over the whole model: two streaming histogram passes."""
    merged = list(_by_method(plan.keys))
    densities = [p["density"] for p in merged[0].per_model[1:]]
    selectors = [ops.MagnitudeSelector(plan.device, backend=plan.backend) for _ in densities]
    total = sum(_nbytes(k) for k in merged)
    for step in ("high", "low"):
        if step == "low":
            d = selectors[0].total
            ranks = [d - int(d * keep) for keep in densities]
            for sel, k in zip(selectors, ranks):
                if k >= 1:
                    sel.locate(k)
            if all(k < 1 for k in ranks):
                break
        with _bar(total, f"TIES thresholds ({step} bits)", progress) as bar:
            for key, tensors in _stream(plan, [k.key for k in merged]):
                for t, tau in enumerate(task_vectors(tensors)):
                    if step == "high":
                        with _naming(key, plan, tensors):
                            selectors[t].count(tau, f"task vector of {plan.checkpoints[t + 1].path}")
                    elif ranks[t] >= 1:
                        selectors[t].count_low(tau)
                if bar is not None:
                    bar.update(_nbytes(plan.keys[key]))
    return torch.stack([sel.threshold() if k >= 1 else torch.zeros((), device=plan.device)
                        for sel, k in zip(selectors, ranks)])


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
    except ops.NonFiniteError as err:
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
        experts = tensors[1:] if method.uses_base else tensors
        stats = running_stat_values(Plan([k.key], [], [k.key], {k.key: k.dtype}), {k.key: tensors[0]},
                                    [{k.key: x} for x in experts], "average", backend=plan.backend)
        return stats[k.key].cpu(), None
    with _naming(k.key, plan, tensors):
        if thresholds is None:
            result = merge_key(method, k.key, tensors, k.shared, k.per_model, out_dtype=k.dtype, seed=plan.seed,
                               backend=plan.backend)
            return result.cpu(), None
        experts = k.per_model[1:]
        result = ops.ties_merge_pass(
            task_vectors(tensors), thresholds, fill_sign=fill, weights=[p["weight"] for p in experts],
            base=tensors[0], lam=k.shared["lambda"], disjoint="mean" if k.shared["normalize"] else "sum",
            out_dtype=k.dtype, backend=plan.backend)
        return result.merged.cpu(), result


def _merge_shards(plan, manifest, thresholds, progress):
    """The merge pass: the keys of every shard not already done are streamed (one key read ahead,
    across shard boundaries), merged and written; a filled shard is finished (fsync, sha256,
    rename) on a thread while the next one is merged, then recorded in the manifest."""
    todo = [s for s in plan.shards if not manifest.is_done(s.name)]
    sign_sum = sum(manifest.extra(s.name).get("sign_sum", 0) for s in plan.shards if s not in todo)
    rerun = {s.name: manifest.extra(s.name).get("fills", {}) for s in plan.shards if s not in todo}
    shard_of = {key: shard for shard in todo for key in shard.keys}
    keys = list(shard_of)  # shard by shard: one shard is open at a time
    last_keys = {shard.keys[-1] for shard in todo}
    writer, finishing = None, []
    try:
        with _bar(sum(s.nbytes for s in todo), "merge", progress) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlmerge-finish") as finisher:
            for done, (key, tensors) in enumerate(_stream(plan, keys), start=1):
                shard, k = shard_of[key], plan.keys[key]
                if writer is None:
                    writer, shard_sum, fills = ckio.ShardWriter(shard, plan.out), 0, {}
                if k.merged:
                    fill = (sign_sum + shard_sum > 0) - (sign_sum + shard_sum < 0)
                    out, info = _merge_one(plan, k, tensors, thresholds, fill)
                    if info is not None:
                        shard_sum += info.sign_sum
                        if info.ambiguous:
                            fills[key] = fill
                else:
                    out = tensors[plan.copy_source].cpu()
                writer.write(key, out)
                if key in last_keys:  # the shard is full: finish it in the background
                    sign_sum += shard_sum
                    rerun[shard.name] = fills
                    finishing.append((finisher.submit(writer.finish), {"sign_sum": shard_sum, "fills": fills}))
                    writer = None
                    _record_finished(manifest, finishing, wait=False)
                if bar is not None:
                    bar.set_postfix_str(f"{done}/{len(keys)} tensors", refresh=False)
                    bar.update(_nbytes(k))
    finally:
        if writer is not None:
            writer.abort()
        _record_finished(manifest, finishing, wait=True)
    if thresholds is not None:
        _rerun_majority(plan, manifest, thresholds, sign_sum, rerun)


def _record_finished(manifest, finishing, *, wait):
    """Record finished shards in order; with ``wait``, wait for all (re-raising a failed finish)."""
    while finishing and (wait or finishing[0][0].done()):
        future, extra = finishing.pop(0)
        manifest.record(future.result(), extra=extra)


def _rerun_majority(plan, manifest, thresholds, sign_sum, rerun):
    """Global TIES: keys whose zero signs were filled before the model-wide majority was known and
    whose result depends on it are merged again and their shard rewritten (rare: an elected sign
    of exactly 0 with a kept entry)."""
    majority = (sign_sum > 0) - (sign_sum < 0)
    disjoint = "mean" if next(_by_method(plan.keys)).shared["normalize"] else "sum"
    for shard in plan.shards:
        stale = [key for key, fill in rerun.get(shard.name, {}).items()
                 if not ops.same_fill_result(fill, majority, disjoint)]
        if not stale:
            continue
        fixed = {}
        for key, tensors in _stream(plan, stale):
            fixed[key], _ = _merge_one(plan, plan.keys[key], tensors, thresholds, majority)
        written = ckio.rewrite_shard(shard, plan.out, fixed)
        manifest.record(written, extra={**manifest.extra(shard.name), "fills": {}})


def _finish_out(plan, copy_tokenizer):
    out, ref = plan.out, plan.checkpoints[plan.copy_source]
    if len(plan.shards) > 1:
        ckio.write_json_atomic(os.path.join(out, INDEX_NAME), ckio.shard_index(plan.shards))
    dtypes = {k.dtype for k in plan.keys.values() if k.merged}
    if ref.config is not None:
        config = dict(ref.config)
        if len(dtypes) == 1:
            name = str(dtypes.pop()).removeprefix("torch.")
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
        ckio.write_json_atomic(os.path.join(out, "config.json"), config)
    if copy_tokenizer and os.path.isdir(ref.path):
        for name in TOKENIZER_FILES:
            src = os.path.join(ref.path, name)
            if os.path.isfile(src):
                ckio.copy_file_atomic(src, os.path.join(out, name))
    import yaml

    text = yaml.safe_dump(plan.config.source, sort_keys=False)
    tmp = os.path.join(out, f".{CONFIG_COPY}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, CONFIG_COPY))
