"""The ``nlmerge`` command line: a small argparse front.

    nlmerge --version
    nlmerge demo [--out DIR] [--seeds 0,1,2] [--device cpu|cuda] [--align weight|activation]
                 [--quick] [--threads N] [--no-progress]
    nlmerge merge CONFIG.yml OUT [--device cpu|cuda] [--cuda] [--out-shard-size 5B] [--random-seed N]
                  [--copy-tokenizer|--no-copy-tokenizer] [--force] [--resume] [--no-progress]
    nlmerge align REFERENCE OTHER OUT [--method weight|activation] [--data FILE] [--restarts N] [--seed S]
                  [--write-aligned DIR] [--force]
    nlmerge correct MERGED --experts E1 E2 ... --data D1 D2 ... OUT [--method tact|repair]
                    [--write-model-card|--no-write-model-card] [--force]

Each subcommand is one ``_add_<name>(commands)`` that declares its arguments and sets
``run=_<name>``, the function that runs it (listed in ``SUBCOMMANDS``). Arguments are checked
while parsing: a bad one ends in one line under that subcommand's usage, exit status 2.
"""
import argparse
import contextlib
import logging
import os
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
    demo.set_defaults(run=_demo, parser=demo)


def _demo(args):
    from nlmerge.demo import run_demo

    run_demo(args.out, seeds=args.seeds, device=args.device, align=args.align, quick=args.quick,
             threads=args.threads, progress=not args.no_progress)
    return 0


# mergekit-yaml flags that nlmerge does not do, refused by name with the reason
_MULTI_DEVICE = "one device per process: run torchrun --nproc-per-node N -m nlmerge merge ... --device cuda"
_REFUSED_MERGEKIT_FLAGS = {
    "--allow-crimes": "nlmerge merges models with one set of keys and shapes",
    "--unsafe-truncate-embeddings": "nlmerge merges models with one set of keys and shapes",
    "--trust-remote-code": "nlmerge runs no code from checkpoints",
    "--lora-merge-cache": "LoRA adapters are not merged by nlmerge (merge them into their models first)",
    "--lora-merge-dtype": "LoRA adapters are not merged by nlmerge (merge them into their models first)",
    "--no-safe-serialization": "nlmerge writes safetensors only",
    "--multi-gpu": _MULTI_DEVICE,
    "--gpu-rich": _MULTI_DEVICE,
}
# mergekit-yaml flags accepted with nothing to do: nlmerge always does what they ask for (the --no-
# forms of mergekit's switches whose default nlmerge keeps)
_NO_OP_MERGEKIT_FLAGS = {
    "--lazy-unpickle": "tensors are always read lazily",
    "--no-lazy-unpickle": "tensors are always read lazily",
    "--low-cpu-memory": "one key is held at a time",
    "--no-low-cpu-memory": "one key is held at a time",
    "--safe-serialization": "the output is always safetensors",
    "--read-to-gpu": "with --device cuda, tensors go to the GPU as they are read",
    "--no-read-to-gpu": "tensors are read on the CPU",
    "--clone-tensors": "every tensor is written once from its own memory; nothing is shared",
    "--async-write": "reading, computing and writing already overlap",
    "--no-async-write": "reading, computing and writing already overlap",
    "--no-cuda": "the default is the CPU",
    "--no-quiet": "the default shows progress",
    "--no-allow-crimes": "the default",
    "--no-trust-remote-code": "the default",
    "--no-clone-tensors": "the default",
    "--no-unsafe-truncate-embeddings": "the default",
    "--no-multi-gpu": "the default",
}
# mergekit-yaml options with a value, accepted with nothing to do
_NO_OP_MERGEKIT_OPTIONS = {"--write-threads": "each output shard is written on its own thread",
                           "--transformers-cache": "nothing is downloaded (models are local folders)"}


class _Refused(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (a mergekit-yaml flag) is not supported: "
                     f"{_REFUSED_MERGEKIT_FLAGS[option_string]}")


