"""Activation plumbing shared by alignment and correction: running the caller's models in eval mode
and leaving them as they were, feeding a batch to a model, a hooked activation as a tensor and its
feature axis (what ``StreamingStats.update`` reads), or moved last."""
import contextlib
from collections.abc import Mapping

import torch


def activation(x, where):
    """A hook's activation as a detached tensor.

    A tuple/list output gives its first element; anything else that is not a tensor raises a
    ValueError naming the site ``where``.
    """
    if isinstance(x, (tuple, list)):
        x = x[0]
    if not torch.is_tensor(x):
        raise ValueError(f"site {where}: activation is not a tensor ({type(x).__name__})")
    return x.detach() if x.requires_grad else x


def feature_axis(x):
    """The feature axis of an activation: 1 for 4-D/5-D (conv channels, NCHW/NCDHW), else -1."""
    return 1 if x.dim() in (4, 5) else -1


def features_last(x, where):
    """``activation(x, where)`` with its feature axis last (a copy-free view; 4-D/5-D: axis 1 moved)."""
    x = activation(x, where)
    return torch.movedim(x, 1, -1) if feature_axis(x) == 1 else x


def run_batch(model, batch):
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple/list, ``model(**batch)`` for a mapping."""
    if torch.is_tensor(batch):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__}; pass forward=")


@contextlib.contextmanager
def eval_mode(*models):
    """While the block runs, every module of ``models`` is in eval mode; on exit, also when the
    block raises, each module's ``training`` flag is what it was before.

    Statistics are measured in eval mode: BatchNorm normalizes with its running statistics and does
    not update them, dropout is off. Only the flags are set (``module.training``), not through
    ``train()``, which a subclass may override with other effects. A module shared by several
    models, or listed twice, is recorded once, before any flag changes.

    Parameters
    ----------
    *models : torch.nn.Module
    """
    flags = {}  # id -> (module, flag)
    for model in models:
        for module in model.modules():
            flags.setdefault(id(module), (module, module.training))
    try:
        for module, _ in flags.values():
            module.training = False
        yield
    finally:
        for module, flag in flags.values():
            module.training = flag
