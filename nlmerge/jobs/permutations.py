"""The merge job's ``permutations:`` key: alignments applied to models as their tensors are read."""
from dataclasses import dataclass, field

import torch

from nlmerge.io import CheckpointError
from nlmerge.io.permutations import load_permutations as read_file
from nlmerge.jobs.methods import ConfigError


@dataclass
class Alignments:
    """``gathers[(model path, key)]`` = ``[(index, axis), ...]`` applied in order when the key is
    read (``x.index_select(axis, index)``); ``files`` the permutation files' paths, for the job's
    fingerprint."""

    gathers: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def apply(self, path, key, x):
        for index, axis in self.gathers.get((path, key), ()):
            x = x.index_select(axis, index)
        return x


def load_permutations(entries, checkpoints):
    """Check each permutations file against the models it names (from their headers) and plan it.

    Parameters
    ----------
    entries : list of PermutationEntry
        The config's ``permutations:`` entries.
    checkpoints : Mapping[str, nlmerge.io.Checkpoint]
        The job's open inputs by path.

    Returns
    -------
    Alignments

    Raises
    ------
    ConfigError
        A file names a model that is not an input of the job, or two files apply to one model.
    CheckpointError
        A file that does not fit its model (a key of its spec missing, a size that differs, a
        permuted tensor that is not floating point), or a model that is the file's reference (the
        checkpoint it aligns to; the aligned one and its fine-tunes are accepted).
    """
    out, aligned = Alignments(), set()
    for entry in entries:
        spec, perms, metadata = read_file(entry.file)
        out.files.append(entry.file)
        for path in entry.models:
            if path not in checkpoints:
                raise ConfigError(f"permutations file {entry.file!r} names model {path!r}, which is not an input "
                                  "of this merge")
            ckpt = checkpoints[path]
            if path in aligned:
                raise ConfigError(f"model {path!r} is given two permutation files")
            aligned.add(path)
            # the aligned checkpoint's fine-tunes share its unit order (and differ in identity): only
            # the reference, which the file aligns to, is sure to be a mix-up
            if metadata.get("reference") is not None and metadata["reference"] == ckpt.identity():
                raise CheckpointError(f"permutations file {entry.file!r} aligns models to {path!r}: it is the "
                                      "file's reference, applying it there would misalign it")
            meta = {k: torch.empty(ckpt.info(k).shape, dtype=ckpt.info(k).dtype, device="meta")
                    for k in spec.params if k in ckpt}
            try:
                sizes = spec.validate(meta)
            except ValueError as err:
                raise CheckpointError(f"permutations file {entry.file!r} does not fit {path!r}: {err}") from None
            for name, perm in perms.items():
                if perm.numel() != sizes[name]:
                    raise CheckpointError(f"permutations file {entry.file!r}: permutation {name!r} has length "
                                          f"{perm.numel()} but {path!r} has {sizes[name]} units there")
            for key, pairs in spec.params.items():
                if not meta[key].is_floating_point():
                    raise CheckpointError(f"permutations file {entry.file!r}: {key!r} of {path!r} is not floating point")
                gathers = [(perms[name], axis) for name, axis in pairs if name in perms]
                if gathers:
                    out.gathers[(path, key)] = gathers
    return out