def _add_merge(commands):
    from nlmerge.demo import options
    from nlmerge.io import parse_size

    merge = commands.add_parser(
        "merge", help="merge checkpoints on disk from a mergekit YAML config (a drop-in for mergekit-yaml)",
        description="Merge Hugging Face checkpoints (safetensors or .bin, sharded or not) as a mergekit config "
                    "says, streaming one tensor at a time, in fp32, into OUT in the Hugging Face layout. "
                    "Methods: linear, task_arithmetic, ties (also scope: global, convention: ties), dare_linear, "
                    "dare_ties, breadcrumbs, breadcrumbs_ties, consensus, tall. Many processes: start it under "
                    "torchrun (see the README).")
    merge.add_argument("config", metavar="CONFIG.yml", help="mergekit-style YAML (the models: form)")
    merge.add_argument("out", metavar="OUT", help="output folder")
    merge.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="where the arithmetic runs (default: cpu)")
    merge.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's flag)")
    merge.add_argument("--out-shard-size", metavar="SIZE", default="5B", type=_checked(parse_size, "SIZE"),
                       help="bytes per output shard, K/M/B = 1e3/1e6/1e9, counted as mergekit's writer counts; "
                            "0: one shard (default: %(default)s)")
    merge.add_argument("--random-seed", metavar="N", type=int, default=None,
                       help="seed of DARE's drops, keyed by (seed, tensor name, element) (default: 0)")
    merge.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                       help="copy the base model's tokenizer files (default: yes)")
    merge.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                       help="write a README.md model card into each merged model (default: yes)")
    merge.add_argument("--force", action="store_true", help="write into an existing output folder")
    merge.add_argument("--resume", action="store_true",
                       help="continue an interrupted job: finished shards (size and content hash checked) are kept")
    merge.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--num-threads", "-j", metavar="N", type=_checked(options.check_threads, "N"), default=None,
                       help="torch CPU threads (default: torch's)")
    merge.add_argument("-v", "--verbose", action="count", default=0,
                       help="log nlmerge's decisions (-v: info, -vv: debug), as mergekit's -v")
    merge.add_argument("--backend", choices=("torch", "cpu", "triton"), default=None,
                       help="kernel backend (default: auto, see the README)")
    for flag, reason in _NO_OP_MERGEKIT_FLAGS.items():  # the --no- forms of mergekit's defaults stay out of --help
        merge.add_argument(flag, action="store_true", help=argparse.SUPPRESS if flag.startswith("--no-") else
                           f"accepted from mergekit-yaml, nothing to do: {reason}")
    for flag, reason in _NO_OP_MERGEKIT_OPTIONS.items():
        merge.add_argument(flag, metavar="VALUE", help=f"accepted from mergekit-yaml, nothing to do: {reason}")
    for flag in _REFUSED_MERGEKIT_FLAGS:
        merge.add_argument(flag, action=_Refused, nargs="?", help=argparse.SUPPRESS)
    merge.set_defaults(run=_merge, parser=merge)


@contextlib.contextmanager
def _interrupt_once():
    """In the block, SIGTERM (torchrun's and schedulers' stop) raises KeyboardInterrupt, as Ctrl-C
    does, so that a command cleans up the same way; from the first of them on, both are ignored,
    so that a second one cannot cut the clean-up short (a half-removed staging folder, an output
    not moved back; ``kill -9`` still stops it). Yields the list the received signal numbers go
    to; the previous handlers are back after the block."""
    import signal

    signals, stopping = [], (signal.SIGTERM, signal.SIGINT)
    before = {each: signal.getsignal(each) for each in stopping}

    def stop(signum, frame):
        signals.append(signum)
        for each in stopping:
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    for each in stopping:
        signal.signal(each, stop)
    try:
        yield signals
    finally:
        for each, handler in before.items():
            signal.signal(each, handler)


def _interrupted_status(signals):
    """The shell's exit status of a process stopped by the first of ``signals`` (SIGINT if none)."""
    import signal

    return 128 + int(signals[0] if signals else signal.SIGINT)


