"""nlmerge.merge: state-dict merges against plain-PyTorch recipes written here."""
import os

import pytest
import torch
from conftest import fast_backends

from nlmerge import merge

pytestmark = pytest.mark.filterwarnings("ignore:nlmerge. the C.. kernels are not built:RuntimeWarning")

FLOAT_KEYS = ["embed.weight", "fc1.weight", "fc1.bias", "norm.weight", "fc2.weight", "fc2.bias"]


def make_base(seed=0, dtype=torch.float32):
    """A tiny MLP-like state dict with integer and bool buffers."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embed.weight": torch.randn(17, 8, generator=g),
        "fc1.weight": torch.randn(16, 8, generator=g) * 0.5,
        "fc1.bias": torch.randn(16, generator=g) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(16, generator=g),
        "norm.num_batches_tracked": torch.tensor(7),
        "fc2.weight": torch.randn(5, 16, generator=g) * 0.3,
        "fc2.bias": torch.randn(5, generator=g) * 0.1,
        "attn.mask": torch.rand(4, 4, generator=g) > 0.5,
    }
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def make_experts(base, num=3, seed=1, scale=0.05):
    """Experts: the base plus noise of a different size per tensor and expert; other buffers."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for t in range(num):
        sd = {}
        for i, (key, value) in enumerate(base.items()):
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=g) * scale * (1 + i) * (1 + t)
                sd[key] = (value.float() + noise).to(value.dtype)
            elif value.dtype == torch.bool:
                sd[key] = ~value
            else:
                sd[key] = value + 100 + t
        experts.append(sd)
    return experts


def make_dyadic(num=3, seed=2):
    """Small integers / 16: exact arithmetic, many equal magnitudes and zero sign sums."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-8, 9, v.shape, generator=g).float() / 16 for k, v in make_base().items() if k in FLOAT_KEYS}
    experts = [{k: v + torch.randint(-3, 4, v.shape, generator=g).float() / 16 for k, v in base.items()} for _ in range(num)]
    return base, experts


def clone_sd(sd):
    return {k: v.clone() for k, v in sd.items()}


def assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def assert_sd_close(a, b, keys=None, rtol=1e-6, atol=1e-6):
    for k in keys or a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def taus_of(base, experts, keys=FLOAT_KEYS):
    return [{k: e[k].float() - base[k].float() for k in keys} for e in experts]


# --------------------------------------------------------------------------- references


def ref_ties(
    base, experts, *, keep, lam=1.0, weights=None, sign="mass", disjoint="mean", keys=FLOAT_KEYS, with_base=True, fill=None
):
    """The original TIES recipe on one flat vector per task (extended with weights and modes).

    Zero elected signs take the majority sign (or ``fill`` when given).
    """
    taus = torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in keys]) for e in experts])
    d = taus.shape[1]
    if keep >= 1:
        thr = torch.zeros(len(experts), 1)
    else:
        thr = taus.abs().kthvalue(d - int(d * keep), dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= thr)
    w = torch.ones(len(experts), 1) if weights is None else torch.tensor(weights, dtype=torch.float32)[:, None]
    s = torch.sign((w * trimmed).sum(0)) if sign == "mass" else torch.sign(torch.sign(trimmed).sum(0))
    s[s == 0] = torch.sign(s.sum()) if fill is None else fill
    agree = torch.where(s > 0, trimmed > 0, trimmed < 0)
    if disjoint == "max":
        merged = (trimmed.abs() * agree).amax(0) * s
    else:
        num = (w * trimmed * agree).sum(0)
        if disjoint == "sum":
            merged = num
        elif weights is None:
            merged = num / agree.sum(0).clamp(min=1)
        else:
            den = (w * agree).sum(0)
            merged = torch.where(den > 0, num / den, torch.zeros_like(num))
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        part = lam * merged[offset : offset + n].reshape(base[k].shape)
        out[k] = base[k] + part if with_base else part
        offset += n
    return out


def ref_mergekit_ties(base, experts, *, density, lam=1.0, weights=None, keys=FLOAT_KEYS):
    """mergekit's TIES: top-k magnitudes per tensor by argsort, weighted sign sum (0 -> +)."""
    weights = [1.0] * len(experts) if weights is None else weights
    out = {}
    for k in keys:
        deltas = []
        for e in experts:
            delta = e[k] - base[k]
            if density < 1:
                kk = max(1, int(density * delta.numel()))
                mask = torch.zeros(delta.numel())
                mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:kk]] = 1
                delta = delta * mask.reshape(delta.shape)
            deltas.append(delta)
        deltas = torch.stack(deltas)
        w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base[k].dim()))
        weighted = deltas * w
        majority = (weighted.sum(0) >= 0).float() * 2 - 1
        mask = weighted.sign() == majority
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        out[k] = base[k] + lam * (mixed / divisor)
    return out


