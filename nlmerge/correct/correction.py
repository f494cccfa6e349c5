"""TACT and REPAIR: per-channel affine corrections of a merged model's activations, and folding.

At each site (per channel c), ``z' = sigma_E * (z - mu_M) / sqrt(var_M + eps) + mu_E``, stored as
``z' = scale * z + shift``. Sites are corrected in forward order: the merged statistics of a site
are measured with the corrections of the sites before it already active (one pass per site, cut
short after the site).

The caller's models are run in eval mode and left as they were (parameters, buffers, every module's
``training`` flag, no hooks), also when a call raises; see ``nlmerge.ops.activations.eval_mode``.
"""
import math
import numbers

import torch
from torch import nn

from nlmerge.correct.sites import (_LINEAR, _NORM, SiteStats, check_channels, check_sites, collect,
                                   default_sites, hooks_at, reiterable, site_label, site_module, unwrap)
from nlmerge.ops.activations import eval_mode, run_batch


class CorrectedModel(nn.Module):
    """A shared merged model plus per-site correction buffers ``scale_i``, ``shift_i`` (float32 [C]).

    The corrections are applied by forward hooks that exist only during ``forward``, so several
    ``CorrectedModel`` (one per task) can share one merged model. Site names refer to the merged
    model's modules (without the ``model.`` prefix).

    The merged model is shared by design, not copied: building a ``CorrectedModel`` and adding sites
    change nothing in it (parameters, buffers, flags, hooks), but the wrapper holds the caller's
    module, so ``.train()``, ``.eval()``, ``.to()``, ``.half()`` or an optimizer step through the
    wrapper act on the caller's merged model and on every other ``CorrectedModel`` of it. Pass a
    ``copy.deepcopy`` of the merged model to keep them apart. ``forward`` runs the merged model in
    whatever mode its modules are in.

    Parameters
    ----------
    model : torch.nn.Module
        The merged model (shared, not copied).

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.
    """

    def __init__(self, model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"CorrectedModel wraps a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        self.model = model
        self.sites = []

    def _nlmerge_corrected_inner(self):
        return self.model

    def add_site(self, site, scale, shift):
        """Add (or replace) the correction ``scale * z + shift`` at ``site``.

        Parameters
        ----------
        site : str or (str, "input")
            A module of the merged model (its output, or its first input).
        scale, shift : Tensor or sequence of float
            One value per channel, stored as float32 [C] (copies).

        Raises
        ------
        ValueError
            A site that is not a module of the merged model, ``scale`` and ``shift`` of different
            lengths, or a value that is not finite in float32 (naming the site).
        """
        (site,) = check_sites(self.model, [site], "merged model")
        label = site_label(site)
        scale, shift = (torch.as_tensor(v).detach().to(torch.float32).reshape(-1).clone() for v in (scale, shift))
        if scale.shape != shift.shape:
            raise ValueError(f"site {label!r}: scale has {scale.numel()} channels, shift has {shift.numel()}")
        for name, value in (("scale", scale), ("shift", shift)):
            bad = (~torch.isfinite(value)).nonzero()
            if bad.numel():
                raise ValueError(f"site {label!r}: the correction's {name} is not finite in float32 "
                                 f"(channel {int(bad[0])}: {float(value[bad[0]])})")
        if site in self.sites:
            i = self.sites.index(site)
        else:
            i = len(self.sites)
            self.sites.append(site)
        self.register_buffer(f"scale_{i}", scale)
        self.register_buffer(f"shift_{i}", shift)

    def correction(self, site):
        """``(scale, shift)`` float32 [C] of ``site``."""
        i = self.sites.index(site)
        return getattr(self, f"scale_{i}"), getattr(self, f"shift_{i}")

    def forward(self, *args, **kwargs):
        """The merged model's forward with the corrections applied at their sites."""
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for i, site in enumerate(self.sites):
                handles.append(_install(modules[site_module(site)], site, getattr(self, f"scale_{i}"),
                                        getattr(self, f"shift_{i}")))
            return self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()


def _affine(x, scale, shift):
    if isinstance(x, (tuple, list)):
        return type(x)((_affine(x[0], scale, shift), *x[1:]))
    shape = [1] * x.dim()
    axis = 1 if x.dim() in (4, 5) else -1
    shape[axis] = -1
    s = scale.to(device=x.device, dtype=x.dtype).view(shape)
    b = shift.to(device=x.device, dtype=x.dtype).view(shape)
    return torch.addcmul(b, x, s)


def _install(module, site, scale, shift):
    if isinstance(site, str):
        return module.register_forward_hook(lambda m, args, out: _affine(out, scale, shift), prepend=True)

    def pre(m, args):
        return (_affine(args[0], scale, shift), *args[1:])
    return module.register_forward_pre_hook(pre, prepend=True)


# ---------------------------------------------------------------------------------- helpers

def _forward_order(model, data, sites):
    """``sites`` sorted by when each first runs in one forward pass of the first batch.

    ValueError when a site runs more than once in that pass (a module called twice, e.g. one
    shared activation module): its calls would share one correction fitted to their mixture.
    """
    calls = {}  # site -> number of calls, in first-call order

    def make(site):
        def fn(_):
            calls[site] = calls.get(site, 0) + 1
        return fn

    batches = 0
    with hooks_at(model, sites, make), torch.no_grad():
        for batch in data:
            batches += 1
            run_batch(model, batch)
            break
    if not batches:
        raise ValueError("data yielded no batch (empty loader)")
    missing = [site_label(s) for s in sites if s not in calls]
    if missing:
        raise ValueError(f"sites {missing} did not run in the forward pass")
    repeated = {site_label(s): n for s, n in calls.items() if n > 1}
    if repeated:
        raise ValueError(
            f"sites run more than once in one forward pass (calls: {repeated}); a correction there would "
            "apply one scale and shift to every call: choose sites whose module is called once"
        )
    return list(calls)


class _Chain:
    """Re-iterable concatenation of several loaders."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        for loader in self.loaders:
            yield from loader


def _check_eps(eps):
    """``eps`` as a float: a real number (TypeError), finite and > 0 (ValueError): a channel of merged
    variance 0 would give NaN at 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0 (it is added to the merged variance under a square root), "
                         f"got {eps!r}")
    return float(eps)


