"""Shared test set-up: Triton runs in its interpreter when there is no GPU; helpers for the
backend matrix, nasty input values and per-dtype comparisons."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before triton is first imported (nlmerge imports it lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nlmerge import kernels  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ON_GPU = torch.cuda.is_available()


def fast_backends():
    """pytest params of the fast backends, each skipped when it cannot run here."""
    params = []
    for name in ("cpu", "triton"):
        module, reason = kernels.load(name)
        marks = [] if module is not None else [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend):
    return "cuda" if backend == "triton" and ON_GPU else "cpu"


def max_size(backend):
    """Triton's interpreter is slow: small shapes there, everything on the compiled backends."""
    return 5000 if backend == "triton" and not ON_GPU else 10**7


KINDS = ("normal", "ties", "zeros", "equal", "denormal", "huge", "mixed")


def nasty(kind, shape, dtype, generator):
    """Random values of one kind: the adversarial inputs every fast kernel is held to."""
    n = int(torch.Size(shape).numel())
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    tiny = 1.0e-7 if dtype == torch.float16 else 1.0e-40
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    if kind == "normal":
        x = torch.randn(n, generator=generator)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=generator).float() * 0.5
    elif kind == "zeros":
        x = signs * 0.0  # +0 and -0
    elif kind == "equal":
        x = torch.full((n,), 0.75)
    elif kind == "denormal":
        x = torch.randn(n, generator=generator) * tiny
    elif kind == "huge":
        x = signs * big * torch.rand(n, generator=generator).clamp_min(0.5)
    else:  # a bit of everything, in random places
        pick = torch.randint(0, 5, (n,), generator=generator)
        x = torch.randn(n, generator=generator)
        x = torch.where(pick == 1, signs * 0.0, x)
        x = torch.where(pick == 2, signs * tiny, x)
        x = torch.where(pick == 3, signs * big, x)
        x = torch.where(pick == 4, signs * 0.5, x)
    return x.to(dtype).reshape(shape)


def assert_matches(actual, expected):
    """fp32 within 1e-6 relative; fp16/bf16 within one ulp of the output dtype (DESIGN.md)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0.0)
        return
    a, e = actual.float(), expected.float()
    ulp = (torch.nextafter(expected.abs(), torch.tensor(float("inf"), dtype=expected.dtype)) - expected.abs()).float()
    bad = (a - e).abs() > ulp
    assert not bad.any(), f"{int(bad.sum())} elements differ by more than one ulp, e.g. {a[bad][:5]} vs {e[bad][:5]}"


@pytest.fixture
def generator(request):
    """A generator seeded per test, fresh values every run of the suite (seed printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("NLMERGE_TEST_SEED") is None else int(os.environ["NLMERGE_TEST_SEED"])
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (rerun with NLMERGE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def random_perms(spec, sizes, generator):
    """Random permutations of every symmetry of a spec: head-structured ones move whole heads and
    units within them; an attention group's members move together (random key/value heads, query
    heads within their group, q/k units when the group allows it, v/o units)."""
    from nlmerge.align.spec import compose_heads

    def rand(n):
        return torch.randperm(n, generator=generator)

    perms = {}
    for name, group in spec.attention.items():
        n_kv, g = group.kv_heads, group.group
        d_qk, d_vo = sizes[group.q] // group.heads, sizes[group.v] // n_kv
        pi = rand(n_kv)
        rho = torch.stack([rand(g) for _ in range(n_kv)])
        tau = torch.stack([rand(d_qk) if group.qk_units else torch.arange(d_qk) for _ in range(n_kv)])
        sigma = torch.stack([rand(d_vo) for _ in range(n_kv)])
        zeros = torch.zeros(n_kv, 1, dtype=torch.int64)
        perms.update({group.q: compose_heads(pi, rho, tau), group.k: compose_heads(pi, zeros, tau),
                      group.v: compose_heads(pi, zeros, sigma), group.o: compose_heads(pi, rho, sigma)})
    for name, n in sizes.items():
        if name in spec.grouped:
            continue
        heads = spec.heads.get(name)
        if heads is None:
            perms[name] = rand(n)
        else:
            d = n // heads
            order = rand(heads)
            perms[name] = torch.cat([order[h] * d + rand(d) for h in range(heads)])
    return perms
