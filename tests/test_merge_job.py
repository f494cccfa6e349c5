"""The merge job (`nlmerge merge CONFIG OUT`): generated HF checkpoints, every method against the
in-memory API and against mergekit, resume, validation errors, the output layout."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

yaml = pytest.importorskip("yaml")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nlmerge import merge, ops  # noqa: E402
from nlmerge.io import CheckpointError, file_digest  # noqa: E402
from nlmerge.jobs import ConfigError, load_config, plan_merge, run_merge  # noqa: E402

NUM_EXPERTS = 3


def _transformers():
    return pytest.importorskip("transformers")


def _llama_config(vocab=96):
    return _transformers().LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)


def _save_llama(path, state, dtype, vocab=96, shard="20KB"):
    model = _transformers().LlamaForCausalLM(_llama_config(vocab)).to(dtype)
    model.load_state_dict(state)
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    """A tiny Llama base (fp32, sharded, with a tokenizer file) and three experts: base + tie-free noise."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = _transformers().LlamaForCausalLM(_llama_config()).state_dict()
    paths = {"base": _save_llama(root / "base", base, torch.float32)}
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    experts = []
    g = torch.Generator().manual_seed(1)
    for i in range(NUM_EXPERTS):
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        experts.append(sd)
        paths[f"e{i}"] = _save_llama(root / f"e{i}", sd, torch.float32)
    return root, paths, base, experts


def _config(paths, method, shared=None, per_model=None, **extra):
    models = [{"model": str(paths[f"e{i}"]), "parameters": dict((per_model or [{}] * NUM_EXPERTS)[i])}
              for i in range(NUM_EXPERTS)]
    cfg = {"merge_method": method, "base_model": str(paths["base"]), "models": models}
    if shared:
        cfg["parameters"] = shared
    cfg.update(extra)
    return cfg


def _load_out(out):
    out = str(out)
    index = os.path.join(out, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(out, f)))
    return sd


WEIGHTS = [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.5}]


def test_task_arithmetic_equals_in_memory(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    run_merge(_config(paths, "task_arithmetic", {"lambda": 0.6}, WEIGHTS), tmp_path / "out", progress=False)
    got = _load_out(tmp_path / "out")
    want = merge.task_arithmetic(base, experts, lam=0.6, weights=[w["weight"] for w in WEIGHTS])
    assert list(got) == list(want) or set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bracket", ["hit", "missed"])
def test_global_ties_equals_in_memory_bit_for_bit(llama_family, tmp_path, monkeypatch, bracket):
    _, paths, base, experts = llama_family
    if bracket == "missed":  # every sample's bracket misses: the job falls back to the histogram passes
        monkeypatch.setattr(ops.MagnitudeSelector, "hit", property(lambda self: False))
    cfg = _config(paths, "ties", {"scope": "global", "convention": "ties", "lambda": 1.0}, WEIGHTS)
    run_merge(cfg, tmp_path / "out", progress=False, out_shard_size="30K")
    got = _load_out(tmp_path / "out")
    want = merge.ties(base, experts, keep=0.5, scope="global", weights=[w["weight"] for w in WEIGHTS])
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_tensor_ties_mergekit_convention_equals_in_memory(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    run_merge(_config(paths, "ties", None, WEIGHTS), tmp_path / "out", progress=False)
    got = _load_out(tmp_path / "out")
    want = merge.ties(base, experts, keep=0.5, convention="mergekit", weights=[w["weight"] for w in WEIGHTS])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_linear_normalizes_weights(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    cfg = {"merge_method": "linear", "models": [{"model": str(paths[f"e{i}"]), "parameters": {"weight": w}}
                                               for i, w in enumerate((1.0, 2.0, 1.0))]}
    run_merge(cfg, tmp_path / "out", progress=False)
    got = _load_out(tmp_path / "out")
    want = merge.average(experts, weights=[1.0, 2.0, 1.0])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


def test_consensus_equals_in_memory(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    cfg = _config(paths, "consensus", {"k": 2, "lambda": 0.8}, [{"tall_lambda": 0.4}] * NUM_EXPERTS)
    run_merge(cfg, tmp_path / "out", progress=False)
    got = _load_out(tmp_path / "out")
    want = merge.consensus(base, experts, k=2, lam=0.4, alpha=0.8)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


MERGEKIT_CASES = [
    ("linear", None, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}]),
    ("task_arithmetic", {"lambda": 0.7}, WEIGHTS),
    ("ties", None, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 0.8, "density": 0.9}]),
    ("ties", {"normalize": False, "lambda": 0.5}, WEIGHTS),
    ("breadcrumbs", None, [{"weight": 1.0, "density": 0.5, "gamma": 0.05}] * NUM_EXPERTS),
    ("breadcrumbs_ties", {"rescale": True}, [{"weight": 1.0, "density": 0.4, "gamma": 0.02}] * NUM_EXPERTS),
    ("ties", None, [{"weight": [0.2, 1.0], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}] * NUM_EXPERTS),
    ("dare_ties", None, [{"weight": 1.0, "density": 1.0}] * NUM_EXPERTS),
]


@pytest.mark.parametrize("method,shared,per_model", MERGEKIT_CASES)
def test_equals_mergekit(llama_family, tmp_path, method, shared, per_model):
    """mergekit's own code on the same config (fp32, tie-free): the same tensors to fp32 rounding."""
    mk_merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    _, paths, _, _ = llama_family
    cfg = _config(paths, method, shared, per_model)
    if method == "linear":
        cfg.pop("base_model")
    run_merge(cfg, tmp_path / "ours", progress=False)
    mk_merge.run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "theirs"),
                       options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours, theirs = _load_out(tmp_path / "ours"), _load_out(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=2e-6, atol=2e-7, msg=key)


def test_output_layout_loads_and_runs(llama_family, tmp_path):
    _, paths, base, _ = llama_family
    out = tmp_path / "out"
    run_merge(_config(paths, "ties", None, WEIGHTS, out_dtype="bfloat16"), out,
              progress=False, out_shard_size="20K")
    names = sorted(os.listdir(out))
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(n.startswith("model-") and f"-of-{len(shards):05d}" in n for n in shards)
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _load_out(out).values())
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert "tokenizer_config.json" in names and "nlmerge_config.yml" in names
    assert not [n for n in names if n.endswith(".partial")]
    base_keys = [k for k in ("dtype", "torch_dtype") if k in json.load(open(paths["base"] / "config.json"))]
    assert _dtype_keys(out) == dict.fromkeys(base_keys, "bfloat16")  # as the base names it (transformers 5: dtype)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and "merge" in meta["tags"]  # the Hub's base_model takes repo ids, not paths
    assert card.split("---", 2)[2].lstrip().startswith("# A ties merge of 3 models onto a base model\n")
    assert all(f"`{paths[n]}`" in card for n in ("base", "e0", "e1", "e2"))
    assert "TIES-merging" in card and yaml.safe_load(card.split("```yaml")[1].split("```")[0])["merge_method"] == "ties"
    model = _transformers().LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert bool(torch.isfinite(logits.float()).all())


