"""Activation matching of two ResNets: nlmerge vs a plain-PyTorch implementation, phase by phase.

Two independently initialised ``nlmerge.align.models.ResNet`` (four stages of widths
``(w, 2w, 4w, 8w)``, two basic blocks each; ``w = 60`` is about 10M parameters), eval mode,
aligned by activation matching on synthetic batches of 3x32x32 images (fixed seed). Timed in
three phases:

1. statistics: the forward passes of both models with hooks at every site and the streaming
   statistics (``StreamingStats``), up to the summed correlation of every permutation;
2. assignment: the linear assignments (scipy ``linear_sum_assignment``);
3. gathers: applying the permutations to the other model's state dict (``apply_permutations``).

nlmerge: ``activation_matching`` (phases 1 + 2; the time spent in its assignment solver is
recorded by a timing wrapper, so the split comes from the same calls) and ``apply_permutations``.
Plain: what one writes by hand: forward hooks, a per-batch float64 ``x.T @ y`` plus float64
column sums and sums of squares (uncentred), the correlation at the end, the same scipy
assignment, and an ``index_select`` chain per tensor. Also timed: the forward passes alone (both
models, no hooks: the floor of the statistics phase) and weight matching once (Git Re-Basin
coordinate descent on the same pair). Statistics, plain statistics and forward-only are timed in
turn within every round (best of the rounds kept), as are the two gathers, so that the load of a
shared machine hits both sides alike. Every figure printed is from this one run; the check at the
end says whether both implementations found the same permutations.

    python benchmarks/bench_align.py [--quick] [--device cpu|cuda] [--width 60] [--batches 8]
                                     [--batch-size 32] [--repeat 3]

``--assignment 2048,8192`` instead times scipy's ``linear_sum_assignment`` on the score of one
permutation of n units (``R @ O.T`` with R ``[n, --inner]`` Gaussian and O a permuted copy plus
``--noise`` times Gaussian noise: 1 for related models, 10 for nearly independent ones) against
the fp32 matmul that builds that score (one tensor's share of weight matching's work) and against
``nlmerge.align``'s own solver (lapx's ``lapjvh`` when lapx is installed, else scipy) on the same
score, with whether it reaches scipy's objective.

``--checkpoint-gb G`` instead benchmarks ``nlmerge align`` on checkpoints (issue 11): it writes a
Llama-shaped bf16 checkpoint of about G GB (``bench_job.llama_shapes``: hidden 2048, intermediate
5632, as many layers as G allows; G = 2 is 16 layers, about 1B parameters) and a copy of it under a
random permutation of every symmetry of its spec plus 5% noise (``bench_job.write_model``), then
runs weight matching (``run_align``, ``--restarts`` orders) in a child process and reports: the
total time, the time per sweep and its split (scores: reading tensors and the matmuls; assignment;
objective), the child's peak anonymous memory (``bench_job.run_measured``) against one model's
size and against a child that only imports nlmerge, and whether the planted permutation was
recovered. Then the activation statistics overhead: ``activation_matching`` on two small
transformers Llamas (grouped-query attention, ``--stats-layers`` layers) at the spec's sites,
its statistics phase against the plain forward passes of both models.

    python benchmarks/bench_align.py --checkpoint-gb 0.25 [--restarts 1] [--dir DIR]
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository: tests.conftest's random_perms
from bench_job import llama_shapes, run_measured, write_model  # noqa: E402
from common import best_time, machine, timed  # noqa: E402

from nlmerge.align import activation_matching, apply_permutations, resnet_spec, spec_from_config  # noqa: E402
from nlmerge.align import weight_matching  # noqa: E402
from nlmerge.align.models import ResNet  # noqa: E402
from nlmerge.io import open_checkpoint  # noqa: E402
from nlmerge.io.permutations import load_permutations  # noqa: E402
from nlmerge.jobs import align_job  # noqa: E402

# the modules (the package attributes of the same names are the functions)
am_module = sys.modules["nlmerge.align.activation_matching"]
assign_module = sys.modules["nlmerge.align._assign"]
wm_module = sys.modules["nlmerge.align.weight_matching"]

NUM_STAGES, BLOCKS = 4, 2


# ---------------------------------------------------------------------------------- the plain way


def _site_list(value):
    """A ``sites`` entry as a list of ``(module_name, "output" | "input")``."""
    if isinstance(value, str):
        return [(value, "output")]
    if isinstance(value, tuple):
        return [value]
    return [(v, "output") if isinstance(v, str) else v for v in value]


def _features_last(t):
    if isinstance(t, (tuple, list)):
        t = t[0]
    t = t.detach()
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])


def plain_statistics(sites, model_a, model_b, batches):
    """Hooks, float64 sums / sums of squares / ``x.T @ y`` per batch, correlations summed per perm."""
    plan = {p: _site_list(v) for p, v in sites.items()}
    wanted = sorted({s for entries in plan.values() for s in entries})
    stores = ({}, {})
    handles = []
    for store, model in zip(stores, (model_a, model_b)):
        modules = dict(model.named_modules())
        for name, kind in wanted:
            def hook(module, args, output, store=store, key=(name, kind)):
                store[key] = output if key[1] == "output" else args
            handles.append(modules[name].register_forward_hook(hook))
    acc = {}
    try:
        with torch.no_grad():
            for batch in batches:
                model_a(batch)
                model_b(batch)
                for site in wanted:
                    x = _features_last(stores[0][site]).double()
                    y = _features_last(stores[1][site]).double()
                    if site not in acc:
                        c, d = x.shape[1], y.shape[1]
                        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
                        acc[site] = {"n": 0, "sx": z(c), "sy": z(d), "sxx": z(c), "syy": z(d), "sxy": z(c, d)}
                    a = acc[site]
                    a["n"] += x.shape[0]
                    a["sx"] += x.sum(0)
                    a["sy"] += y.sum(0)
                    a["sxx"] += (x * x).sum(0)
                    a["syy"] += (y * y).sum(0)
                    a["sxy"] += x.T @ y
    finally:
        for h in handles:
            h.remove()
    corr = {}
    for site, a in acc.items():
        n = a["n"]
        mx, my = a["sx"] / n, a["sy"] / n
        cov = a["sxy"] / n - torch.outer(mx, my)
        sd = torch.outer((a["sxx"] / n - mx * mx).clamp_min(0).sqrt(), (a["syy"] / n - my * my).clamp_min(0).sqrt())
        corr[site] = torch.where(sd > 0, cov / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(cov))
    scores = {}
    for p, entries in plan.items():
        scores[p] = sum(corr[s] for s in entries).cpu()
    return scores


def plain_assignment(scores):
    return {p: torch.as_tensor(linear_sum_assignment(s.numpy(), maximize=True)[1], dtype=torch.int64)
            for p, s in scores.items()}


def plain_gathers(spec, perms, state_dict):
    """An ``index_select`` chain per permuted tensor; a clone of every other entry."""
    device = next(iter(state_dict.values())).device
    index = {p: v.to(device) for p, v in perms.items()}
    out = {}
    for key, w in state_dict.items():
        pairs = spec.params.get(key)
        if pairs:
            for p, axis in pairs:
                w = w.index_select(axis, index[p])
            out[key] = w
        else:
            out[key] = w.clone()
    return out


# ---------------------------------------------------------------------------------- helpers


class _Clock:
    """Wraps the functions ``targets`` names (``(owner, attribute)``: a module's function or a
    class's method) while installed and adds up the time spent inside them."""

    def __init__(self, *targets):
        self.targets = targets
        self.seconds = 0.0

    @contextlib.contextmanager
    def installed(self):
        originals = [(owner, name, getattr(owner, name)) for owner, name in self.targets]

        def wrap(original):
            def clocked(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            return clocked

        for owner, name, original in originals:
            setattr(owner, name, wrap(original))
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def interleaved(fns, clock, repeat, device):
    """Best time of each of ``fns`` (after one warm-up each), timed in turn within every round so
    that a change in the machine's load hits all of them alike; for each, also the time ``clock``
    recorded during its best run."""
    for fn in fns:
        fn()
    best = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            clock.seconds = 0.0
            total = timed(fn, device)
            if best[i] is None or total < best[i][0]:
                best[i] = (total, clock.seconds)
    return best


def ms(seconds):
    return f"{seconds * 1e3:10.1f} ms"


def assignment_figures(sizes, inner, noises):
    """Print, per size and noise, the time of the score matmul and of the assignment by scipy and
    by ``nlmerge.align``'s solver (lapx when installed, with whether it reaches scipy's objective)."""
    solver = "lapx " + sys.modules["lap"].__version__ if assign_module._lapjvh else "scipy"
    print(f"machine: {machine()}; nlmerge.align's assignment solver: {solver}")
    print(f"{'n':>6} {'noise':>6} {'score matmul':>13} {'scipy':>9} {'scipy/matmul':>13} {'nlmerge':>9} "
          f"{'scipy/nlmerge':>14} {'same objective':>15}")
    for n in sizes:
        for noise in noises:
            gen = torch.Generator().manual_seed(n)
            r = torch.randn(n, inner, generator=gen)
            o = r[torch.randperm(n, generator=gen)] + noise * torch.randn(n, inner, generator=gen)
            start = time.perf_counter()
            score = (r @ o.T).double()
            matmul = time.perf_counter() - start
            start = time.perf_counter()
            cols = torch.as_tensor(linear_sum_assignment(score.numpy(), maximize=True)[1])
            lsa = time.perf_counter() - start
            start = time.perf_counter()
            perm = assign_module.solve_assignment(score)
            ours = time.perf_counter() - start
            same = assign_module.assignment_score(score, perm) == assign_module.assignment_score(score, cols)
            print(f"{n:>6} {noise:>6g} {matmul:12.3f}s {lsa:8.3f}s {lsa / matmul:12.2f}x {ours:8.3f}s "
                  f"{lsa / ours:13.2f}x {str(same):>15}", flush=True)


# ---------------------------------------------------------------------------------- checkpoints


def write_pair(root, gb, seed=0):
    """A Llama-shaped bf16 checkpoint ``root/reference`` of about ``gb`` GB and ``root/other``:
    the reference under a random permutation of every symmetry of its spec, plus 5% noise.
    Returns (reference dir, other dir, the permutations that align other to reference, bytes of
    one model)."""
    from tests.conftest import random_perms

    shapes, config = llama_shapes(gb)
    ref_dir, shuffled, other_dir = (os.path.join(root, n) for n in ("reference", "shuffled", "other"))
    write_model(ref_dir, shapes, config, seed)
    with open_checkpoint(ref_dir) as ref:
        spec, _ = spec_from_config(ref.config, keys=ref.keys())
        meta = {k: torch.empty(ref.info(k).shape, dtype=ref.info(k).dtype, device="meta") for k in spec.params}
        planted = random_perms(spec, spec.validate(meta), torch.Generator().manual_seed(seed))
        align_job.write_aligned(ref, spec, planted, shuffled, out_shard_size=1 << 28)  # sharded: load_base reads the index
    write_model(other_dir, shapes, config, seed + 1, base=shuffled)  # shuffled + 0.05 x its own scale
    shutil.rmtree(shuffled)
    size = sum(2 * int(np.prod(shape)) for _, shape in shapes)
    return ref_dir, other_dir, {p: torch.argsort(v) for p, v in planted.items()}, size


def align_child(ref_dir, other_dir, out, info_path, restarts):
    """Run ``run_align`` (weight matching) with clocks on its phases; write them to ``info_path``."""
    clocks = {"weight_matching": _Clock((align_job, "weight_matching")),
              "scores": _Clock((wm_module._Descent, "score")),
              "assignment": _Clock((wm_module, "solve_assignment"), (wm_module, "solve_group")),
              "objectives": _Clock((wm_module._Descent, "objective"))}
    runs = []
    descend = wm_module._descend

    def counted(*args, **kwargs):
        runs.append(descend(*args, **kwargs))
        return runs[-1]

    wm_module._descend = counted
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for clock in clocks.values():
            stack.enter_context(clock.installed())
        result = align_job.run_align(ref_dir, other_dir, out, restarts=restarts, force=True)
    figures = {name: clock.seconds for name, clock in clocks.items()}
    figures.update(total=time.perf_counter() - start, sweeps=[s for s, _ in runs],
                   converged=[c for _, c in runs], best_objective=result["info"]["objective"])
    with open(info_path, "w") as f:
        json.dump(figures, f)


def stats_overheads(layers, batches, repeat):
    """Activation statistics on small transformers Llamas (grouped-query attention) against their
    plain forward passes, seconds of the best of ``repeat`` interleaved rounds: matching (the
    statistics phase of ``activation_matching`` of two models of different seeds at the spec's
    sites, cross-correlations) and correction (``activation_stats`` of one model at the correct
    job's sites, per-channel; loaded with the bias switches, as the job does). Returns
    ``(description, [(name, stats seconds, forward seconds)])``."""
    import transformers

    from nlmerge.correct import activation_stats
    from nlmerge.jobs.correct_job import correction_sites

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                      attention_bias=True, mlp_bias=True)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(config).eval())
    spec, sites = spec_from_config(config, keys=models[0].state_dict().keys())
    fix = correction_sites(models[0])
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 2048, (8, 128), generator=gen)} for _ in range(batches)]

    def forwards(which):
        def run():
            with torch.no_grad():
                for batch in data:
                    for model in which:
                        model(**batch)
        return run

    clock = _Clock((am_module, "solve_assignment"), (am_module, "solve_group"))
    with clock.installed():
        (two, _), (match, assign), (one, _), (stats, _) = interleaved(
            [forwards(models), lambda: activation_matching(spec, *models, data, sites), forwards(models[:1]),
             lambda: activation_stats(models[0], data, fix)], clock, repeat, "cpu")
    n_sites = len({s for v in sites.values() for s in ([v] if isinstance(v, (str, tuple)) else v)})
    what = (f"Llama hidden 256, intermediate 704, {layers} layers, 8 heads / 2 KV heads, {batches} batches of "
            f"8x128 tokens; best of {repeat} interleaved rounds")
    return what, [(f"matching, 2 models, {n_sites} sites (cross-correlations)", match - assign, two),
                  (f"correction, 1 model, {len(fix)} sites (per-channel)", stats, one)]


