"""``nlmerge demo --quick`` end to end: the outputs, the results.json schema, and the direction of
each claim the demo makes (the numbers are the full demo's business, see README "The demo")."""
import json

import pytest
import torch

from nlmerge.align import apply_permutations
from nlmerge.cli import main
from nlmerge.demo.data import TASKS, shifted_copies
from nlmerge.demo.pipeline import CORRECTIONS, DEPTH, METHODS, SETTINGS, align_b_to_a
from nlmerge.demo.training import make_model

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--seeds", "3", "--no-progress"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_outputs_and_schema(quick_run):
    out, results = quick_run
    for name in ("accuracy.png", "variance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    assert results["seeds"] == [3]
    assert results["seconds"] > 0
    assert set(results["settings"]) == set(SETTINGS)
    for setting in SETTINGS:
        s = results["settings"][setting]
        assert len(s["experts"]["accuracy"]) == 4
        assert all(0.85 <= a <= 1 for a in s["experts"]["accuracy"])
        assert set(s["methods"]) == set(METHODS)
        for method in METHODS:
            assert set(s["methods"][method]) == set(CORRECTIONS)
            for cell in s["methods"][method].values():
                assert len(cell["accuracy"]) == 4 and all(0 <= a <= 1 for a in cell["accuracy"])
                assert len(cell["variance_ratio"]) == DEPTH and all(r > 0 for r in cell["variance_ratio"])
                expected = sum(a / e for a, e in zip(cell["accuracy"], s["experts"]["accuracy"])) / 4
                assert cell["normalized_accuracy"] == pytest.approx(expected)


def test_claims_point_the_right_way(quick_run):
    _, results = quick_run
    nl = results["settings"]["nonlocal"]["methods"]
    lo = results["settings"]["local"]["methods"]
    na = lambda methods, m, c: methods[m][c]["normalized_accuracy"]  # noqa: E731
    assert na(nl, "ties+tall", "none") < na(lo, "ties+tall", "none")  # non-local merging fails, local works
    assert na(nl, "ties+tall", "tact") > na(nl, "ties+tall", "none")  # TACT recovers
    assert na(nl, "ties+tall", "tact") > na(nl, "ties+tall", "repair")  # ... better than REPAIR
    assert na(nl, "ties+tall", "tact") > na(nl, "base", "tact")  # merging adds value
    assert max(nl["task_arithmetic"]["none"]["variance_ratio"]) < 1  # variance collapse
    for methods in (nl, lo):
        for m in METHODS:
            before = max(abs(r - 1) for r in methods[m]["none"]["variance_ratio"])
            after = max(abs(r - 1) for r in methods[m]["tact"]["variance_ratio"])
            assert after < before, m


@pytest.mark.parametrize("argv", [["demo", "--seeds", "a,b"], ["demo", "--seeds=-1"], ["demo", "--device", "tpu"],
                                  ["demo", "--threads", "0"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_shifted_copies_move_every_pixel_by_one():
    image = torch.arange(1.0, 65.0).reshape(1, 8, 8)
    shifts = shifted_copies(image)
    assert shifts.shape == (9, 8, 8)
    k = 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            expected = torch.zeros(8, 8)
            for y in range(8):
                for x in range(8):
                    if 0 <= y - dy < 8 and 0 <= x - dx < 8:
                        expected[y, x] = image[0, y - dy, x - dx]
            assert torch.equal(shifts[k], expected), (dy, dx)
            k += 1


def test_tasks_label_their_digits_into_range():
    for task in TASKS:
        labels = task.label(torch.tensor(task.digits))
        assert labels.min() == 0 and labels.max() == task.num_classes - 1, task.name
        images = torch.rand(3, 8, 8)
        shifted = task.shift(images)
        assert shifted.shape == images.shape and not torch.equal(shifted, images), task.name


@pytest.mark.parametrize("how", ["weight", "activation"])
def test_alignment_of_foundations_preserves_b(how):
    """Both alignments give permutations whose application leaves B's function unchanged."""
    torch.manual_seed(0)
    a, b = make_model(10).eval(), make_model(10).eval()
    x = torch.randn(64, 64)
    spec, perms = align_b_to_a(a, b, how, x)
    assert set(perms) == set(spec.perms)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    aligned = make_model(10).eval()
    aligned.load_state_dict(apply_permutations(spec, perms, b.state_dict()))
    torch.testing.assert_close(aligned(x), b(x), rtol=1e-5, atol=1e-5)
