"""One seed of the demo: train foundations and experts, align, merge, correct, evaluate.

Settings: "nonlocal" (experts of tasks 0-1 from foundation A, of tasks 2-3 from foundation B,
B aligned to A; base = average of A and aligned B) and "local" (every expert from A; base = A).
Merging acts on the bodies; each task keeps its expert's head.
"""
import copy

from nlmerge import merge
from nlmerge.align import activation_matching, apply_permutations, mlp_spec, weight_matching
from nlmerge.correct import repair, tact, variance_ratio
from nlmerge.demo.data import TASKS, foundation_data, load_digits_split, task_data
from nlmerge.demo.training import DEPTH, INPUTS, accuracy, body, body_state, head, train_expert, train_foundation

METHODS = ("base", "task_arithmetic", "ties", "ties+tall", "consensus")
CORRECTIONS = ("none", "repair", "tact")
SETTINGS = ("nonlocal", "local")
SITES = [str(2 * k) for k in range(DEPTH)]  # each body Linear's output, before its ReLU
MATCHING_ORDERS = 8  # weight matching: best of this many random visiting orders
CALIBRATION = 512  # clean training images per task for correction statistics
TA_LAM, TIES_KEEP, TALL_LAM, CONSENSUS_K = 0.3, 0.2, 1.0, 2


def align_b_to_a(a, b, how, calib_x):
    """Permutations of foundation ``b``'s hidden units that match ``a`` (``mlp_spec`` names).

    ``how="weight"``: weight matching, the best of ``MATCHING_ORDERS`` random visiting orders by the
    summed inner product of matched weights (a single order is unreliable on these networks);
    ``"activation"``: activation matching on ``calib_x``.
    """
    spec, sites = mlp_spec(DEPTH + 1)
    if how == "activation":
        return spec, activation_matching(spec, a, b, [calib_x], sites)
    sa, sb = a.state_dict(), b.state_dict()

    def agreement(perms):
        aligned = apply_permutations(spec, perms, sb)
        return sum(float((sa[k].double() * aligned[k].double()).sum()) for k in spec.params)

    candidates = [weight_matching(spec, sa, sb, seed=order) for order in range(MATCHING_ORDERS)]
    return spec, max(candidates, key=agreement)


def merged_bodies(method, base, experts):
    """Per-task merged body state dicts (one shared dict for every method but TALL's)."""
    num = len(experts)
    if method == "base":
        return [base] * num
    if method == "task_arithmetic":
        return [merge.task_arithmetic(base, experts, lam=TA_LAM)] * num
    if method == "ties":
        return [merge.ties(base, experts, keep=TIES_KEEP)] * num
    if method == "ties+tall":
        masks = merge.tall(base, experts, lam=TALL_LAM, mtl="ties", ties_kwargs={"keep": TIES_KEEP})
        return [masks.task_state_dict(t) for t in range(num)]
    if method == "consensus":
        return [merge.consensus(base, experts, k=CONSENSUS_K, alpha=TA_LAM)] * num
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def corrected_bodies(correction, bodies, expert_bodies, calib):
    """The per-task bodies after ``correction`` ("none", "repair" or "tact")."""
    if correction == "none":
        return bodies
    if correction == "tact":
        return tact(bodies, expert_bodies, calib, sites=SITES)
    if correction == "repair":  # one REPAIR per distinct merged body (TALL has one per task)
        return per_distinct(bodies, lambda b: repair(b, expert_bodies, calib, sites=SITES))
    raise ValueError(f"unknown correction {correction!r}; expected one of {CORRECTIONS}")


def per_distinct(items, fn):
    """``[fn(x) for x in items]`` with ``fn`` called once per distinct object (by identity)."""
    results = {}
    for x in items:
        if id(x) not in results:
            results[id(x)] = fn(x)
    return [results[id(x)] for x in items]


def body_module(template, state):
    """A copy of ``template``'s body holding ``state``."""
    module = copy.deepcopy(body(template))
    module.load_state_dict(state)
    return module.eval()