def _solve(mu_e, sd_e, mu_m, var_m, eps):
    scale = sd_e / torch.sqrt(var_m + eps)
    return scale, mu_e - scale * mu_m


def _check_inputs(experts, data):
    experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
    if not experts:
        raise ValueError("experts is empty")
    if not isinstance(data, (list, tuple)) or len(data) != len(experts):
        raise ValueError(f"data must be a list of one loader per task ({len(experts)} experts), "
                         f"got {type(data).__name__}" + (f" of length {len(data)}" if isinstance(data, (list, tuple)) else ""))
    return experts, [reiterable(d, f"data[{t}]") for t, d in enumerate(data)]


def _check_experts(experts, sites):
    for t, expert in enumerate(experts):
        check_sites(expert, sites, f"expert {t}")


def _expert_stats(experts, data, sites, backend):
    return [{s: SiteStats(st.count, st.mean, st.var) for s, st in
             collect(expert, loader, sites, backend=backend, label=f"data[{t}]").items()}
            for t, (expert, loader) in enumerate(zip(experts, data))]


def _correct(merged, targets, loader, eps, backend, label):
    """Sequential correction of ``merged`` towards ``targets[site]`` (``SiteStats``)."""
    cm = CorrectedModel(merged)
    for site in _forward_order(merged, loader, list(targets)):
        ms = collect(cm, loader, [site], stop_after=site, backend=backend, label=label)[site]
        target = targets[site]
        check_channels(site, ms.num_features, target.mean.numel())
        scale, shift = _solve(target.mean.to(ms.mean.device), target.std.to(ms.mean.device), ms.mean, ms.var, eps)
        cm.add_site(site, scale, shift)
    return cm


def repair_targets(stats):
    """REPAIR's one target from per-task statistics: per site, the average over tasks of the means
    and of the standard deviations.

    Parameters
    ----------
    stats : list of dict
        ``{site: SiteStats}`` per task (e.g. ``activation_stats`` of expert t on task t's data), the
        same sites in each.

    Returns
    -------
    dict
        ``{site: SiteStats}``: ``count`` summed, ``mean`` the mean of the means, ``var`` the square
        of the mean of the standard deviations (float64 [C]).

    Raises
    ------
    ValueError
        No tasks, a site missing from a task, or channel counts that differ at a site.
    """
    if not stats:
        raise ValueError("repair_targets needs the statistics of at least one task")
    out = {}
    for site in stats[0]:
        for t, task in enumerate(stats[1:], 1):
            if site not in task:
                raise ValueError(f"site {site_label(site)!r} has no statistics for task {t}")
            check_channels(site, stats[0][site].mean.numel(), task[site].mean.numel())
        std = torch.stack([task[site].std for task in stats]).mean(0)
        out[site] = SiteStats(sum(task[site].count for task in stats),
                              torch.stack([task[site].mean for task in stats]).mean(0), std * std)
    return out


