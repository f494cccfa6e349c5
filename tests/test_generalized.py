"""nlmerge.merge.generalized: mergekit's generalized task arithmetic family.

Against mergekit's own code (a test extra) on tie-free fp32 data, where its numbers are exact; DARE
against mergekit with its Bernoulli draws replaced by nlmerge's counter-based ones; bf16 inputs
against a float64 computation of the documented rule; backends, chunkings, errors, conventions.
"""
import itertools
import math

import pytest
import torch
from conftest import fast_backends

from nlmerge import merge
from nlmerge.merge import METHODS, merge_tensor
from nlmerge.merge.generalized import sparsify_mask
from nlmerge.ops.random import keep_mask

pytestmark = pytest.mark.filterwarnings("ignore:nlmerge. the C.. kernels are not built:RuntimeWarning")

BACKENDS = [pytest.param("torch", id="torch"), *fast_backends()]
WEIGHT_SETS = ([1.0, 1.0, 1.0], [1.0, 0.5, 0.25], [0.75, -0.5, 1.25], [0.5, 0.0, 1.5])
DENSITIES = [0.3, 0.55, 0.9]


def tie_free(generator, shape=(23, 13), num=3):
    """A base on a 1/16 grid and experts whose task vectors have pairwise distinct magnitudes
    (k / 1024 for a random permutation of k = 1..n, random signs): exact in fp32, no ties."""
    n = math.prod(shape)
    base = torch.randint(-64, 65, shape, generator=generator).float() / 16
    experts = []
    for _ in range(num):
        signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        delta = (torch.randperm(n, generator=generator) + 1).float() / 1024 * signs
        experts.append(base + delta.view(shape))
    return base, experts


def mergekit_group(base, experts):
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    entries = [TensorEntry("base", base, is_base=True)] + [TensorEntry(t, x) for t, x in enumerate(experts)]
    return TensorGroup(entries)


def mergekit_parameters(method, params, num):
    """mergekit's keyword arguments: every parameter of ``method``, per-model ones by entry id."""
    out = {}
    for p in METHODS[method].parameters:
        value = params.get(p.name, p.default)
        out[p.name] = {t: value[t] if isinstance(value, list) else value for t in range(num)} if p.per_model else value
    return out


def mergekit_merge(method, base, experts, params, mergekit_method=None):
    from mergekit.merge_methods import registry

    merger = mergekit_method or registry.get(method)
    return merger.merge_group(mergekit_group(base, experts), **mergekit_parameters(method, params, len(experts)))


