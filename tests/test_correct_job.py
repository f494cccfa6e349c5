"""``nlmerge correct`` on Hugging Face checkpoints: tiny random Llama (grouped-query attention, tied
and untied embeddings), ViT and CLIP (vision tower) saved with save_pretrained; experts are
perturbed copies, the merged model their average. Outputs are reloaded with plain transformers and
their statistics compared, at every site, with the experts' (computed here on the whole data file
in one batch, independently of the job's batching); bad inputs give one error and no output."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file

from nlmerge.cli import main
from nlmerge.correct import activation_stats, fold
from nlmerge.jobs import correct_job

EPS = 1e-10  # the corrected std is sigma_E * sqrt(var_M / (var_M + eps)): eps small, to compare exactly
TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


def llama(tied):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, num_key_value_heads=2, tie_word_embeddings=tied, **TINY))


def vit():
    return transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, **TINY))


def clip():
    return transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         **TINY),
        vision_config=dict(image_size=16, patch_size=8, **TINY), projection_dim=16))


def expected_sites(layers, per_layer, first=(), last=()):
    """Sites, by hand: ``first``, then ``per_layer`` for each of the 2 layers, then ``last``."""
    return [*first, *(f"{layers}.{i}.{n}" for i in range(2) for n in per_layer), *last]


LLAMA_SITES = expected_sites("model.layers", ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
CLIP_LAYER_SITES = ["self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"]
CASES_VIT = expected_sites("layers", ["attention.o_proj", "layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2"],
                           first=["embeddings.patch_embeddings.projection"], last=["layernorm"])
# name: (model builder, data kind, expected sites relative to the module that runs, that module)
CASES = {
    "llama": (lambda: llama(False), "ids", LLAMA_SITES, ""),
    "llama_tied": (lambda: llama(True), "ids", LLAMA_SITES, ""),
    "vit": (vit, "pixels", CASES_VIT, ""),
    # the vision tower: its patch embedding has no bias
    "clip": (clip, "pixels", expected_sites(
        "encoder.layers", CLIP_LAYER_SITES, first=["pre_layrnorm"], last=["post_layernorm"]), "vision_model"),
}


@pytest.mark.parametrize("build, want", [
    # a model that ends with its encoder: its last fc2 is a site like every other layer's
    (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=16, patch_size=8, **TINY)),
     expected_sites("encoder.layers", CLIP_LAYER_SITES, first=["pre_layrnorm"], last=["post_layernorm"])),
    (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=64, max_position_embeddings=16,
                                                                    **TINY)),
     expected_sites("encoder.layers", CLIP_LAYER_SITES, last=["final_layer_norm"])),
    (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(image_size=16, patch_size=8,
                                                                           num_labels=3, **TINY)),
     ["vit." + s for s in CASES_VIT]),
], ids=["clip_vision", "clip_text", "vit_classifier"])
def test_sites_of_other_classes(build, want):
    assert correct_job.correction_sites(build()) == want


def data_file(path, kind, seed, rows=10):
    g = torch.Generator().manual_seed(seed)
    if kind == "ids":
        ids = torch.randint(0, 64, (rows, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 6:] = 0  # padded rows: their positions must not count
        tensors = {"input_ids": ids, "attention_mask": mask}
    else:
        tensors = {"pixel_values": torch.randn(rows, 3, 16, 16, generator=g) * (1 + seed) + seed}
    save_file(tensors, str(path))
    return tensors


def perturbed(model, seed, scale=0.1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out.eval()


@pytest.fixture(scope="module", params=list(CASES))
def setup(request, tmp_path_factory):
    name = request.param
    build, kind, sites, module = CASES[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    base = build().eval()
    experts = [perturbed(base, 1 + t) for t in range(2)]
    merged = copy.deepcopy(base)
    sds = [e.state_dict() for e in experts]
    merged.load_state_dict({k: (sds[0][k] + sds[1][k]) / 2 if sds[0][k].is_floating_point() else sds[0][k]
                            for k in sds[0]})
    paths = {"merged": root / "merged", "experts": [root / f"expert_{t}" for t in range(2)],
             "data": [root / f"data_{t}.safetensors" for t in range(2)]}
    merged.save_pretrained(paths["merged"])
    for e, p in zip(experts, paths["experts"]):
        e.save_pretrained(p)
    data = [data_file(p, kind, t) for t, p in enumerate(paths["data"])]
    return {"name": name, "root": root, "paths": paths, "data": data, "sites": sites, "module": module,
            "cls": type(base), "experts": [e.get_submodule(module) for e in experts],
            "merged": merged.get_submodule(module)}


def run(paths, out, *extra):
    return main(["correct", str(paths["merged"]), "--experts", *map(str, paths["experts"]),
                 "--data", *map(str, paths["data"]), str(out), "--no-progress", *extra])


def reload(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def assert_close_stats(got, want, tol=2e-5):
    for site in want:
        g, w = got[site], want[site]
        scale = w.std + w.mean.abs()
        assert ((g.mean - w.mean).abs() <= tol * scale).all(), f"site {site}: means differ"
        assert ((g.std - w.std).abs() <= tol * scale).all(), f"site {site}: stds differ"


def assert_differs(got, want, tol=1e-3):
    """The merged model's statistics are not the target's already (so the match above is the job's work)."""
    worst = max(float(((got[s].std - want[s].std).abs() / (want[s].std + want[s].mean.abs())).max()) for s in want)
    assert worst > tol


def test_tact_outputs_match_each_expert(setup, tmp_path):
    out = tmp_path / "out"
    assert run(setup["paths"], out, "--eps", str(EPS), "--batch-size", "3") == 0
    assert sorted(os.listdir(out)) == ["task_0", "task_1"]
    for t, (expert, data) in enumerate(zip(setup["experts"], setup["data"])):
        folder = out / f"task_{t}"
        record = json.loads((folder / correct_job.RECORD_NAME).read_text())
        assert record["sites"] == setup["sites"] and record["module"] == setup["module"]
        assert record["method"] == "tact" and record["task"] == t
        sites = record["sites"]
        model = reload(setup["cls"], folder).get_submodule(setup["module"])
        want = activation_stats(expert, [data], sites)
        assert_close_stats(activation_stats(model, [data], sites), want)
        assert_differs(activation_stats(setup["merged"], [data], sites), want)
        config = json.loads((folder / "config.json").read_text())
        if setup["name"].startswith("llama"):
            assert config["attention_bias"] is True and config["mlp_bias"] is True
            assert config["tie_word_embeddings"] is (setup["name"] == "llama_tied")


def test_repair_output_matches_average_target(setup, tmp_path):
    out = tmp_path / "out"
    assert run(setup["paths"], out, "--method", "repair", "--eps", str(EPS)) == 0
    record = json.loads((out / correct_job.RECORD_NAME).read_text())
    assert record["method"] == "repair" and record["task"] is None
    sites = record["sites"]
    ex = [activation_stats(e, [d], sites) for e, d in zip(setup["experts"], setup["data"])]
    model = reload(setup["cls"], out).get_submodule(setup["module"])
    got = activation_stats(model, setup["data"], sites)  # both tasks' data, as REPAIR measures
    for s in sites:
        mean, std = (ex[0][s].mean + ex[1][s].mean) / 2, (ex[0][s].std + ex[1][s].std) / 2
        scale = std + mean.abs()
        assert ((got[s].mean - mean).abs() <= 2e-5 * scale).all(), f"site {s}: means differ"
        assert ((got[s].std - std).abs() <= 2e-5 * scale).all(), f"site {s}: stds differ"


# ---------------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def llama_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_bad")
    torch.manual_seed(0)
    base = llama(False)
    paths = {"merged": root / "merged", "experts": [root / "expert_0", root / "expert_1"],
             "data": [root / "data_0.safetensors", root / "data_1.safetensors"]}
    for i, p in enumerate([paths["merged"], *paths["experts"]]):
        perturbed(base, i).save_pretrained(p)
    for t, p in enumerate(paths["data"]):
        data_file(p, "ids", t)
    data_file(root / "pixels.safetensors", "pixels", 0)
    return paths


def refused(capsys, out, code, *needles):
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("nlmerge correct: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [n for n in os.listdir(out.parent) if ".partial" in n or ".old" in n]


def test_missing_expert_folder(llama_paths, tmp_path, capsys):
    paths = {**llama_paths, "experts": [llama_paths["experts"][0], tmp_path / "nowhere"]}
    refused(capsys, tmp_path / "out", run(paths, tmp_path / "out"), "expert 1", "nowhere", "not a folder")


def test_data_without_input_ids(llama_paths, tmp_path, capsys):
    pixels = llama_paths["data"][0].parent / "pixels.safetensors"
    paths = {**llama_paths, "data": [llama_paths["data"][0], pixels]}
    refused(capsys, tmp_path / "out", run(paths, tmp_path / "out"), "pixels.safetensors", "task 1",
            "no 'input_ids' tensor", "LlamaForCausalLM")


def test_mismatched_experts_and_data(llama_paths, tmp_path, capsys):
    # OUT right after MERGED: written last, it would be taken from --data (an argument error, tests/test_cli.py)
    out = tmp_path / "out"
    code = main(["correct", str(llama_paths["merged"]), str(out), "--experts", *map(str, llama_paths["experts"]),
                 "--data", str(llama_paths["data"][0])])
    refused(capsys, out, code, "2 experts but 1 data files")


def test_expert_of_another_size_is_refused_before_any_model_runs(llama_paths, tmp_path, capsys, monkeypatch):
    from nlmerge.jobs import correct_job

    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**llama(False).config.to_dict(), "intermediate_size": llama(False).config.intermediate_size + 8}))
    wide.save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    monkeypatch.setattr(correct_job, "_load", lambda *a: pytest.fail("a model was loaded before the check"))
    paths = {**llama_paths, "experts": [llama_paths["experts"][0], tmp_path / "wide"]}
    refused(capsys, tmp_path / "out", run(paths, tmp_path / "out"), "expert 1", "model.layers.0.mlp.", "shape (32, 56)")