def correct_to(merged, targets, data, eps=1e-5, *, backend=None):
    """Correct ``merged`` so that its statistics on ``data`` equal ``targets``: the step that
    ``tact`` runs per task and ``repair`` once, for targets measured elsewhere (one expert loaded at
    a time, say).

    Sites are corrected in forward order with the corrections of earlier sites active:
    ``z' = sigma_T (z - mu_M) / sqrt(var_M + eps) + mu_T`` per channel. The merged model is run
    in eval mode and left as it was, also when the call raises.

    Parameters
    ----------
    merged : torch.nn.Module
        The merged model (shared by the result, not copied).
    targets : dict
        ``{site: SiteStats}``: the target mean and variance (float [C]) of each site to correct.
    data : iterable
        Input batches (re-iterable; a one-shot iterator is materialized).
    eps : float
        Added to the merged variance; finite and > 0. The corrected std is
        ``sigma_T * sqrt(var_M / (var_M + eps))``.

    Returns
    -------
    CorrectedModel

    Raises
    ------
    ValueError
        As ``tact``.
    """
    eps = _check_eps(eps)
    check_sites(merged, list(targets), "merged model")
    data = reiterable(data)
    with eval_mode(merged):
        return _correct(merged, targets, data, eps, backend, "data")


# ---------------------------------------------------------------------------------- public API

def tact(merged, experts, data, sites=None, eps=1e-5, *, backend=None):
    """Task-specific activation correction: one corrected model per task.

    For task t, expert t's per-channel mean and std on ``data[t]`` are the target; the merged model
    is measured on ``data[t]`` site by site in forward order with the corrections of the earlier
    sites active, and corrected by ``z' = sigma_E (z - mu_M) / sqrt(var_M + eps) + mu_E``. The
    models are run in eval mode and left as they were (parameters, buffers, every module's
    ``training`` flag, no hooks), also when the call raises: the statistics are eval-mode statistics
    (BatchNorm on its running statistics), whatever mode the models came in.

    Parameters
    ----------
    merged : torch.nn.Module or list of torch.nn.Module
        One merged model shared by all tasks, or one per task.
    experts : list of torch.nn.Module
        Expert t for task t (same architecture as ``merged``).
    data : list of iterable
        One loader (re-iterable; one-shot iterators are materialized) of input batches per task.
    sites : list, optional
        Module names (outputs) and ``(name, "input")`` pairs; default ``default_sites(merged)``.
    eps : float
        Added to the merged variance; finite and > 0.
    backend : str, optional
        Backend of ``StreamingStats``.

    Returns
    -------
    list of CorrectedModel
        One per task, all sharing the merged model's weights (when one merged model is given; see
        ``CorrectedModel`` for what sharing means).

    Raises
    ------
    ValueError
        A site that is not a module, an empty loader, channel counts that differ at a site, ``eps``
        not finite or not > 0, or a correction that is not finite in float32 (naming the site).
    TypeError
        ``eps`` is not a real number.
    """
    eps = _check_eps(eps)
    experts, data = _check_inputs(experts, data)
    models = list(merged) if isinstance(merged, (list, tuple)) else [merged] * len(experts)
    if len(models) != len(experts):
        raise ValueError(f"{len(models)} merged models for {len(experts)} experts")
    sites = check_sites(models[0], default_sites(models[0]) if sites is None else sites, "merged model")
    for m in models[1:]:
        check_sites(m, sites, "merged model")
    _check_experts(experts, sites)
    out = []
    with eval_mode(*models, *experts):
        ex = _expert_stats(experts, data, sites, backend)
        for t in range(len(experts)):
            out.append(_correct(models[t], ex[t], data[t], eps, backend, f"data[{t}]"))
    return out


def repair(merged, experts, data, sites=None, eps=1e-5, *, backend=None):
    """REPAIR: one correction for all tasks towards the experts' averaged statistics.

    The target of each channel is the average over tasks of expert t's mean and of its std (on
    ``data[t]``); the merged model is measured on all tasks' data together, site by site in forward
    order with earlier corrections active, and corrected as in ``tact``. The models are run in eval
    mode and left as they were, also when the call raises (as in ``tact``).

    Parameters
    ----------
    merged : torch.nn.Module
    experts : list of torch.nn.Module
    data : list of iterable
        One loader of input batches per task.
    sites : list, optional
        Default ``default_sites(merged)``.
    eps : float
        Added to the merged variance; finite and > 0.

    Returns
    -------
    CorrectedModel
        Wrapping (sharing) ``merged``.

    Raises
    ------
    ValueError
        As ``tact``.
    """
    if isinstance(merged, (list, tuple)):
        raise ValueError("repair takes one merged model")
    eps = _check_eps(eps)
    experts, data = _check_inputs(experts, data)
    sites = check_sites(merged, default_sites(merged) if sites is None else sites, "merged model")
    _check_experts(experts, sites)
    with eval_mode(merged, *experts):
        return _correct(merged, repair_targets(_expert_stats(experts, data, sites, backend)), _Chain(data), eps,
                        backend, "data")