def assert_fp32_close(actual, expected):
    """fp32 rounding: 1e-6 relative to the result's scale (sums over tasks may cancel)."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.float(), rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def option_grid(method):
    """Per-model densities, unequal, negative and zero weights, normalize and rescale both ways, lambda."""
    for weights, normalize, rescale in itertools.product(WEIGHT_SETS, (False, True), (False, True)):
        params = dict(weight=weights, density=DENSITIES, normalize=normalize, rescale=rescale)
        params["lambda"] = 0.75 if rescale else 1.0
        if METHODS[method].sparsify == "magnitude_outliers":
            params["gamma"] = [0.05, 0.2, 0.0]
        yield params


def test_methods_table_is_mergekits():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry

    for name, method in METHODS.items():
        theirs = registry.get(name)
        assert method.sparsify == (theirs.sparsification_method and theirs.sparsification_method.value), name
        assert method.consensus == (theirs.consensus_method and theirs.consensus_method.value), name
        assert (method.normalize, method.rescale) == (theirs.default_normalize, theirs.default_rescale), name
        spec = {p.name: p for p in theirs.spec.parameters}
        assert [p.name for p in method.parameters] == list(spec), name
        for p in method.parameters:
            assert p.per_model == (spec[p.name].scope.value != "shared"), (name, p.name)
            assert (p.required, p.type) == (spec[p.name].required, spec[p.name].value_type), (name, p.name)
            if not p.required:
                assert p.default == spec[p.name].default, (name, p.name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_mergekit(method, backend, generator):
    pytest.importorskip("mergekit")
    base, experts = tie_free(generator, (9, 7) if backend == "triton" else (23, 13))
    for params in option_grid(method):
        expected = mergekit_merge(method, base, experts, params)
        actual = merge_tensor(base, experts, **METHODS[method].kwargs(params), name="w", backend=backend)
        assert_fp32_close(actual, expected)
        if backend == "triton":
            break  # the interpreter is slow: one option set there


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_kept_sets_are_mergekits(method, generator):
    pytest.importorskip("mergekit")
    from mergekit.sparsify import SparsificationMethod, sparsify

    base, experts = tie_free(generator, (31, 17))
    kind = METHODS[method].sparsify
    for x, density, gamma in itertools.product(experts, (0.001, 0.1, 0.5, 0.97), (0.0, 0.02, 0.6)):
        tau = x - base
        theirs = sparsify(tau, density, SparsificationMethod(kind), gamma=gamma) != 0
        assert torch.equal(sparsify_mask(tau, kind, density, gamma=gamma), theirs), (density, gamma)


def test_count_consensus_equals_mergekit(generator):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod

    theirs = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.count,
        sparsification_method=SparsificationMethod.magnitude,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_count",
        method_pretty_name=None,
        method_reference_url=None,
    )
    base, experts = tie_free(generator)
    for params in option_grid("ties"):
        expected = mergekit_merge("ties", base, experts, params, mergekit_method=theirs)
        kwargs = {**METHODS["ties"].kwargs(params), "consensus": "count"}
        assert_fp32_close(merge_tensor(base, experts, **kwargs, name="w"), expected)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_equals_mergekit_with_the_same_draws(method, generator, monkeypatch):
    """mergekit with its ``torch.bernoulli`` mask replaced by nlmerge's keep mask of the same
    expert: the rescale, weighting and consensus after the draw are mergekit's."""
    pytest.importorskip("mergekit")
    import mergekit.sparsify

    seed, name = 1234, "model.layers.0.mlp.up_proj.weight"
    calls = []

    def our_draws(tensor, density, rescale_norm=None):
        mask = keep_mask(seed, name, tensor.shape, density, stream=len(calls)).to(tensor.dtype)
        calls.append(density)
        return mergekit.sparsify.rescaled_masked_tensor(tensor, mask, rescale_norm)

    monkeypatch.setattr(mergekit.sparsify, "bernoulli", our_draws)
    base, experts = tie_free(generator)
    for params in option_grid(method):
        calls.clear()
        expected = mergekit_merge(method, base, experts, params)
        assert calls == DENSITIES  # one draw per expert, in order: stream t is expert t
        actual = merge_tensor(base, experts, **METHODS[method].kwargs(params), name=name, seed=seed)
        assert_fp32_close(actual, expected)


@pytest.mark.parametrize("consensus", [None, "sum"])
def test_dare_at_density_one_is_task_arithmetic_or_ties(consensus, generator):
    base, experts = tie_free(generator)
    common = dict(consensus=consensus, weights=[1.0, 0.5, 2.0], lam=0.5, normalize=consensus is not None, name="w")
    dare = merge_tensor(base, experts, sparsify="random", density=1.0, rescale=True, seed=3, **common)
    plain = merge_tensor(base, experts, sparsify=None, **common)
    assert torch.equal(dare, plain)
    if consensus is None:
        sd = merge.dare_linear({"w": base}, [{"w": x} for x in experts], density=1.0, weights=[1.0, 0.5, 2.0], lam=0.5)
        assert_fp32_close(sd["w"], merge.task_arithmetic({"w": base}, [{"w": x} for x in experts], weights=[1.0, 0.5, 2.0], lam=0.5)["w"])


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_same_drops_on_every_backend_and_chunking(method, generator):
    backends = [p.values[0] for p in BACKENDS if not p.marks]
    base, experts = tie_free(generator, (11, 9))
    taus = [x - base for x in experts]
    kwargs = METHODS[method].kwargs(dict(weight=[1.0, 0.5, 0.75], density=[0.3, 0.5, 0.7]))
    results = [merge_tensor(base, experts, **kwargs, name="layer.w", seed=99, backend=b) for b in backends]
    for result in results[1:]:
        assert_fp32_close(result, results[0])
        assert torch.equal(result != base, results[0] != base)  # the same elements changed
    for t, tau in enumerate(taus):
        whole = sparsify_mask(tau, "random", kwargs["density"][t], seed=99, name="layer.w", stream=t).reshape(-1)
        chunks = [keep_mask(99, "layer.w", stop - start, kwargs["density"][t], offset=start, stream=t) for start, stop in ((0, 5), (5, 64), (64, 99))]
        assert torch.equal(torch.cat(chunks), whole)
    # the dropped elements of an expert leave the base unchanged where no other expert moves it
    only_zero = merge_tensor(base, [experts[0], base, base], **kwargs, name="layer.w", seed=99)
    kept = sparsify_mask(taus[0], "random", 0.3, seed=99, name="layer.w", stream=0)
    assert torch.equal(only_zero != base, kept)