def ref_tall_masks(taus, tau_mtl, lam):
    lams = lam if isinstance(lam, list) else [lam] * len(taus)
    return [{k: tau[k].abs() > lams[t] * (tau_mtl[k] - tau[k]).abs() for k in tau_mtl} for t, tau in enumerate(taus)]


def ta_sum(taus):
    out = {}
    for k in taus[0]:
        acc = torch.zeros_like(taus[0][k])
        for tau in taus:  # task order, as the ops add
            acc = acc + tau[k]
        out[k] = acc
    return out


# --------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_ties_global_matches_original_recipe(keep):
    base = make_base()
    experts = make_experts(base)
    got = merge.ties(base, experts, keep=keep, lam=0.7)
    assert_sd_close(got, ref_ties(base, experts, keep=keep, lam=0.7), keys=FLOAT_KEYS)


@pytest.mark.parametrize("keep", [0.1, 0.3])
def test_ties_global_weighted(keep):
    base = make_base(3)
    experts = make_experts(base, num=4, seed=5)
    weights = [0.3, 1.5, 0.7, 2.0]
    got = merge.ties(base, experts, keep=keep, lam=1.3, weights=weights)
    assert_sd_close(got, ref_ties(base, experts, keep=keep, lam=1.3, weights=weights), keys=FLOAT_KEYS)


@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("disjoint", ["mean", "sum", "max"])
@pytest.mark.parametrize("flip", [False, True], ids=["as-is", "negated"])
def test_ties_global_modes_with_zero_signs(sign, disjoint, flip):
    """Exact dyadic values: many zero elections, so the scope-wide majority sign matters (negated
    task vectors flip the majority: both signs are covered, with and without the rerun)."""
    base, experts = make_dyadic(num=2 if sign == "count" else 3)
    if flip:
        experts = [{k: 2 * base[k] - e[k] for k in base} for e in experts]
    got = merge.ties(base, experts, keep=0.4, sign=sign, disjoint=disjoint)
    want = ref_ties(base, experts, keep=0.4, sign=sign, disjoint=disjoint)
    assert_sd_close(got, want)
    # the case is meant: zero elections with non-zero entries exist, so the fill sign matters
    plus = ref_ties(base, experts, keep=0.4, sign=sign, disjoint=disjoint, fill=1)
    minus = ref_ties(base, experts, keep=0.4, sign=sign, disjoint=disjoint, fill=-1)
    assert any(not torch.equal(plus[k], minus[k]) for k in plus)


def test_ties_tensor_scope_is_per_tensor_recipe():
    base = make_base(4)
    experts = make_experts(base, seed=6)
    got = merge.ties(base, experts, keep=0.3, lam=0.5, scope="tensor")
    for k in FLOAT_KEYS:
        want = ref_ties(base, experts, keep=0.3, lam=0.5, keys=[k])
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.02, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.5]])
def test_ties_mergekit_convention(density, weights):
    base = make_base(7)
    experts = make_experts(base, seed=8)
    got = merge.ties(base, experts, keep=density, lam=0.9, weights=weights, convention="mergekit")
    want = ref_mergekit_ties(base, experts, density=density, lam=0.9, weights=weights)
    assert_sd_close(got, want, keys=FLOAT_KEYS)


def test_ties_bf16_is_fp32_rounded_once():
    base = make_base(9, torch.bfloat16)
    experts = make_experts(base, seed=10)
    got = merge.ties(base, experts, keep=0.3, lam=0.8)
    up = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    want = merge.ties(up(base), [up(e) for e in experts], keep=0.3, lam=0.8)
    for k in base:
        assert got[k].dtype == base[k].dtype
        assert torch.equal(got[k], want[k].to(base[k].dtype)), k