def fold_problem(model, site, shift=True):
    """Why a correction at ``site`` of ``model`` cannot be folded into its weights, or None when it can.

    Foldable: the output of a ``Linear``/``Conv`` or of an affine norm layer (BatchNorm, LayerNorm
    over one dim, GroupNorm, InstanceNorm) and the input of a ``Linear``; with ``shift`` (a
    correction whose shift is not all zero) the layer also needs a bias. Not foldable: the whole
    model, a residual-stream site (a block's output), any other module.

    Parameters
    ----------
    model : torch.nn.Module
        A plain model or a ``CorrectedModel``.
    site : str or (str, "input")
    shift : bool
        Whether the correction has a shift.

    Returns
    -------
    str or None
        The reason, phrased to follow the site's name.

    Raises
    ------
    ValueError
        ``site`` is not a module of the model.
    """
    (site,) = check_sites(model, [site])
    name = site_module(site)
    if not name:
        return "is the whole model"
    module = unwrap(model).get_submodule(name)
    kind = type(module).__name__
    if isinstance(site, tuple):
        if not isinstance(module, nn.Linear):
            return f"is the input of {kind}: only the input of a Linear can be folded"
    elif isinstance(module, _NORM):
        w = getattr(module, "weight", None)
        if w is None:
            return f"is the output of {kind} without an affine weight to fold into"
        if w.dim() != 1:
            return f"is the output of {kind} normalizing over {tuple(w.shape)}, not one channel axis"
    elif not isinstance(module, _LINEAR):
        return f"is the output of {kind}, not of a linear, conv or norm layer"
    if shift and getattr(module, "bias", None) is None:
        return f"is a {kind} without a bias to take the shift"
    return None


def fold(corrected):
    """The merged model's state dict with ``corrected``'s corrections folded into its layers.

    An output site of a ``Linear``/``Conv`` scales its weight per output channel and maps its bias
    ``b -> scale * b + shift``; an output site of an affine norm layer (BatchNorm, LayerNorm over one
    dim, GroupNorm, InstanceNorm) does the same to its weight and bias; an input site of a
    ``Linear`` (the attention context) scales the weight's input columns and adds ``W @ shift`` to
    its bias. BatchNorm is folded for ``eval()`` mode. Call once per task for per-task copies.
    Nothing is run and nothing of ``corrected`` or its merged model is changed. Which sites fold:
    ``fold_problem``.

    Parameters
    ----------
    corrected : CorrectedModel

    Returns
    -------
    dict
        A plain state dict of the merged model's architecture (new tensors; the model is unchanged).

    Raises
    ------
    ValueError
        Naming the site that cannot be folded and why (``fold_problem``), or a correction whose
        channel count differs from the layer's.
    """
    if not isinstance(corrected, CorrectedModel):
        raise TypeError(f"fold takes a CorrectedModel, got {type(corrected).__name__}")
    inner = corrected.model
    state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    # input sites before output sites of the same module: y = A (W (a z + b) + c) + d
    ordered = sorted(corrected.sites, key=lambda s: 0 if isinstance(s, tuple) else 1)
    for site in ordered:
        scale, shift = corrected.correction(site)
        label = site_label(site)
        problem = fold_problem(inner, site, shift=bool(shift.any()))
        if problem:
            raise ValueError(f"site {label!r} {problem}: cannot fold")
        name = site_module(site)
        wk, bk = f"{name}.weight", f"{name}.bias"
        w = state[wk]
        b = state.get(bk)
        a, s = scale.double(), shift.double()
        if isinstance(site, tuple):
            wd = w.double()
            if b is not None:
                state[bk] = (b.double() + wd @ s).to(b.dtype)
            state[wk] = (wd * a[None, :]).to(w.dtype)
            continue
        if w.shape[0] != a.numel():
            raise ValueError(f"site {label!r}: layer has {w.shape[0]} output channels, correction has {a.numel()}")
        view = [-1] + [1] * (w.dim() - 1)
        state[wk] = (w.double() * a.view(view)).to(w.dtype)
        if b is not None:
            state[bk] = (b.double() * a + s).to(b.dtype)
    return state