def _run_job(prefix, job, interrupted, errors=(ValueError, FileExistsError, OSError)):
    """Run a command's ``job()`` the way every streaming command reports it: ``(0, result)``; an
    error of ``errors`` as one line ``PREFIX: error: ...``, ``(1, None)``; a stop (SIGTERM, Ctrl-C:
    :func:`_interrupt_once`) as the lines ``interrupted(err)`` returns, each after ``PREFIX: ``,
    ``(128 + signal, None)``."""
    with _interrupt_once() as signals:
        try:
            return 0, job()
        except errors as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            return 1, None
        except KeyboardInterrupt as err:
            for line in interrupted(err):
                print(f"{prefix}: {line}", file=sys.stderr)
            return _interrupted_status(signals), None


def _stream_allocations():
    """Give each large allocation (>= 4 MiB: a tensor) its own mapping, returned when freed (glibc's
    ``M_MMAP_THRESHOLD``; a no-op elsewhere). By default glibc raises that threshold to the size of
    the largest tensor freed and serves tensors from its heap, which the streaming jobs' interleaved
    tensor sizes fragment: a 2 GB merge's peak memory then varied from 3x to 10x its largest tensor
    between runs, and stays at 3x with the fixed threshold, at no cost in time
    (benchmarks/RESULTS.md). Called by the commands that stream checkpoints; it is the process's
    setting, so the Python API leaves it alone."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (malloc.h)


def _merge(args):
    import warnings

    import torch

    from nlmerge.io import MANIFEST_NAME
    from nlmerge.jobs import run_merge
    from nlmerge.jobs.distributed import RankFailedError
    from nlmerge.jobs.merge_job import PREVIOUS

    if args.cuda and args.device == "cpu":
        raise SystemExit("nlmerge merge: error: --cuda contradicts --device cpu")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(name)s: %(message)s")
    rank = os.environ.get("RANK", "0")
    prefix = "nlmerge merge" if rank == "0" else f"nlmerge merge (rank {rank})"
    warnings.showwarning = lambda message, *_: print(f"{prefix}: warning: {message}", file=sys.stderr)

    def interrupted(err):
        if not getattr(err, "shards_kept", os.path.isfile(os.path.join(args.out, MANIFEST_NAME))):
            return ["interrupted before any shard was finished; nothing of this job was kept (a previous output "
                    "is back in place)"]
        lines = [f"interrupted; finished shards are kept: run the same command with --resume to continue into "
                 f"{args.out}"]
        if os.path.isdir(os.path.join(args.out, PREVIOUS)):
            lines.append(f"the previous output stays in {os.path.join(args.out, PREVIOUS)} until the job completes")
        return lines

    _stream_allocations()
    status, out = _run_job(prefix, lambda: run_merge(
        args.config, args.out, device="cuda" if args.cuda else (args.device or "cpu"),
        out_shard_size=args.out_shard_size, random_seed=args.random_seed, copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card, force=args.force, resume=args.resume, progress=not args.no_progress,
        backend=args.backend, log=lambda line: print(f"{prefix}: {line}", file=sys.stderr, flush=True)),
        interrupted, errors=(ValueError, FileExistsError, OSError, RankFailedError))
    if status:
        return status
    if rank == "0":
        _say(f"merged into {out}")
    return 0


class _Paths(argparse.Action):
    """A list of paths (nargs="+") that records that it came last: argparse gives it the paths
    after it, so OUT written last on the command line is the last of them."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(values))
        namespace.last_paths = self.dest


def _batch_size(text):
    """An int >= 1 from the command line's text."""
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {text!r}")
    return int(text)


