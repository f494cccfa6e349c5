"""Activation plumbing shared by alignment and correction: feeding a batch to a model, and a
hooked activation as a ``[..., C]`` tensor (the layout ``StreamingStats`` reads)."""
from collections.abc import Mapping

import torch


def features_last(x, where):
    """A hook's activation, detached, with its feature axis last (4-D/5-D: channels at axis 1).

    A tuple/list output gives its first element; anything else that is not a tensor raises a
    ValueError naming the site ``where``.
    """
    if isinstance(x, (tuple, list)):
        x = x[0]
    if not torch.is_tensor(x):
        raise ValueError(f"site {where}: activation is not a tensor ({type(x).__name__})")
    x = x.detach()
    if x.dim() in (4, 5):
        x = torch.movedim(x, 1, -1)
    return x


def run_batch(model, batch):
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple/list, ``model(**batch)`` for a mapping."""
    if torch.is_tensor(batch):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__}; pass forward=")
