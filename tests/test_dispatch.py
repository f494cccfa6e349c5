"""Backend choice: auto, by name, by NLMERGE_BACKEND, and clear errors for what cannot run."""
import pytest
import torch

from nlmerge import kernels, ops
from nlmerge.ops import _dispatch


def test_unknown_backend_is_refused(monkeypatch):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="backend='cuda-magic' is not a backend"):
        ops.magnitude_threshold(x, 0.5, backend="cuda-magic")
    monkeypatch.setenv("NLMERGE_BACKEND", "nope")
    with pytest.raises(ValueError, match="NLMERGE_BACKEND='nope'"):
        ops.task_arithmetic([x, x])


def test_env_sets_default(monkeypatch):
    monkeypatch.setenv("NLMERGE_BACKEND", "torch")
    assert _dispatch.resolve(None, torch.device("cpu"), "op") == ("torch", None)
    assert _dispatch.resolve("torch", torch.device("cpu"), "op") == ("torch", None)


def test_auto_on_cpu_picks_the_cpu_kernels_when_built(monkeypatch):
    monkeypatch.delenv("NLMERGE_BACKEND", raising=False)
    module, _ = kernels.load("cpu")
    name, _ = _dispatch.resolve(None, torch.device("cpu"), "op")
    assert name == ("cpu" if module is not None else "torch")


def test_unavailable_backend_named_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("NLMERGE_BACKEND", raising=False)
    monkeypatch.setitem(kernels._loaded, "cpu", (None, "ImportError: no _C"))
    monkeypatch.setattr(_dispatch, "_warned_no_cpu_kernels", False)
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: ImportError: no _C"):
        ops.task_arithmetic([torch.ones(3)], backend="cpu")
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels are not built"):
        out = ops.task_arithmetic([torch.ones(3), torch.ones(3)])
    assert torch.equal(out, torch.full((3,), 2.0))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.task_arithmetic([torch.ones(3)], backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpu_backend_refuses_cuda_tensors_message():
    # without a GPU we can only check the message path through resolve itself
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
        _dispatch.resolve("cpu", torch.device("cuda"), "op")
