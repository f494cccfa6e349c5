"""Alignment: spec validation, function preservation of every spec builder, planted permutations
recovered exactly by weight matching and activation matching."""
import copy
import types

import pytest
import torch

from nlmerge.align import (
    AttentionGroup,
    PermutationSpec,
    activation_matching,
    apply_permutations,
    check_permutation,
    cnn_spec,
    hf_vit_spec,
    mlp_spec,
    resnet_spec,
    vit_spec,
    weight_matching,
)
from nlmerge.align.models import CNN, MLP, ResNet, ViT
from tests.conftest import random_perms


def randomize_norms(model, generator):
    """Non-trivial norm affines and running statistics, so that permuting them matters."""
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            with torch.no_grad():
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=generator))
                    module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model.eval()


def make_case(kind, seed=0):
    """(model, spec, sites, input batch) of one builder."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = MLP((12, 24, 20, 16, 5))
        spec, sites = mlp_spec(4)
        x = torch.randn(256, 12, generator=g)
    elif kind.startswith("cnn"):
        norm = {"cnn_batch": "batch", "cnn_layer": "layer", "cnn_none": None}[kind]
        model = CNN(3, (6, 10, 8), 4, norm=norm)
        spec, sites = cnn_spec(3, norm=norm)
        x = torch.randn(16, 3, 6, 6, generator=g)
    elif kind == "resnet":
        model = ResNet(3, (6, 10), blocks_per_stage=2, num_classes=4)
        spec, sites = resnet_spec(2, 2)
        x = torch.randn(16, 3, 8, 8, generator=g)
    elif kind == "vit":
        model = ViT(image_size=8, patch_size=2, in_channels=3, dim=16, depth=2, heads=4, mlp_dim=24, num_classes=4)
        spec, sites = vit_spec(2, 4)
        x = torch.randn(32, 3, 8, 8, generator=g)
    else:
        raise AssertionError(kind)
    return randomize_norms(model, g), spec, sites, x


KINDS = ("mlp", "cnn_batch", "cnn_layer", "cnn_none", "resnet", "vit")


def permuted_copy(model, spec, perms):
    other = copy.deepcopy(model)
    other.load_state_dict(apply_permutations(spec, perms, model.state_dict()))
    return other


@pytest.mark.parametrize("kind", KINDS)
def test_spec_covers_model_and_preserves_function(kind):
    model, spec, sites, x = make_case(kind)
    sd = model.state_dict()
    sizes = spec.validate(sd)
    # every floating parameter with a unit axis is touched (only the output layer's rows are free)
    untouched = {k for k, v in model.named_parameters()} - set(spec.params)
    assert untouched == ({"6.bias"} if kind == "mlp" else {"head.bias"}), untouched
    perms = random_perms(spec, sizes, torch.Generator().manual_seed(7))
    other = permuted_copy(model, spec, perms)
    changed = [k for k in spec.params if not torch.equal(other.state_dict()[k], sd[k])]
    assert changed, "the random permutations changed nothing"
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_planted_permutation_recovered(kind):
    model, spec, sites, x = make_case(kind, seed=3)
    sd = model.state_dict()
    sizes = spec.validate(sd)
    planted = random_perms(spec, sizes, torch.Generator().manual_seed(11))
    other = permuted_copy(model, spec, planted)
    expected = {p: torch.argsort(v) for p, v in planted.items()}  # other unit planted[i] is model unit i

    found, info = weight_matching(spec, sd, other.state_dict(), seed=1, return_info=True)
    assert info["converged"]
    for p in sizes:
        assert torch.equal(found[p], expected[p]), p
    realigned = apply_permutations(spec, found, other.state_dict())
    for k, v in sd.items():
        assert torch.equal(realigned[k], v), k

    batches = list(x.split(max(1, x.shape[0] // 4)))
    found = activation_matching(spec, model, other, batches, sites)
    for p in sizes:
        assert torch.equal(found[p], expected[p]), p


def test_weight_matching_identity_on_same_model():
    model, spec, _, _ = make_case("mlp")
    perms = weight_matching(spec, model.state_dict(), model.state_dict())
    assert all(torch.equal(v, torch.arange(v.numel())) for v in perms.values())


def test_weight_matching_improves_alignment_of_independent_models():
    torch.manual_seed(0)
    a, b = MLP((8, 32, 32, 4)), MLP((8, 32, 32, 4))
    spec, _ = mlp_spec(3)
    sda, sdb = a.state_dict(), b.state_dict()
    perms = weight_matching(spec, sda, sdb, seed=0)
    aligned = apply_permutations(spec, perms, sdb)

    def dist(x):
        return sum(float((x[k] - sda[k]).pow(2).sum()) for k in spec.params)

    assert dist(aligned) < dist(sdb)
    # deterministic for a given seed
    again = weight_matching(spec, sda, sdb, seed=0)
    assert all(torch.equal(again[p], perms[p]) for p in perms)


def test_inverse_map_and_validation_errors():
    spec = PermutationSpec({"p": [("a.weight", 0), ("a.bias", 0), ("b.weight", 1)]})
    assert spec.params == {"a.weight": [("p", 0)], "a.bias": [("p", 0)], "b.weight": [("p", 1)]}
    sd = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(2, 4)}
    assert spec.validate(sd) == {"p": 4}
    with pytest.raises(ValueError, match="'a.bias'"):
        spec.validate({k: v for k, v in sd.items() if k != "a.bias"})
    with pytest.raises(ValueError, match="'p'.*different sizes"):
        spec.validate({**sd, "b.weight": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="out of range"):
        PermutationSpec({"p": [("a.bias", 1)]}).validate(sd)
    with pytest.raises(ValueError, match="permuted twice"):
        PermutationSpec({"p": [("a.weight", 0)], "q": [("a.weight", -2)]}).validate(sd)
    with pytest.raises(ValueError, match="at most 2"):
        PermutationSpec({"p": [("x", 0)], "q": [("x", 1)], "r": [("x", 2)]})
    with pytest.raises(ValueError, match="acts on no parameter"):
        PermutationSpec({"p": []})
    with pytest.raises(ValueError, match="unknown permutation"):
        PermutationSpec({"p": [("a.bias", 0)]}, heads={"q": 2})
    with pytest.raises(ValueError, match="heads do not divide"):
        PermutationSpec({"p": [("a.bias", 0)]}, heads={"p": 3}).validate(sd)
    # validated on construction when a state dict is given
    PermutationSpec({"p": [("a.weight", 0), ("a.bias", 0)]}, state_dict=sd)
    with pytest.raises(ValueError, match="'c.weight'"):
        PermutationSpec({"p": [("a.weight", 0), ("c.weight", 0)]}, state_dict=sd)


def test_apply_permutations_errors_and_copies():
    spec = PermutationSpec({"p": [("a.weight", 0), ("a.bias", 0), ("b.weight", 1)]})
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 4),
          "b.bias": torch.randn(2), "steps": torch.tensor(3)}
    perm = torch.tensor([2, 0, 3, 1])
    out = apply_permutations(spec, {"p": perm}, sd)
    assert list(out) == list(sd)
    assert torch.equal(out["a.weight"], sd["a.weight"][perm])
    assert torch.equal(out["b.weight"], sd["b.weight"][:, perm])
    assert torch.equal(out["b.bias"], sd["b.bias"]) and out["b.bias"] is not sd["b.bias"]
    assert torch.equal(out["steps"], sd["steps"])
    # missing permutations are the identity
    same = apply_permutations(spec, {}, sd)
    assert all(torch.equal(same[k], sd[k]) for k in sd)
    for bad, match in (([0, 1, 2], "'p' has length 3"), ([0, 1, 1, 2], "'p' is not a bijection"),
                       ([0, 1, 2, 4], "'p' is not a bijection"), ([0.0, 1.0, 2.0, 3.0], "'p' must be")):
        with pytest.raises(ValueError, match=match):
            apply_permutations(spec, {"p": torch.tensor(bad)}, sd)
    with pytest.raises(ValueError, match="not in the spec"):
        apply_permutations(spec, {"q": perm}, sd)
    with pytest.raises(ValueError, match="'a.bias' has dtype torch.float64"):
        apply_permutations(spec, {"p": perm}, {**sd, "a.bias": sd["a.bias"].double()})
    half = apply_permutations(spec, {"p": perm}, {k: v.bfloat16() for k, v in sd.items()})
    assert half["a.weight"].dtype == torch.bfloat16
    assert torch.equal(half["a.weight"], sd["a.weight"].bfloat16()[perm])
    headed = PermutationSpec({"p": [("a.bias", 0)]}, heads={"p": 2})
    apply_permutations(headed, {"p": torch.tensor([3, 2, 0, 1])}, sd)
    with pytest.raises(ValueError, match="whole heads"):
        apply_permutations(headed, {"p": torch.tensor([0, 2, 1, 3])}, sd)


def test_matching_argument_errors():
    model, spec, sites, x = make_case("mlp")
    sd = model.state_dict()
    with pytest.raises(ValueError, match="shapes differ"):
        weight_matching(spec, sd, {**sd, "6.weight": torch.zeros(6, 16)})
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, sd, sd, max_iter=0)
    with pytest.raises(ValueError, match="without an activation site.*hidden.1"):
        activation_matching(spec, model, model, [x], {k: v for k, v in sites.items() if k != "hidden.1"})
    with pytest.raises(ValueError, match="'nope' is not in"):
        activation_matching(spec, model, model, [x], {**sites, "hidden.1": "nope"})
    with pytest.raises(ValueError, match="no batch"):
        activation_matching(spec, model, model, [], sites)


def hf_state_dict(flavor, layers, dim, mlp_dim, generator, channels=3, patch=2, image=4, proj_dim=5):
    """Random weights under the parameter names and shapes of HF ViTModel / CLIPVisionModel."""
    def r(*shape):
        return torch.randn(*shape, generator=generator) / max(1, shape[-1]) ** 0.5 if len(shape) > 1 \
            else 0.3 * torch.randn(*shape, generator=generator)

    tokens = (image // patch) ** 2 + 1
    sd = {}
    if flavor == "vit":
        sd["embeddings.cls_token"] = r(1, 1, dim)
        sd["embeddings.position_embeddings"] = r(1, tokens, dim)
        sd["embeddings.patch_embeddings.projection.weight"] = r(dim, channels, patch, patch)
        sd["embeddings.patch_embeddings.projection.bias"] = r(dim)
        names = ("encoder.layer.{}.", "attention.attention.query", "attention.attention.key",
                 "attention.attention.value", "attention.output.dense", "intermediate.dense", "output.dense",
                 "layernorm_before", "layernorm_after")
    else:
        sd["vision_model.embeddings.class_embedding"] = r(dim)
        sd["vision_model.embeddings.patch_embedding.weight"] = r(dim, channels, patch, patch)
        sd["vision_model.embeddings.position_embedding.weight"] = r(tokens, dim)
        sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"] = 1 + r(dim), r(dim)
        names = ("vision_model.encoder.layers.{}.", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2")
    fmt, q, k, v, o, fc1, fc2, n1, n2 = names
    for i in range(layers):
        p = fmt.format(i)
        for m, shape in ((q, (dim, dim)), (k, (dim, dim)), (v, (dim, dim)), (o, (dim, dim)),
                         (fc1, (mlp_dim, dim)), (fc2, (dim, mlp_dim))):
            sd[f"{p}{m}.weight"], sd[f"{p}{m}.bias"] = r(*shape), r(shape[0])
        for m in (n1, n2):
            sd[f"{p}{m}.weight"], sd[f"{p}{m}.bias"] = 1 + r(dim), r(dim)
    if flavor == "vit":
        sd["layernorm.weight"], sd["layernorm.bias"] = 1 + r(dim), r(dim)
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = r(dim, dim), r(dim)
    else:
        sd["vision_model.post_layernorm.weight"], sd["vision_model.post_layernorm.bias"] = 1 + r(dim), r(dim)
        sd["visual_projection.weight"] = r(proj_dim, dim)
    return sd


class _HFSelfAttention(torch.nn.Module):
    """q/k/v Linears under HF names; returns ``(context,)`` (ViT) or applies ``out_proj`` (CLIP)."""

    def __init__(self, dim, heads, names, out=None):
        super().__init__()
        self.heads, self.names, self.out = heads, names, out
        for name in names + ((out,) if out else ()):
            self.add_module(name, torch.nn.Linear(dim, dim))

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = (getattr(self, m)(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in self.names)
        ctx = (torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v).transpose(1, 2)
        ctx = ctx.reshape(b, t, d)
        return (getattr(self, self.out)(ctx) if self.out else ctx,)


class _HFLayer(torch.nn.Module):
    """A pre-norm encoder layer under HF ViT (``ViTLayer``) or CLIP (``CLIPEncoderLayer``) names;
    returns a tuple like HF."""

    def __init__(self, flavor, dim, heads, mlp_dim):
        super().__init__()
        nn = torch.nn
        self.flavor = flavor
        if flavor == "vit":
            self.layernorm_before, self.layernorm_after = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attention = nn.Module()
            self.attention.attention = _HFSelfAttention(dim, heads, ("query", "key", "value"))
            self.attention.output = nn.Module()
            self.attention.output.dense = nn.Linear(dim, dim)
            self.intermediate, self.output = nn.Module(), nn.Module()
            self.intermediate.dense, self.output.dense = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        else:
            self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.self_attn = _HFSelfAttention(dim, heads, ("q_proj", "k_proj", "v_proj"), out="out_proj")
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x):
        gelu = torch.nn.functional.gelu
        if self.flavor == "vit":
            att = self.attention
            x = x + att.output.dense(att.attention(self.layernorm_before(x))[0])
            return (x + self.output.dense(gelu(self.intermediate.dense(self.layernorm_after(x)))),)
        x = x + self.self_attn(self.layer_norm1(x))[0]
        return (x + self.mlp.fc2(gelu(self.mlp.fc1(self.layer_norm2(x)))),)


class HFVisionModel(torch.nn.Module):
    """A stand-in with the module and parameter names of HF ``ViTModel`` (with pooler) or
    ``CLIPVisionModelWithProjection``; returns (pooled or projected output, last hidden state)."""

    def __init__(self, flavor, layers, dim, heads, mlp_dim, channels=3, patch=2, image=4, proj_dim=5):
        super().__init__()
        nn = torch.nn
        self.flavor = flavor
        tokens = (image // patch) ** 2 + 1
        emb = nn.Module()
        encoder = nn.Module()
        layer_list = nn.ModuleList(_HFLayer(flavor, dim, heads, mlp_dim) for _ in range(layers))
        if flavor == "vit":
            emb.cls_token = nn.Parameter(torch.randn(1, 1, dim))
            emb.position_embeddings = nn.Parameter(torch.randn(1, tokens, dim))
            emb.patch_embeddings = nn.Module()
            emb.patch_embeddings.projection = nn.Conv2d(channels, dim, patch, stride=patch)
            encoder.layer = layer_list
            self.embeddings, self.encoder, self.layernorm = emb, encoder, nn.LayerNorm(dim)
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(dim, dim)
        else:
            emb.class_embedding = nn.Parameter(torch.randn(dim))
            emb.patch_embedding = nn.Conv2d(channels, dim, patch, stride=patch, bias=False)
            emb.position_embedding = nn.Embedding(tokens, dim)
            encoder.layers = layer_list
            self.vision_model = nn.Module()
            vm = self.vision_model
            vm.embeddings, vm.pre_layrnorm, vm.encoder = emb, nn.LayerNorm(dim), encoder
            vm.post_layernorm = nn.LayerNorm(dim)
            self.visual_projection = nn.Linear(dim, proj_dim, bias=False)

    def forward(self, pixels):
        if self.flavor == "vit":
            emb, layers = self.embeddings, self.encoder.layer
            x = emb.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], 1) + emb.position_embeddings
        else:
            emb, layers = self.vision_model.embeddings, self.vision_model.encoder.layers
            x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), x], 1) + emb.position_embedding.weight
            x = self.vision_model.pre_layrnorm(x)
        for layer in layers:
            x = layer(x)[0]
        if self.flavor == "vit":
            x = self.layernorm(x)
            return torch.tanh(self.pooler.dense(x[:, 0])), x
        return self.visual_projection(self.vision_model.post_layernorm(x[:, 0])), x


@pytest.mark.parametrize("flavor", ["vit", "clip"])
def test_hf_vit_spec_names_and_function(flavor):
    layers, dim, heads, mlp_dim = 2, 12, 3, 20
    g = torch.Generator().manual_seed(5)
    sd = hf_state_dict(flavor, layers, dim, mlp_dim, g)
    config = {"num_hidden_layers": layers, "hidden_size": dim, "num_attention_heads": heads,
              "intermediate_size": mlp_dim}
    head = None if flavor == "vit" else "visual_projection"
    spec, sites = hf_vit_spec(config if flavor == "vit" else types.SimpleNamespace(**config),
                              flavor=flavor, head=head)
    sizes = spec.validate(sd)
    assert sizes["residual"] == dim and sizes["layer.1.attn.qk"] == dim and sizes["layer.0.mlp"] == mlp_dim
    assert spec.heads == {f"layer.{i}.attn.{m}": heads for i in range(layers) for m in ("qk", "vo")}
    assert spec.attention["layer.0.attn"] == AttentionGroup("layer.0.attn.qk", "layer.0.attn.qk", "layer.0.attn.vo",
                                                            "layer.0.attn.vo", heads, heads, True)
    untouched = set(sd) - set(spec.params)
    assert untouched == ({"pooler.dense.bias"} if flavor == "vit" else set()), untouched
    assert set(sites) == set(spec.perms)
    layer0 = "encoder.layer.0" if flavor == "vit" else "vision_model.encoder.layers.0"
    assert sites["residual"][0] == layer0
    assert sites["layer.0.attn.vo"][1] == ((f"{layer0}.attention.output.dense" if flavor == "vit"
                                            else f"{layer0}.self_attn.out_proj"), "input")

    model = HFVisionModel(flavor, layers, dim, heads, mlp_dim).eval()
    model.load_state_dict(sd)  # strict: the stand-in has exactly these names and shapes
    perms = random_perms(spec, sizes, g)
    permuted = apply_permutations(spec, perms, sd)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    pixels = torch.randn(64, 3, 4, 4, generator=g)
    with torch.no_grad():
        pooled, hidden = model(pixels)
        pooled_p, hidden_p = other(pixels)
    torch.testing.assert_close(pooled_p, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_p, hidden.index_select(-1, perms["residual"]), rtol=1e-5, atol=1e-5)

    expected = {p: torch.argsort(v) for p, v in perms.items()}
    found = weight_matching(spec, sd, permuted, seed=2)
    assert all(torch.equal(found[p], expected[p]) for p in sizes)
    found = activation_matching(spec, model, other, list(pixels.split(16)), sites)
    assert all(torch.equal(found[p], expected[p]) for p in sizes)


def test_hf_vit_spec_prefix_and_errors():
    config = {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2}
    spec, sites = hf_vit_spec(config, prefix="vit.", head="classifier", pooler=False)
    assert ("vit.embeddings.cls_token", 2) in spec.perms["residual"]
    assert ("classifier.weight", 1) in spec.perms["residual"]
    assert not any(k.startswith("vit.pooler") for k in spec.params)
    assert sites["layer.0.mlp"] == "vit.encoder.layer.0.intermediate.dense"
    with pytest.raises(ValueError, match="flavor"):
        hf_vit_spec(config, flavor="bert")
    with pytest.raises(ValueError, match="not divisible"):
        hf_vit_spec({**config, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        hf_vit_spec({"hidden_size": 8, "num_attention_heads": 2})


def test_matching_options():
    model, spec, sites, x = make_case("resnet", seed=4)
    sizes = spec.validate(model.state_dict())
    planted = random_perms(spec, sizes, torch.Generator().manual_seed(2))
    other = permuted_copy(model, spec, planted)
    expected = {p: torch.argsort(v) for p, v in planted.items()}
    # (input, label) batches, max_batches, returned correlations (one site per block for a stage)
    batches = [(chunk, None) for chunk in x.split(4)]
    found, corr = activation_matching(spec, model, other, batches, sites, max_batches=2, return_correlations=True)
    assert all(torch.equal(found[p], expected[p]) for p in sizes)
    for p, c in corr.items():
        n_sites = 1 if isinstance(sites[p], str) else len(sites[p])
        diag = c[torch.arange(c.shape[0]), expected[p]]
        torch.testing.assert_close(diag, torch.full_like(diag, float(n_sites)), rtol=0, atol=1e-6)
    calls = []

    def forward(m, batch):
        calls.append(batch["pixels"].shape[0])
        return m(batch["pixels"])

    found = activation_matching(spec, model, other, [{"pixels": x}], sites, forward=forward)
    assert calls == [16, 16] and all(torch.equal(found[p], expected[p]) for p in sizes)
    # weight matching started at the answer stays there after one sweep
    found, info = weight_matching(spec, model.state_dict(), other.state_dict(), init=expected, return_info=True)
    assert (info["sweeps"], info["converged"], info["restart"]) == (1, True, 0)
    assert all(torch.equal(found[p], expected[p]) for p in sizes)
    with pytest.raises(ValueError, match="'stage1' is not a bijection"):
        weight_matching(spec, model.state_dict(), other.state_dict(), init={"stage1": torch.zeros(10).long()})
    with pytest.raises(ValueError, match="not in the spec"):
        weight_matching(spec, model.state_dict(), other.state_dict(), init={"nope": torch.arange(3)})


@pytest.mark.parametrize("flavor", ["vit-v5", "clip"])
def test_hf_spec_on_real_transformers_models(flavor):
    """The spec names every parameter of a real (tiny, randomly initialised) transformers model,
    and permuting by it preserves the function: the last hidden state comes back permuted."""
    transformers = pytest.importorskip("transformers", minversion="5")
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  image_size=16, patch_size=8)
    if flavor == "clip":
        config = transformers.CLIPVisionConfig(**kwargs)
        model = transformers.CLIPVisionModel(config).eval()
        spec, _ = hf_vit_spec(config, flavor="clip", prefix="")
    else:
        config = transformers.ViTConfig(**kwargs)
        model = transformers.ViTModel(config).eval()
        spec, _ = hf_vit_spec(config, flavor="vit-v5")
    sd = model.state_dict()
    sizes = spec.validate(sd)
    assert set(spec.params) <= set(sd)
    gen = torch.Generator().manual_seed(0)
    perms = random_perms(spec, sizes, gen)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutations(spec, perms, sd))
    pixels = torch.randn(3, 3, 16, 16, generator=gen)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[..., perms["residual"]]
        actual = permuted(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_numeric_parameters_range_checked():
    """Every numeric parameter of the align API is refused out of range (ValueError) or of the wrong
    type (TypeError), naming the parameter and the bad value."""
    model, spec, sites, x = make_case("mlp")
    sd = model.state_dict()
    for value, error, match in ((0, ValueError, "max_iter must be >= 1, got 0"),
                                (-3, ValueError, "max_iter must be >= 1, got -3"),
                                (2.0, TypeError, "max_iter must be an int, got 2.0"),
                                (True, TypeError, "max_iter must be an int, got True")):
        with pytest.raises(error, match=match):
            weight_matching(spec, sd, sd, max_iter=value)
    for value in (None, 1.5, "0", False):
        with pytest.raises(TypeError, match=f"seed must be an int, got {value!r}"):
            weight_matching(spec, sd, sd, seed=value)
    assert all(torch.equal(a, b) for a, b in zip(weight_matching(spec, sd, sd, seed=-5).values(),
                                                  weight_matching(spec, sd, sd, seed=torch.tensor(-5)).values()))
    for value, error, match in ((0, ValueError, "max_batches must be >= 1, got 0"),
                                (-1, ValueError, "max_batches must be >= 1, got -1"),
                                (1.0, TypeError, "max_batches must be an int, got 1.0")):
        with pytest.raises(error, match=match):
            activation_matching(spec, model, model, [x], sites, max_batches=value)
    with pytest.raises(TypeError, match="other_model must be a torch.nn.Module, got OrderedDict"):
        activation_matching(spec, model, sd, [x], sites)
    with pytest.raises(ValueError, match="num_heads of permutation 'p' must be >= 1, got 0"):
        PermutationSpec({"p": [("a", 0)]}, heads={"p": 0})
    with pytest.raises(TypeError, match="num_heads of permutation 'p' must be an int, got True"):
        PermutationSpec({"p": [("a", 0)]}, heads={"p": True})
    with pytest.raises(ValueError, match="size of permutation 'p' must be >= 0, got -1"):
        check_permutation("p", [], -1)
    with pytest.raises(ValueError, match="heads of permutation 'p' must be >= 1, got 0"):
        check_permutation("p", [0, 1], 2, heads=0)
    with pytest.raises(ValueError, match="'p': 3 heads do not divide size 4"):
        check_permutation("p", [0, 1, 2, 3], 4, heads=3)
    builders = [(mlp_spec, {"num_layers": 1}, ValueError, "num_layers must be >= 2, got 1"),
                (mlp_spec, {"num_layers": 2.5}, TypeError, "num_layers must be an int, got 2.5"),
                (cnn_spec, {"num_layers": 0}, ValueError, "num_layers must be >= 1, got 0"),
                (resnet_spec, {"num_stages": 0, "blocks_per_stage": 1}, ValueError, "num_stages must be >= 1, got 0"),
                (resnet_spec, {"num_stages": 1, "blocks_per_stage": -2}, ValueError,
                 "blocks_per_stage must be >= 1, got -2"),
                (vit_spec, {"depth": 0, "heads": 2}, ValueError, "depth must be >= 1, got 0"),
                (vit_spec, {"depth": 1, "heads": 0}, ValueError, "heads must be >= 1, got 0"),
                (hf_vit_spec, {"config": {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 0}},
                 ValueError, "config's num_attention_heads must be >= 1, got 0"),
                (hf_vit_spec, {"config": {"num_hidden_layers": 1.5, "hidden_size": 8, "num_attention_heads": 2}},
                 TypeError, "config's num_hidden_layers must be an int, got 1.5")]
    for builder, kwargs, error, match in builders:
        with pytest.raises(error, match=match):
            builder(**kwargs)
    models = [(MLP, {"sizes": (4,)}, ValueError, r"sizes needs at least 2 entries, got \[4\]"),
              (MLP, {"sizes": (4, 0, 2)}, ValueError, r"sizes\[1\] must be >= 1, got 0"),
              (CNN, {"widths": ()}, ValueError, r"widths needs at least 1 entries"),
              (CNN, {"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
              (ResNet, {"blocks_per_stage": 0}, ValueError, "blocks_per_stage must be >= 1, got 0"),
              (ResNet, {"in_channels": 2.0}, TypeError, "in_channels must be an int, got 2.0"),
              (ViT, {"patch_size": 3}, ValueError, "patch_size 3 does not divide image_size 8"),
              (ViT, {"heads": 0}, ValueError, "heads must be >= 1, got 0"),
              (ViT, {"depth": -1}, ValueError, "depth must be >= 1, got -1")]
    for cls, kwargs, error, match in models:
        with pytest.raises(error, match=match):
            cls(**kwargs)


def residual_mlp_case(seed, dim=12, hidden=24, blocks=3):
    """A unit-Gaussian residual MLP (``in``, blocks ``x + fc2(relu(fc1 x))``, ``out``) and a copy
    with planted permutations of the residual stream and of every block's hidden units."""
    g = torch.Generator().manual_seed(seed)
    sd = {"in.weight": torch.randn(dim, 8, generator=g), "out.weight": torch.randn(4, dim, generator=g)}
    perms = {"residual": [("in.weight", 0), ("out.weight", 1)]}
    for b in range(blocks):
        sd[f"b{b}.fc1.weight"], sd[f"b{b}.fc2.weight"] = torch.randn(hidden, dim, generator=g), torch.randn(dim, hidden, generator=g)
        perms["residual"] += [(f"b{b}.fc1.weight", 1), (f"b{b}.fc2.weight", 0)]
        perms[f"b{b}"] = [(f"b{b}.fc1.weight", 0), (f"b{b}.fc2.weight", 1)]
    spec = PermutationSpec(perms)
    planted = random_perms(spec, spec.validate(sd), g)
    return spec, sd, apply_permutations(spec, planted, sd), {p: torch.argsort(v) for p, v in planted.items()}


