"""The demo's outputs: seed averages (``results.json``), the printed table, the claims it checks and
the two figures."""
import contextlib
import json
import os
import statistics

from nlmerge.demo.data import TASKS
from nlmerge.demo.pipeline import CORRECTIONS, METHODS, SETTINGS


def _mean_std(values):
    """Mean and sample standard deviation of ``values``; the deviation is None for one value (a
    spread needs two seeds)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(per_seed):
    """Seed averages of the ``run_seed`` results, entry by entry (lists elementwise).

    Beside every numeric entry ``k`` (a number or a list of numbers) goes ``k_std``: the sample
    standard deviation over the seeds (same shape), or None when there is one seed.
    """
    def agg(items):
        out = {}
        for key, first in items[0].items():
            values = [item[key] for item in items]
            if isinstance(first, dict):
                out[key] = agg(values)
            elif isinstance(first, list):
                columns = [_mean_std(column) for column in zip(*values)]
                out[key] = [mean for mean, _ in columns]
                out[f"{key}_std"] = None if len(items) == 1 else [std for _, std in columns]
            else:
                out[key], out[f"{key}_std"] = _mean_std(values)
        return out
    return agg(per_seed)


def _percent(values):
    """One table cell: the mean of ``values`` in %, and ``± std`` when there are two or more."""
    mean, std = _mean_std(values)
    return f"{100 * mean:5.1f}" if std is None else f"{100 * mean:5.1f} ±{100 * std:4.1f}"


SETTING_NAMES = {
    "nonlocal": "non-local: experts of tasks 0-1 from foundation A, of 2-3 from B (aligned to A)",
    "local": "local control: every expert from foundation A",
}


def table(per_seed):
    """The readable table: per task accuracy and normalized accuracy (%), the mean over seeds and,
    with two or more seeds, ± their standard deviation."""
    spread = f"mean ± std over {len(per_seed)} seeds" if len(per_seed) > 1 else "one seed"
    lines = [f"Accuracy on the held-out digits (%), {spread}; normalized = mean over tasks of merged / expert"]
    width = max(len(_percent([0.5] * len(per_seed))), *(len(t.name) for t in TASKS))

    def row(name, correction, cells):
        return f"{name:16s} {correction:10s} " + " ".join(f"{c:>{width}s}" for c in cells)

    for setting in SETTINGS:
        runs = [r[setting] for r in per_seed]
        lines += ["", SETTING_NAMES[setting], row("method", "correction", [t.name for t in TASKS] + ["normalized"])]
        accs = [r["experts"]["accuracy"] for r in runs]
        lines.append(row("experts", "", [_percent([a[t] for a in accs]) for t in range(len(TASKS))] + ["100.0"]))
        for method in METHODS:
            for correction in CORRECTIONS:
                cells = [r["methods"][method][correction] for r in runs]
                per_task = [_percent([c["accuracy"][t] for c in cells]) for t in range(len(TASKS))]
                lines.append(row(method, correction, per_task + [_percent([c["normalized_accuracy"] for c in cells])]))
    return "\n".join(lines)


def _normalized(results):
    """``na(method, correction, setting="nonlocal")``: seed-averaged normalized accuracy in %."""
    settings = results["settings"]
    return lambda m, c, s="nonlocal": 100 * settings[s]["methods"][m][c]["normalized_accuracy"]


def _ratios(results, correction):
    """Variance ratios of every layer of every method of both settings under ``correction``."""
    return {(s, m): results["settings"][s]["methods"][m][correction]["variance_ratio"]
            for s in SETTINGS for m in METHODS}


def full_claims(results):
    """The demo's claims with their numbers, each ``(statement, measured, holds)``, from seed-averaged
    results of the full training (set for averages over seeds 0, 1, 2)."""
    na = _normalized(results)
    gap_closed = (na("ties+tall", "tact") - na("ties+tall", "none")) / max(100 - na("ties+tall", "none"), 1e-9)
    after_tact = max(abs(r - 1) for ratios in _ratios(results, "tact").values() for r in ratios)
    ta_ratio = max(results["settings"]["nonlocal"]["methods"]["task_arithmetic"]["none"]["variance_ratio"])
    return [
        ("non-local ties+tall merges badly: normalized accuracy <= 85%", f"{na('ties+tall', 'none'):.1f}%",
         na("ties+tall", "none") <= 85),
        ("the same merge of experts from one foundation works: >= 92%", f"{na('ties+tall', 'none', 'local'):.1f}%",
         na("ties+tall", "none", "local") >= 92),
        ("... and is >= 10 points above non-local",
         f"{na('ties+tall', 'none', 'local') - na('ties+tall', 'none'):+.1f}",
         na("ties+tall", "none", "local") - na("ties+tall", "none") >= 10),
        ("TACT brings non-local ties+tall to >= 90%", f"{na('ties+tall', 'tact'):.1f}%", na("ties+tall", "tact") >= 90),
        ("... recovering >= 60% of the gap to the experts", f"{100 * gap_closed:.0f}%", gap_closed >= 0.6),
        ("TACT beats REPAIR by >= 15 points", f"{na('ties+tall', 'tact') - na('ties+tall', 'repair'):+.1f}",
         na("ties+tall", "tact") - na("ties+tall", "repair") >= 15),
        ("merging adds value: ties+tall + TACT >= base + TACT + 5 points",
         f"{na('ties+tall', 'tact') - na('base', 'tact'):+.1f}", na("ties+tall", "tact") - na("base", "tact") >= 5),
        ("variance collapse: non-local task_arithmetic ratio <= 0.8 in every layer", f"max {ta_ratio:.2f}",
         ta_ratio <= 0.8),
        ("after TACT every layer of every method within 1 +- 0.05", f"max |r - 1| {after_tact:.3f}",
         after_tact <= 0.05),
    ]


def quick_claims(results):
    """The direction of each claim, ``(statement, measured, holds)``: what a quick run (short
    training, one seed) can show; the numbers are ``full_claims``'s."""
    na = _normalized(results)
    worst = lambda ratios: max(abs(r - 1) for r in ratios)  # noqa: E731
    before, after = _ratios(results, "none"), _ratios(results, "tact")
    ta_ratio = max(results["settings"]["nonlocal"]["methods"]["task_arithmetic"]["none"]["variance_ratio"])
    return [
        ("the same merge of experts from one foundation works better: local ties+tall > non-local",
         f"{na('ties+tall', 'none', 'local'):.1f}% > {na('ties+tall', 'none'):.1f}%",
         na("ties+tall", "none", "local") > na("ties+tall", "none")),
        ("TACT raises non-local ties+tall", f"{na('ties+tall', 'tact'):.1f}% > {na('ties+tall', 'none'):.1f}%",
         na("ties+tall", "tact") > na("ties+tall", "none")),
        ("TACT beats REPAIR on non-local ties+tall",
         f"{na('ties+tall', 'tact'):.1f}% > {na('ties+tall', 'repair'):.1f}%",
         na("ties+tall", "tact") > na("ties+tall", "repair")),
        ("merging adds value: non-local ties+tall + TACT > base + TACT",
         f"{na('ties+tall', 'tact'):.1f}% > {na('base', 'tact'):.1f}%", na("ties+tall", "tact") > na("base", "tact")),
        ("variance collapse: non-local task_arithmetic ratio < 1 in every layer", f"max {ta_ratio:.2f}", ta_ratio < 1),
        ("TACT brings every method's layers closer to 1 than no correction",
         f"max |r - 1| {max(map(worst, after.values())):.3f} < {max(map(worst, before.values())):.3f}",
         all(worst(after[k]) < worst(before[k]) for k in before)),
    ]