def test_ties_options_refused():
    base = make_base()
    experts = make_experts(base)
    with pytest.raises(ValueError, match=r"weights\[1\] must be positive \(> 0\), got 0.0"):
        merge.ties(base, experts, weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be positive \(> 0\), got -1.0"):
        merge.ties(base, experts, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="3 experts"):
        merge.ties(base, experts, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="mergekit"):
        merge.ties(base, experts, convention="mergekit", scope="global")
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            merge.ties(base, experts, keep=bad)
    for name, value in (("scope", "layer"), ("sign", "vote"), ("disjoint", "median"), ("convention", "dare")):
        with pytest.raises(ValueError, match=name):
            merge.ties(base, experts, **{name: value})


# --------------------------------------------------------------------------- task arithmetic, average, task vectors


def test_task_vectors():
    base = make_base()
    experts = make_experts(base)
    tvs = merge.task_vectors(base, experts, exclude="fc2.*")
    assert len(tvs) == 3
    for tv, e in zip(tvs, experts):
        assert list(tv) == ["embed.weight", "fc1.weight", "fc1.bias", "norm.weight"]
        for k, v in tv.items():
            assert torch.equal(v, e[k] - base[k])


@pytest.mark.parametrize("weights", [None, [1.0, -0.5, 2.0]])
def test_task_arithmetic(weights):
    base = make_base()
    experts = make_experts(base)
    got = merge.task_arithmetic(base, experts, lam=0.3, weights=weights)
    w = weights or [1.0] * 3
    for k in FLOAT_KEYS:
        acc = torch.zeros_like(base[k])
        for wt, e in zip(w, experts):
            acc = acc + wt * (e[k] - base[k])
        torch.testing.assert_close(got[k], base[k] + 0.3 * acc, rtol=1e-6, atol=1e-6)
    assert torch.equal(got["norm.num_batches_tracked"], base["norm.num_batches_tracked"])
    assert torch.equal(got["attn.mask"], base["attn.mask"])


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_average(weights):
    models = make_experts(make_base(), seed=11)
    got = merge.average(models, weights, exclude=["fc1.bias"])
    w = torch.tensor(weights or [1.0] * 3)
    w = w / w.sum()
    for k in FLOAT_KEYS:
        if k == "fc1.bias":
            assert torch.equal(got[k], models[0][k])
            continue
        want = sum(wt * m[k] for wt, m in zip(w, models))
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got["norm.num_batches_tracked"], models[0]["norm.num_batches_tracked"])
    assert list(got) == list(models[0])
    with pytest.raises(ValueError, match="sum to 0"):
        merge.average(models, [1.0, -1.0, 0.0])