def test_architecture_without_foldable_sites(llama_paths, tmp_path, capsys):
    # transformers' Mistral has no bias on any projection and no switch that adds one
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=64, num_key_value_heads=2, **TINY))
    paths = {"merged": tmp_path / "merged", "experts": [tmp_path / "expert_0"], "data": llama_paths["data"][:1]}
    mistral.save_pretrained(paths["merged"])
    mistral.save_pretrained(paths["experts"][0])
    capsys.readouterr()  # transformers' progress bars while saving
    refused(capsys, tmp_path / "out", run(paths, tmp_path / "out"), "MistralForCausalLM",
            "no correction site that folds", "without a bias to take the shift")


def test_existing_output_needs_force(llama_paths, tmp_path, capsys):
    """A non-empty OUT needs --force, which replaces a previous job's outputs (here a TACT job's
    task folders) and keeps the user's own files, as nlmerge merge --force does."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run(llama_paths, out) == 1
    assert "exists and is not empty" in capsys.readouterr().err and (out / "old.txt").exists()
    assert run(llama_paths, out, "--force") == 0
    assert (out / "task_0" / "model.safetensors").exists() and (out / "old.txt").read_text() == "old"
    assert run(llama_paths, out, "--force", "--method", "repair") == 0
    assert not [n for n in os.listdir(out) if n.startswith("task_")] and (out / "model.safetensors").exists()
    assert (out / "old.txt").read_text() == "old"
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n or ".old" in n]


def test_one_output_line_and_a_model_card_per_checkpoint(llama_paths, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "out"
    assert main(["correct", str(llama_paths["merged"]), "--experts", *map(str, llama_paths["experts"]),
                 "--data", *map(str, llama_paths["data"]), str(out)]) == 0  # with progress lines
    printed = capsys.readouterr()
    assert printed.out == f"corrected into {out / 'task_0'}, {out / 'task_1'}\n"
    assert str(out) not in printed.err  # the progress lines do not report the output again
    card = (out / "task_1" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front)["tags"] == ["merge", "nlmerge"]
    assert body.lstrip().startswith("# A TACT correction of a merged model, task 1\n")
    assert f"`{llama_paths['merged']}`" in body
    assert f"- task 1: expert `{llama_paths['experts'][1]}`, data `{llama_paths['data'][1]}`" in body
    settings = yaml.safe_load(body.split("```yaml")[1].split("```")[0])
    assert settings["method"] == "tact" and settings["task"] == 1 and "sites" not in settings
    assert run(llama_paths, tmp_path / "repaired", "--method", "repair") == 0
    assert "# A REPAIR correction of a merged model\n" in (tmp_path / "repaired" / "README.md").read_text()
    assert run(llama_paths, tmp_path / "bare", "--method", "repair", "--no-write-model-card") == 0
    assert not (tmp_path / "bare" / "README.md").exists()


def test_failure_mid_run_leaves_nothing(llama_paths, tmp_path, monkeypatch, capsys):
    calls = []

    def failing_fold(corrected):  # the second task fails after the first was written
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("planted failure")
        return fold(corrected)

    monkeypatch.setattr(correct_job, "fold", failing_fold)
    out = tmp_path / "new" / "deeper" / "out"
    code = run(llama_paths, out)
    assert len(calls) == 2
    assert code == 1 and "planted failure" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the parent folders made for OUT are gone too


# `python -c STOPPED_AT_TASK_1 SIGNAL correct ...`: nlmerge correct with fold patched to send the job
# SIGNAL at task 1, once task 0 is written in its staging folder
STOPPED_AT_TASK_1 = """
import os, signal, sys
from nlmerge import cli
from nlmerge.jobs import correct_job