def claims_report(results):
    """The printed claims: a quick run checks ``quick_claims`` and lists ``full_claims``'s
    statements as the full run's; a full run checks ``full_claims``. Ends with how many hold."""
    n = len(results["seeds"])
    over = f"averages over {n} seeds" if n > 1 else f"seed {results['seeds'][0]}"
    if results["quick"]:
        checked = quick_claims(results)
        lines = [f"\nWhat this quick run shows ({over}, short training: the direction of each claim):"]
    else:
        checked = full_claims(results)
        lines = [f"\nWhat the demo shows ({over}):"]
    lines += [f"  [{'yes' if holds else 'NO '}] {statement}: {measured}" for statement, measured, holds in checked]
    failed = sum(not holds for _, _, holds in checked)
    lines.append(f"{failed} of {len(checked)} claims do NOT hold." if failed else f"All {len(checked)} claims hold.")
    if results["quick"]:
        lines.append("These claims' numbers are set for averages over seeds 0,1,2 of the full training; "
                     "the full run (`nlmerge demo`, no --quick) checks them:")
        lines += [f"  - {statement}" for statement, _, _ in full_claims(results)]
    return "\n".join(lines)


@contextlib.contextmanager
def _replacing(path):
    """Yield a temporary path that replaces ``path`` on success: never a half-written output."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(results, path):
    """Write ``results`` to ``path`` (replaced at once when complete)."""
    with _replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)


def _spread(results):
    """How a figure's values are made, for its title."""
    seeds = results["seeds"]
    if len(seeds) > 1:
        return f"mean ± std over seeds {','.join(map(str, seeds))} (error bars)"
    return f"seed {seeds[0]} alone (no error bars: a spread needs two seeds)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _scaled(values, scale):
    """``values`` (a list, or None for one seed) times ``scale``."""
    return None if values is None else [scale * v for v in values]