def reference64(base, experts, *, sparsify, consensus, weights, density, gamma, rescale, normalize, lam, seed, name):
    """The module's rule in float64, step by step, with sort-based selections."""
    base64 = base.double()
    deltas = []
    for t, x in enumerate(experts):
        tau = x.double() - base64
        mags = tau.abs().reshape(-1)
        n, d = mags.numel(), density[t]
        if sparsify == "magnitude":
            kept = tau.abs() >= mags.sort(descending=True).values[max(1, int(d * n)) - 1]
        elif sparsify == "magnitude_outliers":
            m = int(d * n)
            b = max(0, n - m - int(gamma[t] * n))
            ascending = mags.sort().values
            kept = (tau.abs() >= ascending[b]) & (tau.abs() <= ascending[b + m - 1])
        else:
            kept = keep_mask(seed, name, tau.shape, d, stream=t)
        masked = torch.where(kept, tau, torch.zeros_like(tau))
        if rescale and tau.abs().sum() >= 1e-7 and masked.abs().sum() >= 1e-7:
            masked = masked * (tau.abs().sum() / masked.abs().sum())
        deltas.append(weights[t] * masked)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    if consensus is None:
        mixed, divisor = deltas.sum(0), w.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    else:
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).double()
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    return base64 + lam * (mixed / divisor if normalize else mixed)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"])
def test_bf16_computes_in_fp32(method, generator):
    """bf16 models: exact fp32 task vectors, fp32 arithmetic (not bf16's): the result is within
    fp32 rounding of the float64 computation of the same rule. Both fused and plain paths."""
    base = torch.randn(19, 11, generator=generator).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(19, 11, generator=generator)).bfloat16() for _ in range(3)]
    for normalize, rescale, weights in itertools.product((False, True), (False, True), ([1.0, 0.5, 0.75], [1.0, -0.5, 0.75])):
        params = dict(weight=weights, density=[0.2, 0.5, 0.8], normalize=normalize, rescale=rescale, gamma=[0.1, 0.0, 0.05])
        kwargs = METHODS[method].kwargs({k: v for k, v in params.items() if k != "gamma" or "breadcrumbs" in method})
        kwargs.setdefault("gamma", params["gamma"])
        kwargs["lam"] = 0.9
        actual = merge_tensor(base, experts, **kwargs, seed=5, name="bf16.w")
        expected = reference64(base, experts, **kwargs, seed=5, name="bf16.w")
        torch.testing.assert_close(actual.double(), expected, rtol=4e-7, atol=4e-7 * float(expected.abs().max()))


def make_models(generator):
    base, experts = {}, [{}, {}, {}]
    for key, shape in (("embed.weight", (13, 5)), ("fc.weight", (7, 6)), ("fc.bias", (7,)), ("empty", (0, 3))):
        b, xs = tie_free(generator, shape) if math.prod(shape) else (torch.zeros(shape), [torch.zeros(shape)] * 3)
        base[key] = b
        for sd, x in zip(experts, xs):
            sd[key] = x
    base["steps"] = torch.tensor(3)
    base["classifier.weight"] = torch.ones(2, 5)
    base["bn.running_var"] = torch.ones(5)
    for t, sd in enumerate(experts):
        sd["steps"] = torch.tensor(10 + t)
        sd["classifier.weight"] = torch.full((2, 5), float(t))
        sd["bn.running_var"] = torch.full((5,), 2.0 ** t)
    return base, experts


