"""The non-local pipeline end to end from the command line (issue 11): two tiny Llamas (grouped-query
attention) of different seeds as foundations, an expert fine-tuned from each on its own synthetic
token task, then ``nlmerge align`` (foundation B to A) -> base = average of A and aligned B ->
``nlmerge merge`` (TIES, the permutations applied to expert B) -> ``nlmerge correct`` (TACT).
Checked at each step: the aligned checkpoint computes what B computed and is nearer A; the
permutations file applied to expert B gives a model that computes what expert B computes (the
aligned expert that correction measures); the merged and corrected models load with plain
transformers and run; each corrected model has its expert's statistics at every site on its
task's data, which the merged model did not have."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from nlmerge import merge  # noqa: E402
from nlmerge.cli import main  # noqa: E402
from nlmerge.correct import activation_stats  # noqa: E402
from tests.test_correct_job import assert_close_stats, assert_differs, reload  # noqa: E402

VOCAB, LENGTH, ROWS = 17, 12, 16
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
# next token of each task's sequences: x_{i+1} = (x_i + 1) mod V, x_{i+1} = (2 x_i) mod V (V prime: never stuck)
TASKS = {"add": lambda x: (x + 1) % VOCAB, "double": lambda x: (2 * x) % VOCAB}
EPS = 1e-10  # the corrected std is sigma_E * sqrt(var_M / (var_M + eps)): eps small, to compare exactly


def task_tokens(task, rows, generator):
    """int64 [rows, LENGTH]: sequences of ``task`` from random starts in 1..V-1."""
    x = [torch.randint(1, VOCAB, (rows,), generator=generator)]
    for _ in range(LENGTH - 1):
        x.append(TASKS[task](x[-1]))
    return torch.stack(x, dim=1)


def task_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fine_tune(model, task, seed, steps=25):
    """A few Adam steps of next-token prediction on ``task``: the expert (eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = task_tokens(task, 32, generator)
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def distance(a, b):
    """Euclidean distance between two checkpoints' weights over every key."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def cli(*args):
    assert main([*map(str, args)]) == 0, args


def copy_config(path, model, perms):
    """A merge config that copies ``model`` with the permutations file ``perms`` applied."""
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
                    f"dtype: float32\npermutations: [{{file: {perms}, models: [{model}]}}]\n")


def test_align_merge_correct_from_the_command_line(tmp_path, capsys):
    torch.set_num_threads(2)
    config = transformers.LlamaConfig(**CONFIG)
    foundations, experts, data = [], [], []
    for t, task in enumerate(TASKS):
        torch.manual_seed(10 + t)  # different seeds: foundations with permuted (and different) units
        foundation = transformers.LlamaForCausalLM(config).eval()
        foundation.save_pretrained(tmp_path / f"foundation_{t}")
        ids = task_tokens(task, ROWS, torch.Generator().manual_seed(20 + t))
        before = task_loss(foundation, ids)
        expert = fine_tune(foundation, task, seed=30 + t)
        assert task_loss(expert, ids) < 0.5 * before, f"expert {t} did not learn task {task!r}"
        expert.save_pretrained(tmp_path / f"expert_{t}")
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / f"{task}.safetensors")
        foundations.append(transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"foundation_{t}").eval())
        experts.append(expert)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    probe = torch.cat([d["input_ids"] for d in data])

    # align: foundation B (1) to foundation A (0); the aligned B computes what B did, nearer A
    perms = tmp_path / "perms.safetensors"
    cli("align", tmp_path / "foundation_0", tmp_path / "foundation_1", perms, "--restarts", 4,
        "--write-aligned", tmp_path / "foundation_1_aligned")
    aligned_b = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "foundation_1_aligned").eval()
    torch.testing.assert_close(logits(aligned_b, probe), logits(foundations[1], probe), rtol=1e-5, atol=1e-5)
    weights = [load_file(tmp_path / name / "model.safetensors")
               for name in ("foundation_0", "foundation_1", "foundation_1_aligned")]
    assert distance(weights[0], weights[2]) < distance(weights[0], weights[1])
    # the file aligns to A: applying it to A itself is refused by name
    copy_config(tmp_path / "misuse.yml", tmp_path / "foundation_0", perms)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "misuse.yml"), str(tmp_path / "misuse"), "--no-progress"]) == 1
    assert "it is the file's reference" in capsys.readouterr().err

    # base: the average of A and aligned B
    base = transformers.LlamaForCausalLM(config)
    sd_a, sd_b = foundations[0].state_dict(), aligned_b.state_dict()
    base.load_state_dict({k: (sd_a[k] + sd_b[k]) / 2 for k in sd_a})
    base.save_pretrained(tmp_path / "base")

    # the permutations applied to expert B as the merge job reads it (one model: a plain copy)
    # give the aligned expert B, which computes what expert B does: correction measures it
    expert_b, aligned_expert_b = tmp_path / "expert_1", tmp_path / "expert_1_aligned"
    copy_config(tmp_path / "align_b.yml", expert_b, perms)
    cli("merge", tmp_path / "align_b.yml", aligned_expert_b, "--no-progress")
    aligned_expert = reload(transformers.LlamaForCausalLM, aligned_expert_b)
    torch.testing.assert_close(logits(aligned_expert, probe), logits(experts[1], probe), rtol=1e-5, atol=1e-5)

    # merge: TIES of expert A and expert B over the base, expert B aligned as it is read
    merged_dir = tmp_path / "merged"
    (tmp_path / "ties.yml").write_text(
        f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n"
        f"  - model: {tmp_path / 'expert_0'}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {expert_b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"dtype: float32\npermutations: [{{file: {perms}, models: [{expert_b}]}}]\n")
    cli("merge", tmp_path / "ties.yml", merged_dir, "--no-progress")
    merged = reload(transformers.LlamaForCausalLM, merged_dir)
    assert torch.isfinite(logits(merged, probe)).all()
    # what the in-memory TIES makes of the aligned expert B: the permutations were applied
    want = merge.ties(load_file(tmp_path / "base" / "model.safetensors"),
                      [load_file(tmp_path / name / "model.safetensors") for name in ("expert_0", "expert_1_aligned")],
                      keep=0.5, convention="mergekit")
    got = load_file(merged_dir / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)

    # correct: TACT towards expert A on task A's data and aligned expert B on task B's
    out = tmp_path / "corrected"
    cli("correct", merged_dir, "--experts", tmp_path / "expert_0", aligned_expert_b,
        "--data", *(tmp_path / f"{task}.safetensors" for task in TASKS), out, "--eps", EPS, "--no-progress")
    for t, (expert, batch) in enumerate(zip([experts[0], aligned_expert], data)):
        folder = out / f"task_{t}"
        sites = json.loads((folder / "nlmerge_correct.json").read_text())["sites"]
        assert len(sites) == 4 * CONFIG["num_hidden_layers"], sites  # o_proj, gate, up, down per layer
        corrected = reload(transformers.LlamaForCausalLM, folder)
        assert torch.isfinite(logits(corrected, probe)).all()
        want = activation_stats(expert, [batch], sites)
        assert_close_stats(activation_stats(corrected, [batch], sites), want)
        assert_differs(activation_stats(merged, [batch], sites), want)
    capsys.readouterr()