fold, calls, stop = correct_job.fold, [], getattr(signal, sys.argv.pop(1))

def stopping_fold(corrected):
    calls.append(corrected)
    if len(calls) == 2:
        os.kill(os.getpid(), stop)
    return fold(corrected)

correct_job.fold = stopping_fold
sys.exit(cli.main(sys.argv[1:]))
"""


def stopped_at_task_1(signal_name, paths, out):
    argv = ["correct", str(paths["merged"]), str(out), "--experts", *map(str, paths["experts"]),
            "--data", *map(str, paths["data"])]
    return subprocess.run([sys.executable, "-c", STOPPED_AT_TASK_1, signal_name, *argv], capture_output=True,
                          text=True, timeout=300)


def test_sigterm_mid_run_leaves_nothing(llama_paths, tmp_path):
    """SIGTERM (a scheduler's stop), as for nlmerge merge: the job stops as on Ctrl-C, removes its
    staging folder and the OUT it made (with the parent folders made for it) and exits with 128 + 15."""
    out = tmp_path / "new" / "out"
    done = stopped_at_task_1("SIGTERM", llama_paths, out)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.splitlines()[-2:] == ["task 1: correcting the merged model towards expert 1",
                                             "nlmerge correct: interrupted; nothing of this job was kept (an existing "
                                             "OUT is as it was)"]
    assert os.listdir(tmp_path) == []


def test_a_later_run_removes_the_staging_folder_of_a_killed_one(llama_paths, tmp_path, capsys):
    """kill -9 leaves the job's staging folder (.OUT.partial-*, a full model) beside OUT; the next
    correct into OUT removes it, once it holds OUT's lock, and says so in one line, which the
    command line shows even with --no-progress."""
    out = tmp_path / "out"
    done = stopped_at_task_1("SIGKILL", llama_paths, out)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]
    assert os.path.isdir(tmp_path / left / "task_0")
    assert run(llama_paths, out) == 0  # with --no-progress
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"removed 1 staging folder(s) of {out} that a killed job left: {left}"]
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["task_0", "task_1"]


def test_staging_folders_of_running_jobs_and_other_outputs_stay(tmp_path):
    """Only a staging folder of OUT whose link to its job's lock file is not held goes: not one a
    running job holds (here a lock held on another folder, as after that job renamed its output),
    not one without a lock file (its job cannot be told), not another output's."""
    from nlmerge.io import LOCK_NAME, lock_output

    def stage(name, lock_from=None):
        (tmp_path / name).mkdir()
        if lock_from:
            os.link(lock_from, tmp_path / name / LOCK_NAME)

    left = tmp_path / "left.lock"
    left.write_text("")  # a lock file that no job holds, as kill -9 leaves it
    with lock_output(tmp_path / "running"):
        stage(".out.partial-running", tmp_path / "running" / LOCK_NAME)
        for name in (".out.partial-killed", ".out.partial-killed2", ".other.partial-killed", ".outx.partial-killed"):
            stage(name, left)
        stage(".out.partial-unknown")
        lines = []
        with correct_job._locked_output(str(tmp_path / "out"), force=False, say=lines.append):
            assert sorted(os.listdir(tmp_path)) == [".other.partial-killed", ".out.partial-running",
                                                    ".out.partial-unknown", ".outx.partial-killed", "left.lock",
                                                    "out", "running"]
    assert lines == [f"removed 2 staging folder(s) of {tmp_path / 'out'} that a killed job left: "
                     ".out.partial-killed, .out.partial-killed2"]
    with correct_job._locked_output(str(tmp_path / "out"), force=False, say=lines.append):
        assert ".out.partial-running" not in os.listdir(tmp_path)  # its job ended: stale now
    assert len(lines) == 2


def test_output_overlapping_an_input_is_refused(llama_paths, capsys):
    out = llama_paths["merged"] / "corrected"
    refused(capsys, out, run(llama_paths, out), "overlaps the input")


def test_output_is_locked_as_merge_locks_it(llama_paths, tmp_path, capsys):
    """correct holds OUT's lock (nlmerge.io.lock_output, OUT/.nlmerge.lock) from before it loads a
    model until it ends, the output that replaces OUT included: a second correct, or a merge, into
    that OUT is refused at once; a correct into an OUT that a merge holds is refused and leaves it
    as it was; a lock file left by a killed job locks nothing and is no output."""
    from nlmerge.io import LOCK_NAME, OutputInUseError, lock_output
    from nlmerge.jobs import run_merge

    out = tmp_path / "out"
    in_use = f"output folder {str(out)!r} is in use by another nlmerge job"
    with lock_output(out):  # a merge writing OUT
        assert run(llama_paths, out) == 1
        assert capsys.readouterr().err.startswith(f"nlmerge correct: error: {in_use}")
        assert os.listdir(out) == [LOCK_NAME]
    assert not out.exists()

    merge_config = {"merge_method": "task_arithmetic", "base_model": str(llama_paths["merged"]),
                    "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in llama_paths["experts"]]}
    refused = []

    def second_jobs(line):  # while the first correct runs, from its progress lines
        if line.startswith("task 1:"):
            for second in (lambda: correct_job.run_correct(llama_paths["merged"], llama_paths["experts"],
                                                           llama_paths["data"], out, force=True),
                           lambda: run_merge(merge_config, out, progress=False, force=True)):
                with pytest.raises(OutputInUseError, match=in_use):
                    second()
                refused.append(line)

    out.mkdir()
    (out / LOCK_NAME).write_text("")  # what a job killed outright leaves
    correct_job.run_correct(llama_paths["merged"], llama_paths["experts"], llama_paths["data"], out, log=second_jobs)
    assert len(refused) == 2
    assert sorted(os.listdir(out)) == ["task_0", "task_1"]

    swapped = str(tmp_path / "swapped")  # the output that replaces OUT holds the lock until the job ends
    with correct_job._locked_output(swapped, force=False):
        with correct_job._staging(swapped) as stage:
            open(os.path.join(stage, "model.safetensors"), "w").close()
        assert sorted(os.listdir(swapped)) == [LOCK_NAME, "model.safetensors"]
        with pytest.raises(OutputInUseError), lock_output(swapped):
            pass
    assert os.listdir(swapped) == ["model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n or ".old" in n]
