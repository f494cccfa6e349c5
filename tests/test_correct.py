"""TACT / REPAIR correction: statistics matched, REPAIR == TACT with one target, folding, collapse
undone, errors."""
import copy

import pytest
import torch
from torch import nn

from nlmerge.align import apply_permutations, mlp_spec, weight_matching
from nlmerge.align.models import CNN, MLP, ViT, ResNet
from nlmerge.correct import (CorrectedModel, SiteStats, activation_stats, correct_to, default_sites, fold,
                             fold_problem, repair, repair_targets, tact, variance_ratio)

IN_SHAPES = {"mlp": (12,), "cnn": (3, 6, 6), "resnet": (3, 8, 8), "vit": (3, 8, 8)}


def make(kind, seed):
    torch.manual_seed(seed)
    model = {"mlp": lambda: MLP((12, 16, 16, 5)), "cnn": lambda: CNN(widths=(6, 10)),
             "resnet": lambda: ResNet(widths=(4, 8), blocks_per_stage=1), "vit": lambda: ViT()}[kind]()
    with torch.no_grad():  # non-trivial norm parameters and running statistics
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0, 0.3)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def average(models):
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    out.load_state_dict({k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype)
                         if sds[0][k].is_floating_point() else sds[0][k] for k in sds[0]})
    return out.eval()


def loader(kind, seed, batches=3, size=16, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((size, *IN_SHAPES[kind]), generator=g) + shift for _ in range(batches)]


def assert_stats_match(got, want, tol=1e-4):
    for site in want:
        g, w = got[site], want[site]
        scale = w.std + w.mean.abs()
        assert ((g.mean - w.mean).abs() <= tol * scale).all(), f"site {site}: means differ"
        assert ((g.std - w.std).abs() <= tol * w.std).all(), f"site {site}: stds differ"


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet", "vit"])
def test_tact_matches_expert_statistics(kind):
    experts = [make(kind, 1), make(kind, 2)]
    merged = average(experts)
    data = [loader(kind, 10), loader(kind, 11, shift=0.5)]
    corrected = tact(merged, experts, data, eps=1e-10)
    assert len(corrected) == 2 and all(c.model is merged for c in corrected)  # shared weights
    sites = default_sites(merged)
    assert set(corrected[0].sites) == set(sites)
    for t in range(2):
        want = activation_stats(experts[t], data[t], sites)
        got = activation_stats(corrected[t], data[t], sites)
        assert_stats_match(got, want)
    # per-task corrections differ; the merged model itself is left uncorrected
    assert not torch.equal(corrected[0].correction(sites[0])[0], corrected[1].correction(sites[0])[0])
    x = data[0][0]
    assert not torch.allclose(merged(x), corrected[0](x))