def _add_correct(commands):
    from nlmerge.demo import options

    correct = commands.add_parser(
        "correct", help="correct a merged Hugging Face checkpoint towards its experts (TACT, REPAIR), folded into "
                        "the weights",
        description="Measure each expert's activation statistics on its task's data, correct the merged model's to "
                    "match them (TACT: one checkpoint per task in OUT/task_<t>; REPAIR: one checkpoint in OUT, "
                    "towards the experts' average), and fold the correction into the weights: the output loads in "
                    "plain transformers. Data files: safetensors with input_ids [N, L] (and attention_mask [N, L]) "
                    "or pixel_values [N, C, H, W], one per expert, in the experts' order.")
    correct.add_argument("merged", metavar="MERGED", help="the merged model's folder (what nlmerge merge writes)")
    correct.add_argument("out", metavar="OUT", nargs="?",
                         help="output folder (anywhere outside the path lists, or last)")
    correct.add_argument("--experts", metavar="E", nargs="+", required=True, action=_Paths,
                         help="the experts' folders, expert t for task t")
    correct.add_argument("--data", metavar="D", nargs="+", required=True, action=_Paths,
                         help="one data file (safetensors) per expert, in the same order")
    correct.add_argument("--method", choices=("tact", "repair"), default="tact",
                         help="tact: one corrected model per task; repair: one model, one target (default: %(default)s)")
    correct.add_argument("--batch-size", metavar="N", type=_checked(_batch_size, "N"), default=8,
                         help="rows of a data file per forward pass (default: %(default)s)")
    correct.add_argument("--eps", type=float, default=1e-5,
                         help="added to the merged variance before the square root (default: %(default)s)")
    correct.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                         help="write a README.md model card into each corrected model (default: yes)")
    correct.add_argument("--force", action="store_true",
                         help="replace an existing output folder (once the new output is complete)")
    correct.add_argument("--no-progress", "--quiet", action="store_true", help="no progress lines")
    correct.add_argument("--num-threads", metavar="N", type=_checked(options.check_threads, "N"), default=None,
                         help="torch CPU threads (default: torch's)")
    correct.set_defaults(run=_correct, parser=correct)


def _correct(args):
    import torch

    from nlmerge.jobs.correct_job import run_correct

    if args.out is None:  # OUT came last, so the last list took it
        paths = getattr(args, args.last_paths)
        if len(paths) < 2:
            args.parser.error("the following arguments are required: OUT")
        args.out = paths.pop()
        # a list ends at the next option only: OUT written inside one is a path, and the list's last
        # path was taken for OUT
        problem = (f"leaves {len(args.experts)} experts and {len(args.data)} data files"
                   if len(args.experts) != len(args.data) else "is a file" if os.path.isfile(args.out) else None)
        if problem:
            args.parser.error(f"OUT taken as the last path of --{args.last_paths} ({args.out!r}) {problem}: give "
                              "one data file per expert, and OUT outside the path lists (each takes every path up "
                              "to the next option)")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    def say(line):
        print(line, file=sys.stderr, flush=True)

    status, folders = _run_job("nlmerge correct", lambda: run_correct(
        args.merged, args.experts, args.data, args.out, method=args.method, batch_size=args.batch_size, eps=args.eps,
        force=args.force, write_model_card=args.write_model_card, log=None if args.no_progress else say, notice=say),
        lambda err: ["interrupted; nothing of this job was kept (an existing OUT is as it was)"])
    if status:
        return status
    _say(f"corrected into {', '.join(folders)}")
    return 0


