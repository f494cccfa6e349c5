"""The caller's models are never changed by alignment or correction: statistics are measured in eval
mode whatever mode the models came in, and every parameter, buffer, module ``training`` flag and hook
dict is as it was after the call, also when the call raises midway."""
import copy

import pytest
import torch
from torch import nn

from nlmerge import align, correct
from nlmerge.align.models import CNN

KINDS = ("mlp", "cnn")


def bn_mlp(seed, hidden=8):
    """The issue's model, ``Linear(4, 8) -> BatchNorm1d(8) -> ReLU -> Linear(8, 2)``, left in train
    mode, with running statistics away from their initial values."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


def bn_cnn(seed, widths=(4, 6)):
    torch.manual_seed(seed)
    model = CNN(in_channels=3, widths=widths, num_classes=3)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0, 0.5)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
    return model


def case(kind):
    """(merged, [expert 0, expert 1], [task 0 batches, task 1 batches], spec, sites), all models in
    train mode except one ReLU of the merged model (flags are restored module by module)."""
    make = bn_mlp if kind == "mlp" else bn_cnn
    merged, experts = make(0), [make(1), make(2)]
    merged.get_submodule("2" if kind == "mlp" else "features.2").eval()  # a ReLU
    g = torch.Generator().manual_seed(3)
    shape = (16, 4) if kind == "mlp" else (8, 3, 5, 5)
    data = [[torch.randn(shape, generator=g) + 1 for _ in range(2)] for _ in range(2)]
    if kind == "mlp":
        spec = align.PermutationSpec({"h": [("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0),
                                            ("1.running_mean", 0), ("1.running_var", 0), ("3.weight", 1)]})
        sites = {"h": "1"}
    else:
        spec, sites = align.cnn_spec(2)
    return merged, experts, data, spec, sites


def snapshot(model):
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "flags": {n: m.training for n, m in model.named_modules()},
    }


def hook_dicts(model):
    """``{(module, attribute): dict}`` of every hook dict of every module (``_forward_hooks``, ...)."""
    return {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
            if "hooks" in k and isinstance(v, dict)}


def assert_unchanged(model, before, label):
    after = snapshot(model)
    assert list(after["params"]) == list(before["params"]), label
    for n, (p, grad) in before["params"].items():
        assert torch.equal(after["params"][n][0], p), f"{label}: parameter {n} changed"
        assert after["params"][n][1] == grad, f"{label}: requires_grad of {n} changed"
    assert list(after["buffers"]) == list(before["buffers"]), label
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), f"{label}: buffer {n} changed"
    assert after["flags"] == before["flags"], f"{label}: training flags changed"
    left = {k: v for k, v in hook_dicts(model).items() if v}
    assert not left, f"{label}: hooks left behind: {left}"
    assert all(p.grad is None for p in model.parameters()), f"{label}: gradients left behind"


def run_checked(fn, models):
    before = [snapshot(m) for m in models]
    assert any(before[0]["flags"].values()), "the test needs models in train mode"
    try:
        return fn()
    finally:
        for t, (m, b) in enumerate(zip(models, before)):
            assert_unchanged(m, b, f"model {t}")


def calls(merged, experts, data, spec, sites):
    """Every public function of ``align`` and ``correct`` that takes models or their state dicts."""
    sd = [m.state_dict() for m in (merged, *experts)]
    site = correct.default_sites(merged)[0]  # a BatchNorm output
    width = merged.get_submodule(site).num_features
    return {
        "align.activation_matching": lambda: align.activation_matching(spec, experts[0], experts[1], data[0], sites),
        "align.weight_matching": lambda: align.weight_matching(spec, sd[1], sd[2]),
        "align.apply_permutations": lambda: align.apply_permutations(
            spec, align.weight_matching(spec, sd[1], sd[2]), sd[2]),
        "align.PermutationSpec": lambda: align.PermutationSpec(spec.perms, state_dict=sd[1]),
        "correct.default_sites": lambda: correct.default_sites(merged),
        "correct.activation_stats": lambda: correct.activation_stats(merged, data[0]),
        "correct.variance_ratio": lambda: correct.variance_ratio(merged, experts[0], data[0]),
        "correct.tact": lambda: correct.tact(merged, experts, data),
        "correct.repair": lambda: correct.repair(merged, experts, data),
        "correct.fold": lambda: [correct.fold(c) for c in correct.tact(merged, experts, data)],
        "correct.CorrectedModel": lambda: correct.CorrectedModel(merged).add_site(
            site, torch.full((width,), 2.0), torch.zeros(width)),
    }


CALLS = list(calls(*case("mlp")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CALLS)
def test_call_leaves_models_unchanged(kind, name):
    merged, experts, data, spec, sites = case(kind)
    run_checked(calls(merged, experts, data, spec, sites)[name], [merged, *experts])


def failing_calls(merged, experts, data, spec, sites):
    """Calls that raise after some forwards ran (a batch of the wrong shape second, a merged model
    whose channels differ from the experts') or before any (a bad site, a bad eps)."""
    bad = [data[0][0], data[0][0][:, :2]]  # the second batch does not fit the first layer
    narrow = bn_mlp(5, hidden=6) if isinstance(merged, nn.Sequential) else bn_cnn(5, widths=(5, 6))
    return [
        (lambda: align.activation_matching(spec, experts[0], experts[1], bad, sites), RuntimeError),
        (lambda: align.activation_matching(spec, experts[0], narrow, data[0], sites), ValueError),
        (lambda: correct.activation_stats(merged, bad), RuntimeError),
        (lambda: correct.activation_stats(merged, data[0], ["nope"]), ValueError),
        (lambda: correct.variance_ratio(merged, experts[0], bad), RuntimeError),
        (lambda: correct.variance_ratio(narrow, experts[0], data[0]), ValueError),
        (lambda: correct.tact(merged, experts, [data[0], bad]), RuntimeError),
        (lambda: correct.tact(narrow, experts, data), ValueError),  # after the experts' pass
        (lambda: correct.tact(merged, experts, data, eps=0.0), ValueError),
        (lambda: correct.repair(merged, experts, [bad, data[1]]), RuntimeError),
        (lambda: correct.repair(narrow, experts, data), ValueError),
    ], narrow


@pytest.mark.parametrize("kind", KINDS)
def test_raising_call_leaves_models_unchanged(kind):
    merged, experts, data, spec, sites = case(kind)
    failing, narrow = failing_calls(merged, experts, data, spec, sites)
    narrow.get_submodule("1" if kind == "mlp" else "features.1").eval()
    for fn, error in failing:
        with pytest.raises(error):
            run_checked(fn, [merged, *experts, narrow])


def eval_copies(models):
    return [copy.deepcopy(m).eval() for m in models]


def hand_tact(merged, expert, x, site, eps):
    """TACT at one site of an MLP, in float64, from eval-mode activations computed by hand."""
    def act(model):
        with torch.no_grad():
            return model[:int(site) + 1](x).double()
    e, m = act(expert), act(merged)
    scale = e.var(0, unbiased=False).sqrt() / (m.var(0, unbiased=False) + eps).sqrt()
    return scale, e.mean(0) - scale * m.mean(0)


def test_tact_on_train_mode_models_uses_eval_statistics():
    """The issue's input: the correction equals the one computed on models put in eval() first, and
    the hand-written eval-mode TACT; train-mode (batch) statistics would give another one."""
    merged, expert = bn_mlp(0), bn_mlp(1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) + 1
    got = correct.tact(merged, [expert], [[x]])[0]
    want = correct.tact(*eval_copies([merged]), eval_copies([expert]), [[x]])[0]
    assert got.sites == want.sites == ["1"]
    scale, shift = got.correction("1")
    assert torch.equal(scale, want.correction("1")[0]) and torch.equal(shift, want.correction("1")[1])
    ref_scale, ref_shift = hand_tact(eval_copies([merged])[0], eval_copies([expert])[0], x, "1", 1e-5)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shift.double(), ref_shift, rtol=1e-5, atol=1e-6)
    batch_scale, _ = hand_tact(copy.deepcopy(merged).train(), copy.deepcopy(expert).train(), x, "1", 1e-5)
    assert not torch.allclose(batch_scale, ref_scale, rtol=1e-2)  # train mode would be another answer


