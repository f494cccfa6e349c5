"""``nlmerge correct MERGED --experts E1 ... --data D1 ... OUT``: TACT / REPAIR on Hugging Face
checkpoints, with the correction folded into the weights.

The merged model and each expert are loaded with ``transformers`` (the class named by
``architectures`` in ``config.json``; no remote code), in float32. Expert t is run on task t's data
file and its per-channel statistics at the correction sites are kept; one expert is in memory at a
time. The merged model is then corrected towards them (``nlmerge.correct.correct_to``: sites in
forward order, earlier corrections active), the correction is folded into its weights
(``nlmerge.correct.fold``), and the result is saved with ``save_pretrained`` in the merged
config's dtype: TACT writes ``OUT/task_0``, ``OUT/task_1``, ... (task t = expert t = data file t),
REPAIR writes one checkpoint in ``OUT``, each with a README.md model card (unless asked not to, as
``nlmerge merge``). Every output loads and runs with plain ``transformers``.

Sites (:func:`correction_sites`): the ``nlmerge.correct.default_sites`` rule with the attention
context (the input of the output projection) replaced by the output projection's output, kept
only where the correction folds exactly into the site's own layer (``nlmerge.correct.fold_problem``:
the output of a linear/conv/affine norm layer with a bias). Llama's projections have biases only
behind ``attention_bias`` / ``mlp_bias``: the merged model is loaded with both switched on, the
biases it adds start at zero, and the written ``config.json`` carries the switches. What this gives:

- Llama (``llama``): per decoder layer, the outputs of ``o_proj``, ``gate_proj``, ``up_proj``
  and ``down_proj``. Not sites: the RMSNorm outputs (no bias, so no shift), the residual stream
  (a sum, no layer of its own), q/k/v (the default rule corrects attention after it),
  ``lm_head`` (the output).
- ViT, CLIP: the patch embedding (when it has a bias), the attention output projection, the
  LayerNorm outputs, ``fc1``/``fc2``; not the residual stream, not bias-free projections (CLIP's
  patch embedding, ``visual_projection``), not the output head.
- Mistral and Qwen2 have no sites: their ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``
  have no bias and ``transformers`` has no switch that adds one; such a model is refused.

Data files: one safetensors file per task holding ``input_ids`` [N, L] (integers) and optionally
``attention_mask`` [N, L] (positions where it is 0 are not counted in the statistics) for language
models, or ``pixel_values`` [N, C, H, W] (floats) for vision models; the N rows are fed in batches
of ``batch_size`` (the last may be smaller). A dual encoder (CLIP) runs one tower: the vision
tower on ``pixel_values``, the text tower on ``input_ids``; the other tower is written unchanged.

Everything is checked before any model is run (folders, configs, data files, the output folder);
outputs are written in a temporary folder beside ``OUT`` and renamed to ``OUT`` when complete
(an existing ``OUT`` is replaced only with ``force``, and only then): no half-written output.
``OUT`` is locked while the job runs, as ``nlmerge merge`` locks it (created, with only its lock
file, until the output replaces it).
"""
import contextlib
import inspect
import json
import os
import re
import shutil
import tempfile

import torch

from nlmerge.correct import activation_stats, correct_to, default_sites, fold, fold_problem, repair_targets
from nlmerge.correct.correction import _check_eps
from nlmerge.correct.sites import site_label
from nlmerge.io import (LOCK_NAME, WEIGHT_FILES, check_apart, check_output_folder, lock_held, lock_output,
                        open_checkpoint, output_entries)
from nlmerge.jobs.merge_job import TOKENIZER_FILES, previous_outputs
from nlmerge.jobs.model_card import CARD_NAME, correction_card

METHODS = ("tact", "repair")
DATA_INPUTS = ("input_ids", "attention_mask", "pixel_values")
# model_type -> config switches that give its projections biases (a folded shift needs one)
BIAS_SWITCHES = {"llama": ("attention_bias", "mlp_bias")}
# a dual encoder's towers, by the data input that runs them
TOWERS = {"pixel_values": "vision_model", "input_ids": "text_model"}
RECORD_NAME = "nlmerge_correct.json"