def accuracy_figure(results):
    """Normalized accuracy per method (groups) and correction (bars), one panel per setting, with
    the seeds' standard deviation as error bars when there are two or more seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(13, 5), sharey=True, layout="constrained")
    width = 0.8 / len(CORRECTIONS)
    for ax, setting in zip(axes, SETTINGS):
        methods = results["settings"][setting]["methods"]
        for i, correction in enumerate(CORRECTIONS):
            cells = [methods[m][correction] for m in METHODS]
            stds = [c["normalized_accuracy_std"] for c in cells]
            ax.bar([k + (i - (len(CORRECTIONS) - 1) / 2) * width for k in range(len(METHODS))],
                   [100 * c["normalized_accuracy"] for c in cells], width, label=correction,
                   yerr=None if None in stds else _scaled(stds, 100), capsize=3)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(SETTING_NAMES[setting], fontsize=10)
    axes[0].set_ylabel("normalized accuracy (% of the experts')")
    fig.suptitle(f"Merged models' accuracy relative to the experts, non-local vs local merging\n{_spread(results)}")
    fig.legend(*axes[0].get_legend_handles_labels(), title="correction", loc="outside right center", fontsize=10)
    return fig


def variance_figure(results):
    """The variance ratio per hidden layer, one panel per setting (rows) and method (columns), one
    line per correction, with the seeds' standard deviation as error bars when there are two or
    more seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(SETTINGS), len(METHODS), figsize=(17, 6.5), sharex=True, sharey=True,
                             layout="constrained")
    for row, setting in zip(axes, SETTINGS):
        for ax, method in zip(row, METHODS):
            for correction in CORRECTIONS:
                cell = results["settings"][setting]["methods"][method][correction]
                layers = range(1, len(cell["variance_ratio"]) + 1)
                ax.errorbar(layers, cell["variance_ratio"], yerr=cell["variance_ratio_std"], marker="o", capsize=3,
                            label=correction)
            ax.axhline(1, color="k", lw=0.8, ls="--")
            ax.set_title(method, fontsize=10)
        row[0].set_ylabel(f"{SETTING_NAMES[setting].split(':')[0]}\nvar(merged) / var(expert)")
    for ax in axes[-1]:
        ax.set_xlabel("hidden layer")
    fig.suptitle("Variance collapse and its correction: var(merged) / var(expert) per layer on each task's test "
                 f"digits, averaged over tasks (1 = the expert's)\n{_spread(results)}")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), title="correction", loc="outside right center", fontsize=10)
    return fig


def plot(results, out_dir):
    """Write ``accuracy.png`` (:func:`accuracy_figure`) and ``variance.png`` (:func:`variance_figure`)
    to ``out_dir``, each replaced at once when complete."""
    plt = _pyplot()
    for name, make in (("accuracy.png", accuracy_figure), ("variance.png", variance_figure)):
        fig = make(results)
        with _replacing(os.path.join(out_dir, name)) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
