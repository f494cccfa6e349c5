"""``nlmerge align`` on checkpoints saved with ``save_pretrained``: tiny random Llama (grouped-query
attention, tied and untied embeddings), ViT and CLIP. A planted permutation of every symmetry is
recovered exactly by weight and activation matching; the permutations file is the merge job's;
the aligned checkpoint holds the reference's tensors and gives the original's outputs."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from nlmerge.align import apply_permutations, llama_spec
from nlmerge.cli import main
from nlmerge.io import open_checkpoint
from nlmerge.io.permutations import load_permutations
from tests.conftest import random_perms
from tests.test_align_hf import logits, state, tiny_llama, tiny_vision, vision_inputs, vision_outputs

transformers = pytest.importorskip("transformers", minversion="5")


def save_pair(model, spec, tmp_path, seed):
    """Save ``model`` as the reference and a copy under planted permutations as the other; return
    their folders, the other model and the permutations that undo the planted ones."""
    sd = state(model, spec)
    planted = random_perms(spec, spec.validate(sd), torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutations(spec, planted, sd), strict=False)
    ref_dir, other_dir = tmp_path / "reference", tmp_path / "other"
    model.save_pretrained(ref_dir)
    other.save_pretrained(other_dir)
    return ref_dir, other_dir, other, {p: torch.argsort(v) for p, v in planted.items()}


def check_file(path, ref_dir, other_dir, expected):
    spec, perms, metadata = load_permutations(path)
    assert [p for p in expected if not torch.equal(perms[p], expected[p])] == []
    with open_checkpoint(ref_dir) as ref, open_checkpoint(other_dir) as oth:
        assert (metadata["reference"], metadata["other"]) == (ref.identity(), oth.identity())
    return spec


def check_aligned(aligned_dir, ref_dir):
    with open_checkpoint(aligned_dir) as al, open_checkpoint(ref_dir) as ref:
        assert al.keys() == ref.keys()
        assert [k for k in ref.keys() if not torch.equal(al.get(k), ref.get(k))] == []


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "llama-gqa-tied"])
def test_align_llama_weight_and_activation(kind, tmp_path, capsys):
    config, model = tiny_llama(kind, seed=1)
    spec, _ = llama_spec(config)
    ref_dir, other_dir, other, expected = save_pair(model, spec, tmp_path, seed=2)
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "data.safetensors")
    for method in ("weight", "activation"):
        out = tmp_path / f"{method}.safetensors"
        extra = ["--data", str(tmp_path / "data.safetensors"), "--batch-size", "4"] if method == "activation" else []
        aligned = tmp_path / f"aligned-{method}"
        assert main(["align", str(ref_dir), str(other_dir), str(out), "--method", method, "--write-aligned",
                     str(aligned), *extra]) == 0
        saved = check_file(out, ref_dir, other_dir, expected)
        assert saved.perms == spec.perms
        check_aligned(aligned, ref_dir)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(aligned).eval()
        torch.testing.assert_close(logits(reloaded, ids), logits(other, ids), rtol=1e-5, atol=1e-5)
    assert "best of 8 orders" in capsys.readouterr().out


def test_aligned_independent_llama_keeps_its_function(tmp_path):
    """Two models of different seeds: whatever the matching finds, the aligned checkpoint computes
    what the original did (eval mode, fp32 rounding), and is closer to the reference."""
    _, a = tiny_llama("llama-gqa-untied", seed=4)
    _, b = tiny_llama("llama-gqa-untied", seed=5)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "p.safetensors"),
                 "--restarts", "2", "--write-aligned", str(tmp_path / "b-aligned")]) == 0
    aligned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b-aligned").eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(logits(aligned, ids), logits(b, ids), rtol=1e-5, atol=1e-5)
    sa, sb, sal = a.state_dict(), b.state_dict(), aligned.state_dict()
    assert sum(float((sal[k] - sa[k]).pow(2).sum()) for k in sa) < sum(float((sb[k] - sa[k]).pow(2).sum()) for k in sa)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_align_vision(kind, tmp_path):
    """ViT (checkpoint names of transformers 4, module names of 5) and CLIP (both towers)."""
    from nlmerge.align import spec_from_config

    config, model = tiny_vision(kind, seed=7)
    model.save_pretrained(tmp_path / "probe")
    with open_checkpoint(tmp_path / "probe") as ckpt:
        spec, _ = spec_from_config(ckpt.config, keys=ckpt.keys())
    module_spec, _ = spec_from_config(config.to_dict(), keys=model.state_dict())
    assert set(module_spec.perms) == set(spec.perms)
    ref_dir, other_dir, other, expected = save_pair(model, module_spec, tmp_path, seed=8)
    batch = vision_inputs(kind, torch.Generator().manual_seed(9))
    save_file(batch, tmp_path / "data.safetensors")
    for method in ("weight", "activation"):
        out = tmp_path / f"{method}.safetensors"
        extra = ["--data", str(tmp_path / "data.safetensors")] if method == "activation" else []
        aligned = tmp_path / f"aligned-{method}"
        assert main(["align", str(ref_dir), str(other_dir), str(out), "--method", method,
                     "--write-aligned", str(aligned), *extra]) == 0
        check_file(out, ref_dir, other_dir, expected)
        check_aligned(aligned, ref_dir)
    reloaded = type(model).from_pretrained(tmp_path / "aligned-weight").eval()
    for x, y in zip(vision_outputs(reloaded, kind, batch), vision_outputs(other, kind, batch)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_align_refusals(tmp_path, capsys):
    config, model = tiny_llama("llama-gqa-untied", seed=1)
    model.save_pretrained(tmp_path / "a")
    _, vit = tiny_vision("vit")
    vit.save_pretrained(tmp_path / "v")
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"old")

    def error(*argv):
        assert main(["align", *map(str, argv)]) == 1
        return capsys.readouterr().err

    assert "p.safetensors: the output exists (use --force" in error(tmp_path / "a", tmp_path / "a", out)
    assert out.read_bytes() == b"old"
    assert "model types differ" in error(tmp_path / "a", tmp_path / "v", tmp_path / "q.safetensors")
    assert "overlaps the input" in error(tmp_path / "a", tmp_path / "a", out, "--write-aligned", tmp_path / "a")
    weights = sorted((tmp_path / "a").glob("*.safetensors"))[0]
    before = weights.read_bytes()
    for argv in ([weights, "--force"], [out, "--force", "--write-aligned", tmp_path / "a" / "aligned"]):
        assert "overlaps the input" in error(tmp_path / "a", tmp_path / "v", *argv)  # never written into an input
    assert weights.read_bytes() == before and not (tmp_path / "a" / "aligned").exists()
    save_file({"labels": torch.zeros(2, 3, dtype=torch.int64)}, tmp_path / "bad.safetensors")
    assert "tensors ['labels'] are not model inputs" in error(tmp_path / "a", tmp_path / "a", out, "--force",
                                                               "--method", "activation", "--data", tmp_path / "bad.safetensors")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert "not empty (use --force)" in error(tmp_path / "a", tmp_path / "a", tmp_path / "new.safetensors",
                                              "--write-aligned", tmp_path / "busy")
    assert not (tmp_path / "new.safetensors").exists()
    with pytest.raises(SystemExit):
        main(["align", str(tmp_path / "a"), str(tmp_path / "a"), str(out), "--restarts", "0"])
    assert "--restarts: must be an integer >= 1, got 0" in capsys.readouterr().err
    # the same model aligned to itself: identities, --force replaces the file
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "a"), str(out), "--force", "--restarts", "1"]) == 0
    _, perms, _ = load_permutations(out)
    assert all(torch.equal(p, torch.arange(p.numel())) for p in perms.values())