@pytest.mark.parametrize(
    "function, kwargs",
    [
        (merge.dare_linear, dict(density=0.5, seed=4)),
        (merge.dare_ties, dict(density=[0.5, 0.3, 0.9], seed=4)),
        (merge.breadcrumbs, dict(density=0.5, gamma=0.1)),
        (merge.breadcrumbs_ties, dict(density=0.5, gamma=[0.1, 0.0, 0.2])),
    ],
)
def test_state_dict_functions_are_merge_tensor_per_key(function, kwargs, generator):
    base, experts = make_models(generator)
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base, *experts]]
    out = function(base, experts, weights=[1.0, 0.5, 0.25], lam=0.8, exclude="classifier.*", **kwargs)
    for sd, copy in zip([base, *experts], before):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)  # inputs untouched
    assert list(out) == list(base)
    assert torch.equal(out["steps"], base["steps"]) and torch.equal(out["classifier.weight"], base["classifier.weight"])
    assert out["classifier.weight"] is not base["classifier.weight"]
    torch.testing.assert_close(out["bn.running_var"], torch.full((5,), 7 / 3))  # the experts' plain mean, unmerged
    name = function.__name__
    method = METHODS[name]
    for key in ("embed.weight", "fc.weight", "fc.bias", "empty"):
        options = dict(sparsify=method.sparsify, consensus=method.consensus, rescale=method.rescale, normalize=method.normalize)
        expected = merge_tensor(base[key], [sd[key] for sd in experts], weights=[1.0, 0.5, 0.25], lam=0.8, name=key, **options, **kwargs)
        assert torch.equal(out[key], expected), key
    half = function(base, experts, weights=[1.0, 0.5, 0.25], lam=0.8, out_dtype=torch.bfloat16, **kwargs)
    assert half["fc.weight"].dtype == torch.bfloat16 and torch.equal(half["fc.weight"], out["fc.weight"].bfloat16())


def test_generalized_state_dict_equals_mergekit_ties(generator):
    pytest.importorskip("mergekit")
    base, experts = make_models(generator)
    params = dict(weight=[1.0, 0.5, 0.25], density=DENSITIES)
    out = merge.generalized_task_arithmetic(base, experts, **METHODS["ties"].kwargs(params))
    for key in ("embed.weight", "fc.weight", "fc.bias"):
        assert_fp32_close(out[key], mergekit_merge("ties", base[key], [sd[key] for sd in experts], params))


ONE = dict(sparsify="magnitude", consensus="sum", weights=[1.0, 1.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(density=0.0), r"density = 0.0 is outside \(0, 1\].*drop the whole task vector"),
        (dict(density=[0.5, 1.5]), r"density\[1\] = 1.5 is outside \(0, 1\].*keep every element"),
        (dict(density=-0.2), r"density = -0.2 is outside"),
        (dict(density=float("nan")), r"density must be finite"),
        (dict(density=[0.5]), r"density has 1 entries for 2 experts"),
        (dict(gamma=-0.1), r"gamma = -0.1 is outside \[0, 1\]"),
        (dict(gamma=[0.1, 1.01]), r"gamma\[1\] = 1.01 is outside \[0, 1\]"),
        (dict(weights=[1.0]), r"weights has 1 entries for 2 experts"),
        (dict(weights=[1.0, float("inf")]), r"weights\[1\] must be finite"),
        (dict(sparsify="della"), r"sparsify must be one of .*'della'"),
        (dict(consensus="majority"), r"consensus must be one of .*'majority'"),
        (dict(lam=float("inf")), r"lam must be finite"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        (dict(seed=1.5), r"seed must be an integer"),
        (dict(sparsify="random", name=None), r"needs the tensor's name"),
    ],
)
def test_errors_name_the_parameter(kwargs, message):
    x = torch.randn(4, 3)
    options = {**ONE, "density": 0.5, "name": "w", **kwargs}
    with pytest.raises(ValueError, match=message):
        merge_tensor(x, [x + 1, x - 1], **options)