def run_correct(merged, experts, data, out, *, method="tact", batch_size=8, eps=1e-5, force=False,
                write_model_card=True, log=None, notice=None):
    """Correct a merged Hugging Face checkpoint towards its experts and write the corrected
    checkpoint(s) with the correction folded into the weights.

    Parameters
    ----------
    merged : str or os.PathLike
        The merged model's folder (what ``nlmerge merge`` writes: ``config.json`` and weights).
    experts : list of str or os.PathLike
        Expert t's folder; same ``architectures`` and ``model_type`` as ``merged``.
    data : list of str or os.PathLike
        Task t's data file (safetensors; layout in the module docstring), one per expert.
    out : str or os.PathLike
        TACT: a folder holding ``task_0``, ``task_1``, ...; REPAIR: the corrected checkpoint's folder.
        Each checkpoint: weights (``save_pretrained``), ``config.json`` (the merged one, with the
        bias switches), the merged folder's tokenizer files and ``nlmerge_correct.json`` (method,
        task, inputs, eps, batch size, ``module``: the tower that ran or "" for the whole model,
        ``sites``: the modules whose outputs were corrected, relative to ``module``) and a
        ``README.md`` model card (:func:`nlmerge.jobs.model_card.correction_card`).
    method : "tact" or "repair"
    batch_size : int
        Rows of a data file per forward pass (>= 1).
    eps : float
        Added to the merged variance (finite, > 0); the corrected std is
        ``sigma_E * sqrt(var_M / (var_M + eps))``.
    force : bool
        Replace an existing non-empty ``out`` (only once the new output is complete).
    write_model_card : bool
        Write the ``README.md`` model card into each corrected checkpoint (as ``nlmerge merge`` does).
    log : callable, optional
        Called with one line of text per step (the returned folders are the caller's to report).
    notice : callable, optional
        Called with a line when the job removes what killed jobs left beside ``out`` (their
        staging folders); default: ``log``. The command line shows it even with ``--no-progress``.

    Returns
    -------
    list of str
        The folders of the corrected checkpoints.

    Raises
    ------
    ValueError
        A bad argument, a missing or unreadable folder, config or data file, experts that differ
        from the merged model's architecture, a data file without the model's input (naming the
        file and the tensor), an architecture with no foldable site, a checkpoint missing weights.
    TypeError
        ``eps`` is not a real number.
    FileExistsError
        ``out`` exists (non-empty, without ``force``; a file), or overlaps an input;
        ``nlmerge.io.OutputInUseError`` when another job (``correct``, ``merge``, ``tall-task``)
        is writing into ``out``: the job holds ``OUT/.nlmerge.lock`` from before it loads a model
        until it ends, and the lock file is not an output.
    """
    say = log or (lambda line: None)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    eps = _check_eps(eps)
    experts, data = [os.fspath(e) for e in experts], [os.fspath(d) for d in data]
    if not experts:
        raise ValueError("no experts given")
    if len(experts) != len(data):
        raise ValueError(f"{len(experts)} experts but {len(data)} data files: give one data file per expert, "
                         "in the same order")
    merged = os.fspath(merged)
    config = _read_config(merged, "merged model")
    expert_configs = [_read_config(path, f"expert {t}") for t, path in enumerate(experts)]
    for t, (path, expert_config) in enumerate(zip(experts, expert_configs)):
        _same_architecture(config, expert_config, f"expert {t} ({path})", merged)
    _same_tensors(merged, experts)
    out = os.fspath(out)
    _check_out(out, [merged, *experts, *data])
    tensors = [_read_data(path, t) for t, path in enumerate(data)]

    with _locked_output(out, force, notice or say):
        say(f"loading the merged model {merged}")
        switches = BIAS_SWITCHES.get(config.get("model_type"), ())
        model = _load(merged, config, "merged model", switches)
        tower, root = _tower(model, tensors, data)
        batches = [_batches(root, tensors[t], data[t], t, batch_size) for t in range(len(data))]
        sites = correction_sites(model, tower)

        stats = []
        for t, path in enumerate(experts):
            say(f"expert {t} ({path}): statistics at {len(sites)} sites on {data[t]}")
            expert = _load(path, expert_configs[t], f"expert {t}", ())
            stats.append(activation_stats(expert.get_submodule(tower), batches[t], sites))
            del expert

        record = {"format": "nlmerge-correct/1", "method": method, "merged": merged, "experts": experts,
                  "data": data, "eps": eps, "batch_size": batch_size, "module": tower, "sites": sites}
        saved = {**config, **{k: True for k in switches}}
        with _staging(out) as stage:
            if method == "tact":
                folders = []
                for t in range(len(experts)):
                    say(f"task {t}: correcting the merged model towards expert {t}")
                    corrected = correct_to(root, stats[t], batches[t], eps)
                    name = f"task_{t}"
                    _save(model, tower, fold(corrected), os.path.join(stage, name), merged, saved,
                          {**record, "task": t}, write_model_card)
                    folders.append(os.path.join(out, name))
            else:
                say("correcting the merged model towards the experts' average statistics (REPAIR)")
                corrected = correct_to(root, repair_targets(stats), [b for task in batches for b in task], eps)
                _save(model, tower, fold(corrected), stage, merged, saved, {**record, "task": None},
                      write_model_card)
                folders = [out]
    return folders


