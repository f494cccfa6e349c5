"""The demo's options: defaults and the checks shared by ``run_demo`` and ``nlmerge demo``.

Each ``check_*`` returns the checked value or raises ``ValueError`` with one line that names the
option and the bad value; the command line turns it into argparse's error (exit status 2) before
any work. Importing this module imports torch only.
"""
import numbers
import os

import torch

FULL_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
DEVICES = ("cpu", "cuda")
ALIGNS = ("weight", "activation")


def check_seeds(seeds):
    """``seeds`` (a sequence of integers >= 0, each once) as a list of ints; ValueError naming the
    bad seed."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds must be integers, got {s!r}")
        if s < 0:
            raise ValueError(f"seeds must be >= 0 (they seed scikit-learn's split too), got {s}")
    seeds = [int(s) for s in seeds]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seed {repeated[0]} is given more than once: every seed is one run, give distinct seeds")
    return seeds


def parse_seeds(text):
    """``"0,1,2"`` -> ``[0, 1, 2]`` (then :func:`check_seeds`)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds are comma-separated integers, got {text!r}") from None
    return check_seeds(seeds)


def resolve_seeds(seeds, quick):
    """The seeds a run uses: ``seeds`` when given (checked), else seed 0 for a quick run and
    0, 1, 2 for the full one."""
    if seeds is None:
        return list(QUICK_SEEDS if quick else FULL_SEEDS)
    return check_seeds(seeds)


def check_device(device):
    """``"cpu"``, or ``"cuda"`` when torch sees a CUDA device."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device 'cuda' asked for, but torch {torch.__version__} ({build}) sees no CUDA device")
    return device


def check_align(align):
    """``"weight"`` or ``"activation"``."""
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {', '.join(ALIGNS)}, got {align!r}")
    return align


def check_threads(threads):
    """An int >= 1 (also from a string such as ``"4"``, as the command line gives it)."""
    if isinstance(threads, str):
        try:
            threads = int(threads)
        except ValueError:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def check_out(out):
    """``out`` when it is a directory or can be created as one: neither it nor a parent is an
    existing file, and the nearest existing parent is writable."""
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output directory {out!r} is an existing file")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output directory {out!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {out!r} cannot be written: no write permission on {existing!r}")
    return out