def test_weight_matching_restarts_keep_the_best_objective():
    """One visiting order often stops in a local optimum on a unit-Gaussian residual MLP; the best
    of 8 orders recovers the planted permutation on every seed, with the objective of the planted
    answer (the sum of squares of the permuted weights)."""
    single = best = 0
    for seed in range(20):
        spec, sd, other, expected = residual_mlp_case(seed)
        one, info_one = weight_matching(spec, sd, other, seed=seed, return_info=True)
        found, info = weight_matching(spec, sd, other, seed=seed, restarts=8, return_info=True)
        assert len(info["objectives"]) == 8 and info["objectives"][0] == info_one["objective"]
        assert info["objective"] == max(info["objectives"]) == info["objectives"][info["restart"]]
        assert all(torch.equal(one[p], v) for p, v in weight_matching(spec, sd, other, seed=seed).items())
        single += all(torch.equal(one[p], expected[p]) for p in expected)
        if all(torch.equal(found[p], expected[p]) for p in expected):
            best += 1
            planted_value = sum(float(sd[k].double().pow(2).sum()) for k in spec.params)
            assert info["objective"] == pytest.approx(planted_value, rel=1e-6)
    assert single <= 14 and best == 20, (single, best)
    with pytest.raises(ValueError, match="restarts must be >= 1, got 0"):
        weight_matching(spec, sd, other, restarts=0)