def correction_sites(model, module=""):
    """The correction sites of a Hugging Face model, or of one of its towers, for ``nlmerge correct``.

    Rule: the sites of ``nlmerge.correct.default_sites(model)`` (on the whole model), with each
    input site (the attention context) replaced by the output of its layer (the attention's output
    projection), and every layer of a stack given the sites of the others (the default rule takes
    the model's last linear layer for its output head, which in a model ending with its encoder is
    the last layer's ``fc2``), kept where ``fold_problem`` finds none (the correction, shift
    included, folds exactly into the site's own layer), in module registration order. Input sites
    are replaced because a
    correction folded into the next layer leaves no corrected tensor in the folded model, so its
    statistics could not be checked; an output site's corrected values are the folded layer's
    output. Call it on the model as loaded for correction (Llama's bias switches on).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    module : str
        The tower that runs ("" for the whole model); the sites are named relative to it.

    Returns
    -------
    list of str
        Module names (their outputs are the sites), relative to ``module``.

    Raises
    ------
    ValueError
        No site folds: names the architecture and why its candidate sites do not fold.
    """
    prefix = f"{module}." if module else ""
    default = {site[0] if isinstance(site, tuple) else site for site in default_sites(model)}
    stacked = {_stacked(name) for name in default}
    # every layer of a stack gets the same sites: the default rule's output head (the model's last
    # linear layer) is the last layer's fc2 in a model that ends with its encoder (CLIPVisionModel)
    candidates = [name for name, _ in model.named_modules() if name.startswith(prefix) and
                  (name in default or (_stacked(name) != name and _stacked(name) in stacked))]
    problems = {s: fold_problem(model, s) for s in candidates}
    sites = [s[len(prefix):] for s in candidates if problems[s] is None]
    if not sites:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        why = "; ".join(f"{site_label(s)} {problems[s]}" for s in candidates[:4]) or "it has no candidate site"
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no correction site that folds "
                         f"into its weights, so a corrected checkpoint could not load in plain transformers: {why}. "
                         "A site folds at a linear, conv or norm layer with a bias; bias switches are known for "
                         + ", ".join(f"{k} ({' / '.join(v)})" for k, v in BIAS_SWITCHES.items()))
    return sites


