"""A new user's first hour: the ``nlmerge`` command line (every bad argument is one line under the
subcommand's usage, exit status 2), the set-up scripts (skip what is up to date, say each step,
the demo's files land where the caller is) and the README's examples, run as written."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nlmerge
from nlmerge import cli
from nlmerge.cli import build_parser, environment_defaults, main
from nlmerge.demo import options

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import install_state  # noqa: E402  (scripts/ is not a package)


def _parse_error(argv, capsys):
    """The argparse exit status and stderr of parsing ``argv`` (which must fail)."""
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(argv)
    return err.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,0"], "argument --seeds: seed 0 is given more than once"),
    (["--seeds", "3,4,3"], "argument --seeds: seed 3 is given more than once"),
    (["--seeds", "a,b"], "argument --seeds: seeds are comma-separated integers, got 'a,b'"),
    (["--seeds=-1"], "argument --seeds: seeds must be >= 0 (they seed scikit-learn's split too), got -1"),
    (["--seeds", ","], "argument --seeds: seeds is empty"),
    (["--device", "tpu"], "argument --device: device must be one of cpu, cuda, got 'tpu'"),
    (["--threads", "0"], "argument --threads: threads must be an integer >= 1, got 0"),
    (["--threads", "two"], "argument --threads: threads must be an integer >= 1, got 'two'"),
    (["--align", "greedy"], "argument --align: invalid choice: 'greedy'"),
])
def test_bad_demo_argument_is_one_line_under_the_demo_usage(argv, message, capsys):
    code, err = _parse_error(["demo", *argv], capsys)
    assert code == 2
    assert err.startswith("usage: nlmerge demo ")
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1]
    assert errors[0].startswith(f"nlmerge demo: error: {message}")


def test_cuda_without_a_gpu_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _parse_error(["demo", "--device", "cuda"], capsys)
    assert code == 2
    assert err.splitlines()[-1].startswith(
        f"nlmerge demo: error: argument --device: device 'cuda' asked for, but torch {torch.__version__}")
    assert err.splitlines()[-1].endswith("sees no CUDA device")


def test_out_that_is_a_file_is_an_argument_error(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("a user's file")
    code, err = _parse_error(["demo", "--out", str(existing)], capsys)
    assert code == 2
    assert err.splitlines()[-1] == f"nlmerge demo: error: argument --out: output directory {str(existing)!r} is an existing file"
    code, err = _parse_error(["demo", "--out", str(existing / "sub")], capsys)
    assert err.splitlines()[-1] == (f"nlmerge demo: error: argument --out: output directory {str(existing / 'sub')!r} "
                                    f"cannot be created: {str(existing)!r} is a file")
    assert existing.read_text() == "a user's file"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out == f"nlmerge {nlmerge.__version__}\n"
    with pytest.raises(SystemExit) as err:
        main(["demo", "--help"])
    assert err.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--threads N torch CPU threads, pinned so that a run is reproducible (default: 2)" in text
    assert "--device {cpu,cuda} where the networks train and run; cuda needs a GPU that torch sees (default: cpu)" in text
    assert "(default: 0,1,2; with --quick: 0)" in text


@pytest.mark.parametrize("argv", [
    "M OUT --experts A B --data X Y",
    "M --experts A B --data X Y OUT",  # the README's two forms
    "M --experts A B --data X Y --method repair OUT",
    "M --method repair OUT --experts A B --data X Y",
    "--method repair M --data X Y --experts A B --force OUT",
])
def test_correct_takes_out_anywhere_outside_the_path_lists(argv, monkeypatch):
    from nlmerge.jobs import correct_job

    calls = []
    monkeypatch.setattr(correct_job, "run_correct", lambda *a, **k: calls.append(a) or [a[3]])
    assert main(["correct", *argv.split(), "--no-progress"]) == 0
    assert calls == [("M", ["A", "B"], ["X", "Y"], "OUT")]


@pytest.mark.parametrize("argv, message", [
    ("M --experts A B OUT --data X Y", "OUT taken as the last path of --data ('Y') leaves 3 experts and 1 data files: "
                                       "give one data file per expert, and OUT outside the path lists"),
    ("M --experts A B --data X OUT", "OUT taken as the last path of --data ('OUT') leaves 2 experts and 1 data files"),
    ("M --experts A --data X", "the following arguments are required: OUT"),
    ("M --experts A B --data X OUT Y.safetensors", "OUT taken as the last path of --data ('Y.safetensors') is a "
                                                   "file: give one data file per expert, and OUT outside"),
])
def test_correct_without_a_clear_out_is_an_argument_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Y.safetensors").write_bytes(b"")  # a data file: OUT written before it in the list
    with pytest.raises(SystemExit) as err:
        main(["correct", *argv.split()])
    lines = capsys.readouterr().err.splitlines()
    assert err.value.code == 2 and lines[0].startswith("usage: nlmerge correct ")
    assert lines[-1].startswith(f"nlmerge correct: error: {message}")


@pytest.mark.parametrize("argv, positionals", [
    ("align R --restarts 3 O OUT", ("R", "O", "OUT")),
    ("align R O --force OUT", ("R", "O", "OUT")),
    ("merge C.yml --force OUT", ("C.yml", "OUT")),
    ("tall-task M --force 1 OUT", ("M", 1, "OUT")),
])
def test_other_commands_take_their_positionals_among_the_options(argv, positionals):
    args = build_parser().parse_args(argv.split())
    assert tuple(vars(args)[k] for k in ("reference", "other", "config", "masks", "task", "out")
                 if k in vars(args)) == positionals


@pytest.mark.parametrize("argv, defaults", [
    (["merge", "config.yml", "out"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["--no-progress", "tall-task", "job", "0", "out"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    (["demo", "--quick"], {}),  # many small torch ops: spinning workers serve them better
    (["correct", "merged"], {}),
    ([], {}),
])
def test_environment_defaults_of_the_streaming_commands(argv, defaults):
    assert environment_defaults(argv) == defaults


def test_the_command_imports_no_torch_before_it_sets_the_environment():
    """OpenMP reads its wait policy once, as torch loads: ``import nlmerge.cli`` must not load it."""
    code = "import sys, nlmerge.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dir_lists_the_lazy_subpackages_without_importing_them():
    """``dir(nlmerge)`` names every public subpackage and module (each imported on first use) and
    imports none of them: no torch."""
    code = ("import sys, nlmerge; names = dir(nlmerge); print(' '.join(names)); "
            "print('torch' in sys.modules, [n for n in sys.modules if n.startswith('nlmerge.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, loaded = out.splitlines()
    assert loaded == "False []"
    expected = {p.name for p in (REPO / "nlmerge").iterdir() if (p / "__init__.py").is_file()} | {"cli"}
    assert expected <= set(names.split()) and set(nlmerge.__all__) <= set(names.split())
    assert not [n for n in names.split() if n.startswith("_") and n != "__version__"]
    assert nlmerge.io.LOCK_NAME and nlmerge.jobs.run_merge is nlmerge.run_merge  # listed means usable


def test_demo_command_passes_the_given_seeds_even_with_quick(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("nlmerge.demo.run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    assert main(["demo", "--quick", "--seeds", "3,4", "--out", str(tmp_path), "--threads", "1", "--no-progress"]) == 0
    assert main(["demo", "--quick"]) == 0
    assert calls == [
        (str(tmp_path), dict(seeds=[3, 4], device="cpu", align="weight", quick=True, threads=1, progress=False)),
        ("nlmerge-demo", dict(seeds=None, device="cpu", align="weight", quick=True, threads=2, progress=True)),
    ]


def test_seeds_a_run_uses():
    assert options.resolve_seeds(None, quick=True) == [0]
    assert options.resolve_seeds(None, quick=False) == [0, 1, 2]
    assert options.resolve_seeds((3, 4), quick=True) == [3, 4]
    with pytest.raises(ValueError, match="seed 4 is given more than once"):
        options.resolve_seeds([4, 1, 4], quick=False)
    with pytest.raises(ValueError, match="seeds must be integers, got 1.0"):
        options.resolve_seeds([1.0], quick=False)


def test_run_demo_refuses_bad_options_before_any_work(tmp_path):
    from nlmerge.demo import run_demo

    out = tmp_path / "never"
    for kwargs, message in [(dict(seeds=[0, 0]), "seed 0 is given more than once"),
                            (dict(threads=0), "threads must be an integer >= 1, got 0"),
                            (dict(align="greedy"), "align must be one of weight, activation, got 'greedy'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            run_demo(out, **kwargs)
    assert not out.exists()


# --- set-up scripts ------------------------------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for Python in the set-up scripts: logs "cwd|arguments", answers the checks from the
# environment (FAKE_TORCH, FAKE_INSTALLED: 1 = present / up to date), installs nothing.
echo "$PWD|$*" >> "$FAKE_LOG"
case "$1 ${2:-}" in
    "-c import torch"*) [ "$FAKE_TORCH" = 1 ] && echo 2.13.0 && exit 0; exit 1 ;;
    "scripts/install_state.py check") echo "why"; [ "$FAKE_INSTALLED" = 1 ]; exit $? ;;
    "- ") cat > /dev/null ;;
esac
"""


