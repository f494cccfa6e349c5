"""``nlmerge demo --quick`` end to end: the outputs, the results.json schema, and the direction of
each claim the demo makes (the numbers are the full demo's business, see README "The demo")."""
import json

import pytest

from nlmerge.cli import main
from nlmerge.demo.pipeline import CORRECTIONS, DEPTH, METHODS, SETTINGS

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


@pytest.mark.parametrize("argv", [["demo", "--seeds", "a,b"], ["demo", "--device", "tpu"], ["demo", "--threads", "0"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "usage" in capsys.readouterr().err
