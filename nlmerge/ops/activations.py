"""Activation plumbing shared by alignment and correction: feeding a batch to a model, a hooked
activation as a tensor and its feature axis (what ``StreamingStats.update`` reads), or moved last."""
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
