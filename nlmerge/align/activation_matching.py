"""Activation matching: assignment on the cross-correlation of two models' activations."""

import torch
from torch import nn

from nlmerge.align._assign import solve_assignment, solve_group
from nlmerge.align.spec import check_int
from nlmerge.ops.activations import eval_mode, features_last, run_batch
from nlmerge.ops.stats import StreamingStats


def _sites_of(perm, value):
    """Normalize one ``sites`` entry to a list of ``(module_name, "output" | "input")``."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, tuple) and len(value) == 2 and value[1] in ("input", "output"):
        value = [value]
    out = []
    for entry in value:
        if isinstance(entry, str):
            out.append((entry, "output"))
        elif isinstance(entry, tuple) and len(entry) == 2 and entry[1] in ("input", "output"):
            out.append((str(entry[0]), entry[1]))
        else:
            raise ValueError(f"permutation {perm!r}: bad site {entry!r} "
                             "(a module name, or (module name, 'input' | 'output'))")
    if not out:
        raise ValueError(f"permutation {perm!r} has no site")
    return out


def activation_matching(spec, reference_model, other_model, data, sites, *, forward=None,
                        max_batches=None, backend=None, return_correlations=False):
    """Permutations of ``other_model`` that best match ``reference_model`` on activations.

    One streaming pass over ``data`` feeds the paired activations of both models at every site into
    ``nlmerge.ops.stats.StreamingStats``; each permutation's score is the Pearson cross-correlation
    ``[reference unit, other unit]`` summed over its sites, and the linear assignment maximizes it
    (head-structured permutations: heads first on block-summed correlation, then units within
    each matched head pair; the members of an attention group together, by ``solve_group``). Activations are reduced over every axis but the feature axis: the
    last axis, or axis 1 for 4-D and 5-D (convolution) outputs. The models are run in eval mode
    (BatchNorm on its running statistics, dropout off) under ``torch.no_grad`` and left as they
    were: parameters, buffers, every module's ``training`` flag, no hooks, also when the call
    raises.

    Parameters
    ----------
    spec : PermutationSpec
        Permutations (only names and head counts are used here).
    reference_model, other_model : torch.nn.Module
        Models with the same module names.
    data : iterable
        Batches: a tensor (``model(batch)``), a tuple/list (``model(batch[0])``) or a mapping
        (``model(**batch)``), unless ``forward`` is given.
    sites : Mapping[str, site or list of sites]
        ``{perm_name: site}`` where a site is a module name (its output; the first element of a
        tuple output) or ``(module_name, "input" | "output")``.
    forward : callable, optional
        ``forward(model, batch)`` runs one model on one batch (inside the eval-mode block).
    max_batches : int, optional
        Stop after this many batches (>= 1).
    backend : str, optional
        Backend of ``StreamingStats``.
    return_correlations : bool
        Also return ``{perm_name: [n, n] summed correlation}``.

    Returns
    -------
    dict
        ``{perm_name: int64 tensor}`` (CPU), ``perms[p][i] = j``: unit i of the aligned model is
        unit j of ``other_model``. With ``return_correlations``, ``(perms, correlations)``.

    Raises
    ------
    ValueError
        Sites missing or unknown, a site module not in a model, activation shapes that differ, an
        empty loader, ``max_batches`` < 1.
    TypeError
        A model that is not a ``torch.nn.Module``; ``max_batches`` not an int.
    """
    missing = [p for p in spec.perms if p not in sites]
    if missing:
        raise ValueError(f"permutations without an activation site: {missing}")
    unknown = [p for p in sites if p not in spec.perms]
    if unknown:
        raise ValueError(f"sites given for permutations not in the spec: {unknown}")
    for label, model in (("reference_model", reference_model), ("other_model", other_model)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{label} must be a torch.nn.Module, got {type(model).__name__}")
    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches", 1)
    forward = forward or run_batch
    plan = {p: _sites_of(p, sites[p]) for p in spec.perms}
    ref_modules = dict(reference_model.named_modules())
    oth_modules = dict(other_model.named_modules())
    wanted = sorted({site for entries in plan.values() for site in entries})
    for name, _ in wanted:
        for label, modules in (("reference_model", ref_modules), ("other_model", oth_modules)):
            if name not in modules:
                raise ValueError(f"site module {name!r} is not in {label}")

    captured = ({}, {})
    handles = []

    def make_hook(store, site):
        if site[1] == "output":
            return lambda module, args, output: store.__setitem__(site, output)
        return lambda module, args, output: store.__setitem__(site, args)

    stats = {}
    with eval_mode(reference_model, other_model), torch.no_grad():
        try:
            for store, modules in zip(captured, (ref_modules, oth_modules)):
                for site in wanted:
                    handles.append(modules[site[0]].register_forward_hook(make_hook(store, site)))
            for index, batch in enumerate(data):
                if max_batches is not None and index >= max_batches:
                    break
                for store, model in zip(captured, (reference_model, other_model)):
                    store.clear()
                    forward(model, batch)
                for site in wanted:
                    for label, store in (("reference_model", captured[0]), ("other_model", captured[1])):
                        if site not in store:
                            raise RuntimeError(f"site {site} did not run in {label}")
                    x = features_last(captured[0][site], site)
                    y = features_last(captured[1][site], site)
                    if x.shape != y.shape:
                        raise ValueError(f"site {site}: activation shapes differ, {tuple(x.shape)} "
                                         f"vs {tuple(y.shape)}")
                    if site not in stats:
                        stats[site] = StreamingStats(x.shape[-1], y.shape[-1], backend=backend)
                    stats[site].update(x, y)
        finally:
            for handle in handles:
                handle.remove()
    if not stats:
        raise ValueError("data yielded no batch")

    perms, correlations = {}, {}
    for p, entries in plan.items():
        score = None
        for site in entries:
            corr = stats[site].cross_corr().to("cpu", torch.float64)
            if score is not None and corr.shape != score.shape:
                raise ValueError(f"permutation {p!r}: sites of different widths")
            score = corr if score is None else score + corr
        heads = spec.heads.get(p)
        if heads is not None and score.shape[0] % heads:
            raise ValueError(f"permutation {p!r}: {heads} heads do not divide width {score.shape[0]}")
        if p not in spec.grouped:
            perms[p] = solve_assignment(score, heads)
        correlations[p] = score
    for group in spec.attention.values():
        perms.update(solve_group(group, correlations))
    return (perms, correlations) if return_correlations else perms
