"""Correction sites, their forward order, and per-channel activation statistics at them.

A site is a module name (the module's output) or ``(module_name, "input")`` (the first positional
input of the module, e.g. the attention context before its output projection). Activations are
reduced over every axis but the channel axis: the last axis, or axis 1 of 4-D/5-D (conv) outputs
(the convention of ``nlmerge.align.activation_matching``), read in place. A batch that is a mapping
with an ``attention_mask`` [B, L] counts only the positions it marks (mask != 0) of activations
shaped [B, L, C]: padding is not data.

The caller's models are run in eval mode and left as they were: the public functions measure under
``eval_mode`` and ``torch.no_grad``, and every hook they add is removed on the way out, also when
they raise.
"""
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from nlmerge.ops.activations import activation, eval_mode, feature_axis, run_batch
from nlmerge.ops.stats import StreamingStats

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONTAINERS = (nn.Sequential, nn.ModuleList)
_PROJ_NAMES = ("proj", "out_proj", "o_proj", "dense")
_QKV_NAMES = ({"q", "k", "v"}, {"q_proj", "k_proj", "v_proj"}, {"qkv"}, {"query", "key", "value"})


# ---------------------------------------------------------------------------------- site names

def site_key(site):
    """Normalize a site to ``name`` (module output) or ``(name, "input")``; ValueError if malformed."""
    if isinstance(site, str):
        return site
    if isinstance(site, (tuple, list)) and len(site) == 2 and isinstance(site[0], str):
        if site[1] == "output":
            return site[0]
        if site[1] == "input":
            return (site[0], "input")
    raise ValueError(f"bad site {site!r}: a module name, or (module name, 'input' | 'output')")


def site_module(site):
    """The module name of a normalized site."""
    return site if isinstance(site, str) else site[0]


def site_label(site):
    """Human-readable site name for messages."""
    return site if isinstance(site, str) else f"{site[0]} (input)"


def unwrap(model, label="model"):
    """The plain model behind a ``CorrectedModel`` (or the model itself); TypeError naming ``label``
    when it is not a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the {label} must be a torch.nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_nlmerge_corrected_inner", None)
    return model if inner is None else inner()


def check_sites(model, sites, label="model"):
    """Normalized sites, each a module of ``unwrap(model)``; ValueError naming the first missing one,
    TypeError when the model is not a ``torch.nn.Module``."""
    modules = dict(unwrap(model, label).named_modules())
    out = []
    for s in sites:
        key = site_key(s)
        if site_module(key) not in modules:
            raise ValueError(f"site {site_label(key)!r} is not a module of the {label}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no sites to correct")
    return out


def _is_attention(module):
    names = {n for n, _ in module.named_children()}
    return any(p in names for p in _PROJ_NAMES) and any(q <= names for q in _QKV_NAMES)


def _attention_proj(module):
    names = {n for n, _ in module.named_children()}
    return next(p for p in _PROJ_NAMES if p in names)


def default_sites(model):
    """The default correction sites of ``model``, in registration order.

    Rule, over the module tree:

    - each ``Linear``/``Conv{1,2,3}d``: its output, unless the next sibling in its parent is a norm
      layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm), whose output is the site instead;
      every other norm layer's output is a site too (pre-activation values);
    - attention modules (children ``q``/``k``/``v`` or ``qkv`` or ``*_proj`` with an output
      projection ``proj``/``out_proj``/``o_proj``/``dense``): only the context, the input of the
      output projection, ``(attn.proj, "input")``; their q/k/v/proj layers are not sites;
    - the residual stream after each block: every non-container module that is a direct child of an
      ``nn.Sequential``/``nn.ModuleList`` and itself holds linear/conv layers (ResNet basic blocks,
      transformer blocks);
    - the last linear/conv layer of the model (the output head) is not a site.

    ``nn.MultiheadAttention`` computes its context internally and gets no context site.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list
        Sites: module names (outputs) and ``(name, "input")`` pairs.
    """
    model = unwrap(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, _LINEAR)]
    head = layers[-1] if layers else None
    sites = []
    skip_prefixes = []

    def visit(prefix, module, parent_is_container):
        for p in skip_prefixes:
            if prefix.startswith(p):
                return
        if prefix and _is_attention(module):
            sites.append((f"{prefix}.{_attention_proj(module)}", "input"))
            skip_prefixes.append(prefix + ".")
            return
        children = list(module.named_children())
        for i, (name, child) in enumerate(children):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _LINEAR):
                nxt = children[i + 1][1] if i + 1 < len(children) else None
                if full != head and not isinstance(nxt, _NORM):
                    sites.append(full)
            elif isinstance(child, _NORM):
                sites.append(full)
            else:
                visit(full, child, isinstance(module, _CONTAINERS))
        if (parent_is_container and prefix and not isinstance(module, _CONTAINERS)
                and any(isinstance(m, _LINEAR) for m in module.modules())):
            sites.append(prefix)

    visit("", model, False)
    return sites


# ---------------------------------------------------------------------------------- forward helpers

def reiterable(data, label="data"):
    """``data`` as something that can be iterated more than once (one-shot iterators become lists)."""
    if data is None:
        raise ValueError(f"{label} is None")
    if iter(data) is data:
        data = list(data)
    return data


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the site of interest ran."""