def test_assignment_accelerator_reaches_scipys_optimum(monkeypatch):
    """With lapx installed, the assignment (flat and head-structured) reaches scipy's objective:
    exactly on small-integer scores full of ties (float64 sums of integers are exact), with the
    same permutation on Gaussian scores, whose optimum is unique; the caller's score is left as it
    was (lapx negates it in place and back)."""
    lap = pytest.importorskip("lap", reason="lapx not installed")
    if not hasattr(lap, "lapjvh"):
        pytest.skip("the installed lap module is not lapx's (no lapjvh)")
    from nlmerge.align import _assign

    assert _assign._lapjvh is not None
    g = torch.Generator().manual_seed(0)
    cases = []
    for n, heads in ((1, None), (2, None), (7, None), (64, None), (300, None), (64, 4), (96, 8)):
        cases += [("ties", torch.randint(0, 4, (n, n), generator=g).double(), heads),
                  ("zeros", torch.zeros(n, n, dtype=torch.float64), heads),
                  ("gauss", torch.randn(n, n, generator=g, dtype=torch.float64), heads)]
    kept = [s.clone() for _, s, _ in cases]
    fast = [_assign.solve_assignment(s, heads) for _, s, heads in cases]
    monkeypatch.setattr(_assign, "_lapjvh", None)
    for (kind, s, heads), perm, before in zip(cases, fast, kept):
        assert torch.equal(s, before), "the score negated in place was not restored"
        ref = _assign.solve_assignment(s, heads)
        check_permutation(f"{kind} n={s.shape[0]}", perm, s.shape[0], heads)
        assert _assign.assignment_score(s, perm) == _assign.assignment_score(s, ref), (kind, s.shape, heads)
        if kind == "gauss":
            assert torch.equal(perm, ref), (s.shape, heads)


def test_assignment_refuses_non_finite_scores():
    """NaN or Inf anywhere is refused; finite scores whose sum overflows are solved."""
    from nlmerge.align._assign import solve_assignment

    for bad in (float("nan"), float("inf"), -float("inf")):
        score = torch.zeros(5, 5, dtype=torch.float64)
        score[3, 1] = bad
        with pytest.raises(ValueError, match="score has non-finite entries"):
            solve_assignment(score)
    huge = torch.full((3, 3), 1e308, dtype=torch.float64)
    huge[0, 2] = huge[1, 0] = huge[2, 1] = 1.7e308  # the sum overflows; the best assignment is (2, 0, 1)
    assert solve_assignment(huge).tolist() == [2, 0, 1]