def test_tact_one_merged_model_per_task():
    experts = [make("mlp", 1), make("mlp", 2)]
    merged = [average(experts), copy.deepcopy(experts[1])]
    data = [loader("mlp", 3), loader("mlp", 4)]
    corrected = tact(merged, experts, data, eps=1e-10)
    assert corrected[0].model is merged[0] and corrected[1].model is merged[1]
    assert_stats_match(activation_stats(corrected[1], data[1]), activation_stats(experts[1], data[1]))


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_repair_equals_tact_with_one_target(kind):
    experts = [make(kind, 1), make(kind, 2)]
    merged = average(experts)
    data = loader(kind, 5)
    # one task
    t = tact(merged, [experts[0]], [data])[0]
    r = repair(merged, [experts[0]], [data])
    # identical experts and data: every task has the same target
    r2 = repair(merged, [experts[0], copy.deepcopy(experts[0])], [data, list(data)])
    for site in t.sites:
        for other in (r, r2):
            for a, b in zip(t.correction(site), other.correction(site)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    x = data[0]
    torch.testing.assert_close(t(x), r(x), rtol=1e-5, atol=1e-5)


def test_repair_targets_average_of_experts():
    experts = [make("mlp", 1), make("mlp", 2)]
    merged = average(experts)
    data = [loader("mlp", 6), loader("mlp", 7)]
    r = repair(merged, experts, data, eps=1e-10)
    sites = default_sites(merged)
    ex = [activation_stats(e, d, sites) for e, d in zip(experts, data)]
    got = activation_stats(r, data[0] + data[1], sites)
    for s in sites:
        torch.testing.assert_close(got[s].mean, (ex[0][s].mean + ex[1][s].mean) / 2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[s].std, (ex[0][s].std + ex[1][s].std) / 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet", "vit"])
def test_fold_matches_inserted_correction(kind):
    experts = [make(kind, 1), make(kind, 2)]
    merged = average(experts)
    data = [loader(kind, 8), loader(kind, 9)]
    # residual-stream sites (block outputs) cannot be folded: keep layer outputs and input sites
    modules = dict(merged.named_modules())
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    sites = [s for s in default_sites(merged) if isinstance(s, tuple) or isinstance(modules[s], layers)]
    assert len(sites) < len(default_sites(merged)) or kind in ("mlp", "cnn")
    corrected = tact(merged, experts, data, sites=sites)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    for t, c in enumerate(corrected):
        folded = copy.deepcopy(merged)
        folded.load_state_dict(fold(c))
        x = data[t][0]
        with torch.no_grad():
            torch.testing.assert_close(folded(x), c(x), rtol=1e-4, atol=1e-5)
    for k, v in merged.state_dict().items():  # fold does not touch the shared model
        assert torch.equal(v, before[k])


def test_fold_refuses_residual_site():
    experts = [make("resnet", 1)]
    merged = average(experts + [make("resnet", 2)])
    c = tact(merged, experts, [loader("resnet", 1)], sites=["stem.1", "stages.0.0"])[0]
    with pytest.raises(ValueError, match="stages.0.0"):
        fold(c)


def test_variance_collapse_undone():
    torch.manual_seed(0)
    a, b = MLP((12, 64, 64, 5)).eval(), MLP((12, 64, 64, 5)).eval()
    spec, _ = mlp_spec(3)
    perms = weight_matching(spec, a.state_dict(), b.state_dict())
    b_aligned = copy.deepcopy(b)
    b_aligned.load_state_dict(apply_permutations(spec, perms, b.state_dict()))
    merged = average([a, b_aligned])
    data = loader("mlp", 3, batches=4, size=64)
    before = variance_ratio(merged, a, data)
    assert min(before.values()) < 0.9, before  # collapsed
    corrected = tact(merged, [a, b_aligned], [data, data])
    for t, expert in enumerate((a, b_aligned)):
        after = variance_ratio(corrected[t], expert, data)
        for site, ratio in after.items():
            assert abs(ratio - 1) <= 1e-3, (site, ratio)
    r = repair(merged, [a], [data])
    assert all(abs(v - 1) <= 1e-3 for v in variance_ratio(r, a, data).values())


def test_error_unknown_site():
    m = make("mlp", 1)
    with pytest.raises(ValueError, match="nope"):
        tact(m, [m], [loader("mlp", 1)], sites=["0", "nope"])
    with pytest.raises(ValueError, match="nope"):
        activation_stats(m, loader("mlp", 1), ["nope"])
    with pytest.raises(ValueError, match="nope"):
        variance_ratio(m, m, loader("mlp", 1), ["nope"])


def test_error_empty_loader():
    m = make("mlp", 1)
    with pytest.raises(ValueError, match=r"data\[1\].*empty"):
        tact(m, [m, m], [loader("mlp", 1), []])
    with pytest.raises(ValueError, match="empty"):
        repair(m, [m], [iter([])])
    with pytest.raises(ValueError, match="empty"):
        activation_stats(m, [])


def test_error_channel_mismatch():
    torch.manual_seed(0)
    merged, expert = MLP((12, 8, 5)).eval(), MLP((12, 9, 5)).eval()
    with pytest.raises(ValueError, match=r"site '0'.*8.*9"):
        tact(merged, [expert], [loader("mlp", 1)])
    with pytest.raises(ValueError, match=r"site '0'"):
        repair(merged, [expert], [loader("mlp", 1)])
    with pytest.raises(ValueError, match=r"site '0'"):
        variance_ratio(merged, expert, loader("mlp", 1))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet", "vit"])
def test_activation_stats_backends_agree(kind):
    """The "cpu" backend reads conv activations in place (channels at axis 1), the reference moves
    them last: same statistics."""
    from nlmerge import kernels

    if kernels.load("cpu")[0] is None:
        pytest.skip("C++ extension not built")
    model, data = make(kind, 1), loader(kind, 5, shift=3.0)
    fast, ref = activation_stats(model, data, backend="cpu"), activation_stats(model, data, backend="torch")
    assert list(fast) == list(ref)
    for site in ref:
        assert fast[site].count == ref[site].count
        torch.testing.assert_close(fast[site].mean, ref[site].mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast[site].var, ref[site].var, rtol=1e-8, atol=1e-12)


def test_default_sites_rule():
    assert default_sites(MLP((4, 8, 8, 3))) == ["0", "2"]  # head excluded
    assert default_sites(CNN(widths=(4, 6))) == ["features.1", "features.4"]  # conv -> its BN
    vit = default_sites(ViT(depth=1))
    assert ("blocks.0.attn.proj", "input") in vit and "blocks.0" in vit
    assert not any(isinstance(s, str) and s.startswith("blocks.0.attn.") for s in vit)
    res = default_sites(ResNet(widths=(4, 8), blocks_per_stage=1))
    assert "stages.1.0" in res and "stages.1.0.shortcut.1" in res and "stages.1.0.conv1" not in res


def test_corrected_model_is_a_module():
    m = make("mlp", 1)
    c = tact(m, [make("mlp", 2)], [loader("mlp", 1)])[0]
    assert isinstance(c, CorrectedModel)
    assert any(k.startswith("scale_") for k in c.state_dict())


def test_error_site_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 12)
            self.head = nn.Linear(12, 5)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    torch.manual_seed(0)
    m = Twice().eval()
    with pytest.raises(ValueError, match=r"more than once.*'fc': 2"):
        tact(m, [m], [loader("mlp", 1)], sites=["fc"])
    with pytest.raises(ValueError, match=r"more than once.*'fc': 2"):
        repair(m, [m], [loader("mlp", 1)], sites=["fc"])


def constant_channel_case():
    """An MLP whose merged model has a constant channel 0 at site "0" (merged variance exactly 0)."""
    expert, merged = make("mlp", 1), make("mlp", 2)
    with torch.no_grad():
        merged[0].weight[0].zero_()
    return merged, expert, loader("mlp", 7)


@pytest.mark.parametrize("fn", [tact, repair])
@pytest.mark.parametrize("eps, error, match", [
    (0.0, ValueError, r"eps must be finite and > 0.*got 0\.0$"),
    (-1, ValueError, r"eps must be finite and > 0.*got -1$"),
    (float("nan"), ValueError, r"eps must be finite.*got nan$"),
    (float("inf"), ValueError, r"eps must be finite.*got inf$"),
    ("1e-5", TypeError, r"eps must be a real number, got '1e-5'"),
    (True, TypeError, r"eps must be a real number, got True"),
    (None, TypeError, r"eps must be a real number, got None"),
])
def test_eps_refused(fn, eps, error, match):
    merged, expert, data = constant_channel_case()
    with pytest.raises(error, match=match):
        fn(merged, [expert], [data], eps=eps)


def test_constant_channel_corrected_to_expert_mean():
    """With the default eps a channel of merged variance 0 is moved to the expert's mean (finite);
    an eps so small that the scale overflows float32 is refused naming the site and channel."""
    merged, expert, data = constant_channel_case()
    for fn in (lambda: tact(merged, [expert], [data])[0], lambda: repair(merged, [expert], [data])):
        c = fn()
        scale, shift = c.correction("0")
        assert torch.isfinite(scale).all() and torch.isfinite(shift).all()
        got, want = activation_stats(c, data, ["0"])["0"], activation_stats(expert, data, ["0"])["0"]
        torch.testing.assert_close(got.mean[0], want.mean[0], rtol=1e-5, atol=1e-5)
        assert got.var[0] == 0
    with pytest.raises(ValueError, match=r"site '0': the correction's scale is not finite in float32 \(channel 0: inf\)"):
        tact(merged, [expert], [data], eps=1e-300)


def test_add_site_checks():
    m = make("mlp", 1)
    c = CorrectedModel(m)
    c.add_site(("2", "input"), torch.ones(16), torch.zeros(16))
    assert c.sites == [("2", "input")]
    c.add_site(["2", "input"], [2.0] * 16, [1.0] * 16)  # same site, replaced
    assert c.sites == [("2", "input")] and torch.equal(c.correction(("2", "input"))[0], torch.full((16,), 2.0))
    with pytest.raises(ValueError, match="site 'nope' is not a module of the merged model"):
        c.add_site("nope", torch.ones(16), torch.zeros(16))
    with pytest.raises(ValueError, match="site '0': scale has 16 channels, shift has 15"):
        c.add_site("0", torch.ones(16), torch.zeros(15))
    bad = torch.ones(16)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"site '0': the correction's shift is not finite in float32 \(channel 3: nan\)"):
        c.add_site("0", torch.ones(16), bad)
    with pytest.raises(ValueError, match=r"scale is not finite in float32 \(channel 0: inf\)"):
        c.add_site("0", torch.full((16,), 1e39, dtype=torch.float64), torch.zeros(16))
    assert c.sites == [("2", "input")]
    with pytest.raises(TypeError, match="the model must be a torch.nn.Module, got OrderedDict"):
        activation_stats(m.state_dict(), loader("mlp", 1))
    with pytest.raises(TypeError, match="expert 0 must be a torch.nn.Module"):
        tact(m, [m.state_dict()], [loader("mlp", 1)], sites=["0"])


