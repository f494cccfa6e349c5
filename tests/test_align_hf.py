"""Permutation specs from Hugging Face configs: tiny random Llama-family models with grouped-query
attention (tied and untied embeddings, biases), ViT and CLIP built from configs with transformers.
Every symmetry of a spec keeps the function; planted permutations are recovered exactly by weight
and activation matching; a q/k permutation within a head (the negative control) changes the
function and is refused."""
import copy

import pytest
import torch

from nlmerge.align import AttentionGroup, apply_permutations, spec_from_config, weight_matching
from nlmerge.align import activation_matching, llama_spec
from nlmerge.align.spec import compose_heads
from tests.conftest import random_perms

transformers = pytest.importorskip("transformers", minversion="5")

LLAMAS = {  # name: (config class, model class, extra config)
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-mha-bias": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "attention_bias": True,
                                                           "mlp_bias": True}),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}),
}


def randomize(model, generator):
    """Non-trivial norm weights and biases (HF initializes them to ones and zeros)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_llama(kind, seed=0):
    config_cls, model_cls, extra = LLAMAS[kind]
    kwargs = {**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64), **extra}
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    return config, randomize(getattr(transformers, model_cls)(config), torch.Generator().manual_seed(seed))


def state(model, spec):
    """The model's tensors that a checkpoint holds (a tied lm_head is not stored)."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or "lm_head.weight" in spec.params}


