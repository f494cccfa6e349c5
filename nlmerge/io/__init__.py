"""Checkpoints on disk: lazy validated readers, the planned-offset shard writer, the resume
manifest.

Reading::

    with open_checkpoint("path/to/hf_folder") as ckpt:   # or a single .safetensors file
        for key in ckpt.keys():                          # file order, then data offset
            info = ckpt.info(key)     # TensorInfo(key, shape, dtype, file, nbytes)
            t = ckpt.get(key)                             # one tensor, read alone
        ckpt.config, ckpt.identity()                      # config.json dict; cheap fingerprint

Every header is validated when the checkpoint is opened; problems raise ``CheckpointError``
(a ValueError) naming the file and key.

Writing (mergekit's output layout; see ``plan_shards`` for the shard-size rule)::

    plans = plan_shards([(key, shape, dtype), ...], parse_size("5B"))
    for plan in plans:
        with ShardWriter(plan, out_dir) as w:
            for key in plan.keys:
                w.write(key, tensor_for(key))
            manifest.record(w.finish(), extra={})         # WrittenShard(name, size, digest)
    if (index := shard_index(plans)) is not None:
        write_json_atomic(out_dir / "model.safetensors.index.json", index)

Files appear under their final names only when complete (temporary ``.NAME.partial`` first).
"""
from nlmerge.io.checkpoint import WEIGHT_FILES, Checkpoint, TensorInfo, open_checkpoint
from nlmerge.io.format import DTYPES, CheckpointError
from nlmerge.io.manifest import MANIFEST_NAME, PART_PATTERN, Manifest
from nlmerge.io.writer import (LOCK_NAME, OutputInUseError, ShardPlan, ShardWriter, WrittenShard, check_apart,
                               check_output_folder, copy_file_atomic, file_digest, lock_held, lock_output,
                               output_entries, parse_size, plan_shards, shard_index, write_checkpoint,
                               write_json_atomic, write_text_atomic)

__all__ = [
    "Checkpoint", "CheckpointError", "DTYPES", "LOCK_NAME", "MANIFEST_NAME", "Manifest", "OutputInUseError",
    "PART_PATTERN", "ShardPlan", "ShardWriter", "TensorInfo", "WEIGHT_FILES", "WrittenShard", "check_apart",
    "check_output_folder", "copy_file_atomic", "file_digest", "lock_held", "lock_output", "open_checkpoint",
    "output_entries", "parse_size", "plan_shards", "shard_index", "write_checkpoint", "write_json_atomic",
    "write_text_atomic",
]
