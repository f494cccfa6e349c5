"""``nlmerge demo --quick`` end to end: the outputs, the results.json schema, what a quick run
prints (the direction of each claim; the numbers are the full demo's business, see README "The
demo"), and the report's seed statistics, table and figures on hand-made results."""
import contextlib
import io
import json
import statistics

import pytest
import torch

from nlmerge.align import apply_permutations
from nlmerge.cli import main
from nlmerge.demo.data import TASKS, shifted_copies
from nlmerge.demo.pipeline import CORRECTIONS, DEPTH, METHODS, SETTINGS, align_b_to_a
from nlmerge.demo.report import accuracy_figure, aggregate, full_claims, quick_claims, table, variance_figure
from nlmerge.demo.training import make_model

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--quick", "--out", str(out), "--seeds", "3", "--no-progress"]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f), printed.getvalue()


def test_outputs_and_schema(quick_run):
    out, results, _ = quick_run
    for name in ("accuracy.png", "variance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    assert results["seeds"] == [3]
    assert results["quick"] is True
    assert results["seconds"] > 0
    assert set(results["settings"]) == set(SETTINGS)
    for setting in SETTINGS:
        s = results["settings"][setting]
        assert len(s["experts"]["accuracy"]) == 4
        assert all(0.85 <= a <= 1 for a in s["experts"]["accuracy"])
        assert s["experts"]["accuracy_std"] is None  # one seed: no spread
        assert set(s["methods"]) == set(METHODS)
        for method in METHODS:
            assert set(s["methods"][method]) == set(CORRECTIONS)
            for cell in s["methods"][method].values():
                assert len(cell["accuracy"]) == 4 and all(0 <= a <= 1 for a in cell["accuracy"])
                assert len(cell["variance_ratio"]) == DEPTH and all(r > 0 for r in cell["variance_ratio"])
                expected = sum(a / e for a, e in zip(cell["accuracy"], s["experts"]["accuracy"])) / 4
                assert cell["normalized_accuracy"] == pytest.approx(expected)
                assert cell["accuracy_std"] is cell["normalized_accuracy_std"] is cell["variance_ratio_std"] is None


def test_claims_point_the_right_way(quick_run):
    _, results, _ = quick_run
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


def test_quick_run_prints_claims_that_hold_and_names_the_full_runs(quick_run):
    _, results, printed = quick_run
    assert "[NO" not in printed
    assert all(holds for _, _, holds in quick_claims(results))
    for statement, measured, _ in quick_claims(results):
        assert f"  [yes] {statement}: {measured}\n" in printed
    assert f"All {len(quick_claims(results))} claims hold." in printed
    listed = printed.split("the full run (`nlmerge demo`, no --quick) checks them:\n", 1)[1]
    assert listed.startswith("".join(f"  - {statement}\n" for statement, _, _ in full_claims(results)))


def test_one_seed_prints_no_spreads(quick_run):
    _, results, printed = quick_run
    assert "±" not in printed
    assert printed.startswith("Accuracy on the held-out digits (%), one seed;")


# --- the report on hand-made results of two seeds ------------------------------------------------

def _seed_result(value):
    """A ``run_seed``-shaped result whose every accuracy is ``value`` and every ratio ``value / 2``."""
    cell = {"accuracy": [value] * 4, "normalized_accuracy": value, "variance_ratio": [value / 2] * DEPTH}
    setting = {"experts": {"accuracy": [1.0] * 4},
               "methods": {m: {c: dict(cell) for c in CORRECTIONS} for m in METHODS}}
    return {s: setting for s in SETTINGS}


TWO_SEEDS = [_seed_result(0.4), _seed_result(0.6)]
STD = statistics.stdev([0.4, 0.6])  # 0.1414...


def test_aggregate_keeps_mean_and_std_of_every_value():
    cell = aggregate(TWO_SEEDS)["nonlocal"]["methods"]["ties"]["tact"]
    assert cell["accuracy"] == pytest.approx([0.5] * 4) and cell["accuracy_std"] == pytest.approx([STD] * 4)
    assert cell["normalized_accuracy"] == pytest.approx(0.5) and cell["normalized_accuracy_std"] == pytest.approx(STD)
    assert cell["variance_ratio"] == pytest.approx([0.25] * DEPTH)
    assert cell["variance_ratio_std"] == pytest.approx([STD / 2] * DEPTH)
    assert aggregate(TWO_SEEDS)["local"]["experts"] == {"accuracy": [1.0] * 4, "accuracy_std": [0.0] * 4}
    one = aggregate(TWO_SEEDS[:1])["local"]["methods"]["base"]["none"]
    assert one["accuracy_std"] is one["normalized_accuracy_std"] is one["variance_ratio_std"] is None


def test_table_shows_spreads_with_two_seeds():
    text = table(TWO_SEEDS)
    assert text.startswith("Accuracy on the held-out digits (%), mean ± std over 2 seeds;")
    rows = [line.split() for line in text.splitlines() if line.startswith("ties+tall ")]
    assert [row[1] for row in rows] == list(CORRECTIONS) * 2
    assert all(row[2:] == ["50.0", "±14.1"] * 5 for row in rows)


def _results(per_seed, seeds):
    return {"seeds": seeds, "quick": False, "settings": aggregate(per_seed)}


def _error_bars(ax):
    """Half-heights of the vertical error bars drawn on ``ax`` (``bar(yerr=)`` draws them through
    ``errorbar`` too)."""
    from matplotlib.container import ErrorbarContainer

    return [(segment[1][1] - segment[0][1]) / 2 for c in ax.containers
            if isinstance(c, ErrorbarContainer) and c.has_yerr for segment in c.lines[2][0].get_segments()]


def _legend_is_outside_every_panel(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = fig.legends[0]
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 10
    box = legend.get_window_extent(renderer)
    return not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_figures_have_titles_error_bars_and_a_readable_legend():
    import matplotlib.pyplot as plt

    results = _results(TWO_SEEDS, [0, 1])
    acc, var = accuracy_figure(results), variance_figure(results)
    try:
        assert "non-local vs local" in acc.get_suptitle() and "var(merged) / var(expert)" in var.get_suptitle()
        for fig in (acc, var):
            assert "mean ± std over seeds 0,1 (error bars)" in fig.get_suptitle()
            assert _legend_is_outside_every_panel(fig)
        for ax in acc.axes:
            assert _error_bars(ax) == pytest.approx([100 * STD] * len(METHODS) * len(CORRECTIONS))
        for ax in var.axes:
            assert _error_bars(ax) == pytest.approx([STD / 2] * DEPTH * len(CORRECTIONS))
    finally:
        plt.close("all")


def test_figures_of_one_seed_have_no_error_bars():
    import matplotlib.pyplot as plt

    results = _results(TWO_SEEDS[:1], [7])
    try:
        for fig in (accuracy_figure(results), variance_figure(results)):
            assert "seed 7 alone (no error bars" in fig.get_suptitle()
            assert not any(_error_bars(ax) for ax in fig.axes)
    finally:
        plt.close("all")


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