@pytest.mark.parametrize("shared, options", [({}, []), ({"convention": "ties"}, ["`convention: ties`"]),
                                             ({"scope": "global", "convention": "ties"},
                                              ["`convention: ties`", "`scope: global`"])])
def test_model_card_method_line_names_nlmerge_ties_options(tmp_path, shared, options):
    from nlmerge.jobs.model_card import model_card

    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    cfg = load_config({"merge_method": "ties", "base_model": str(tmp_path / "base"), "parameters": shared,
                       "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0, "density": 0.5}}
                                  for n in ("a", "b")]})
    card = model_card(cfg, [str(tmp_path / n) for n in ("base", "a", "b")])
    (line,) = [line for line in card.splitlines() if line.startswith("`ties`: ")]
    assert [o for o in ("`convention: ties`", "`scope: global`") if o in line] == options


def _dtype_keys(folder):
    """The dtype entries (``dtype``, ``torch_dtype``) of ``folder``'s config.json."""
    return {k: v for k, v in json.load(open(os.path.join(folder, "config.json"))).items() if k in ("dtype", "torch_dtype")}


@pytest.mark.parametrize("keys, written", [(["dtype"], ["dtype"]), (["torch_dtype"], ["torch_dtype"]),
                                           (["dtype", "torch_dtype"], ["dtype", "torch_dtype"]),
                                           ([], ["torch_dtype"])], ids=["dtype", "torch_dtype", "both", "neither"])
def test_config_json_gets_the_output_dtype_in_the_keys_the_base_uses(tmp_path, keys, written):
    from types import SimpleNamespace

    from nlmerge.jobs.merge_job import write_model_files

    ref = SimpleNamespace(path=str(tmp_path / "base"), config={"model_type": "llama", **dict.fromkeys(keys, "float32")})
    write_model_files(ref, {torch.bfloat16}, str(tmp_path), copy_tokenizer=False)
    assert _dtype_keys(tmp_path) == dict.fromkeys(written, "bfloat16")
    write_model_files(ref, {torch.bfloat16, torch.float32}, str(tmp_path), copy_tokenizer=False)  # mixed: as the base
    assert _dtype_keys(tmp_path) == dict.fromkeys(keys, "float32")


def _killed_after(monkeypatch, writes, run):
    """Run ``run()`` with the shard writer killed (KeyboardInterrupt) at its ``writes``-th write."""
    from nlmerge.io import writer as writer_module

    real_write, calls = writer_module.ShardWriter.write, [0]

    def dying_write(self, key, tensor, **options):
        calls[0] += 1
        if calls[0] == writes:
            raise KeyboardInterrupt("killed")
        return real_write(self, key, tensor, **options)

    with monkeypatch.context() as patch:
        patch.setattr(writer_module.ShardWriter, "write", dying_write)
        with pytest.raises(KeyboardInterrupt):
            run()


