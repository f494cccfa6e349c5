"""Measurement helpers shared by the benchmarks: timing, copy bandwidth, peak memory, machine name."""
import os
import platform
import time

import torch


def machine():
    """The CPU model and core count (and the GPU, when there is one)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def timed(fn, device="cpu"):
    """Seconds of one call of ``fn`` (on a GPU: synchronized before and after)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_time(fn, repeat=3, device="cpu"):
    """Fastest of ``repeat`` runs after one warm-up, in seconds."""
    fn()
    return min(timed(fn, device) for _ in range(repeat))


def interleaved_times(fns, repeat, device="cpu"):
    """``times[r][i]``: seconds of ``fns[i]`` in round r. After one warm-up call each, every round
    runs each function once, so a load that comes and goes on the machine hits them alike."""
    for fn in fns:
        fn()
    return [[timed(fn, device) for fn in fns] for _ in range(repeat)]


def copy_bandwidth(nbytes, device="cpu", repeat=5):
    """Bytes per second of a plain copy (read + write counted) of an ``nbytes`` buffer."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeat, device)
    return 2 * src.numel() * 4 / seconds


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_extra_bytes(fn, device="cpu"):
    """Peak memory that ``fn`` adds above what is held before it.

    CUDA: the caching allocator's peak. CPU (Linux): resident memory, after resetting the
    kernel's high-water mark (``clear_refs`` 5) so that earlier peaks do not count; None where
    that is not possible.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS:")
        result = fn()
        peak = _status_kib("VmHWM:")
    except OSError:
        return None
    del result
    return (peak - before) * 1024
