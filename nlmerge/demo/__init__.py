"""``nlmerge demo``: an end-to-end non-local merge on scikit-learn's bundled digits.

Experts fine-tuned from two different foundation MLPs are aligned (weight matching), merged (base,
task arithmetic, TIES, TIES + TALL masks, consensus) and corrected (none, REPAIR, TACT); the same
merges of experts from one foundation are the control. ``run_demo`` writes ``results.json``,
``accuracy.png`` and ``variance.png`` (README: "The demo").

- ``options``: the options' defaults and checks (shared with ``nlmerge demo``).
- ``data``: the digits, the four tasks (label split + input-domain shift), augmentation.
- ``training``: the MLPs, foundations, experts (linear probe, then fine-tuning).
- ``pipeline``: one seed: align, merge, correct, evaluate.
- ``report``: seed averages, the table, the claims, the figures.
"""
import contextlib
import dataclasses
import os
import sys
import time

import torch

from nlmerge.demo import options
from nlmerge.demo.data import TASKS
from nlmerge.demo.pipeline import run_seed, steps_per_seed
from nlmerge.demo.report import aggregate, claims_report, plot, table, write_json
from nlmerge.demo.training import Schedule

QUICK_SCHEDULE = Schedule(foundation=1000, probe=100, finetune=500)


def run_demo(out="nlmerge-demo", *, seeds=None, device="cpu", align="weight", quick=False, threads=2,
             progress=True, stream=None):
    """Run the demo and write its outputs to ``out``.

    Parameters
    ----------
    out : str or path
        Output directory (created): ``results.json``, ``accuracy.png``, ``variance.png``.
    seeds : sequence of int, optional
        Distinct seeds >= 0, one full run each (data split, foundations, experts, merges); results
        are averaged. Default: 0, 1, 2; with ``quick``: 0.
    device : "cpu" or "cuda"
    align : "weight" or "activation"
        How foundation B is aligned to A.
    quick : bool
        Shorter training: a smoke test of the whole pipeline, which checks the direction of each
        claim (``report.quick_claims``); the full run checks the claims' numbers
        (``report.full_claims``), which are set for averages over seeds of the full training.
    threads : int
        torch's CPU thread count (>= 1), pinned so that a run is reproducible on one machine.
    progress : bool
        Show a progress bar (on stderr).
    stream : file, optional
        Where the table and the claims are printed (default: ``sys.stdout`` at the time of the call).

    Returns
    -------
    dict
        The contents of ``results.json``.

    Raises
    ------
    ValueError
        An option out of range (``options.check_*``), before any work.
    ImportError
        A dependency of the demo (scikit-learn, matplotlib, tqdm) is missing.
    """
    _require("sklearn", "matplotlib", "tqdm")  # before minutes of training, not after
    seeds = options.resolve_seeds(seeds, quick)
    options.check_device(device)
    options.check_align(align)
    options.check_threads(threads)
    options.check_out(out)
    stream = sys.stdout if stream is None else stream
    schedule = QUICK_SCHEDULE if quick else Schedule()
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    per_seed = []
    with _pinned(threads, device), _progress(len(seeds) * steps_per_seed(), progress) as bar:
        for seed in seeds:
            def step(what, seed=seed):
                bar.set_postfix_str(f"seed {seed}: {what}", refresh=False)
                bar.update()
            per_seed.append(run_seed(seed, schedule, device=device, align=align, on_step=step))
    results = {
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "align": align,
        "quick": quick,
        "tasks": [t.name for t in TASKS],
        "schedule": dataclasses.asdict(schedule),
        "settings": aggregate(per_seed),
    }
    write_json(results, os.path.join(out, "results.json"))
    plot(results, out)
    print(table(per_seed), file=stream)
    print(claims_report(results), file=stream)
    print(f"\n{len(seeds)} seed{'s' if len(seeds) > 1 else ''} in {results['seconds']:.0f} s; "
          f"wrote results.json, accuracy.png, variance.png to {out}", file=stream)
    return results


@contextlib.contextmanager
def _pinned(threads, device):
    """torch's thread count pinned and its random state seeded by the demo, both restored after
    (a caller's process is left as it was)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
            yield
    finally:
        torch.set_num_threads(previous)


def _require(*modules):
    """ImportError naming every missing optional dependency of the demo and how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}: pip install 'nlmerge[demo]'")


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="nlmerge demo", unit="step", file=sys.stderr)
