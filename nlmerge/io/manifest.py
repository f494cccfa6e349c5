"""The resume manifest: which output shards of a job are finished, with their sizes and hashes."""
import json
import os

from nlmerge.io.writer import file_sha256, write_json_atomic

MANIFEST_NAME = "nlmerge-manifest.json"
_FORMAT = "nlmerge-manifest/1"


class Manifest:
    """``nlmerge-manifest.json`` in an output folder: the job's ``fingerprint`` (a string the
    caller derives from the config, the inputs' identities and the options) and, per finished
    shard, its size and sha256. A resumed job whose fingerprint equals the manifest's may skip
    the shards that ``is_done``; ``record`` rewrites the file atomically after each shard.
    ``shards`` maps a shard name to ``{"size": int, "sha256": str, "extra": dict}``; ``extra``
    is the caller's JSON-serializable per-shard state (what a resumed job needs to carry on)."""

    def __init__(self, out_dir, fingerprint, shards=None):
        self.out_dir = os.fspath(out_dir)
        self.fingerprint = fingerprint
        self.shards = dict(shards or {})

    @property
    def path(self):
        return os.path.join(self.out_dir, MANIFEST_NAME)

    @classmethod
    def load(cls, out_dir):
        """The manifest saved in ``out_dir``, or None when there is none; ValueError naming the
        file when it is not a manifest of this format."""
        path = os.path.join(os.fspath(out_dir), MANIFEST_NAME)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") != _FORMAT or not isinstance(obj.get("fingerprint"), str):
                raise ValueError(f"not a {_FORMAT} object")
            shards = {name: {"size": int(s["size"]), "sha256": str(s["sha256"]),
                             "extra": dict(s.get("extra", {}))}
                      for name, s in obj["shards"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: unreadable resume manifest: {e}") from None
        return cls(out_dir, obj["fingerprint"], shards)

    def save(self):
        """Write the manifest to ``out_dir`` through a temporary name."""
        write_json_atomic(self.path, {"format": _FORMAT, "fingerprint": self.fingerprint,
                                      "shards": self.shards})

    def record(self, shard, extra=None):
        """Record a finished shard (a ``WrittenShard``: name, size, sha256) with the caller's
        ``extra`` dict (JSON-serializable; replaces any earlier one) and save."""
        self.shards[shard.name] = {"size": shard.size, "sha256": shard.sha256,
                                   "extra": dict(extra or {})}
        self.save()

    def extra(self, name):
        """The ``extra`` dict recorded with shard ``name`` ({} when none or not recorded)."""
        return self.shards.get(name, {}).get("extra", {})

    def is_done(self, name):
        """True when shard ``name`` is recorded and the file in ``out_dir`` still has the
        recorded size and sha256 (the file is re-read and hashed)."""
        if name not in self.shards:
            return False
        entry = self.shards[name]
        path = os.path.join(self.out_dir, name)
        return (os.path.isfile(path) and os.path.getsize(path) == entry["size"]
                and file_sha256(path) == entry["sha256"])