def checkpoint_figures(args):
    print(f"machine: {machine()}; assignment solver: {'lapx' if assign_module._lapjvh else 'scipy'}")
    root = args.dir or tempfile.mkdtemp(prefix="bench_align_")
    os.makedirs(root, exist_ok=True)
    try:
        start = time.perf_counter()
        ref_dir, other_dir, expected, size = write_pair(root, args.checkpoint_gb)
        layers = llama_shapes(args.checkpoint_gb)[1]["num_hidden_layers"]
        print(f"two Llama-shaped bf16 checkpoints: hidden 2048, intermediate 5632, {layers} layers, "
              f"{size / 2e9:.2f}B parameters, {size / 1e9:.2f} GB each (written in "
              f"{time.perf_counter() - start:.0f} s); the other is the reference under a random "
              f"permutation of all {len(expected)} permutations plus 5% noise", flush=True)
        out, info_path = os.path.join(root, "perms.safetensors"), os.path.join(root, "info.json")
        seconds, peak = run_measured([sys.executable, os.path.abspath(__file__), "--align-child", ref_dir, other_dir,
                                      out, info_path, "--restarts", str(args.restarts)])
        _, idle = run_measured([sys.executable, "-c", "import nlmerge.jobs.align_job, time; time.sleep(1)"])
        info = json.load(open(info_path))
        _, found, _ = load_permutations(out)
        recovered = sum(torch.equal(found[p], expected[p]) for p in expected)
        sweeps = sum(info["sweeps"])
        per_sweep = (info["weight_matching"] - info["objectives"]) / sweeps
        print(f"nlmerge align --restarts {args.restarts}: {seconds:.1f} s in the child "
              f"(run_align {info['total']:.1f} s, weight matching {info['weight_matching']:.1f} s); "
              f"{sweeps} sweeps {info['sweeps']} (converged {info['converged']})")
        print(f"  per sweep {per_sweep:.1f} s: scores (read + fp32 matmuls) {info['scores'] / sweeps:.1f} s, "
              f"assignment {info['assignment'] / sweeps:.2f} s; objective of each order {info['objectives'] / len(info['sweeps']):.1f} s")
        largest = 4 * max(int(np.prod(shape)) for _, shape in llama_shapes(args.checkpoint_gb)[0])
        print(f"  peak anonymous memory {peak / 1e9:.2f} GB = {peak / size:.2f}x one model; above a child that only "
              f"imports nlmerge ({idle / 1e9:.2f} GB): {(peak - idle) / size:.2f}x one model, "
              f"{(peak - idle) / largest:.1f}x its largest tensor in fp32")
        print(f"  planted permutation recovered: {recovered}/{len(expected)} permutations", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    what, rows = stats_overheads(args.stats_layers, 4, args.repeat)
    print(f"activation statistics over the plain forward passes ({what}):")
    for name, stats, forward in rows:
        print(f"  {name}: statistics {ms(stats).strip()}, forwards {ms(forward).strip()}: "
              f"overhead {100 * (stats / forward - 1):+.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignment", default=None, metavar="N,N",
                        help="time the linear assignment at these sizes instead (see above)")
    parser.add_argument("--inner", type=int, default=2048, help="--assignment: inner size of the score matmul")
    parser.add_argument("--noise", default="1,10", help="--assignment: noise levels, comma-separated")
    parser.add_argument("--width", type=int, default=60, help="stage widths (w, 2w, 4w, 8w)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up (best kept)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="width 16, 2 batches of 16, one repeat")
    parser.add_argument("--checkpoint-gb", type=float, default=None, metavar="G",
                        help="benchmark nlmerge align on two generated checkpoints of G GB (see above)")
    parser.add_argument("--restarts", type=int, default=1, help="--checkpoint-gb: weight matching's orders")
    parser.add_argument("--stats-layers", type=int, default=4, help="--checkpoint-gb: layers of the statistics Llamas")
    parser.add_argument("--dir", default=None, help="--checkpoint-gb: where to write them (default: a temporary folder)")
    parser.add_argument("--align-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.align_child:
        align_child(*args.align_child, args.restarts)
        return
    if args.checkpoint_gb is not None:
        checkpoint_figures(args)
        return
    if args.assignment:
        assignment_figures([int(v) for v in args.assignment.split(",")], args.inner,
                           [float(v) for v in args.noise.split(",")])
        return
    if args.quick:
        args.width, args.batches, args.batch_size, args.repeat = 16, 2, 16, 1
    device = args.device
    w = args.width
    widths = (w, 2 * w, 4 * w, 8 * w)

    torch.manual_seed(1)
    model_a = ResNet(widths=widths, blocks_per_stage=BLOCKS).to(device).eval()
    torch.manual_seed(2)
    model_b = ResNet(widths=widths, blocks_per_stage=BLOCKS).to(device).eval()
    n_params = sum(p.numel() for p in model_a.parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device) for _ in range(args.batches)]
    spec, sites = resnet_spec(NUM_STAGES, BLOCKS)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    n_sites = len({s for v in sites.values() for s in _site_list(v)})

    print(f"machine: {machine()}")
    print(f"ResNet widths {widths}, {BLOCKS} blocks/stage: {n_params / 1e6:.2f}M parameters; "
          f"{len(spec.perms)} permutations, {n_sites} activation sites; {args.batches} batches of "
          f"{args.batch_size}x3x32x32 on {device}; best of {args.repeat} rounds after a warm-up (gathers: {10 * args.repeat})\n", flush=True)

    repeat = args.repeat

    def forward_only():
        with torch.no_grad():
            for b in batches:
                model_a(b)
                model_b(b)

    clock = _Clock((am_module, "solve_assignment"))
    result = {}

    def nl_match():
        result["perms"] = activation_matching(spec, model_a, model_b, batches, sites)

    def plain_match():
        result["scores"] = plain_statistics(sites, model_a, model_b, batches)

    # the statistics phases and the forward-only floor, in turn in every round
    with clock.installed():
        (forward, _), (nl_total, nl_assign), (plain_stats, _) = interleaved(
            [forward_only, nl_match, plain_match], clock, repeat, device)
    nl_stats = nl_total - nl_assign
    nl_perms, scores = result["perms"], result["scores"]
    plain_assign = best_time(lambda: result.__setitem__("pp", plain_assignment(scores)), repeat, device)
    plain_perms = result["pp"]
    (nl_gather, _), (plain_gather, _) = interleaved(
        [lambda: apply_permutations(spec, nl_perms, sd_b), lambda: plain_gathers(spec, plain_perms, sd_b)],
        clock, 10 * repeat, device)  # milliseconds: more rounds

    start = time.perf_counter()
    wm_perms, info = weight_matching(spec, sd_a, sd_b, return_info=True)
    wm_seconds = time.perf_counter() - start

    rows = [("statistics (fwd + hooks + stats)", nl_stats, plain_stats),
            ("assignment (scipy)", nl_assign, plain_assign),
            ("gathers (permute state dict)", nl_gather, plain_gather),
            ("total", nl_stats + nl_assign + nl_gather, plain_stats + plain_assign + plain_gather)]
    print(f"{'phase':<34}  {'nlmerge':>13}  {'plain':>13}  {'plain/nlmerge':>13}")
    for name, nl, pl in rows:
        print(f"{name:<34}  {ms(nl)}  {ms(pl)}  {pl / nl:12.2f}x", flush=True)
    print()
    print(f"{'forward passes only (floor)':<34}  {ms(forward)}")
    print(f"  statistics / forward-only: nlmerge {nl_stats / forward:.2f}x, plain {plain_stats / forward:.2f}x "
          f"(overhead above the forwards: nlmerge {ms(nl_stats - forward).strip()}, "
          f"plain {ms(plain_stats - forward).strip()})")
    print(f"{'weight matching (once)':<34}  {ms(wm_seconds)}  ({info['sweeps']} sweeps, "
          f"converged {info['converged']})")
    print()

    same = [p for p in spec.perms if torch.equal(nl_perms[p], plain_perms[p])]
    print(f"same permutations (nlmerge vs plain): {len(same)}/{len(spec.perms)}")
    for p in spec.perms:
        if p not in same:
            moved = int((nl_perms[p] != plain_perms[p]).sum())
            print(f"  {p}: {moved}/{nl_perms[p].numel()} units differ")
    a = apply_permutations(spec, nl_perms, sd_b)
    b = plain_gathers(spec, nl_perms, sd_b)
    print(f"same gathered state dict (same permutations): {all(torch.equal(a[k], b[k]) for k in a)}")
    agree = sum(torch.equal(wm_perms[p], nl_perms[p]) for p in spec.perms)
    print(f"weight matching agrees with activation matching on {agree}/{len(spec.perms)} permutations "
          f"(not expected to: a different objective)")


if __name__ == "__main__":
    main()