def results_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(results_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(results_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, correct.CorrectedModel):
        return a.sites == b.sites and all(results_equal(a.correction(s), b.correction(s)) for s in a.sites)
    if isinstance(a, correct.SiteStats):
        return a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


MEASURING = {
    "activation_matching": lambda m, e, d, spec, sites: align.activation_matching(
        spec, e[0], e[1], d[0], sites, return_correlations=True),
    "activation_stats": lambda m, e, d, spec, sites: correct.activation_stats(m, d[0]),
    "variance_ratio": lambda m, e, d, spec, sites: correct.variance_ratio(m, e[0], d[0]),
    "tact": lambda m, e, d, spec, sites: correct.tact(m, e, d),
    "repair": lambda m, e, d, spec, sites: correct.repair(m, e, d),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MEASURING))
def test_train_mode_result_equals_eval_mode_result(kind, name):
    merged, experts, data, spec, sites = case(kind)
    got = MEASURING[name](merged, experts, data, spec, sites)
    m, e = eval_copies([merged])[0], eval_copies(experts)
    want = MEASURING[name](m, e, data, spec, sites)
    assert results_equal(got, want)


def test_corrected_model_shares_without_changing():
    """Building a CorrectedModel changes nothing in the merged model; it holds it (by design)."""
    merged, experts, data, _, _ = case("mlp")
    before = snapshot(merged)
    per_task = correct.tact(merged, experts, data)
    assert all(c.model is merged for c in per_task)
    assert_unchanged(merged, before, "merged")
    # running the corrected model in eval mode changes nothing either
    merged.eval()
    before = snapshot(merged)
    with torch.no_grad():
        per_task[0](data[0][0])
    assert_unchanged(merged, before, "merged")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        correct.CorrectedModel(merged.state_dict())