def test_average_fp16_keeps_dtype():
    models = make_experts(make_base(dtype=torch.float16), seed=12)
    got = merge.average(models)
    for k in FLOAT_KEYS:
        assert got[k].dtype == torch.float16
        want = (sum(m[k].float() for m in models) / 3).half()
        torch.testing.assert_close(got[k], want, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- TALL and consensus


@pytest.mark.parametrize("lam", [0.4, [0.2, 0.6, 1.0]])
def test_tall_task_models(lam):
    base = make_base(13)
    experts = make_experts(base, seed=14)
    tm = merge.tall(base, experts, lam=lam)
    assert tm.num_tasks == 3 and tm.lam == lam
    taus = taus_of(base, experts)
    tau_mtl = ta_sum(taus)
    masks = ref_tall_masks(taus, tau_mtl, lam)
    for k in FLOAT_KEYS:
        assert torch.equal(tm.tau_mtl[k], tau_mtl[k])
    for t in range(3):
        sd = tm.task_state_dict(t)
        assert list(sd) == list(base)
        for k in FLOAT_KEYS:
            assert torch.equal(tm.mask(t, k), masks[t][k])
            assert torch.equal(sd[k], base[k] + torch.where(masks[t][k], tau_mtl[k], torch.zeros_like(tau_mtl[k]))), k
        assert torch.equal(sd["norm.num_batches_tracked"], base["norm.num_batches_tracked"])
        assert torch.equal(sd["attn.mask"], base["attn.mask"])
    with pytest.raises(IndexError):
        tm.task_state_dict(3)


def test_tall_with_ties_mtl():
    base = make_base(15)
    experts = make_experts(base, seed=16)
    tm = merge.tall(base, experts, lam=0.5, mtl="ties", ties_kwargs={"keep": 0.3})
    want = ref_ties(base, experts, keep=0.3, with_base=False)
    assert_sd_close(tm.tau_mtl, want)
    masks = ref_tall_masks(taus_of(base, experts), tm.tau_mtl, 0.5)
    for t in range(3):
        for k in FLOAT_KEYS:
            assert torch.equal(tm.mask(t, k), masks[t][k])


def test_tall_single_task_bf16_rebuilds_expert():
    """fp32 task vectors: with one task and its own tau as tau_MTL, the expert comes back exactly."""
    base = make_base(17, torch.bfloat16)
    experts = make_experts(base, num=1, seed=18)
    tm = merge.tall(base, experts, lam=0.4)
    sd = tm.task_state_dict(0)
    for k in FLOAT_KEYS:
        assert sd[k].dtype == torch.bfloat16
        assert torch.equal(sd[k], experts[0][k]), k


def test_tall_save_load_round_trip(tmp_path):
    base = make_base(19)
    experts = make_experts(base, seed=20)
    for lam in (0.3, [0.1, 0.5, 0.9]):
        tm = merge.tall(base, experts, lam=lam, exclude="embed.*")
        path = tmp_path / "tall.pt"
        tm.save(path)
        tm.save(str(path))  # overwrites in place
        assert sorted(os.listdir(tmp_path)) == ["tall.pt"]  # no temporary file left behind
        loaded = merge.TallMasks.load(path)
        assert loaded.num_tasks == 3 and loaded.lam == lam
        assert loaded.keys == tm.keys and loaded.merged_keys == tm.merged_keys
        assert "embed.weight" not in loaded.merged_keys
        assert_sd_equal(loaded.base, tm.base)
        assert_sd_equal(loaded.tau_mtl, tm.tau_mtl)
        assert_sd_equal(loaded.masks, tm.masks)
        for t in range(3):
            assert_sd_equal(loaded.task_state_dict(t), tm.task_state_dict(t))


def test_tall_save_is_atomic(tmp_path, monkeypatch):
    base = make_base()
    experts = make_experts(base)
    tm = merge.tall(base, experts)
    path = tmp_path / "tall.pt"
    tm.save(path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        merge.tall(base, experts, lam=0.9).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tall.pt"]
    monkeypatch.undo()
    bad = tmp_path / "other.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not a TallMasks file"):
        merge.TallMasks.load(bad)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus(k):
    base = make_base(21)
    experts = make_experts(base, seed=22)
    got = merge.consensus(base, experts, k=k, lam=[0.3, 0.4, 0.5], alpha=0.8)
    taus = taus_of(base, experts)
    tau_mtl = ta_sum(taus)
    masks = ref_tall_masks(taus, tau_mtl, [0.3, 0.4, 0.5])
    for key in FLOAT_KEYS:
        count = sum(m[key].int() for m in masks)
        want = base[key] + 0.8 * torch.where(count >= k, tau_mtl[key], torch.zeros_like(tau_mtl[key]))
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got["attn.mask"], base["attn.mask"])


def test_consensus_with_ties_mtl():
    base = make_base(23)
    experts = make_experts(base, seed=24)
    kwargs = {"keep": 0.5, "sign": "count", "convention": "ties", "scope": "tensor"}
    got = merge.consensus(base, experts, k=2, lam=0.6, mtl="ties", ties_kwargs=kwargs)
    tau_mtl = merge.tall(base, experts, lam=0.6, mtl="ties", ties_kwargs=kwargs).tau_mtl
    masks = ref_tall_masks(taus_of(base, experts), tau_mtl, 0.6)
    for key in FLOAT_KEYS:
        keep = sum(m[key].int() for m in masks) >= 2
        want = base[key] + torch.where(keep, tau_mtl[key], torch.zeros_like(tau_mtl[key]))
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ties_kwargs"):
        merge.consensus(base, experts, ties_kwargs={"keep": 0.5})
    with pytest.raises(ValueError, match="unknown"):
        merge.consensus(base, experts, mtl="ties", ties_kwargs={"lam": 0.5})
    for k in (-1, 0, 4, 1.5, True):  # 0 would keep everything, more than T nothing
        with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 3\] \(the number of tasks\), got {k!r}"):
            merge.consensus(base, experts, k=k)