def permuted_model(model, spec, perms):
    other = copy.deepcopy(model)
    missing, unexpected = other.load_state_dict(apply_permutations(spec, perms, state(model, spec)), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return other


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(LLAMAS))
def test_llama_spec_symmetries_and_matching(kind):
    config, model = tiny_llama(kind)
    spec, sites = spec_from_config(config.to_dict(), keys=state(model, llama_spec(config)[0]))
    sd = state(model, spec)
    sizes = spec.validate(sd)
    # every tensor of the checkpoint is touched, on every axis but the vocabulary
    assert set(spec.params) == set(sd)
    vocab = {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(len(spec.params[k]) == (1 if sd[k].dim() == 1 or k in vocab else 2) for k in sd), spec.params
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    roles = "qkvo" if kv != heads else ("qk", "qk", "vo", "vo")
    assert spec.attention["layer.1.attn"] == AttentionGroup(*(f"layer.1.attn.{r}" for r in roles), heads, kv, False)
    assert set(sites) == set(spec.perms)

    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    planted = random_perms(spec, sizes, torch.Generator().manual_seed(2))
    other = permuted_model(model, spec, planted)
    assert not torch.equal(other.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=1e-5, atol=1e-5)

    expected = {p: torch.argsort(v) for p, v in planted.items()}
    found = weight_matching(spec, sd, state(other, spec), seed=0)
    assert [p for p in sizes if not torch.equal(found[p], expected[p])] == []
    batches = [{"input_ids": ids[i:i + 1]} for i in range(3)]
    found = activation_matching(spec, model, other, batches, sites)
    assert [p for p in sizes if not torch.equal(found[p], expected[p])] == []


def test_qk_units_within_a_head_are_not_a_symmetry():
    """The negative control: moving q/k units within a head (the same order on q and k, which
    would keep plain attention) changes a rotary model's logits, and the spec refuses it."""
    config, model = tiny_llama("llama-gqa-untied", seed=3)
    spec, _ = llama_spec(config)
    sd = state(model, spec)
    sizes = spec.validate(sd)
    group = spec.attention["layer.0.attn"]
    d = sizes[group.k] // group.kv_heads
    tau = torch.arange(d).roll(1).repeat(group.kv_heads, 1)
    ident, zeros = torch.arange(group.kv_heads), torch.zeros(group.kv_heads, 1, dtype=torch.int64)
    rho = torch.arange(group.group).repeat(group.kv_heads, 1)
    perms = {group.q: compose_heads(ident, rho, tau), group.k: compose_heads(ident, zeros, tau)}
    with pytest.raises(ValueError, match="'layer.0.attn'.*moves q/k units within a head; with rotary"):
        apply_permutations(spec, perms, sd)
    plain = copy.deepcopy(model)
    attn = plain.model.layers[0].self_attn
    with torch.no_grad():
        for proj, index in ((attn.q_proj, perms[group.q]), (attn.k_proj, perms[group.k])):
            proj.weight.copy_(proj.weight[index])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    assert (logits(plain, ids) - logits(model, ids)).abs().max() > 1e-3
    # q and k ordered differently, or a query head moved to another group, are refused too
    with pytest.raises(ValueError, match="order the q/k units differently"):
        apply_permutations(spec, {group.q: perms[group.q]}, sd)
    moved = torch.arange(sizes[group.q]).view(4, d).roll(1, 0).reshape(-1)
    with pytest.raises(ValueError, match="moves a query head out of its key/value group"):
        apply_permutations(spec, {group.q: moved}, sd)


def test_spec_from_config_errors():
    with pytest.raises(ValueError, match="model_type 'bert' has no permutation spec; supported: llama, mistral, "
                                         "qwen2, vit, clip, clip_vision_model, clip_text_model"):
        spec_from_config({"model_type": "bert"})
    base = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="num_key_value_heads 3 does not divide num_attention_heads 4"):
        spec_from_config({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="config has no 'num_hidden_layers'"):
        spec_from_config({k: v for k, v in base.items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match="no tensor named 'embed_tokens.weight'"):
        spec_from_config(base, keys=["x"])
    with pytest.raises(ValueError, match="needs vision_config and text_config"):
        spec_from_config({"model_type": "clip"})


def tiny_vision(kind, seed=0):
    torch.manual_seed(seed)
    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if kind == "vit":
        config = transformers.ViTConfig(**enc, image_size=16, patch_size=8)
        model = transformers.ViTModel(config)
    else:
        config = transformers.CLIPConfig(text_config=dict(**enc, vocab_size=64, max_position_embeddings=16),
                                         vision_config=dict(**enc, image_size=16, patch_size=8), projection_dim=24)
        model = transformers.CLIPModel(config)
    return config, randomize(model, torch.Generator().manual_seed(seed))


def vision_inputs(kind, generator):
    pixels = {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator)}
    if kind == "vit":
        return pixels
    return {**pixels, "input_ids": torch.randint(0, 64, (4, 7), generator=generator)}


def vision_outputs(model, kind, batch):
    with torch.no_grad():
        out = model(**batch)
    return (out.pooler_output,) if kind == "vit" else (out.logits_per_image, out.image_embeds, out.text_embeds)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_vision_specs_from_config(kind):
    """On the module names (transformers 5): the spec from the config covers every tensor, keeps
    the function, and weight and activation matching recover a planted permutation."""
    config, model = tiny_vision(kind)
    sd = model.state_dict()
    spec, sites = spec_from_config(config.to_dict(), keys=sd)
    sizes = spec.validate(sd)
    assert set(sd) - set(spec.params) == ({"logit_scale"} if kind == "clip" else {"pooler.dense.bias"})
    if kind == "clip":
        assert {"vision.residual", "text.residual", "vision.layer.1.attn.qk", "text.layer.0.attn.vo"} <= set(sizes)
    assert all(g.qk_units for g in spec.attention.values())
    g = torch.Generator().manual_seed(5)
    planted = random_perms(spec, sizes, g)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutations(spec, planted, sd))
    batch = vision_inputs(kind, g)
    for a, b in zip(vision_outputs(other, kind, batch), vision_outputs(model, kind, batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = {p: torch.argsort(v) for p, v in planted.items()}
    found = weight_matching(spec, sd, other.state_dict(), seed=0)
    assert [p for p in sizes if not torch.equal(found[p], expected[p])] == []
    found = activation_matching(spec, model, other, [batch], sites)
    assert [p for p in sizes if not torch.equal(found[p], expected[p])] == []