@contextlib.contextmanager
def hooks_at(model, sites, make):
    """While the block runs, ``make(site)(activation)`` is called at every site of ``unwrap(model)``
    (an output hook, or a pre-hook for an input site)."""
    modules = dict(unwrap(model).named_modules())
    handles = []
    try:
        for site in sites:
            fn, module = make(site), modules[site_module(site)]
            if isinstance(site, str):
                handles.append(module.register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0] if args else None)))
        yield
    finally:
        for h in handles:
            h.remove()


def _positions(batch):
    """The positions of ``batch`` that count: its ``attention_mask`` as bool [B, L], or None (all)."""
    if isinstance(batch, Mapping) and torch.is_tensor(batch.get("attention_mask")):
        return batch["attention_mask"] != 0
    return None


def collect(model, data, sites, *, stop_after=None, backend=None, label="data"):
    """One pass over ``data`` accumulating ``StreamingStats`` at ``sites`` of ``model``.

    Activations [B, L, C] of a batch with an ``attention_mask`` [B, L] count only where the mask
    is set.

    ``stop_after``: a site after which each forward is cut short (the pass only needs it and the
    sites before it). Returns ``{site: StreamingStats}``; ValueError if ``data`` yields no batch.
    """
    stats = {}
    mask = [None]  # the current batch's attention_mask, read by the hooks

    def make(site):
        label, stop = site_label(site), site == stop_after

        def fn(act):
            x = activation(act, label)
            if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0]]
            axis = feature_axis(x)
            st = stats.get(site)
            if st is None:
                st = stats[site] = StreamingStats(x.shape[axis], backend=backend)
            st.update(x, feature_axis=axis)
            if stop:
                raise _Stop
        return fn

    batches = 0
    with hooks_at(model, sites, make), torch.no_grad():
        for batch in data:
            batches += 1
            mask[0] = _positions(batch)
            try:
                run_batch(model, batch)
            except _Stop:
                pass
    if batches == 0:
        raise ValueError(f"{label} yielded no batch (empty loader)")
    for s in sites:
        if s not in stats:
            raise ValueError(f"site {site_label(s)!r} did not run in the forward pass over {label}")
    return stats


# ---------------------------------------------------------------------------------- public API

@dataclass
class SiteStats:
    """Per-channel statistics of one site: ``count`` (rows reduced over), ``mean``, ``var`` (float64 [C])."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor

    @property
    def std(self):
        """Population standard deviation, float64 [C]."""
        return self.var.sqrt()


def activation_stats(model, data, sites=None, *, backend=None):
    """Per-site, per-channel count, mean and population variance of ``model``'s activations.

    One pass over ``data`` with ``StreamingStats`` at every site (float64 state). The model is run
    in eval mode (BatchNorm on its running statistics, dropout off) and left as it was: parameters,
    buffers, every module's ``training`` flag, no hooks, also when the call raises.

    Parameters
    ----------
    model : torch.nn.Module
        A plain model or a ``CorrectedModel`` (statistics then include its corrections).
    data : iterable
        Batches: tensor, tuple/list (first element is the input) or mapping of keyword inputs (an
        ``attention_mask`` [B, L] there limits activations [B, L, C] to the positions it marks).
    sites : list, optional
        Default ``default_sites(model)``.
    backend : str, optional
        Backend of ``StreamingStats``.

    Returns
    -------
    dict
        ``{site: SiteStats}`` in the order of ``sites``.

    Raises
    ------
    ValueError
        A site that is not a module of the model; an empty loader.
    """
    sites = check_sites(model, default_sites(model) if sites is None else sites)
    with eval_mode(model):
        stats = collect(model, reiterable(data), sites, backend=backend)
    return {s: SiteStats(stats[s].count, stats[s].mean, stats[s].var) for s in sites}


def variance_ratio(merged, expert, data, sites=None, *, backend=None):
    """Per site, channel-averaged variance of ``merged`` over channel-averaged variance of ``expert``.

    A ratio of averages: ``mean_c var_M[c] / mean_c var_E[c]``; below 1 means variance collapse.
    The models are run in eval mode and left as they were (see ``activation_stats``).

    Parameters
    ----------
    merged, expert : torch.nn.Module
        Same architecture (``merged`` may be a ``CorrectedModel``).
    data : iterable
        Batches fed to both models.
    sites : list, optional
        Default ``default_sites(merged)``.

    Returns
    -------
    dict
        ``{site: float}``.

    Raises
    ------
    ValueError
        Unknown site, empty loader, or channel counts that differ at a site.
    """
    data = reiterable(data)
    sites = check_sites(merged, default_sites(merged) if sites is None else sites, "merged model")
    check_sites(expert, sites, "expert")
    with eval_mode(merged, expert):
        sm = collect(merged, data, sites, backend=backend)
        se = collect(expert, data, sites, backend=backend)
    out = {}
    for s in sites:
        check_channels(s, sm[s].num_features, se[s].num_features)
        out[s] = float(sm[s].var.mean() / se[s].var.mean())
    return out


def check_channels(site, merged_c, expert_c):
    """ValueError naming ``site`` when the merged and expert channel counts differ."""
    if merged_c != expert_c:
        raise ValueError(f"site {site_label(site)!r}: merged model has {merged_c} channels, expert has {expert_c}")
