"""The ``nlmerge`` command line.

    nlmerge demo [--out DIR] [--seeds 0,1,2] [--device cpu|cuda] [--align weight|activation] [--quick]
"""
import argparse
import sys


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be >= 0, got {text!r}")
    return seeds


def main(argv=None):
    """Entry point of the ``nlmerge`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="nlmerge", description="Non-local model merging: align, merge, correct.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="end-to-end non-local merge on scikit-learn's digits (no download)",
        description="Experts fine-tuned from two different foundation MLPs on four digit tasks are aligned, "
                    "merged and corrected (TACT, REPAIR); experts from one foundation are the control.")
    demo.add_argument("--out", default="nlmerge-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default: 0,1,2)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.add_argument("--align", choices=("weight", "activation"), default="weight",
                      help="weight matching (best of 8 orders) or activation matching")
    demo.add_argument("--quick", action="store_true", help="one seed, shorter training (under a minute)")
    demo.add_argument("--threads", type=int, default=2, help="torch CPU threads, pinned for reproducibility")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from nlmerge.demo import run_demo

        if args.threads < 1:
            parser.error("--threads must be >= 1")
        run_demo(args.out, seeds=args.seeds, device=args.device, align=args.align, quick=args.quick,
                 threads=args.threads, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