# --- nlmerge align -------------------------------------------------------------------------------
def _positive(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {value}")
    return value


def _add_align(commands):
    from nlmerge.io import parse_size

    align = commands.add_parser(
        "align", help="permutations that align checkpoint OTHER to REFERENCE (for merge's permutations: key)",
        description="Find the permutations of OTHER's hidden units (residual stream, MLP units, attention heads "
                    "and units within heads) that best match REFERENCE, by weight matching on the checkpoints "
                    "read one tensor at a time, or by activation matching on --data. Writes OUT, the "
                    "permutations file of nlmerge merge's permutations: key, and with --write-aligned the "
                    "aligned OTHER. Architectures: llama, mistral, qwen2, vit, clip.")
    align.add_argument("reference", metavar="REFERENCE", help="Hugging Face folder aligned to")
    align.add_argument("other", metavar="OTHER", help="Hugging Face folder whose units are permuted")
    align.add_argument("out", metavar="OUT", help="permutations file to write (.safetensors)")
    align.add_argument("--method", choices=("weight", "activation"), default="weight",
                       help="weight matching (no data) or activation matching on --data (default: %(default)s)")
    align.add_argument("--data", metavar="FILE", default=None,
                       help="safetensors file of model inputs (input_ids, attention_mask, pixel_values) for "
                            "activation matching")
    align.add_argument("--restarts", metavar="N", type=_checked(_positive, "N"), default=8,
                       help="weight matching: random visiting orders, the best objective is kept (default: %(default)s)")
    align.add_argument("--seed", metavar="S", type=int, default=0, help="seed of the visiting orders (default: 0)")
    align.add_argument("--max-iter", metavar="N", type=_checked(_positive, "N"), default=100,
                       help="weight matching: sweeps per visiting order at most (default: %(default)s)")
    align.add_argument("--batch-size", metavar="N", type=_checked(_positive, "N"), default=8,
                       help="activation matching: examples per forward pass (default: %(default)s)")
    align.add_argument("--write-aligned", metavar="DIR", default=None,
                       help="also write the aligned OTHER there, in the Hugging Face layout")
    align.add_argument("--out-shard-size", metavar="SIZE", default="5B", type=_checked(parse_size, "SIZE"),
                       help="bytes per shard of the aligned checkpoint, K/M/B = 1e3/1e6/1e9 (default: %(default)s)")
    align.add_argument("--force", action="store_true",
                       help="replace an existing OUT, write into a non-empty --write-aligned folder")
    align.set_defaults(run=_align, parser=align)


def _align(args):
    import torch

    from nlmerge.jobs.align_job import run_align

    if args.method == "activation" and args.data is None:
        args.parser.error("--method activation needs --data FILE")
    if args.method == "weight" and args.data is not None:
        args.parser.error("--data is for --method activation")
    try:
        result = run_align(args.reference, args.other, args.out, method=args.method, data=args.data,
                           restarts=args.restarts, seed=args.seed, max_iter=args.max_iter, batch_size=args.batch_size,
                           aligned=args.write_aligned, out_shard_size=args.out_shard_size, force=args.force)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"nlmerge align: error: {err}", file=sys.stderr)
        return 1
    info = result["info"]
    if info is not None:
        _say(f"weight matching: objective {info['objective']:.6g} (best of {len(info['objectives'])} orders), "
             f"{info['sweeps']} sweeps, {'converged' if info['converged'] else 'not converged'}")
    moved = sum(not torch.equal(p, torch.arange(p.numel())) for p in result["perms"].values())
    _say(f"{moved} of {len(result['perms'])} permutations move units; wrote {args.out}"
         + (f" and {args.write_aligned}" if args.write_aligned else ""))
    return 0
# --- end of nlmerge align ------------------------------------------------------------------------


def _add_tall_task(commands):
    from nlmerge.io import parse_size

    tall = commands.add_parser(
        "tall-task", help="rebuild one task's model from a TALL job's masks and the base",
        description="Write task TASK's model of a merge_method: tall job (e.g. one run with output: masks) from "
                    "the masks and tau_MTL in MASKS and the base: base + mask_TASK * tau_MTL, bit for bit what the "
                    "job writes in task_<TASK> with output: models.")
    tall.add_argument("masks", metavar="MASKS", help="the TALL job's output folder (tall.json, tall-masks*.safetensors)")
    tall.add_argument("task", metavar="TASK", type=int, help="the task, 0-based in the config's order of the experts")
    tall.add_argument("out", metavar="OUT", help="output folder (the Hugging Face layout)")
    tall.add_argument("--base", metavar="PATH", default=None, help="the base model (default: the path tall.json records)")
    tall.add_argument("--out-shard-size", metavar="SIZE", default="5B", type=_checked(parse_size, "SIZE"),
                      help="bytes per output shard, K/M/B = 1e3/1e6/1e9 (default: %(default)s)")
    tall.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                      help="copy the base model's tokenizer files (default: yes)")
    tall.add_argument("--force", action="store_true", help="write into an existing output folder")
    tall.set_defaults(run=_tall_task, parser=tall)


def _tall_task(args):
    from nlmerge.jobs.tall_task import run_tall_task

    _stream_allocations()
    status, out = _run_job("nlmerge tall-task", lambda: run_tall_task(
        args.masks, args.task, args.out, base=args.base, out_shard_size=args.out_shard_size,
        copy_tokenizer=args.copy_tokenizer, force=args.force),
        lambda err: ["interrupted; nothing was kept (a previous output is back in place)"])
    if status:
        return status
    _say(f"wrote task {args.task}'s model into {out}")
    return 0


