"""The demo's data: scikit-learn's bundled 8x8 ``digits`` (no download), four tasks that are each a
label split and an input-domain shift, and the training-set augmentation.

Images are float32 in [0, 1], shape [N, 8, 8]; models see them flattened to 64 features.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Task:
    """A task: the digits it uses, how it labels them, and the domain shift of its inputs."""

    name: str
    digits: tuple
    num_classes: int
    label: Callable  # digit labels (int64 [N]) -> task labels
    shift: Callable  # images [N, 8, 8] -> the task's input domain


TASKS = (
    Task("0-4 rot90", tuple(range(5)), 5, lambda d: d, lambda im: torch.rot90(im, 1, dims=(1, 2))),
    Task("5-9 inverted", tuple(range(5, 10)), 5, lambda d: d - 5, lambda im: 1.0 - im),
    Task("parity flipped", tuple(range(10)), 2, lambda d: d % 2, lambda im: torch.flip(im, dims=(1,))),
    Task(">=5 rot180", tuple(range(10)), 2, lambda d: (d >= 5).long(), lambda im: torch.rot90(im, 2, dims=(1, 2))),
)


def load_digits_split(seed):
    """Stratified 2/3 train, 1/3 test split of ``load_digits`` for ``seed``.

    Returns
    -------
    (train_images, train_digits, test_images, test_digits)
        float32 [N, 8, 8] in [0, 1] and int64 [N].
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=1 / 3, stratify=digits.target, random_state=seed
    )
    as_t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return as_t(train_x, torch.float32), as_t(train_y, torch.int64), as_t(test_x, torch.float32), as_t(test_y, torch.int64)


def shifted_copies(images):
    """Every +-1-pixel shift of ``images`` [N, 8, 8] (9 shifts including none; vacated pixels 0)."""
    out = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.zeros_like(images)
            ys, yd = (slice(max(-dy, 0), 8 - max(dy, 0)), slice(max(dy, 0), 8 - max(-dy, 0)))
            xs, xd = (slice(max(-dx, 0), 8 - max(dx, 0)), slice(max(dx, 0), 8 - max(-dx, 0)))
            shifted[:, yd, xd] = images[:, ys, xs]
            out.append(shifted)
    return torch.cat(out)


@dataclass
class TaskData:
    """One task's tensors (flattened inputs [N, 64], labels [N]) on the demo's device."""

    train_x: torch.Tensor  # augmented (shifts), domain-shifted
    train_y: torch.Tensor
    calib_x: torch.Tensor  # clean training images, domain-shifted: statistics for correction
    test_x: torch.Tensor
    test_y: torch.Tensor


def task_data(task, split, *, calibration, device):
    """The tensors of ``task`` from a ``load_digits_split`` result.

    ``calibration``: number of clean training images kept for statistics (all when fewer).
    """
    train_x, train_d, test_x, test_d = split
    keep_train = torch.isin(train_d, torch.tensor(task.digits))
    keep_test = torch.isin(test_d, torch.tensor(task.digits))
    clean_x, clean_d = train_x[keep_train], train_d[keep_train]
    aug_x = shifted_copies(clean_x)
    aug_d = clean_d.repeat(9)
    flat = lambda im: task.shift(im).reshape(im.shape[0], -1).to(device)  # noqa: E731
    return TaskData(
        train_x=flat(aug_x),
        train_y=task.label(aug_d).to(device),
        calib_x=flat(clean_x[:calibration]),
        test_x=flat(test_x[keep_test]),
        test_y=task.label(test_d[keep_test]).to(device),
    )


def foundation_data(split, *, device):
    """All ten classes, augmented, no domain shift: ``(inputs [N, 64], digits [N])``."""
    train_x, train_d, _, _ = split
    aug = shifted_copies(train_x)
    return aug.reshape(aug.shape[0], -1).to(device), train_d.repeat(9).to(device)