class _Tokens(nn.Module):
    """Embedding then Linear: activations [B, L, C] and keyword inputs, as a language model has."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 5)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def test_attention_mask_limits_statistics_to_its_positions():
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.randint(0, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        rows = model(ids)[mask.bool()].double()  # the 12 positions the mask keeps, by hand
    got = activation_stats(model, [{"input_ids": ids, "attention_mask": mask}], ["lin"])["lin"]
    assert got.count == 4 + 7 + 1
    torch.testing.assert_close(got.mean, rows.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.var, rows.var(0, unbiased=False), rtol=1e-6, atol=1e-7)
    unmasked = activation_stats(model, [{"input_ids": ids}], ["lin"])["lin"]
    assert unmasked.count == 21 and not torch.allclose(unmasked.mean, got.mean)


def test_correct_to_is_tact_and_repair_with_measured_targets():
    experts = [make("mlp", 1), make("mlp", 2)]
    merged = average(experts)
    data = [loader("mlp", 3), loader("mlp", 4, shift=0.5)]
    sites = default_sites(merged)
    stats = [activation_stats(e, d, sites) for e, d in zip(experts, data)]
    for t, c in enumerate(tact(merged, experts, data)):
        own = correct_to(merged, stats[t], data[t])
        for s in sites:
            assert all(torch.equal(a, b) for a, b in zip(own.correction(s), c.correction(s))), s
    shared = repair(merged, experts, data)
    own = correct_to(merged, repair_targets(stats), data[0] + data[1])
    for s in sites:
        assert all(torch.equal(a, b) for a, b in zip(own.correction(s), shared.correction(s))), s


def test_repair_targets_by_hand():
    a = {"x": SiteStats(10, torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64))}
    b = {"x": SiteStats(6, torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([9.0, 16.0], dtype=torch.float64))}
    got = repair_targets([a, b])["x"]
    assert got.count == 16
    assert torch.equal(got.mean, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert torch.equal(got.var, torch.tensor([4.0, 9.0], dtype=torch.float64))  # (mean std)^2: (1+3)/2, (2+4)/2
    c = {"x": SiteStats(1, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))}
    with pytest.raises(ValueError, match="site 'x': merged model has 2 channels, expert has 3"):
        repair_targets([a, c])
    with pytest.raises(ValueError, match="site 'x' has no statistics for task 1"):
        repair_targets([a, {}])
    with pytest.raises(ValueError, match="at least one task"):
        repair_targets([])


def test_fold_problem():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.LayerNorm(4, bias=False),
                          nn.LayerNorm(4), nn.LayerNorm((2, 2)))
    assert fold_problem(model, "0") is None
    assert fold_problem(model, ("0", "input")) is None
    assert fold_problem(model, "4") is None
    assert fold_problem(model, "2") == "is a Linear without a bias to take the shift"
    assert fold_problem(model, "2", shift=False) is None
    assert fold_problem(model, ("2", "input")) == "is a Linear without a bias to take the shift"
    assert fold_problem(model, "3") == "is a LayerNorm without a bias to take the shift"
    assert fold_problem(model, "1") == "is the output of ReLU, not of a linear, conv or norm layer"
    assert fold_problem(model, ("1", "input")) == "is the input of ReLU: only the input of a Linear can be folded"
    assert fold_problem(model, "5") == "is the output of LayerNorm normalizing over (2, 2), not one channel axis"
    assert fold_problem(model, "") == "is the whole model"
    with pytest.raises(ValueError, match="site 'nope' is not a module of the model"):
        fold_problem(model, "nope")