# --------------------------------------------------------------------------- common rules


MERGES = {
    "task_vectors": lambda b, e, **kw: merge.task_vectors(b, e, **{k: v for k, v in kw.items() if k == "exclude"}),
    "average": lambda b, e, **kw: merge.average([b, *e], **kw),
    "task_arithmetic": lambda b, e, **kw: merge.task_arithmetic(b, e, lam=0.5, **kw),
    "ties_global": lambda b, e, **kw: merge.ties(b, e, keep=0.3, **kw),
    "ties_tensor": lambda b, e, **kw: merge.ties(b, e, keep=0.3, scope="tensor", **kw),
    "ties_mergekit": lambda b, e, **kw: merge.ties(b, e, keep=0.3, convention="mergekit", **kw),
    "tall": lambda b, e, **kw: merge.tall(b, e, **kw).task_state_dict(1),
    "tall_ties": lambda b, e, **kw: merge.tall(b, e, mtl="ties", **kw).task_state_dict(0),
    "consensus": lambda b, e, **kw: merge.consensus(b, e, **kw),
    "consensus_ties": lambda b, e, **kw: merge.consensus(b, e, mtl="ties", **kw),
}
STATE_MERGES = [name for name in MERGES if name != "task_vectors"]


def _model_name(name, i):
    """How a message names expert ``i`` (average: the base is model 0, expert i is model i+1)."""
    return f"model {i + 1}" if name == "average" else f"expert {i}"


@pytest.mark.parametrize("name", STATE_MERGES)
def test_exclude_buffers_order_and_no_aliasing(name):
    base = make_base()
    experts = make_experts(base)
    for e in experts:  # excluded keys may be missing from experts, or differ in shape
        del e["fc2.bias"]
        e["fc2.weight"] = torch.zeros(2, 2)
        e["head.extra"] = torch.ones(3)
    base_copy = clone_sd(base)
    experts_copy = [clone_sd(e) for e in experts]
    got = MERGES[name](base, experts, exclude=("fc2.*", "head.*"))
    assert list(got) == list(base)
    for k in ("fc2.weight", "fc2.bias", "norm.num_batches_tracked", "attn.mask"):
        assert torch.equal(got[k], base[k]), k
        assert got[k].data_ptr() != base[k].data_ptr(), k
    for k in FLOAT_KEYS[:4]:
        assert got[k].dtype == base[k].dtype
        assert not torch.equal(got[k], base[k]), k
    # inputs untouched
    assert_sd_equal(base, base_copy)
    for e, c in zip(experts, experts_copy):
        assert_sd_equal(e, c)


@pytest.mark.parametrize("name", list(MERGES))
def test_structural_errors_name_key_and_expert(name):
    base = make_base()
    fn = MERGES[name]
    with pytest.raises(ValueError, match="empty"):
        merge.average([]) if name == "average" else fn(base, [])
    cases = [
        (lambda e: e.pop("fc1.bias"), "fc1.bias"),
        (lambda e: e.__setitem__("fc9.weight", torch.ones(2)), "fc9.weight"),
        (lambda e: e.__setitem__("fc1.weight", torch.ones(8, 16)), "fc1.weight"),
        (lambda e: e.__setitem__("norm.weight", e["norm.weight"].double()), "norm.weight"),
        (lambda e: e.__setitem__("fc2.bias", e["fc2.bias"].half()), "fc2.bias"),
        (lambda e: e.__setitem__("norm.num_batches_tracked", torch.tensor([1, 2])), "norm.num_batches_tracked"),
    ]
    for change, key in cases:
        experts = make_experts(base)
        change(experts[2])
        with pytest.raises(ValueError, match=rf"(?s)(?=.*{key})(?=.*{_model_name(name, 2)})"):
            fn(base, experts)