def _stacked(name):
    """A module name with its layer indices replaced by ``#`` (``layers.3.mlp`` -> ``layers.#.mlp``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


# ---------------------------------------------------------------------------------- inputs

def _read_config(path, label):
    if not os.path.isdir(path):
        raise ValueError(f"{label}: {path!r} is not a folder (a Hugging Face checkpoint folder is expected)")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{label}: {path!r} has no config.json")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{label}: {file} cannot be read as JSON: {err}") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ValueError(f"{label}: {file} names no 'architectures' (the transformers class to load)")
    if not any(os.path.isfile(os.path.join(path, name)) for name, _ in WEIGHT_FILES):
        raise ValueError(f"{label}: {path!r} holds no weights (none of {', '.join(n for n, _ in WEIGHT_FILES)})")
    return config


def _same_tensors(merged, experts):
    """Every expert's checkpoint holds the merged checkpoint's tensor names and shapes (headers
    only, read before any model is built); ValueError naming the expert, the tensor and both
    shapes, or a tensor one side lacks."""
    with open_checkpoint(merged) as ref:
        shapes = {key: tuple(ref.info(key).shape) for key in ref.keys()}
    for t, path in enumerate(experts):
        with open_checkpoint(path) as ckpt:
            theirs = {key: tuple(ckpt.info(key).shape) for key in ckpt.keys()}
        for key in sorted(set(shapes) ^ set(theirs)):
            has, lacks = (merged, path) if key in shapes else (path, merged)
            raise ValueError(f"expert {t} ({path}): tensor {key!r} is in {has} but not in {lacks}")
        for key, shape in shapes.items():
            if theirs[key] != shape:
                raise ValueError(f"expert {t} ({path}): tensor {key!r} has shape {theirs[key]}, the merged model's "
                                 f"{shape} ({merged})")


def _same_architecture(ref, config, label, ref_path):
    for key in ("architectures", "model_type"):
        if config.get(key) != ref.get(key):
            raise ValueError(f"{label}: {key} {config.get(key)!r} differs from the merged model's "
                             f"{ref.get(key)!r} ({ref_path})")


def _check_out(out, inputs):
    check_apart(out, inputs, "write the correction elsewhere")
    check_output_folder(out)


def _read_data(path, t):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"data file {path!r} (task {t})"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{where}: not a readable safetensors file: {err}") from None
    unknown = sorted(set(tensors) - set(DATA_INPUTS))
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown}; a data file holds {', '.join(DATA_INPUTS)}")
    if not tensors:
        raise ValueError(f"{where}: holds no tensor; expected input_ids [N, L] or pixel_values [N, C, H, W]")
    rows = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise ValueError(f"{where}: tensors must share a leading (row) count >= 1, got {rows}")
    for key, kinds in (("input_ids", "integer"), ("attention_mask", "integer or bool"), ("pixel_values", "floating")):
        x = tensors.get(key)
        if x is None:
            continue
        ok = x.is_floating_point() if kinds == "floating" else not (x.is_floating_point() or x.is_complex())
        if not ok:
            raise ValueError(f"{where}: {key} must be {kinds}, got {x.dtype}")
    mask, ids = tensors.get("attention_mask"), tensors.get("input_ids")
    if mask is not None and (ids is None or mask.shape != ids.shape):
        raise ValueError(f"{where}: attention_mask {tuple(mask.shape)} needs input_ids of the same shape "
                         f"(got {None if ids is None else tuple(ids.shape)})")
    return tensors


def _tower(model, tensors, paths):
    """The module that runs on the data: a dual encoder's tower chosen by the data's input, or the model."""
    if not all(isinstance(getattr(model, t, None), torch.nn.Module) for t in TOWERS.values()):
        return "", model
    given = {k: [p for p, ts in zip(paths, tensors) if k in ts] for k in TOWERS}
    towers = {TOWERS[k] for k, ps in given.items() if ps}
    if len(towers) != 1:
        raise ValueError(f"{type(model).__name__} is a dual encoder: every data file gives pixel_values (the vision "
                         f"tower is corrected) or every one gives input_ids (the text tower), not both; "
                         f"pixel_values in {given['pixel_values']}, input_ids in {given['input_ids']}")
    tower = towers.pop()
    return tower, model.get_submodule(tower)


def _batches(model, tensors, path, t, batch_size):
    where = f"data file {path!r} (task {t})"
    main = model.main_input_name
    if main not in tensors:
        raise ValueError(f"{where}: no {main!r} tensor, which {type(model).__name__} reads "
                         f"(the file holds {sorted(tensors)})")
    params = inspect.signature(model.forward).parameters
    for key in tensors:
        if key not in params:
            raise ValueError(f"{where}: {type(model).__name__} takes no {key!r} input")
    vocab = getattr(model.config, "vocab_size", None)
    ids = tensors.get("input_ids")
    if ids is not None and vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{where}: input_ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary "
                         f"[0, {vocab})")
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
    rows = next(iter(tensors.values())).shape[0]
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, rows, batch_size)]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports and progress bars off while loading and saving (the job says what it does)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load(path, config, label, switches):
    """The checkpoint at ``path`` in float32, eval mode, with the bias ``switches`` on; the biases
    they add are zero. ValueError naming any other weight the checkpoint lacks (transformers would
    initialize it at random)."""
    import transformers

    name = config["architectures"][0]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{label}: architecture {name!r} ({path}) is not a transformers model class")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    for switch in switches:
        setattr(hf_config, switch, True)
    with _quiet_transformers():
        model, info = cls.from_pretrained(path, config=hf_config, dtype=torch.float32, output_loading_info=True)
    params = dict(model.named_parameters())
    added = {k for k in info["missing_keys"] if switches and k.endswith(".bias")}
    lacking = sorted(set(info["missing_keys"]) - added)
    if lacking:
        raise ValueError(f"{label}: the checkpoint {path!r} lacks {len(lacking)} weight(s) of {name}: {lacking[:5]}")
    with torch.no_grad():
        for key in added:
            params[key].zero_()
    return model.eval()


# ---------------------------------------------------------------------------------- output

@contextlib.contextmanager
def _locked_output(out, force, say=None):
    """Hold ``out``'s lock while the block runs: ``nlmerge.io.lock_output``, the lock of ``nlmerge
    merge`` and ``tall-task`` (``OUT/.nlmerge.lock``; ``out`` is created for it if needed), so that
    two jobs never write one OUT. A non-empty ``out`` (the lock file aside) needs ``force``. Then
    the staging folders of ``out`` that killed jobs left are removed (:func:`_remove_stale_stages`),
    said in one line to ``say``. On an error, ``out`` (when made here: by ``lock_output``) and the
    parent folders made for it go."""
    made, folder = [], os.path.dirname(os.path.abspath(out))  # the parent folders made here, deepest first
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        with lock_output(out):
            if output_entries(out) and not force:
                raise FileExistsError(f"output folder {out!r} exists and is not empty; pass --force to replace it")
            _remove_stale_stages(out, say or (lambda line: None))
            yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _stage_prefix(name):
    """How the staging folders of the output folder ``name`` (:func:`_staging`, beside it) begin."""
    return f".{name}.partial-"


def _remove_stale_stages(out, say):
    """Remove the staging folders of ``out`` that no running job holds: a job killed outright
    (``kill -9``) leaves its staging folder, a full model, that nothing else would remove. Each
    holds a link to its job's lock file (:func:`_staging`), held while the job runs
    (``nlmerge.io.lock_held``), or the very lock file this job holds (left in ``out`` by the killed
    job); a folder without one is left, since its job cannot be told (a file system without hard
    links). Call it holding ``out``'s lock, before this job stages; says what it removed."""
    parent, name = os.path.split(os.path.abspath(out))
    ours = os.stat(os.path.join(out, LOCK_NAME))
    removed = []
    for entry in sorted(os.listdir(parent)):
        stage = os.path.join(parent, entry)
        if not (entry.startswith(_stage_prefix(name)) and os.path.isdir(stage)):
            continue
        lock = os.path.join(stage, LOCK_NAME)
        try:
            # the lock file a killed job left in OUT is the one this job now holds: linked, it is stale
            stale = os.path.samestat(os.stat(lock), ours) or not lock_held(lock)
        except FileNotFoundError:
            stale = False
        if stale:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(entry)
    if removed:
        say(f"removed {len(removed)} staging folder(s) of {out} that a killed job left: {', '.join(removed)}")


