"""The demo's outputs: seed averages (``results.json``), the printed table, the claims it checks and
the two figures."""
import contextlib
import json
import os
import statistics

from nlmerge.demo.data import TASKS
from nlmerge.demo.pipeline import CORRECTIONS, METHODS, SETTINGS


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_seed):
    """Average the ``run_seed`` results of every seed, entry by entry (lists elementwise)."""
    def avg(items):
        first = items[0]
        if isinstance(first, dict):
            return {k: avg([i[k] for i in items]) for k in first}
        if isinstance(first, list):
            return [statistics.fmean(col) for col in zip(*items)]
        return statistics.fmean(items)
    return avg(per_seed)


def table(per_seed):
    """The readable table: per task accuracy and normalized accuracy, mean +- std over seeds (%)."""
    pm = lambda values: "{:5.1f} ±{:4.1f}".format(*(100 * v for v in _mean_std(values)))  # noqa: E731
    lines = []
    for setting in SETTINGS:
        runs = [r[setting] for r in per_seed]
        lines.append(f"\n{setting} ({'experts of tasks 1-2 from A, 3-4 from B, B aligned to A' if setting == 'nonlocal' else 'all experts from A'})")
        lines.append(f"{'method':16s} {'correction':10s} " + " ".join(f"{t.name:>15s}" for t in TASKS)
                     + f" {'normalized':>15s}")
        accs = [r["experts"]["accuracy"] for r in runs]
        lines.append(f"{'experts':16s} {'':10s} " + " ".join(f"{pm([a[t] for a in accs]):>15s}" for t in range(len(TASKS)))
                     + f" {'100.0':>15s}")
        for method in METHODS:
            for correction in CORRECTIONS:
                cells = [r["methods"][method][correction] for r in runs]
                lines.append(f"{method:16s} {correction:10s} "
                             + " ".join(f"{pm([c['accuracy'][t] for c in cells]):>15s}" for t in range(len(TASKS)))
                             + f" {pm([c['normalized_accuracy'] for c in cells]):>15s}")
    return "\n".join(lines)


def claims(results):
    """What the demo shows, each as ``(statement, measured, holds)`` from the seed-averaged results."""
    nl, lo = results["settings"]["nonlocal"]["methods"], results["settings"]["local"]["methods"]
    na = lambda m, c, s=nl: 100 * s[m][c]["normalized_accuracy"]  # noqa: E731
    gap_closed = (na("ties+tall", "tact") - na("ties+tall", "none")) / max(100 - na("ties+tall", "none"), 1e-9)
    after_tact = max(abs(r - 1) for s in (nl, lo) for m in METHODS for r in s[m]["tact"]["variance_ratio"])
    ta_ratio = max(nl["task_arithmetic"]["none"]["variance_ratio"])
    return [
        ("non-local ties+tall merges badly: normalized accuracy <= 85%", f"{na('ties+tall', 'none'):.1f}%",
         na("ties+tall", "none") <= 85),
        ("the same merge of experts from one foundation works: >= 92%", f"{na('ties+tall', 'none', lo):.1f}%",
         na("ties+tall", "none", lo) >= 92),
        ("... and is >= 10 points above non-local", f"{na('ties+tall', 'none', lo) - na('ties+tall', 'none'):+.1f}",
         na("ties+tall", "none", lo) - na("ties+tall", "none") >= 10),
        ("TACT brings non-local ties+tall to >= 90%", f"{na('ties+tall', 'tact'):.1f}%", na("ties+tall", "tact") >= 90),
        ("... recovering >= 60% of the gap to the experts", f"{100 * gap_closed:.0f}%", gap_closed >= 0.6),
        ("TACT beats REPAIR by >= 15 points", f"{na('ties+tall', 'tact') - na('ties+tall', 'repair'):+.1f}",
         na("ties+tall", "tact") - na("ties+tall", "repair") >= 15),
        ("merging adds value: ties+tall + TACT >= base + TACT + 5 points",
         f"{na('ties+tall', 'tact') - na('base', 'tact'):+.1f}", na("ties+tall", "tact") - na("base", "tact") >= 5),
        ("variance collapse: non-local task_arithmetic ratio <= 0.8 in every layer", f"max {ta_ratio:.2f}",
         ta_ratio <= 0.8),
        ("after TACT every layer of every method within 1 +- 0.05", f"max |r - 1| {after_tact:.3f}", after_tact <= 0.05),
    ]


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


def plot(results, out_dir):
    """``accuracy.png`` (normalized accuracy per method and correction, both settings) and
    ``variance.png`` (variance ratio per layer, before and after each correction)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(12, 4), sharey=True)
    width = 0.8 / len(CORRECTIONS)
    for ax, setting in zip(axes, SETTINGS):
        for i, correction in enumerate(CORRECTIONS):
            values = [100 * settings[setting]["methods"][m][correction]["normalized_accuracy"] for m in METHODS]
            ax.bar([k + (i - (len(CORRECTIONS) - 1) / 2) * width for k in range(len(METHODS))], values, width,
                   label=correction)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(setting)
    axes[0].set_ylabel("normalized accuracy (% of experts)")
    axes[0].legend(title="correction")
    fig.tight_layout()
    with _replacing(os.path.join(out_dir, "accuracy.png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    fig, axes = plt.subplots(len(SETTINGS), len(METHODS), figsize=(16, 6), sharex=True, sharey=True)
    for row, setting in zip(axes, SETTINGS):
        for ax, method in zip(row, METHODS):
            for correction in CORRECTIONS:
                ratios = settings[setting]["methods"][method][correction]["variance_ratio"]
                ax.plot(range(1, len(ratios) + 1), ratios, marker="o", label=correction)
            ax.axhline(1, color="k", lw=0.8, ls="--")
            ax.set_title(f"{setting}: {method}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("var(merged) / var(expert)")
    axes[0, 0].legend(title="correction", fontsize=8)
    fig.tight_layout()
    with _replacing(os.path.join(out_dir, "variance.png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