@pytest.mark.parametrize("name", STATE_MERGES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_names_key_and_expert(name, bad):
    base = make_base()
    experts = make_experts(base)
    experts[1]["fc1.weight"][3, 4] = bad
    with pytest.raises(ValueError, match=rf"(?s)(?=.*fc1\.weight)(?=.*{_model_name(name, 1)})"):
        MERGES[name](base, experts)
    experts = make_experts(base)
    base = clone_sd(base)
    base["fc2.bias"][0] = bad
    with pytest.raises(ValueError, match=r"(?s)(?=.*fc2\.bias)(?=.*(base|model 0))"):
        MERGES[name](base, experts)


def test_task_vector_overflow_is_named():
    base = {"w": torch.full((4,), -3e38)}
    experts = [{"w": torch.full((4,), 3e38)}, {"w": torch.zeros(4)}]
    with pytest.raises(ValueError, match=r"(?s)(?=.*'w')(?=.*expert 0)(?=.*overflow)"):
        merge.ties(base, experts)


def test_float64_refused_unless_excluded():
    base = make_base()
    base["stats"] = torch.randn(3, dtype=torch.float64)
    experts = make_experts(base)
    with pytest.raises(ValueError, match="stats"):
        merge.task_arithmetic(base, experts)
    got = merge.task_arithmetic(base, experts, exclude="stats")
    assert torch.equal(got["stats"], base["stats"])


def test_other_argument_errors():
    base = make_base()
    experts = make_experts(base)
    with pytest.raises(TypeError):
        merge.ties(base, experts[0])  # one state dict, not a list
    with pytest.raises(ValueError, match="lam"):
        merge.tall(base, experts, lam=[0.1, 0.2])
    with pytest.raises(ValueError, match="lam"):
        merge.task_arithmetic(base, experts, lam=float("nan"))
    with pytest.raises(ValueError, match="mtl"):
        merge.tall(base, experts, mtl="average")


def test_empty_tensor_key():
    base = {"w": torch.randn(3, 4), "e": torch.zeros(0, 4)}
    experts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    for name in STATE_MERGES:
        got = MERGES[name](base, experts)
        assert got["e"].shape == (0, 4), name


def test_parameters_with_grad():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)) for _ in range(3)]
    base, *experts = [dict(net.named_parameters()) for net in nets]
    for name in STATE_MERGES:
        got = MERGES[name](base, experts)
        assert list(got) == list(base)
        assert not any(v.requires_grad for v in got.values()), name


