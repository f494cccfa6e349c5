"""The resume manifest: which output shards of a job are finished, with their sizes and hashes.

A job over several processes keeps one manifest per process: rank 0 the main file, rank r > 0
``nlmerge-manifest.rank<r>.json`` (its own shards), merged into the main file when the job ends;
:meth:`Manifest.load` reads the main file together with the parts an interrupted job left.
"""
import glob
import json
import os

from nlmerge.io.writer import DIGEST, file_digest, new_digest, write_json_atomic

MANIFEST_NAME = "nlmerge-manifest.json"
PART_PATTERN = "nlmerge-manifest.rank*.json"
_FORMAT = "nlmerge-manifest/3"
_EARLIER = {"nlmerge-manifest/1": "sha256s, not xxh3-128", "nlmerge-manifest/2": "no check of its contents"}


class Manifest:
    """``nlmerge-manifest.json`` in an output folder: the job's ``fingerprint`` (a string the
    caller derives from the config, the inputs' identities and the options) and, per finished
    shard, its size and content hash (``DIGEST``: xxh3-128). A resumed job whose fingerprint
    equals the manifest's may skip the shards that ``is_done``; ``record`` rewrites the file
    atomically after each shard. ``shards`` maps a shard name to ``{"size": int, DIGEST: str,
    "extra": dict}``; ``extra`` is the caller's JSON-serializable per-shard state and ``job`` its
    state of the whole job (what a resumed job needs to carry on; set it, then ``save``).
    ``share``: the names of the shards this process answers for (None: all), the only ones its
    file holds (``own_shards``): a part never carries another process's entries as it loaded
    them, which would overwrite what that process recorded since."""

    def __init__(self, out_dir, fingerprint, shards=None, *, rank=0, job=None):
        self.out_dir = os.fspath(out_dir)
        self.fingerprint = fingerprint
        self.shards = dict(shards or {})
        self.rank = rank
        self.job = dict(job or {})
        self.share = None

    @property
    def path(self):
        name = MANIFEST_NAME if self.rank == 0 else PART_PATTERN.replace("*", str(self.rank))
        return os.path.join(self.out_dir, name)

    @classmethod
    def load(cls, out_dir):
        """The manifest saved in ``out_dir`` with the shards that the parts of an interrupted
        many-process job recorded under the same fingerprint, or None when there is no main
        file; ValueError naming the file when one is not a manifest of this format."""
        main = cls._read(os.path.join(os.fspath(out_dir), MANIFEST_NAME))
        if main is None:
            return None
        fingerprint, shards, job = main
        for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), PART_PATTERN))):
            part = cls._read(path)
            if part is not None and part[0] == fingerprint:
                shards.update(part[1])
        return cls(out_dir, fingerprint, shards, job=job)

    def remove_parts(self):
        """Delete the per-process parts (after their shards were recorded in this manifest)."""
        for path in glob.glob(os.path.join(glob.escape(self.out_dir), PART_PATTERN)):
            os.remove(path)

    @staticmethod
    def _read(path):
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") in _EARLIER:
                raise ValueError(f"written by an earlier nlmerge ({_EARLIER[obj['format']]})")
            if obj.get("format") != _FORMAT or not isinstance(obj.get("fingerprint"), str):
                raise ValueError(f"not a {_FORMAT} object")
            if obj.get("check") != _check(obj):
                raise ValueError("its contents do not match its check (edited or damaged)")
            shards = {name: {"size": int(s["size"]), DIGEST: str(s[DIGEST]),
                             "extra": dict(s.get("extra", {}))}
                      for name, s in obj["shards"].items()}
            job = dict(obj.get("job", {}))
        except KeyError as e:
            raise ValueError(f"{path}: unreadable resume manifest: no {e} entry; start again with --force") from None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: unreadable resume manifest: {e}; start again with --force") from None
        return obj["fingerprint"], shards, job

    def own_shards(self):
        """The entries of ``shards`` in ``share`` (all when ``share`` is None), sorted by name."""
        return {name: entry for name, entry in sorted(self.shards.items())
                if self.share is None or name in self.share}

    def save(self):
        """Write the manifest (``own_shards``) to ``out_dir`` through a temporary name."""
        obj = {"format": _FORMAT, "fingerprint": self.fingerprint, "job": self.job, "shards": self.own_shards()}
        write_json_atomic(self.path, {**obj, "check": _check(obj)})

    def record(self, shard, extra=None):
        """Record a finished shard (a ``WrittenShard``: name, size, digest) with the caller's
        ``extra`` dict (JSON-serializable; replaces any earlier one) and save."""
        self.shards[shard.name] = {"size": shard.size, DIGEST: shard.digest,
                                   "extra": dict(extra or {})}
        self.save()

    def extra(self, name):
        """The ``extra`` dict recorded with shard ``name`` ({} when none or not recorded)."""
        return self.shards.get(name, {}).get("extra", {})

    def is_done(self, name):
        """True when shard ``name`` is recorded and the file in ``out_dir`` still has the
        recorded size and digest (the file is re-read and hashed)."""
        if name not in self.shards:
            return False
        entry = self.shards[name]
        path = os.path.join(self.out_dir, name)
        return (os.path.isfile(path) and os.path.getsize(path) == entry["size"]
                and file_digest(path) == entry[DIGEST])


def _check(obj):
    """The digest of a manifest object's contents (its ``check`` left out): a resumed job trusts the
    state recorded there (a global TIES job's thresholds, sign sums and fills), so an edited or
    damaged manifest is refused rather than silently giving another merge."""
    contents = {key: value for key, value in obj.items() if key != "check"}
    return new_digest(json.dumps(contents, sort_keys=True).encode()).hexdigest()
