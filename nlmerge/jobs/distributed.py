"""The processes of one job under torch.distributed (``torchrun``): who does what, and agreeing on
failures.

A job started by ``torchrun --nproc-per-node N -m nlmerge merge ...`` (or by a caller that has
already initialized ``torch.distributed``) runs on every process; :func:`join` gives each its
:class:`World`. One process is the world of size 1, in which every collective is a no-op, so the
job's code has one path. The output does not depend on the number of processes: each rank merges
a contiguous run of output shards (split by bytes), integer counts are summed across ranks, and
rank 0 writes what covers the whole model (index, manifest, config).
"""
import contextlib
import os
import signal
import threading

import torch


class RankFailedError(RuntimeError):
    """Another process of the job failed: this one stops too (the message names the rank and its error)."""


class World:
    """This process's place in the job: ``rank`` of ``size``, and the ``device`` its arithmetic
    runs on (``cuda:LOCAL_RANK`` for a CUDA job over several processes)."""

    def __init__(self, rank=0, size=1, device=None, owns_group=False):
        self.rank = rank
        self.size = size
        self.device = device
        self._owns_group = owns_group

    @property
    def leader(self):
        """Whether this is rank 0 (the process that writes the job-wide files)."""
        return self.rank == 0

    def share(self, sizes):
        """The indices of ``sizes`` (bytes of each output shard) this rank merges: a contiguous run,
        the shard going to the rank whose equal share of the total bytes holds its middle byte."""
        total = sum(sizes)
        if self.size == 1 or total == 0:
            return list(range(len(sizes))) if self.leader else []
        mine, before = [], 0
        for i, n in enumerate(sizes):
            if min((2 * before + n) * self.size // (2 * total), self.size - 1) == self.rank:
                mine.append(i)
            before += n
        return mine

    def sum_(self, tensor):
        """Sum an integer tensor over the ranks, in place (exact: integer counts)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum(self, value):
        """The sum of an int over the ranks."""
        if self.size == 1:
            return int(value)
        return int(self.sum_(torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device()))[0])

    def gather(self, obj):
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def step(self):
        """A stretch of work that every rank runs before the next collective. An error on any rank
        fails every rank at the end of the stretch: the rank that failed re-raises its own error,
        the others raise RankFailedError naming that rank and its error (no rank waits forever in a
        collective that a failed rank never joins)."""
        if self.size == 1:
            yield
            return
        error = None
        try:
            yield
        except BaseException as err:  # noqa: BLE001 - every failure must reach the other ranks
            error = err
        failures = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, failure in enumerate(failures):
            if failure is not None:
                raise RankFailedError(f"the job failed on rank {rank} of {self.size}: {failure}")

    def close(self):
        """Tear down the process group if :func:`join` created it."""
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def _comm_device(self):
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def join(device):
    """This process's :class:`World` for a job whose arithmetic runs on ``device`` ("cpu" or
    "cuda").

    One process unless ``torch.distributed`` is initialized or the environment says the process
    was started by ``torchrun`` (``WORLD_SIZE`` > 1); then the process group is initialized from
    that environment (gloo for CPU jobs, NCCL for CUDA jobs, with ``cuda:LOCAL_RANK`` as this
    rank's GPU). Raises ValueError for a CUDA job without enough GPUs for the local ranks.
    """
    device = torch.device(device)
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ValueError(f"--device cuda over several processes needs one GPU per local rank: local rank {local}, "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s) visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialized:
        with _default_sigterm():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, owns_group=not initialized)


@contextlib.contextmanager
def _default_sigterm():
    """SIGTERM's default action (end the process) while the process group forms: the rendezvous
    waits in C++, where a Python handler (the command's clean stop) never runs, so workers that
    lost their torchrun would ignore ``kill`` until the rendezvous times out; nothing is written
    yet. Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