def evaluate(bodies, experts, data):
    """Per-task accuracy (task t: ``bodies[t]`` then expert t's head) and the variance ratio per
    site on each task's test data, averaged over tasks."""
    acc, ratios = [], []
    for t, (b, expert, d) in enumerate(zip(bodies, experts, data)):
        acc.append(accuracy(lambda x, b=b, h=head(expert): h(b(x)), d.test_x, d.test_y))
        r = variance_ratio(b, body(expert), [d.test_x], SITES)
        ratios.append([r[s] for s in SITES])
    return acc, [sum(col) / len(col) for col in zip(*ratios)]


def run_setting(experts, base_state, data, on_step):
    """Every method x correction of one setting: ``{"experts": .., "methods": ..}`` for one seed."""
    expert_bodies = [body(e) for e in experts]
    expert_acc = [accuracy(e, d.test_x, d.test_y) for e, d in zip(experts, data)]
    calib = [[d.calib_x] for d in data]
    expert_states = [body_state(e.state_dict()) for e in experts]
    methods = {}
    for method in METHODS:
        states = merged_bodies(method, base_state, expert_states)
        bodies = per_distinct(states, lambda s: body_module(experts[0], s))
        methods[method] = {}
        for correction in CORRECTIONS:
            acc, ratio = evaluate(corrected_bodies(correction, bodies, expert_bodies, calib), experts, data)
            methods[method][correction] = {
                "accuracy": acc,
                "normalized_accuracy": sum(m / e for m, e in zip(acc, expert_acc)) / len(acc),
                "variance_ratio": ratio,
            }
        on_step(f"merged: {method}")
    return {"experts": {"accuracy": expert_acc}, "methods": methods}


def run_seed(seed, schedule, *, device, align="weight", on_step=lambda what: None):
    """The whole demo for one seed: ``{"nonlocal": .., "local": ..}`` (see ``run_setting``).

    ``on_step(what)`` is called after each unit of work (``steps_per_seed()`` calls in all).
    """
    split = load_digits_split(seed)
    data = [task_data(task, split, calibration=CALIBRATION, device=device) for task in TASKS]
    fx, fy = foundation_data(split, device=device)
    foundation_a = train_foundation(fx, fy, schedule, seed=1000 * seed + 1)
    on_step("foundation A")
    foundation_b = train_foundation(fx, fy, schedule, seed=1000 * seed + 2)
    on_step("foundation B")
    experts_a, experts_b = [], {}
    for t, task in enumerate(TASKS):
        experts_a.append(train_expert(foundation_a, task, data[t], schedule, seed=1000 * seed + 10 + 2 * t))
        on_step(f"expert {task.name} from A")
    for t in (2, 3):
        experts_b[t] = train_expert(foundation_b, TASKS[t], data[t], schedule, seed=1000 * seed + 20 + 2 * t)
        on_step(f"expert {TASKS[t].name} from B")

    clean_images = split[0][:CALIBRATION].reshape(-1, INPUTS).to(device)
    spec, perms = align_b_to_a(foundation_a, foundation_b, align, clean_images)
    aligned_b = body_state(apply_permutations(spec, perms, foundation_b.state_dict()))
    on_step("aligned B to A")
    nonlocal_experts = experts_a[:2]
    for t in (2, 3):
        expert = copy.deepcopy(experts_b[t])
        expert.load_state_dict(apply_permutations(spec, perms, expert.state_dict()))
        nonlocal_experts.append(expert)
    nonlocal_base = merge.average([body_state(foundation_a.state_dict()), aligned_b])
    return {
        "nonlocal": run_setting(nonlocal_experts, nonlocal_base, data, on_step),
        "local": run_setting(experts_a, body_state(foundation_a.state_dict()), data, on_step),
    }


def steps_per_seed():
    """Number of ``on_step`` calls of one ``run_seed``."""
    return 2 + len(TASKS) + 2 + 1 + len(SETTINGS) * len(METHODS)