SUBCOMMANDS = (_add_demo, _add_merge, _add_align, _add_correct, _add_tall_task)


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
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse gives an optional positional (correct's OUT) nothing where it first can, so one
        # written later (after --method repair) is left over: parse the subcommand's arguments again,
        # positionals taken from among all the options (the command is the first word: the top
        # level's own options take no value)
        command = argparse.Namespace(command=args.command)
        args, unknown = args.parser.parse_known_intermixed_args(argv[argv.index(args.command) + 1:], command)
    if unknown:  # name them under the subcommand's usage, not the top level's
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args)


def _say(line):
    """Print a command's report on stdout. A stdout that cannot take it (its reader left:
    ``nlmerge ... | head -0``; ``>/dev/full``) loses the line but fails nothing: the work is done,
    and later writes to stdout go to /dev/null."""
    try:
        print(line, flush=True)
    except OSError:
        _to_devnull(sys.stdout.fileno())


def _to_devnull(fd):
    """Point the file descriptor ``fd`` at /dev/null: the stream's reader is gone, and later writes
    (the interpreter's at exit, C libraries') must neither fail nor reach a file the job opened."""
    null = os.open(os.devnull, os.O_WRONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


class _LosableStderr:
    """The console script's ``sys.stderr``: progress bars, log lines and warnings are commentary,
    so a write or flush that fails (the reader left: ``2>&1 | head``; a terminal that hung up)
    drops the text, sends the descriptor to /dev/null and lets the job go on. An error still ends
    the command with its exit status; only its message is lost."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        """Write ``text``, or drop it once the stream is lost; returns its length either way."""
        try:
            return self._stream.write(text)
        except OSError:
            _to_devnull(self._stream.fileno())
            return len(text)

    def flush(self):
        """Flush, or drop what is buffered once the stream is lost (it then goes to /dev/null)."""
        try:
            self._stream.flush()
        except OSError:
            _to_devnull(self._stream.fileno())

    def __getattr__(self, name):  # fileno, encoding, isatty...: the real stream's
        return getattr(self._stream, name)


def _survive_lost_streams():
    """Make the commands' stderr losable (:class:`_LosableStderr`; stdout's one line is
    :func:`_say`'s). A standard stream started closed (``>&-``, ``2>&-``: ``sys.stdout`` or
    ``sys.stderr`` is None) writes to /dev/null, and its descriptor is held by /dev/null so that
    the first files the job opens do not become fd 1 or 2 (where C libraries write)."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            _to_devnull(fd)
        setattr(sys, name, open(os.devnull, "w"))
    sys.stderr = _LosableStderr(sys.stderr)


# The commands that stream checkpoints: a reader, a writer and a hash thread share the cores with
# the kernels' OpenMP team, whose idle workers otherwise spin after every kernel call (merge job,
# 1B bf16 on 2 cores: TIES 0.5-0.9 s faster, task arithmetic 0.15 s, 0.7 s less CPU). Not the
# others: the demo's many small torch ops wait on woken threads (19 -> 34 s passive).
PASSIVE_WAIT_COMMANDS = ("merge", "tall-task")


def environment_defaults(argv):
    """``{variable: value}`` that the command line ``argv`` (without the program name) runs best
    with, set by :func:`console` where the caller's environment does not set them."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return {"OMP_WAIT_POLICY": "PASSIVE"} if command in PASSIVE_WAIT_COMMANDS else {}


def console():
    """The ``nlmerge`` console script (and ``python -m nlmerge``): ``main()``, then exit without
    tearing the interpreter down: torch's module teardown and unmapping the inputs take 0.3-0.5 s
    after every command, and every output file is closed and synced by then. Logs and the standard
    streams are flushed first.

    For the commands in ``PASSIVE_WAIT_COMMANDS``, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``
    (an explicit setting is kept); OpenMP reads it once, when torch loads, which is after this.
    A lost stderr or stdout (closed, full, or its reader gone) loses the messages and fails nothing
    (:func:`_survive_lost_streams`, :func:`_say`)."""
    if "torch" not in sys.modules:
        for name, value in environment_defaults(sys.argv[1:]).items():
            os.environ.setdefault(name, value)
    _survive_lost_streams()
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    console()