@contextlib.contextmanager
def _staging(out):
    """A temporary folder beside the locked ``out`` (:func:`_locked_output`) that becomes ``out``
    when the block completes (the previous ``out`` is removed only then, the user's own files in
    it carried over: :func:`_keep_users_files`); on error it is removed.
    From the start it holds a second link to the lock file this job holds: a later job tells it
    from a folder that a killed job left (:func:`_remove_stale_stages`), and the new ``out`` is
    never without the lock: a job that opens it there is refused until this one ends."""
    parent, name = os.path.split(os.path.abspath(out))
    stage = tempfile.mkdtemp(prefix=_stage_prefix(name), dir=parent)
    try:
        with contextlib.suppress(OSError):  # a file system without hard links: unlocked until the job ends
            os.link(os.path.join(out, LOCK_NAME), os.path.join(stage, LOCK_NAME))
        yield stage
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.replace(out, os.path.join(old, "out"))
        os.replace(stage, out)
        _keep_users_files(os.path.join(old, "out"), out)
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _keep_users_files(previous, out):
    """Move the entries of the replaced output folder ``previous`` that no job wrote (the user's
    own files, which ``nlmerge merge --force`` keeps too) into the new ``out``. A previous job's
    outputs (``previous_outputs``, a correction's record, config and tokenizer files) and the
    names ``out`` already has stay behind, to be removed with ``previous``."""
    written = {*previous_outputs(previous), RECORD_NAME, "config.json", *TOKENIZER_FILES, *os.listdir(out)}
    for name in output_entries(previous):
        if name not in written:
            os.replace(os.path.join(previous, name), os.path.join(out, name))


def _save(model, tower, state, folder, merged, config, record, write_model_card):
    """``model``'s weights with ``tower``'s replaced by ``state``, saved in ``folder`` in the merged
    config's dtype (tied weights once), with ``config`` as config.json, the merged folder's
    tokenizer files, ``record`` as nlmerge_correct.json and, with ``write_model_card``, its card."""
    prefix = f"{tower}." if tower else ""
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = torch.float32
    full, seen = {}, set()
    for key, value in model.state_dict().items():
        if value.numel() and value.data_ptr() in seen:  # a tied weight: transformers ties it on load
            continue
        seen.add(value.data_ptr())
        value = state[key[len(prefix):]] if key.startswith(prefix) else value
        full[key] = value.to(dtype) if value.is_floating_point() else value
    os.makedirs(folder, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(folder, state_dict=full)
    for name in TOKENIZER_FILES:
        src = os.path.join(merged, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
    for name, obj in (("config.json", config), (RECORD_NAME, record)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    if write_model_card:
        with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(correction_card(record))