BACKENDS = [pytest.param(None, id="default"), *fast_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", STATE_MERGES)
def test_backend_matches_torch(name, dtype, backend):
    base = make_base(25, dtype)
    experts = make_experts(base, seed=26)
    default = MERGES[name](base, experts, backend=backend)
    reference = MERGES[name](base, experts, backend="torch")
    assert list(default) == list(reference)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)  # 1 ulp of bf16
    for k in default:
        assert default[k].dtype == reference[k].dtype
        torch.testing.assert_close(default[k], reference[k], **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_masks_exact(dtype, backend):
    base = make_base(27, dtype)
    experts = make_experts(base, seed=28)
    for mtl in ("task_arithmetic", "ties"):
        default = merge.tall(base, experts, mtl=mtl, lam=[0.3, 0.5, 0.7], backend=backend)
        reference = merge.tall(base, experts, mtl=mtl, lam=[0.3, 0.5, 0.7], backend="torch")
        assert_sd_equal(default.masks, reference.masks)
    if dtype != torch.float32:
        return  # 16-bit values repeat: ties at the threshold would keep more entries
    # mergekit thresholds keep exactly max(1, int(keep * n)) entries whichever backend selects them
    for b in (backend, "torch"):
        got = merge.ties(base, experts[:1], keep=0.25, convention="mergekit", disjoint="sum", backend=b)
        for k in FLOAT_KEYS:
            n = base[k].numel()
            assert int((got[k] != base[k]).sum()) == max(1, int(0.25 * n)), k


# --------------------------------------------------------------------------- output dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", STATE_MERGES)
def test_out_dtype_is_the_fp32_result_rounded_once(name, dtype):
    """out_dtype=fp32 on a 16-bit model equals the merge of the upcast model exactly (everything is
    computed in fp32), and the default result is that, rounded once to the model's dtype."""
    base = make_base(29, dtype)
    experts = make_experts(base, seed=30)
    up = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    wide = MERGES[name](base, experts, out_dtype=torch.float32)
    assert_sd_equal(wide, MERGES[name](up(base), [up(e) for e in experts]))
    narrow = MERGES[name](base, experts)
    for k in base:
        want = wide[k].to(dtype) if base[k].is_floating_point() else wide[k]
        assert narrow[k].dtype == base[k].dtype and torch.equal(narrow[k], want), k
    got = MERGES[name](base, experts, out_dtype=torch.float32, exclude="fc2.*")
    assert got["fc2.weight"].dtype == dtype and torch.equal(got["fc2.weight"], base["fc2.weight"])  # copied as is


# --------------------------------------------------------------------------- BatchNorm running statistics


def make_bn(num=3, seed=31):
    """A base and experts with BatchNorm buffers whose running variances are far below the base's:
    their task vectors sum below -base (task arithmetic at lam 1 made them negative)."""
    g = torch.Generator().manual_seed(seed)

    def model(var_offset, var_scale, batches):
        return {
            "fc.weight": torch.randn(8, 4, generator=g),
            "bn.weight": 1 + 0.1 * torch.randn(8, generator=g),
            "bn.bias": 0.1 * torch.randn(8, generator=g),
            "bn.running_mean": torch.randn(8, generator=g),
            "bn.running_var": var_offset + var_scale * torch.rand(8, generator=g),
            "bn.num_batches_tracked": torch.tensor(batches),
            "head.weight": torch.randn(2, 8, generator=g),
        }

    return model(1.0, 1.0, 10), [model(0.05, 0.2, 100 + t) for t in range(num)]


RUNNING = ("bn.running_mean", "bn.running_var")


def without_running(sd):
    return {k: v for k, v in sd.items() if k not in RUNNING}


@pytest.mark.parametrize("name", STATE_MERGES)
def test_running_stats_are_the_experts_mean(name):
    base, experts = make_bn()
    models = [base, *experts] if name == "average" else experts  # average: every model is an expert
    got = MERGES[name](base, experts)
    for k in RUNNING:
        want = torch.stack([m[k] for m in models]).mean(0)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-6, msg=k)  # fp32 rounding of a mean
    assert bool((got["bn.running_var"] >= 0).all())
    assert torch.equal(got["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    # the method never sees them: the other keys are what the merge gives without them (TIES's
    # global threshold included)
    plain = MERGES[name](without_running(base), [without_running(e) for e in experts])
    assert_sd_equal(without_running(got), plain)
    from_base = MERGES[name](base, experts, running_stats="base")
    for k in RUNNING:
        assert torch.equal(from_base[k], base[k]), k
    excluded = MERGES[name](base, experts, exclude="bn.*")
    for k in (*RUNNING, "bn.weight"):
        assert torch.equal(excluded[k], base[k]), k


def test_task_arithmetic_running_var_never_negative():
    """The issue's case: a base's running variance above the experts' and lam >= 1."""
    base, experts = make_bn()
    mean = torch.stack([e["bn.running_var"] for e in experts]).mean(0)
    for lam in (1.0, 2.0):
        as_weights = base["bn.running_var"] + lam * sum(e["bn.running_var"] - base["bn.running_var"] for e in experts)
        assert bool((as_weights < 0).any())  # what merging them as task vectors gave
        got = merge.task_arithmetic(base, experts, lam=lam, weights=[0.5, 2.0, -1.0])
        torch.testing.assert_close(got["bn.running_var"], mean, rtol=1e-6, atol=0)  # lam, weights not applied


def test_running_stats_of_a_torch_batchnorm_model():
    """State dicts of real modules (keys "1.running_mean", ...): the merged model runs in eval mode."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)) for _ in range(4)]
    for i, net in enumerate(nets):  # running statistics from data of different scales
        with torch.no_grad():
            net(torch.randn(64, 4) * (3.0 if i == 0 else 0.3))
    base, *experts = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    merged = merge.task_arithmetic(base, experts, lam=1.0)
    want = torch.stack([e["1.running_var"] for e in experts]).mean(0)
    torch.testing.assert_close(merged["1.running_var"], want, rtol=1e-6, atol=0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    net.load_state_dict(merged)
    assert bool(torch.isfinite(net.eval()(torch.randn(5, 4))).all())


def test_tall_stores_running_stats_apart(tmp_path):
    base, experts = make_bn()
    tm = merge.tall(base, experts, lam=0.4)
    assert not set(RUNNING) & set(tm.merged_keys) and not set(RUNNING) & set(tm.masks)
    assert list(tm.stats) == list(RUNNING)
    for k in RUNNING:
        mean = torch.stack([e[k] for e in experts]).mean(0)
        assert tm.stats[k].dtype == torch.float32
        torch.testing.assert_close(tm.stats[k], mean, rtol=1e-6, atol=1e-6)
        for t in range(3):
            assert torch.equal(tm.task_state_dict(t)[k], tm.stats[k]), (k, t)
    tm.save(tmp_path / "tall.pt")
    loaded = merge.TallMasks.load(tmp_path / "tall.pt")
    assert_sd_equal(loaded.stats, tm.stats)
    assert_sd_equal(loaded.task_state_dict(2), tm.task_state_dict(2))
    payload = torch.load(tmp_path / "tall.pt", weights_only=True)
    payload["version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="unsupported TallMasks version 1"):
        merge.TallMasks.load(tmp_path / "old.pt")
    from_base = merge.tall(base, experts, running_stats="base")
    assert_sd_equal(from_base.stats, {k: base[k] for k in RUNNING})
    with pytest.raises(ValueError, match=r"key 'bn.running_var': stats contains NaN"):
        merge.TallMasks(base, tm.tau_mtl, tm.masks, 0.4, stats={"bn.running_var": torch.full((8,), float("nan"))})


@pytest.mark.parametrize("name", STATE_MERGES)
def test_running_stats_refused_inputs(name):
    base, experts = make_bn()
    bad = [{k: v.clone() for k, v in e.items()} for e in experts]
    bad[1]["bn.running_var"][3] = -0.5
    with pytest.raises(ValueError, match=rf"key 'bn.running_var': {_model_name(name, 1)} holds a negative running variance"):
        MERGES[name](base, bad)
    bad = [{k: v.clone() for k, v in e.items()} for e in experts]
    bad[2]["bn.running_mean"][0] = float("nan")
    with pytest.raises(ValueError, match=rf"key 'bn.running_mean': {_model_name(name, 2)} contains NaN or Inf"):
        MERGES[name](base, bad)
    with pytest.raises(ValueError, match=r"running_stats must be one of \('average', 'base'\), got 'median'"):
        MERGES[name](base, experts, running_stats="median")


def test_task_vectors_leave_running_stats_out():
    base, experts = make_bn()
    tvs = merge.task_vectors(base, experts)
    assert list(tvs[0]) == ["fc.weight", "bn.weight", "bn.bias", "head.weight"]


# --------------------------------------------------------------------------- ranges of numeric parameters


def test_numeric_parameters_are_range_checked():
    base = make_base()
    experts = make_experts(base)
    nan, inf = float("nan"), float("inf")
    cases = [
        (lambda: merge.task_arithmetic(base, experts, lam=inf), r"lam must be finite, got inf"),
        (lambda: merge.task_arithmetic(base, experts, weights=[1.0, nan, 1.0]), r"weights\[1\] must be finite"),
        (lambda: merge.average([base, *experts], [1.0, inf, 1.0, 1.0]), r"weights\[1\] must be finite"),
        (lambda: merge.ties(base, experts, lam=nan), r"lam must be finite"),
        (lambda: merge.ties(base, experts, keep=-0.1), r"keep must be > 0 .*got -0.1"),
        (lambda: merge.ties(base, experts, weights=[1.0, 1.0, inf]), r"weights\[2\] must be finite"),
        (lambda: merge.tall(base, experts, lam=-0.1), r"lam must be non-negative \(>= 0\), got -0.1"),
        (lambda: merge.tall(base, experts, lam=[0.1, -0.2, 0.3]), r"lam\[1\] must be non-negative \(>= 0\), got -0.2"),
        (lambda: merge.tall(base, experts, mtl="ties", ties_kwargs={"keep": 0.0}), r"keep must be > 0"),
        (lambda: merge.consensus(base, experts, alpha=inf), r"alpha must be finite, got inf"),
        (lambda: merge.consensus(base, experts, lam=-1.0), r"lam must be non-negative"),
        (lambda: merge.TallMasks(base, {}, {}, -0.5, num_tasks=2), r"lam must be non-negative \(>= 0\), got -0.5"),
        (lambda: merge.task_arithmetic(base, experts, out_dtype=torch.float64), r"out_dtype must be None, torch.float32"),
        (lambda: merge.task_vectors(base, experts, out_dtype=torch.int8), r"out_dtype must be None"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