def test_flags_must_be_bools():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        merge_tensor(x, [x], normalize="yes")


def test_method_kwargs_errors():
    with pytest.raises(ValueError, match="parameter 'weight' is required"):
        METHODS["ties"].kwargs({"density": 0.5})
    with pytest.raises(ValueError, match="unknown parameter 'gamma'"):
        METHODS["ties"].kwargs({"weight": 1.0, "gamma": 0.1})
    assert METHODS["breadcrumbs"].kwargs({"weight": 1.0})["gamma"] == 0.01
    assert METHODS["dare_ties"].kwargs({"weight": [1.0, 2.0], "int8_mask": True})["rescale"] is True
    x = torch.randn(5)
    one_weight = merge_tensor(x, [x + 1, x - 2], **METHODS["task_arithmetic"].kwargs({"weight": 0.5}))
    assert torch.equal(one_weight, merge_tensor(x, [x + 1, x - 2], weights=[0.5, 0.5]))
    with pytest.raises(TypeError, match="rescale must be a bool, got 'false'"):
        merge_tensor(x, [x], **METHODS["ties"].kwargs({"weight": 1.0, "rescale": "false"}))


def test_tensor_errors_name_key_and_expert():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"key 'w': expert 1 has shape \(3, 4\) but the base has \(4, 3\)"):
        merge_tensor(x, [x, torch.randn(3, 4)], name="w")
    bad = x.clone()
    bad[1, 2] = float("nan")
    for sparsify in ("magnitude", "random", "magnitude_outliers", None):
        for consensus in ("sum", None):
            with pytest.raises(ValueError, match=r"key 'w': expert 1 contains NaN or Inf"):
                merge_tensor(x, [x + 1, bad], sparsify=sparsify, consensus=consensus, density=0.5, name="w")
    base, experts = {"a": x, "b": x.clone()}, [{"a": x + 1, "b": x + 2}, {"a": x - 1, "b": bad}]
    with pytest.raises(ValueError, match=r"key 'b': expert 1 contains NaN or Inf"):
        merge.dare_ties(base, experts, density=0.5, normalize=True)
    with pytest.raises(ValueError, match=r"expert 1 lacks key 'b'"):
        merge.breadcrumbs(base, [experts[0], {"a": x}], density=0.5)


def test_plain_path_overflow_names_the_key():
    """normalize + rescale under consensus runs the plain path (the scale 1.1 is not 1)."""
    x = torch.zeros(2)
    expert = torch.tensor([1e38, 1e37])
    options = dict(sparsify="magnitude", consensus="sum", density=0.5, rescale=True, normalize=True, name="w")
    assert_fp32_close(merge_tensor(x, [expert, expert], **options), torch.tensor([1.1e38, 0.0]))
    with pytest.raises(ValueError, match=r"key 'w'.*the merged result"):
        merge_tensor(x, [expert, expert], **options, lam=4.0)


def test_rescale_skips_a_kept_norm_below_eps():
    """mergekit rescales only when both L1 norms are >= 1e-7: keeping just a tiny value (the
    outliers dropped) leaves it unscaled."""
    pytest.importorskip("mergekit")
    base = torch.zeros(4)
    experts = [torch.tensor([1e-9, 1.0, -2.0, 3.0]), torch.tensor([-2e-9, 0.5, 1.5, -2.5])]
    params = dict(weight=[1.0, 1.0], density=0.25, gamma=0.75, rescale=True)
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        expected = mergekit_merge(method, base, experts, params)
        assert_fp32_close(merge_tensor(base, experts, **METHODS[method].kwargs(params)), expected)
    assert torch.equal(expected, torch.tensor([-2e-9, 0.0, 0.0, 0.0]))  # the negative majority alone, unscaled