def test_resume_after_kill_is_byte_identical(llama_family, tmp_path, monkeypatch):
    _, paths, _, _ = llama_family
    cfg = _config(paths, "ties", {"scope": "global", "convention": "ties"}, WEIGHTS)
    run_merge(cfg, tmp_path / "clean", progress=False, out_shard_size="20K")
    _killed_after(monkeypatch, 25, lambda: run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K"))
    partial = sorted(os.listdir(tmp_path / "resumed"))
    assert not [n for n in partial if n.endswith(".partial")]
    done_before = [n for n in partial if n.startswith("model-")]
    assert done_before, "the kill should come after at least one finished shard"
    with pytest.raises(FileExistsError):
        run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K")
    shard = tmp_path / "resumed" / done_before[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # a finished shard that no longer verifies: merged again
    shard.write_bytes(bytes(data))
    lines = []
    run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K", resume=True, log=lines.append)
    total = len([n for n in os.listdir(tmp_path / "clean") if n.startswith("model-")])
    kept = len(done_before) - 1
    assert lines == [f"resuming: {kept} of {total} shards verified and kept, {total - kept} to merge (merged "
                     f"again, missing or no longer as recorded: {done_before[0]})"]
    clean, resumed = sorted(os.listdir(tmp_path / "clean")), sorted(os.listdir(tmp_path / "resumed"))
    assert clean == resumed
    for name in clean:
        if name != "nlmerge-manifest.json":
            assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    other = {**cfg, "parameters": {**cfg["parameters"], "normalize": False}}
    with pytest.raises(ValueError, match=r"holds a job with another config \(parameters\) \(fingerprints differ\); "
                                         "use --force to start over"):
        run_merge(other, tmp_path / "resumed", progress=False, out_shard_size="20K", resume=True)
    # another seed: the same job for a method that draws nothing (TIES)
    run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K", resume=True, random_seed=7)
    # an input rewritten in place since (its sampled identity may not see a few bytes): refused
    data_file = sorted(Path(paths["e1"]).glob("*.safetensors"))[-1]  # a shard of the sharded checkpoint
    stat = data_file.stat()
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ValueError, match=rf"holds a job with another input file modified since "
                                             rf"\({re.escape(str(paths['e1']))}\) \(fingerprints"):
            run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K", resume=True)
    finally:
        os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_vocab_mismatch_names_key_shapes_and_files(llama_family, tmp_path):
    root, paths, base, experts = llama_family
    odd = _transformers().LlamaForCausalLM(_llama_config(vocab=98)).state_dict()
    odd_path = _save_llama(tmp_path / "odd", odd, torch.float32, vocab=98)
    cfg = _config({**paths, "e1": odd_path}, "task_arithmetic", None, WEIGHTS)
    with pytest.raises(CheckpointError) as err:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and "(98, 32)" in msg and "(96, 32)" in msg and "odd" in msg
    assert not (tmp_path / "out").exists()


def test_refused_config_keys(llama_family, tmp_path):
    _, paths, _, _ = llama_family
    for bad, word in [({"slices": []}, "slices"), ({"chat_template": "x"}, "chat_template"),
                      ({"merge_method": "slerp"}, "slerp"), ({"tokenizer_source": "union"}, "union")]:
        cfg = {**_config(paths, "ties", None, WEIGHTS), **bad}
        with pytest.raises(ConfigError, match=word):
            load_config(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({**_config(paths, "ties", None, WEIGHTS), "base_model": "meta-llama/Llama-3.2-1B"})
    with pytest.raises(ConfigError, match="density"):
        plan_merge(_config(paths, "ties", None, [{"weight": 1.0, "density": 1.5}] * NUM_EXPERTS), tmp_path / "o")
    with pytest.raises(ConfigError, match="missing parameter 'weight'"):
        plan_merge(_config(paths, "ties", None, [{"density": 0.5}] * NUM_EXPERTS), tmp_path / "o")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            plan_merge(_config(paths, "ties", None, WEIGHTS), tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists()


def test_tokenizer_source_base_needs_a_tokenizer(llama_family, tmp_path):
    """``tokenizer_source: base`` with a base that has no tokenizer (only tokenizer_config.json) is
    refused before any work, as mergekit fails; a base with one has it copied, whatever
    ``copy_tokenizer`` says (as mergekit does, with a warning)."""
    import shutil

    _, paths, _, _ = llama_family
    cfg = {**_config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS), "tokenizer_source": "base"}
    with pytest.raises(ConfigError, match=f"tokenizer_source: base, but {paths['base']} has no tokenizer"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    shutil.copytree(paths["base"], tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    cfg["base_model"] = str(tmp_path / "base")
    run_merge(cfg, tmp_path / "with", progress=False)
    assert (tmp_path / "with" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    with pytest.warns(UserWarning, match="whatever --no-copy-tokenizer says"):
        run_merge(cfg, tmp_path / "without", progress=False, copy_tokenizer=False)
    assert (tmp_path / "without" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_gradient_and_filter_resolution(llama_family):
    _, paths, _, _ = llama_family
    per = [{"weight": [0.0, 1.0], "density": [{"filter": "self_attn", "value": 0.25}, {"value": [0.5, 0.9]}]}] * 3
    plan = plan_merge(_config(paths, "ties", None, per), "unused")
    try:
        k = plan.keys
        # 3 layers: t = 0, 0.5, 1; outside the layers t = 0
        assert k["model.layers.1.mlp.up_proj.weight"].per_model[1] == {"weight": 0.5, "density": 0.7}
        assert k["model.layers.2.self_attn.q_proj.weight"].per_model[1]["density"] == 0.25
        assert k["model.layers.2.self_attn.q_proj.weight"].per_model[1]["weight"] == 1.0
        assert k["model.embed_tokens.weight"].per_model[2] == {"weight": 0.0, "density": 0.5}
    finally:
        for c in plan.checkpoints:
            c.close()


def test_overflow_is_an_error_naming_the_key_and_nothing_is_written(tmp_path):
    for name, scale in (("base", 0.0), ("e0", 6e4), ("e1", 6e4)):
        (tmp_path / name).mkdir()
        save_file({"a.weight": torch.full((4,), scale, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)},
                  str(tmp_path / name / "model.safetensors"))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in ("e0", "e1")]}
    with pytest.raises(ValueError, match="'a.weight'.*float32"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    run_merge({**cfg, "out_dtype": "float32"}, tmp_path / "out32", progress=False)
    assert torch.equal(load_file(str(tmp_path / "out32" / "model.safetensors"))["a.weight"],
                       torch.full((4,), 2 * torch.tensor(6e4, dtype=torch.float16).item()))


def test_dare_is_keyed_by_seed_and_name(llama_family, tmp_path):
    _, paths, _, _ = llama_family
    per = [{"weight": 1.0, "density": 0.5}] * NUM_EXPERTS
    run_merge(_config(paths, "dare_linear", None, per), tmp_path / "a", progress=False, random_seed=3)
    run_merge(_config(paths, "dare_linear", None, per), tmp_path / "b", progress=False, random_seed=3,
              out_shard_size="10K", backend="torch")
    run_merge(_config(paths, "dare_linear", None, per), tmp_path / "c", progress=False, random_seed=4)
    a, b, c = _load_out(tmp_path / "a"), _load_out(tmp_path / "b"), _load_out(tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])
    with pytest.raises(ValueError, match=r"another --random-seed \(4 before, 3 now\) \(fingerprints"):  # DARE's
        run_merge(_config(paths, "dare_linear", None, per), tmp_path / "c", progress=False, random_seed=3, resume=True)


def test_yaml_file_and_exclude(llama_family, tmp_path):
    _, paths, base, _ = llama_family
    cfg = _config(paths, "task_arithmetic", None, WEIGHTS, exclude=["lm_head.*"])
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_merge(str(path), tmp_path / "out", progress=False)
    got = _load_out(tmp_path / "out")
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert not torch.equal(got["model.norm.weight"], base["model.norm.weight"])


def test_permutations_are_applied_as_models_are_read(llama_family, tmp_path):
    """An expert whose MLP units are shuffled, merged with the permutations file that undoes the
    shuffle, gives the same bytes as the unshuffled expert."""
    from nlmerge.align import PermutationSpec
    from nlmerge.io.permutations import save_permutations

    _, paths, _, experts = llama_family
    p = "model.layers.1.mlp."
    spec = PermutationSpec({"mlp1": [(p + "gate_proj.weight", 0), (p + "up_proj.weight", 0), (p + "down_proj.weight", 1)]})
    shuffle = torch.randperm(48, generator=torch.Generator().manual_seed(5))
    shuffled = dict(experts[1])
    for key, axis in spec.perms["mlp1"]:
        shuffled[key] = experts[1][key].index_select(axis, torch.argsort(shuffle))
    shuffled_path = _save_llama(tmp_path / "shuffled", shuffled, torch.float32)
    # aligned = shuffled.index_select(axis, shuffle) undoes it
    save_permutations(tmp_path / "perms.safetensors", spec, {"mlp1": shuffle})
    cfg = _config(paths, "ties", None, WEIGHTS)
    run_merge(cfg, tmp_path / "plain", progress=False)
    cfg_perm = _config({**paths, "e1": shuffled_path}, "ties", None, WEIGHTS,
                       permutations=[{"file": str(tmp_path / "perms.safetensors"), "models": [str(shuffled_path)]}])
    run_merge(cfg_perm, tmp_path / "aligned", progress=False)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "aligned" / "model.safetensors").read_bytes()
    bad = PermutationSpec({"mlp1": [(p + "gate_proj.weight", 1)]})
    save_permutations(tmp_path / "bad.safetensors", bad, {"mlp1": torch.arange(48)})
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        plan_merge({**cfg_perm, "permutations": [{"file": str(tmp_path / "bad.safetensors"),
                                                  "models": [str(shuffled_path)]}]}, tmp_path / "x")


def test_single_files_bin_and_tied_embeddings(tmp_path):
    """A single .safetensors file and a pytorch_model.bin folder merge as folders do; a checkpoint
    with embed_tokens and no lm_head (tied embeddings) merges as it is."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (10, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
              "model.norm.weight": (4,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(experts[0], str(tmp_path / "e0.safetensors"))
    (tmp_path / "e1").mkdir()
    torch.save(experts[1], tmp_path / "e1" / "pytorch_model.bin")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"),
           "models": [{"model": str(tmp_path / "e0.safetensors"), "parameters": {"weight": 0.5}},
                      {"model": str(tmp_path / "e1"), "parameters": {"weight": 0.5}}]}
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge.task_arithmetic(base, experts, weights=[0.5, 0.5])
    assert list(got) == list(base) or set(got) == set(base)
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_command_line(llama_family, tmp_path, capsys):
    from nlmerge.cli import main

    _, paths, _, _ = llama_family
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(_config(paths, "ties", None, WEIGHTS)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--lazy-unpickle",
                 "--out-shard-size", "20K", "--no-copy-tokenizer"]) == 0
    assert "tokenizer_config.json" not in os.listdir(tmp_path / "out")
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress", "--resume", "--out-shard-size", "20K",
                 "--no-copy-tokenizer"]) == 0
    shards = len([n for n in os.listdir(tmp_path / "out") if n.startswith("model-")])
    assert capsys.readouterr().err == f"nlmerge merge: resuming: {shards} of {shards} shards verified and kept, 0 to merge\n"
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(path), str(tmp_path / "o2"), "--allow-crimes"])
    assert exit_.value.code == 2 and "--allow-crimes" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**_config(paths, "ties", None, WEIGHTS), "slices": []}))
    assert main(["merge", str(path), str(tmp_path / "o3"), "--no-progress"]) == 1
    assert "'slices'" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    # mergekit-yaml's other flags: its defaults' --no- forms, -v, -j, --write-threads, --clone-tensors,
    # --transformers-cache are accepted
    path.write_text(yaml.safe_dump(_config(paths, "task_arithmetic", None, WEIGHTS)))
    assert main(["merge", str(path), str(tmp_path / "o4"), "--no-progress", "--no-cuda", "--no-allow-crimes",
                 "--write-model-card", "-v", "-j", str(torch.get_num_threads()), "--write-threads", "2",
                 "--clone-tensors", "--transformers-cache", str(tmp_path / "cache")]) == 0
    with pytest.raises(SystemExit):
        main(["merge", str(path), str(tmp_path / "o5"), "--gpu-rich"])
    assert "torchrun" in capsys.readouterr().err
    path.write_text("merge_method: ties\nmodels: [oops\n")
    assert main(["merge", str(path), str(tmp_path / "o6"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlmerge merge: error:") and "line" in err


def test_batchnorm_running_statistics_are_the_experts_mean(tmp_path):
    """Running statistics are not task vectors (nlmerge.merge's rule): the job gives the in-memory result."""
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(4, 3, generator=g), "bn.running_mean": torch.randn(4, generator=g),
            "bn.running_var": torch.rand(4, generator=g) + 0.1, "bn.num_batches_tracked": torch.tensor(7)}
    experts = [{**base, "conv.weight": base["conv.weight"] + 1, "bn.running_var": torch.rand(4, generator=g) * 0.1,
                "bn.running_mean": torch.randn(4, generator=g)} for _ in range(3)]
    for name, sd in [("base", base)] + [(f"e{i}", e) for i, e in enumerate(experts)]:
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"),
           "parameters": {"lambda": 2.0},
           "models": [{"model": str(tmp_path / f"e{i}.safetensors"), "parameters": {"weight": 1.0}} for i in range(3)]}
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = merge.task_arithmetic(base, experts, lam=2.0)
    assert bool((got["bn.running_var"] >= 0).all())
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["bn.running_var"], torch.stack([e["bn.running_var"] for e in experts]).mean(0))


def test_global_ties_zero_sign_majority_replaces_a_filled_key(tmp_path, monkeypatch):
    """Elected signs of exactly 0 take the model-wide majority, known only at the end: the file of a
    key merged earlier with another fill is reopened, the key merged again and replaced, the file
    hashed again; the result equals the in-memory global TIES bit for bit."""
    from nlmerge.io import writer as writer_module

    replaced, real_write = [], writer_module.ShardWriter.write

    def spy(self, key, tensor, *, replace=False):
        if replace:
            replaced.append(key)
        return real_write(self, key, tensor, replace=replace)

    monkeypatch.setattr(writer_module.ShardWriter, "write", spy)
    n = 64
    base = {"a": torch.zeros(n), "b": torch.zeros(n), "c": torch.zeros(n)}
    e0 = {"a": torch.full((n,), 1.0), "b": torch.linspace(1, 2, n), "c": -torch.full((4 * n // 4,), 3.0)}
    e1 = {"a": torch.full((n,), 1.0), "b": -torch.linspace(1, 2, n), "c": -torch.full((n,), 3.0)}
    e1["c"][: n // 2] = -5.0  # the majority over the model ends negative, after "b" was merged with fill +1
    for name, sd in (("base", base), ("e0", e0), ("e1", e1)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base.safetensors"),
           "parameters": {"scope": "global", "convention": "ties", "normalize": True},
           "models": [{"model": str(tmp_path / f"{m}.safetensors"), "parameters": {"weight": 1.0, "density": 1.0}}
                      for m in ("e0", "e1")]}
    run_merge(cfg, tmp_path / "out", progress=False, out_shard_size=n * 4)
    got = _load_out(tmp_path / "out")
    want = merge.ties(base, [e0, e1], keep=1.0, scope="global", disjoint="mean")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(got["b"], -torch.linspace(1, 2, n))  # the negative entries, by the final majority
    assert replaced == ["b"]
    manifest = json.load(open(tmp_path / "out" / "nlmerge-manifest.json"))
    assert len(manifest["shards"]) == 3
    for name, entry in manifest["shards"].items():  # the reopened shard's hash covers its replaced bytes
        assert entry["xxh3_128"] == file_digest(tmp_path / "out" / name)
    # the signs sum to 0: "b" filled with 0, merged as -1 is
    assert [e["extra"]["fills"] for e in manifest["shards"].values()] == [{}, {"b": 0}, {}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,shared", [("task_arithmetic", None), ("ties", None), ("dare_ties", None),
                                           ("ties", {"scope": "global", "convention": "ties"})])
def test_cuda_job_equals_cpu_job(tmp_path, method, shared):
    """--device cuda: the arithmetic on the GPU (Triton kernels) gives the CPU job's tensors; masks,
    thresholds and DARE's drops are exact, so only fp32 rounding may differ."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (300, 64), "model.layers.0.mlp.up_proj.weight": (129, 64),
              "model.layers.1.mlp.up_proj.weight": (129, 64), "model.norm.weight": (64,)}
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    for i in range(3):
        save_file({k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()},
                  str(tmp_path / f"e{i}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    cfg = {"merge_method": method, "base_model": str(tmp_path / "base.safetensors"), "out_dtype": "float32",
           "models": [{"model": str(tmp_path / f"e{i}.safetensors"), "parameters": {"weight": 1.0, "density": 0.4}}
                      for i in range(3)]}
    if method == "task_arithmetic":
        for m in cfg["models"]:
            m["parameters"].pop("density")
    if shared:
        cfg["parameters"] = shared
    run_merge(cfg, tmp_path / "cpu", progress=False)
    run_merge(cfg, tmp_path / "cuda", progress=False, device="cuda")
    a, b = _load_out(tmp_path / "cpu"), _load_out(tmp_path / "cuda")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6)


def test_output_that_overlaps_an_input_is_refused_untouched(llama_family, tmp_path):
    import shutil

    _, paths, _, _ = llama_family
    own_base = tmp_path / "own_base"
    shutil.copytree(paths["base"], own_base)
    before = sorted(os.listdir(own_base))
    cfg = _config({**paths, "base": own_base}, "ties", None, WEIGHTS)
    for out in (own_base, tmp_path):
        for flags in ({"force": True}, {"resume": True}):
            with pytest.raises(FileExistsError, match="overlaps the input"):
                run_merge(cfg, out, progress=False, **flags)
    assert sorted(os.listdir(own_base)) == before


@pytest.mark.parametrize("when", ["set-aside", "manifest", "killed"])
def test_force_cut_short_while_setting_aside_puts_the_previous_output_back(llama_family, tmp_path, monkeypatch, when):
    """--force moves a previous output aside before it merges. A stop while it moves the files (a
    signal after the first), or while the new manifest is written after that, leaves OUT as it
    was; a set-aside cut short by a kill (files left in ``.nlmerge-previous.partial``) is undone by
    the next forced job, whose failure then leaves OUT as it was too."""
    from nlmerge.jobs import merge_job

    _, paths, _, _ = llama_family
    out = tmp_path / "out"
    out.mkdir()
    files = {"model.safetensors": "stale", "mergekit_config.yml": "merge_method: slerp\n", "notes.txt": "mine",
             "model.safetensors.index.json": "{}"}
    for name, text in files.items():
        (out / name).write_text(text)
    cfg = _config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS)
    if when == "killed":
        (out / ".nlmerge-previous.partial").mkdir()
        os.replace(out / "model.safetensors", out / ".nlmerge-previous.partial" / "model.safetensors")
        monkeypatch.setattr(merge_job, "_manifest", lambda plan, resume: (_ for _ in ()).throw(OSError("disk gone")))
        with pytest.raises(OSError, match="disk gone"):
            run_merge(cfg, out, progress=False, force=True)
    else:
        target = merge_job.os if when == "set-aside" else merge_job.ckio.Manifest
        name = "replace" if when == "set-aside" else "save"
        real, calls = getattr(target, name), []

        def stop(*args):
            calls.append(args)
            if len(calls) == 2 or when == "manifest":
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(target, name, stop)
        with pytest.raises(KeyboardInterrupt) as err:
            run_merge(cfg, out, progress=False, force=True)
        assert err.value.shards_kept is False  # the command says nothing was kept, the previous output is back
    assert {name: (out / name).read_text() for name in os.listdir(out)} == files


def test_a_job_killed_as_it_began_leaves_nothing_in_the_way(llama_family, tmp_path):
    """``kill -9`` as the job wrote its first manifest leaves its temporary file and lock file in
    OUT: a plain rerun (no --force, no --resume) removes them and runs."""
    _, paths, _, _ = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nlmerge-manifest.json.partial").write_text("")
    (out / ".nlmerge.lock").write_text("")
    run_merge(_config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS), out, progress=False)
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]


def test_too_little_free_space_is_refused_before_anything_is_written(llama_family, tmp_path, monkeypatch):
    import collections
    import errno

    from nlmerge.jobs import merge_job

    _, paths, _, _ = llama_family
    real = os.statvfs(tmp_path)
    Stat = collections.namedtuple("Stat", "f_bavail f_frsize f_flag")
    seen = []
    monkeypatch.setattr(merge_job.os, "statvfs", lambda path: seen.append(path) or Stat(10, real.f_frsize, 0))
    with pytest.raises(OSError, match=r"writes \d+\.\d+ GB of shards but its file system has 0\.00 GB free") as err:
        run_merge(_config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS), tmp_path / "new" / "out", progress=False)
    assert err.value.errno == errno.ENOSPC
    assert seen == [str(tmp_path)]  # the nearest existing folder's file system
    assert not (tmp_path / "new").exists()


def test_force_over_a_mergekit_output_replaces_its_files_and_keeps_the_users(llama_family, tmp_path):
    _, paths, _, _ = llama_family
    out = tmp_path / "out"
    out.mkdir()
    mergekit_card = "---\nbase_model:\n- a\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n\n---\n# merge\n"
    files = {"model.safetensors": "stale", "mergekit_config.yml": "merge_method: slerp\n", "README.md": mergekit_card,
             "notes.txt": "mine"}
    for name, text in files.items():
        (out / name).write_text(text)
    cfg = _config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS)
    run_merge(cfg, out, progress=False, force=True, write_model_card=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "mergekit_config.yml").exists() and not (out / "README.md").exists()
    run_merge(cfg, out, progress=False, force=True)
    assert "task arithmetic" in (out / "README.md").read_text()
    (out / "README.md").write_text("# my own notes\n")  # not a merge card: --force keeps it
    run_merge(cfg, out, progress=False, force=True, write_model_card=False)
    assert (out / "README.md").read_text() == "# my own notes\n"
    assert not (out / ".nlmerge-previous").exists()


def test_force_keeps_the_previous_output_until_the_new_one_completes(llama_family, tmp_path, monkeypatch):
    from nlmerge.jobs import merge_job

    _, paths, _, _ = llama_family
    out = tmp_path / "out"
    run_merge(_config(paths, "tall", None, TALL_LAMBDAS), out, progress=False, out_shard_size="30K")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (out / "task_2").is_dir()

    def failing(plan, k, tensors, thresholds, fill):  # a late error that --resume could not get past
        raise ValueError("tensor 'model.norm.weight': expert 1 contains NaN or Inf")

    monkeypatch.setattr(merge_job, "_merge_one", failing)
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_merge(_config(paths, "ties", None, WEIGHTS), out, progress=False, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # restored as it was
    monkeypatch.undo()
    with pytest.raises(ValueError, match="pass one of them"):
        run_merge(_config(paths, "ties", None, WEIGHTS), out, progress=False, force=True, resume=True)
    run_merge(_config(paths, "ties", None, WEIGHTS), out, progress=False, force=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("task_", "tall", "."))) == []


def test_a_locked_output_is_refused_and_its_lock_file_is_no_output(llama_family, tmp_path, capsys):
    import subprocess
    import sys

    from nlmerge.cli import main
    from nlmerge.io import LOCK_NAME, OutputInUseError
    from nlmerge.jobs import merge_job

    _, paths, _, _ = llama_family
    cfg = _config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("")  # what a job killed outright leaves: it locks nothing, and is no output
    run_merge(cfg, out, progress=False, out_shard_size="20K")
    assert LOCK_NAME not in os.listdir(out)
    done = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / LOCK_NAME).write_text("")
    assert LOCK_NAME not in merge_job.previous_outputs(out)  # --force leaves it in place
    holder = subprocess.Popen(  # another job, in another process, holds the lock
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(out / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        config = tmp_path / "c.yml"
        config.write_text(yaml.safe_dump(cfg))
        assert main(["merge", str(config), str(out), "--no-progress", "--force", "--out-shard-size", "20K"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"nlmerge merge: error: output folder {str(out)!r} is in use by another nlmerge job")
        assert err.count("\n") == 1
        with pytest.raises(OutputInUseError):
            run_merge(cfg, out, progress=False, resume=True, out_shard_size="20K")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == {**done, LOCK_NAME: b""}  # untouched
    finally:
        holder.stdin.close()
        holder.wait()
    run_merge(cfg, out, progress=False, resume=True, out_shard_size="20K")  # the holder's file is stale now
    run_merge(cfg, out, progress=False, force=True, out_shard_size="20K")
    assert sorted(os.listdir(out)) == sorted(done)


def test_resume_needs_a_job_and_a_failed_start_leaves_nothing(tmp_path):
    for name, scale in (("base", 0.0), ("e0", 6e4), ("e1", 6e4)):
        save_file({"a.weight": torch.full((4,), scale, dtype=torch.float16)}, str(tmp_path / f"{name}.safetensors"))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"),
           "models": [{"model": str(tmp_path / f"{n}.safetensors"), "parameters": {"weight": 1.0}} for n in ("e0", "e1")]}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no nlmerge job"):
        run_merge(cfg, tmp_path / "other", progress=False, resume=True)
    with pytest.raises(ValueError, match=r"'a.weight'.*does not fit torch.float16.*out_dtype: float32") as err:
        run_merge(cfg, tmp_path / "out", progress=False)
    assert "key 'a.weight'" not in str(err.value)  # named once
    assert not (tmp_path / "out").exists()  # nothing left: the fixed config runs without --force
    run_merge({**cfg, "out_dtype": "float32"}, tmp_path / "out", progress=False)


def test_mergekit_leniency_warns_instead_of_failing(llama_family, tmp_path):
    _, paths, _, _ = llama_family
    cfg = {"merge_method": "linear", "exclude": ["no.such.*"],
           "models": [{"model": str(paths[f"e{i}"]), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]}
    with pytest.warns(UserWarning) as record:
        plan = plan_merge(cfg, tmp_path / "o")
    assert any("density" in str(w.message) for w in record)
    assert any("no.such" in str(w.message) for w in record)
    for c in plan.checkpoints:
        c.close()
    zero = {**cfg, "models": [{**m, "parameters": {"weight": w}} for m, w in zip(cfg["models"], (1.0, -1.0))]}
    with pytest.raises(ConfigError, match="sum to 0"):
        plan_merge(zero, tmp_path / "o")


def test_a_filter_that_matches_no_tensor_warns_before_any_work(llama_family, tmp_path):
    import warnings

    _, paths, _, _ = llama_family
    per_model = [dict(w) for w in WEIGHTS]
    per_model[1]["density"] = [{"filter": "mlpp", "value": 0.3}, {"filter": "mlp", "value": 0.4}, {"value": 0.6}]
    per_model[2]["density"] = [{"filter": "*", "value": 0.3}]
    cfg = _config(paths, "ties", {"lambda": [{"filter": "no_such_tensor", "value": 0.5}, {"value": 1.0}]}, per_model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = plan_merge(cfg, tmp_path / "o")
    for c in plan.checkpoints:
        c.close()
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        f"models[1] ({paths['e1']}).parameters.density: filter 'mlpp' matches no tensor of {paths['base']}",
        f"parameters.lambda: filter 'no_such_tensor' matches no tensor of {paths['base']}"]
    assert not (tmp_path / "o").exists()


def _tall_out(out):
    """A TALL job's outputs: the task models' state dicts and the masks file's tensors."""
    info = json.load(open(os.path.join(out, "tall.json")))
    tasks = [_load_out(os.path.join(out, folder)) for folder in info["task_folders"]]
    index = os.path.join(out, "tall-masks.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["tall-masks.safetensors"])
    masks = {}
    for f in files:
        masks.update(load_file(os.path.join(out, f)))
    return info, tasks, masks


TALL_LAMBDAS = [{"tall_lambda": 0.3}, {"tall_lambda": 0.5}, {"tall_lambda": 0.8}]


@pytest.mark.parametrize("mtl", ["task_arithmetic", "ties"])
def test_tall_writes_each_task_and_the_masks_as_in_memory(llama_family, tmp_path, mtl):
    _, paths, base, experts = llama_family
    per_model = [{**lam, **w} for lam, w in zip(TALL_LAMBDAS, WEIGHTS)]
    cfg = _config(paths, "tall", {"mtl": mtl, "normalize": True}, per_model)
    run_merge(cfg, tmp_path / "out", progress=False, out_shard_size="30K")
    info, tasks, masks = _tall_out(tmp_path / "out")
    ties_kwargs = None if mtl == "task_arithmetic" else dict(
        keep=0.5, scope="tensor", convention="ties", weights=[w["weight"] for w in WEIGHTS])
    want = merge.tall(base, experts, lam=[p["tall_lambda"] for p in TALL_LAMBDAS], mtl=mtl, ties_kwargs=ties_kwargs)
    assert info["num_tasks"] == NUM_EXPERTS and info["task_folders"] == [f"task_{t}" for t in range(NUM_EXPERTS)]
    assert len(os.listdir(tmp_path / "out" / "task_0")) > 3  # sharded: several files and an index
    assert "Task 1 of a TALL merge" in (tmp_path / "out" / "task_1" / "README.md").read_text()
    assert not (tmp_path / "out" / "README.md").exists()  # OUT holds the masks, not a model
    for t in range(NUM_EXPERTS):
        expected = want.task_state_dict(t)
        assert list(tasks[t]) == list(expected) or set(tasks[t]) == set(expected)
        for key in expected:
            assert torch.equal(tasks[t][key], expected[key]), (t, key)
    assert set(masks) == {f"{kind}.{key}" for key in want.merged_keys for kind in ("mask", "tau_mtl")}
    for key in want.merged_keys:
        assert torch.equal(masks[f"mask.{key}"], want.masks[key]), key
        assert torch.equal(masks[f"tau_mtl.{key}"], want.tau_mtl[key]), key
        rebuilt = (base[key] + ops.unpack_masks(masks[f"mask.{key}"][1], base[key].numel()).view(base[key].shape)
                   * masks[f"tau_mtl.{key}"])
        assert torch.equal(rebuilt, tasks[1][key]), key  # the documented rebuild rule
    transformers = _transformers()
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out" / "task_2").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tall_masks_output_and_consensus_with_ties_mtl(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    cfg = _config(paths, "tall", {"output": "masks"}, TALL_LAMBDAS)
    run_merge(cfg, tmp_path / "masks", progress=False)
    assert not [n for n in os.listdir(tmp_path / "masks") if n.startswith("task_")]
    info, tasks, masks = _tall_out(tmp_path / "masks")
    assert tasks == [] and info["tasks"] == [str(paths[f"e{i}"]) for i in range(NUM_EXPERTS)]
    want = merge.tall(base, experts, lam=[p["tall_lambda"] for p in TALL_LAMBDAS])
    for key in want.merged_keys:
        assert torch.equal(masks[f"mask.{key}"], want.masks[key]), key

    per_model = [{**lam, **w} for lam, w in zip(TALL_LAMBDAS, WEIGHTS)]
    run_merge(_config(paths, "consensus", {"k": 2, "lambda": 0.9, "mtl": "ties"}, per_model), tmp_path / "cons",
              progress=False)
    got = _load_out(tmp_path / "cons")
    expected = merge.consensus(base, experts, k=2, lam=[p["tall_lambda"] for p in TALL_LAMBDAS], alpha=0.9, mtl="ties",
                               ties_kwargs=dict(keep=0.5, scope="tensor", convention="ties",
                                                weights=[w["weight"] for w in WEIGHTS]))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_tall_task_rebuilds_each_task_model_from_the_masks(llama_family, tmp_path, capsys, monkeypatch):
    from nlmerge.cli import main
    from nlmerge.jobs.tall_task import run_tall_task

    _, paths, _, _ = llama_family
    cfg = _config(paths, "tall", {"mtl": "ties"}, [{**lam, **w} for lam, w in zip(TALL_LAMBDAS, WEIGHTS)],
                  out_dtype="float16")
    run_merge(cfg, tmp_path / "models", progress=False, out_shard_size="30K")
    cfg["parameters"]["output"] = "masks"
    run_merge(cfg, tmp_path / "masks", progress=False)
    for t in range(NUM_EXPERTS):
        rebuilt = tmp_path / f"rebuilt_{t}"
        assert main(["tall-task", str(tmp_path / "masks"), str(t), str(rebuilt), "--out-shard-size", "30K"]) == 0
        want = tmp_path / "models" / f"task_{t}"
        for name in sorted(os.listdir(want)):  # shards, index, config.json (float16), tokenizer files
            if name != "README.md":
                assert (rebuilt / name).read_bytes() == (want / name).read_bytes(), name
    assert "wrote task 2's model" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"task must be an integer in \[0, 3\)"):
        run_tall_task(tmp_path / "masks", 3, tmp_path / "bad")
    with pytest.raises(ValueError, match="holds no TALL job"):
        run_tall_task(tmp_path / "models" / "task_0", 0, tmp_path / "bad")
    with pytest.raises(FileExistsError, match="not empty; pass --force"):
        run_tall_task(tmp_path / "masks", 0, tmp_path / "rebuilt_1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "rebuilt_1").iterdir()}
    from nlmerge.jobs import tall_task as tall_task_module

    def failing(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tall_task_module.ops, "apply_mask", failing)
        with pytest.raises(KeyboardInterrupt):
            run_tall_task(tmp_path / "masks", 0, tmp_path / "rebuilt_1", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "rebuilt_1").iterdir()} == before  # task 1's, back
    from nlmerge.io import OutputInUseError, lock_output

    with lock_output(tmp_path / "rebuilt_1"), pytest.raises(OutputInUseError, match="rebuilt_1.*in use"):
        run_tall_task(tmp_path / "masks", 0, tmp_path / "rebuilt_1", force=True)  # another job writes there
    assert {p.name: p.read_bytes() for p in (tmp_path / "rebuilt_1").iterdir()} == before
    run_tall_task(tmp_path / "masks", 0, tmp_path / "rebuilt_1", force=True)
    assert not (tmp_path / "rebuilt_1" / ".nlmerge-previous").exists()
    other = tmp_path / "other_base"
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"is not the base of the TALL job"):
        run_tall_task(tmp_path / "masks", 0, other, base=tmp_path / "other.safetensors")
    assert not other.exists()
    with pytest.raises(ValueError, match="is not the base of the TALL job"):
        run_tall_task(tmp_path / "masks", 0, other, base=paths["e0"])
    assert not other.exists()


def test_tall_resume_after_kill_is_byte_identical(llama_family, tmp_path, monkeypatch):
    _, paths, _, _ = llama_family
    cfg = _config(paths, "tall", None, TALL_LAMBDAS)
    run_merge(cfg, tmp_path / "clean", progress=False, out_shard_size="20K")
    _killed_after(monkeypatch, 90, lambda: run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K"))
    assert os.listdir(tmp_path / "resumed" / "task_0"), "the kill should come after a finished step"
    assert not (tmp_path / "resumed" / "tall.json").exists()
    run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K", resume=True)
    for folder in ("", "task_0", "task_1", "task_2"):
        clean, resumed = tmp_path / "clean" / folder, tmp_path / "resumed" / folder
        names = sorted(n for n in os.listdir(clean) if os.path.isfile(clean / n))
        assert names == sorted(n for n in os.listdir(resumed) if os.path.isfile(resumed / n))
        for name in names:
            if name != "nlmerge-manifest.json":
                assert (clean / name).read_bytes() == (resumed / name).read_bytes(), (folder, name)
    run_merge(cfg, tmp_path / "resumed", progress=False, out_shard_size="20K", force=True)  # --force rewrites it


def test_tall_output_must_not_vary_by_tensor(llama_family, tmp_path):
    _, paths, _, _ = llama_family
    cfg = _config(paths, "tall", {"output": [{"filter": "mlp", "value": "masks"}, {"value": "models"}]}, TALL_LAMBDAS)
    with pytest.raises(ConfigError, match="output must be the same for every tensor"):
        run_merge(cfg, tmp_path / "out", progress=False)
    cfg = _config(paths, "tall", {"mtl": "ties"}, [{"density": 1.5}] * NUM_EXPERTS)
    with pytest.raises(ConfigError, match=r"density of model .* must be in \(0, 1\], got 1.5"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_float64_tensors_and_a_varying_global_normalize_are_refused(tmp_path):
    for name in ("base", "e0", "e1"):
        save_file({"a.weight": torch.randn(4), "rope.inv_freq": torch.randn(3, dtype=torch.float64)},
                  str(tmp_path / f"{name}.safetensors"))
    models = [{"model": str(tmp_path / f"{n}.safetensors"), "parameters": {"weight": 1.0, "density": 0.5}}
              for n in ("e0", "e1")]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"), "models": models}
    with pytest.raises(ConfigError, match=r"'rope.inv_freq' of .*base.safetensors is torch.float64.*exclude"):
        plan_merge(cfg, tmp_path / "out")
    run_merge({**cfg, "exclude": ["rope.*"]}, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["rope.inv_freq"], load_file(str(tmp_path / "base.safetensors"))["rope.inv_freq"])
    cfg = {**cfg, "merge_method": "ties", "exclude": ["rope.*"],
           "parameters": {"scope": "global", "convention": "ties", "normalize": [{"filter": "a.", "value": False}]}}
    save_file({"a.weight": torch.randn(4), "b.weight": torch.randn(2), "rope.inv_freq": torch.zeros(3, dtype=torch.float64)},
              str(tmp_path / "base.safetensors"))
    for name in ("e0", "e1"):
        save_file({"a.weight": torch.randn(4), "b.weight": torch.randn(2),
                   "rope.inv_freq": torch.zeros(3, dtype=torch.float64)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ConfigError, match="normalize must be the same for every tensor"):
        plan_merge(cfg, tmp_path / "out2")


def test_nan_found_mid_run_names_the_model_and_leaves_no_output(llama_family, tmp_path):
    _, paths, base, experts = llama_family
    plan = plan_merge(_config(paths, "task_arithmetic", None, WEIGHTS), tmp_path / "out", out_shard_size="20K")
    last = plan.shards[-1].file_order[-1]  # the last key merged: every other shard is finished by then
    assert len(plan.shards) > 2
    for ckpt in plan.checkpoints:
        ckpt.close()
    poisoned = {k: v.clone() for k, v in experts[1].items()}
    poisoned[last][0] = float("nan")
    bad = _save_llama(tmp_path / "poisoned", poisoned, torch.float32)
    for method, shared in (("dare_ties", None), ("ties", {"scope": "global", "convention": "ties"}), ("tall", None)):
        cfg = _config({**paths, "e1": bad}, method, shared, [{**w, "tall_lambda": 0.4} for w in WEIGHTS])
        with pytest.raises(ValueError, match=rf"{last}.*{bad}.* NaN or Inf"):
            run_merge(cfg, tmp_path / "out", progress=False, out_shard_size="20K")
        assert not (tmp_path / "out").exists(), method


def test_the_command_finishes_when_stdout_is_closed(llama_family, tmp_path):
    """``nlmerge merge ... | head -0``: the reader of stdout left before the closing line; the merge
    is complete, the command exits 0 and says nothing on stderr (the process exits without the
    interpreter's teardown, so this runs it as the console script does: ``python -m nlmerge``)."""
    import subprocess
    import sys

    _, paths, _, _ = llama_family
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(_config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS)))
    read, write = os.pipe()
    os.close(read)  # nobody reads stdout
    done = subprocess.run([sys.executable, "-m", "nlmerge", "merge", str(config), str(tmp_path / "out"), "--no-progress"],
                          stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert (done.returncode, done.stderr) == (0, "")
    run_merge(_config(paths, "task_arithmetic", {"lambda": 0.5}, WEIGHTS), tmp_path / "ref", progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def _tiny_job(tmp_path, nan=False):
    """``tmp_path/c.yml``: a global TIES over three small safetensors files (a few shards at 4K);
    with ``nan``, the last key of an expert holds a NaN, an error found after progress started."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(4)}
    for name in ("e0", "e1"):
        expert = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        if nan and name == "e1":
            expert["w3"][0, 0] = float("nan")
        save_file(expert, str(tmp_path / f"{name}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base.safetensors"),
           "parameters": {"scope": "global", "convention": "ties"},
           "models": [{"model": str(tmp_path / f"{m}.safetensors"), "parameters": {"weight": 1.0, "density": 0.5}}
                      for m in ("e0", "e1")]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("stderr", ["reader gone", "closed"])
def test_the_command_finishes_when_stderr_is_lost(tmp_path, stderr):
    """``nlmerge merge ... 2>&1 | head -c 100`` or ``2>&-``: progress bars and -v's log lines have
    nowhere to go; the merge completes, byte for byte, with exit status 0. An error in the job
    still exits 1 (its message is lost) and leaves no output."""
    import subprocess
    import sys

    _tiny_job(tmp_path)
    with pytest.warns(UserWarning, match="no config.json"):  # the command warns too, into the lost stderr
        run_merge(tmp_path / "c.yml", tmp_path / "ref", progress=False, out_shard_size="4K")

    def command(out):
        read, write = os.pipe()
        os.close(read)  # nobody reads stderr
        options = {"stderr": write} if stderr == "reader gone" else {"preexec_fn": lambda: os.close(2)}
        try:
            return subprocess.run([sys.executable, "-m", "nlmerge", "merge", str(tmp_path / "c.yml"), str(out),
                                   "--out-shard-size", "4K", "-vv"], stdout=subprocess.PIPE, text=True, **options)
        finally:
            os.close(write)

    done = command(tmp_path / "out")
    assert (done.returncode, done.stdout) == (0, f"merged into {tmp_path / 'out'}\n")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "ref"))
    for name in os.listdir(tmp_path / "ref"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    _tiny_job(tmp_path, nan=True)
    done = command(tmp_path / "failed")
    assert (done.returncode, done.stdout) == (1, "")
    assert not (tmp_path / "failed").exists()


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_the_command_finishes_when_stdout_cannot_be_written(tmp_path, stdout):
    """``nlmerge merge ... >&-`` or ``>/dev/full``: the closing line is lost, the merge is complete
    (byte for byte) and the command exits 0 with nothing on stderr; a closed fd 1 is held by
    /dev/null, so no file of the job becomes fd 1."""
    import subprocess
    import sys

    if stdout == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    _tiny_job(tmp_path)
    with pytest.warns(UserWarning, match="no config.json"):
        run_merge(tmp_path / "c.yml", tmp_path / "ref", progress=False, out_shard_size="4K")
    command = [sys.executable, "-m", "nlmerge", "merge", str(tmp_path / "c.yml"), str(tmp_path / "out"),
               "--out-shard-size", "4K", "--no-progress"]
    if stdout == "closed":
        done = subprocess.run(command, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    else:
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "ref"))
    for name in os.listdir(tmp_path / "ref"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


@pytest.mark.parametrize("filled", [False, True], ids=["plain", "filled"])
def test_a_signal_while_a_shard_is_recorded_leaves_every_renamed_shard_recorded(tmp_path, monkeypatch, filled):
    """SIGINT reaches the main thread (where Python raises every signal's KeyboardInterrupt) while
    the job records its third shard in the manifest (on the finisher thread): every shard under its
    final name in OUT is in the saved manifest, and --resume keeps them all and completes the
    clean job's bytes. ``filled``: a global TIES on a bf16 model whose task vectors cancel exactly
    (zero elected signs in every shard) and whose majority sign flips late: the kept shards were
    filled with the running majority, so the resume reopens them and replaces their filled keys.
    The manifest used to be written on the main thread after the rename: a signal there left
    renamed shards unrecorded. The resume takes the TIES thresholds from the manifest: it reads
    nothing for them."""
    import signal
    import threading

    from nlmerge import ops
    from nlmerge.io import Manifest, ShardWriter

    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(8)}
    if filled:  # coarse steps cancel exactly; the first keys lean positive, the last more negative
        experts = [{k: v + 0.01 * (torch.randint(-2, 3, v.shape, generator=g) + (1 if i < 3 else -2) * (t == 0))
                    for i, (k, v) in enumerate(base.items())} for t in range(3)]
    else:
        experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for name, sd in (("base", base), *((f"e{t}", e) for t, e in enumerate(experts))):
        save_file({k: v.bfloat16() if filled else v for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base.safetensors"),
           "parameters": {"scope": "global", "convention": "ties"},
           "models": [{"model": str(tmp_path / f"e{t}.safetensors"), "parameters": {"weight": 1.0, "density": 0.5}}
                      for t in range(3)]}
    size = "2K" if filled else "4K"  # one tensor a shard
    with pytest.warns(UserWarning, match="no config.json"):
        run_merge(cfg, tmp_path / "clean", progress=False, out_shard_size=size)

    real_save, saves, main = Manifest.save, [], threading.main_thread().ident

    def save(self):
        saves.append(threading.current_thread().name)
        if len(saves) == 4:  # the job's empty manifest, then three shards
            signal.pthread_kill(main, signal.SIGINT)
        return real_save(self)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(Manifest, "save", save)
        with pytest.raises(KeyboardInterrupt):
            run_merge(cfg, out, progress=False, out_shard_size=size)
    shards = {name for name in os.listdir(out) if name.startswith("model-")}
    assert len(shards) >= 2
    recorded = json.load(open(out / "nlmerge-manifest.json"))["shards"]
    assert shards <= set(recorded)
    assert saves[3].startswith("nlmerge-finish")
    reopened, real_init = [], ShardWriter.__init__

    def spy(self, plan, out_dir, *, reopen=False):
        if reopen:
            reopened.append(plan.name)
        real_init(self, plan, out_dir, reopen=reopen)

    lines = []
    with monkeypatch.context() as patch, pytest.warns(UserWarning, match="no config.json"):
        patch.setattr(ShardWriter, "__init__", spy)
        patch.setattr(ops, "kth_smallest_magnitudes_streaming", None)  # not called: recorded
        run_merge(cfg, out, progress=False, out_shard_size=size, resume=True, log=lines.append)
    assert lines[0].startswith(f"resuming: {len(shards)} of 8 shards verified and kept")
    assert bool(set(reopened) & shards) == filled  # a kept shard filled with a sign the majority overturned
    if filled:
        assert all(recorded[name]["extra"]["fills"] for name in shards)
    for name in os.listdir(tmp_path / "clean"):
        if name.startswith("model"):
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name