"""The permutations file: an alignment's result, read by the merge job's ``permutations:`` key.

Format (a safetensors file, so no pickle): one 1-D int64 tensor ``perm.<name>`` per permutation
(``perm[i] = j``: unit i of the aligned model is unit j of the original), and string metadata:

- ``format``: ``"nlmerge-permutations/1"``;
- ``spec``: JSON ``{"perms": {name: [[parameter key, axis], ...]}, "heads": {name: count}}``
  (the :class:`nlmerge.align.PermutationSpec`);
- ``reference``, ``other`` (optional): identities (:meth:`nlmerge.io.Checkpoint.identity`) of
  the checkpoint aligned to and of the checkpoint the permutations apply to.
"""
import json
import os

import safetensors
import torch
from safetensors.torch import save_file

from nlmerge.align.spec import PermutationSpec, check_permutation
from nlmerge.io.format import CheckpointError
from nlmerge.io.writer import temp_path

FORMAT = "nlmerge-permutations/1"
_PREFIX = "perm."


def save_permutations(path, spec, perms, *, reference=None, other=None):
    """Write ``perms`` ({name: 1-D integer tensor}) and their ``spec`` to ``path`` (atomically).

    ``reference`` / ``other`` are optional identity strings of the two checkpoints.
    ValueError naming the permutation when one is not in the spec.
    """
    unknown = sorted(set(perms) - set(spec.perms))
    if unknown:
        raise ValueError(f"permutations {unknown} are not in the spec")
    metadata = {"format": FORMAT,
                "spec": json.dumps({"perms": {n: [list(p) for p in pairs] for n, pairs in spec.perms.items()},
                                    "heads": spec.heads})}
    for name, value in (("reference", reference), ("other", other)):
        if value is not None:
            metadata[name] = str(value)
    tensors = {_PREFIX + n: torch.as_tensor(p).detach().to("cpu", torch.int64).contiguous() for n, p in perms.items()}
    tmp = temp_path(os.fspath(path))
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_permutations(path):
    """Read a permutations file: ``(spec, perms, metadata)``.

    Raises
    ------
    CheckpointError
        The file is missing, not a safetensors file, not of this format, or holds a permutation
        that is not a bijection or that its spec does not name (each naming the file).
    """
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable permutations file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a permutations file (metadata format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        raw = json.loads(metadata["spec"])
        spec = PermutationSpec({n: [tuple(p) for p in pairs] for n, pairs in raw["perms"].items()},
                               heads=raw.get("heads"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed permutation spec in its metadata ({err})") from None
    perms = {}
    for key, value in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else None
        if name not in spec.perms:
            raise CheckpointError(f"{path}: tensor {key!r} is not a permutation of its spec")
        try:
            perms[name] = check_permutation(name, value, value.numel(), spec.heads.get(name))
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
    return spec, perms, metadata
