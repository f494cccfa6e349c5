"""The ``nlmerge`` command line: a small argparse front.

    nlmerge --version
    nlmerge demo [--out DIR] [--seeds 0,1,2] [--device cpu|cuda] [--align weight|activation]
                 [--quick] [--threads N] [--no-progress]

Each subcommand is one ``_add_<name>(commands)`` that declares its arguments and sets
``run=_<name>``, the function that runs it (listed in ``SUBCOMMANDS``). Arguments are checked
while parsing: a bad one ends in one line under that subcommand's usage, exit status 2.
"""
import argparse
import sys

import nlmerge


def _checked(check, metavar):
    """An argparse ``type=`` from ``check`` (returns the value or raises ValueError): its message
    becomes argparse's one-line error for the argument."""
    def convert(text):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = metavar  # argparse's fallback message names the type by this
    return convert


def _add_demo(commands):
    from nlmerge.demo import options

    demo = commands.add_parser(
        "demo", help="end-to-end non-local merge on scikit-learn's digits (no download)",
        description="Experts fine-tuned from two different foundation MLPs on four digit tasks are aligned, "
                    "merged and corrected (TACT, REPAIR); experts from one foundation are the control.")
    demo.add_argument("--out", metavar="DIR", default="nlmerge-demo", type=_checked(options.check_out, "DIR"),
                      help="output directory, created if needed (default: %(default)s)")
    demo.add_argument("--seeds", type=_checked(options.parse_seeds, "seeds"), default=None,
                      help="comma-separated distinct seeds, one run each, results averaged "
                           "(default: 0,1,2; with --quick: 0)")
    demo.add_argument("--device", choices=options.DEVICES, default="cpu", type=_checked(options.check_device, "device"),
                      help="where the networks train and run; cuda needs a GPU that torch sees (default: %(default)s)")
    demo.add_argument("--align", choices=options.ALIGNS, default="weight",
                      help="how foundation B is aligned to A: weight matching (best of 8 orders) or activation "
                           "matching (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="shorter training and, unless --seeds says otherwise, seed 0 only (about 15 s); checks "
                           "the direction of each claim, the full run checks its numbers")
    demo.add_argument("--threads", metavar="N", type=_checked(options.check_threads, "N"), default=2,
                      help="torch CPU threads, pinned so that a run is reproducible (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)


def _demo(args):
    from nlmerge.demo import run_demo

    run_demo(args.out, seeds=args.seeds, device=args.device, align=args.align, quick=args.quick,
             threads=args.threads, progress=not args.no_progress)
    return 0


SUBCOMMANDS = (_add_demo,)


def build_parser():
    """The ``nlmerge`` parser with every subcommand of ``SUBCOMMANDS``."""
    parser = argparse.ArgumentParser(prog="nlmerge", description="Non-local model merging: align, merge, correct.")
    parser.add_argument("--version", action="version", version=f"nlmerge {nlmerge.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv=None):
    """Entry point of the ``nlmerge`` command; returns the exit status (argparse exits with 2 on a
    bad argument)."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