def _run_script(script, tmp_path, *, torch_present, installed, args=(), cwd=None):
    """Run ``scripts/<script>`` with the fake Python; returns (stdout, the fake's log lines)."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), FAKE_TORCH=str(int(torch_present)),
               FAKE_INSTALLED=str(int(installed)))
    done = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=cwd or tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, log.read_text().splitlines()


def _commands(log):
    return [line.split("|", 1)[1] for line in log]


def test_setup_on_a_fresh_machine_installs_torch_first_then_the_package(tmp_path):
    out, log = _run_script("setup.sh", tmp_path, torch_present=False, installed=False)
    pips = [c for c in _commands(log) if c.startswith("-m pip")]
    assert pips == ["-m pip install --quiet torch==2.13.0",
                    "-m pip install --quiet -e .[test] --config-settings editable_mode=compat"]
    assert _commands(log).index("scripts/install_state.py stamp") > _commands(log).index(pips[1])
    steps = out.splitlines()
    assert steps[0].startswith("setup: installing torch==2.13.0")
    assert steps[1].startswith('setup: why: installing nlmerge, its C++ kernels and the test extras (pip install -e ".[test]"')


def test_setup_skips_pip_when_installed_and_up_to_date(tmp_path):
    out, log = _run_script("setup.sh", tmp_path, torch_present=True, installed=True)
    assert not [c for c in _commands(log) if "pip" in c or c.endswith("stamp")]
    assert out.splitlines() == ["setup: torch 2.13.0 is installed", "setup: nlmerge: why"]


def test_demo_script_runs_in_the_callers_directory(tmp_path):
    """demo.sh runs the demo in the caller's directory, on the installed package even where that
    directory holds a folder named nlmerge (this checkout, seen from its parent), which `python -m`
    would import instead (its AttributeError: no __version__)."""
    caller = tmp_path / "caller"
    (caller / "nlmerge").mkdir(parents=True)
    _, log = _run_script("demo.sh", tmp_path, torch_present=True, installed=True, args=["--out", "mine", "--quick"],
                         cwd=caller)
    where, command = log[-1].split("|", 1)
    args = " demo --out mine --quick"
    assert where == str(caller) and command.startswith("-c ") and command.endswith(args)
    shown = subprocess.run([sys.executable, "-c", command[len("-c "):-len(args)], "demo", "--help"], cwd=caller,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: nlmerge demo"), shown.stderr


def _fake_checkout(root):
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "nlmerge").mkdir()
    (root / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.1"]\n')
    (root / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (root / "csrc" / "cpu" / "merge.cpp").write_text("int f() { return 1; }\n")
    (root / "nlmerge" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")


def test_install_stamp_notices_every_change_that_needs_pip(tmp_path):
    _fake_checkout(tmp_path)
    assert install_state.stamp_state(tmp_path) == (False, "no valid install stamp at build/setup-stamp.json")
    install_state.write_stamp(tmp_path)
    assert install_state.stamp_state(tmp_path) == (True, "installed from this checkout and up to date")
    assert install_state.stamp_state(tmp_path, python="/other/python") == (
        False, f"last installed for another Python ({sys.executable})")
    edits = [
        (lambda: (tmp_path / "pyproject.toml").write_text(
            '[project]\ndependencies = ["torch>=2.1"]\n[project.optional-dependencies]\ntest = ["mergekit"]\n'),
         "pyproject.toml changed since the last install"),
        (lambda: (tmp_path / "setup.py").write_text("# new flags\n"), "setup.py changed since the last install"),
        (lambda: (tmp_path / "csrc" / "cpu" / "merge.cpp").write_text("int f() { return 2; }\n"),
         "csrc/cpu/merge.cpp changed since the last install"),
        (lambda: (tmp_path / "csrc" / "cpu" / "new.h").write_text("#pragma once\n"),
         "csrc/cpu/new.h changed since the last install"),
        (lambda: (tmp_path / "csrc" / "cpu" / "merge.cpp").unlink(), "csrc/cpu/merge.cpp changed since the last install"),
        (lambda: (tmp_path / "nlmerge" / "_C.cpython-311-x86_64-linux-gnu.so").unlink(),
         "the built extension nlmerge/_C.cpython-311-x86_64-linux-gnu.so is gone"),
    ]
    for edit, reason in edits:
        edit()
        assert install_state.stamp_state(tmp_path) == (False, reason)
        install_state.write_stamp(tmp_path)
        assert install_state.stamp_state(tmp_path)[0]


def test_install_check_needs_nlmerge_imported_from_the_checkout(tmp_path):
    _fake_checkout(tmp_path)
    install_state.write_stamp(tmp_path)
    assert install_state.check(tmp_path) == (False, "nlmerge is not installed from this checkout")
    assert install_state.installed_from(Path(nlmerge.__file__).resolve().parent.parent)


def test_demo_output_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "nlmerge-demo/results.json"], cwd=REPO)
    assert done.returncode == 0


# --- the README's examples, as written -----------------------------------------------------------

def _readme_blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_examples_run_in_order(tmp_path, monkeypatch):
    """Every Python block of the README runs, in order, in one namespace that holds only the models
    and data a user brings (the correction example follows on from the merge example)."""
    from nlmerge.align.models import ResNet

    monkeypatch.chdir(tmp_path)  # the TALL example saves a file
    torch.manual_seed(0)

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()

    namespace = {
        "model_base": mlp(), "expert_a": mlp(), "expert_b": mlp(), "expert_c": mlp(),
        "model_a": ResNet(widths=(8, 16, 32), blocks_per_stage=2).eval(),
        "model_b": ResNet(widths=(8, 16, 32), blocks_per_stage=2).eval(),
        "loader": [torch.randn(4, 3, 8, 8)],
        "ids": torch.randint(0, 10, (4, 6)), "mask": torch.ones(4, 6, dtype=torch.int64),  # nlmerge correct's data
        "images": torch.randn(2, 3, 8, 8),
        **{f"task_{t}_batches": [torch.randn(16, 4) + t] for t in range(3)},
    }
    blocks = _readme_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    per_task, merged_model = namespace["per_task"], namespace["merged_model"]
    assert len(per_task) == 3
    x = namespace["task_0_batches"][0]
    torch.testing.assert_close(merged_model(x), torch.func.functional_call(
        namespace["model_base"], namespace["merged"], (x,)))  # the merged state dict, in a module
    assert namespace["state_dict_0"].keys() == namespace["model_base"].state_dict().keys()


def test_readme_fold_example_runs_on_a_llama():
    """The README's folding block on a tiny Llama loaded with its bias switches (zero biases): the
    sites it keeps fold, and the folded state dict computes the corrected model. The default sites
    do not fold (the residual stream): an error that names the site."""
    import copy

    transformers = pytest.importorskip("transformers")
    from nlmerge import correct

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    merged_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in merged_model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    expert_models = [copy.deepcopy(merged_model) for _ in range(2)]
    with torch.no_grad():
        for p in (p for e in expert_models for p in e.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    batches = [[{"input_ids": torch.randint(0, 64, (4, 8))}] for _ in range(2)]
    with pytest.raises(ValueError, match=r"site 'model\.layers\.0' is the output of LlamaDecoderLayer"):
        correct.fold(correct.tact(merged_model, expert_models, batches)[0])

    namespace = {"correct": correct, "merged_model": merged_model, "expert_models": expert_models, "batches": batches}
    (block,) = [b for b in _readme_blocks() if "foldable = " in b]
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["foldable"]) == 8  # per layer: the attention context, gate, up, down
    folded = copy.deepcopy(merged_model)
    folded.load_state_dict(namespace["state_dict_0"])
    corrected = correct.tact(merged_model, expert_models, batches, sites=namespace["foldable"])[0]
    torch.testing.assert_close(folded(**batches[0][0]).logits, corrected(**batches[0][0]).logits,
                               rtol=1e-4, atol=1e-5)


def test_readme_says_once_that_tasks_are_numbered_from_0():
    text = (REPO / "README.md").read_text()
    assert len(re.findall(r"numbered from 0", text)) == 1
    for variable, index in re.findall(r"(\w+) = \w+\.task_state_dict\((\d+)\)", text):
        assert variable == f"task_{index}"


def test_the_first_stop_signal_interrupts_and_later_ones_wait_for_the_clean_up():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does; from then on SIGTERM and SIGINT are
    ignored, so that a second one cannot cut the command's clean-up short."""
    import signal

    before = {each: signal.getsignal(each) for each in (signal.SIGTERM, signal.SIGINT)}
    with cli._interrupt_once() as signals:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert signals == [signal.SIGTERM]
        assert all(signal.getsignal(each) == signal.SIG_IGN for each in (signal.SIGTERM, signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the clean-up goes on
        time.sleep(0.1)
        assert signals == [signal.SIGTERM] and cli._interrupted_status(signals) == 143
    assert {each: signal.getsignal(each) for each in before} == before  # the caller's handlers are back
