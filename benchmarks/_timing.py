"""Timing a step on any device, shared by the benchmarks.

On a GPU a call only queues its kernels, so `timed` waits for the device before and after.
One step between two waits measures its latency, with every kernel launch and read-back
exposed; training queues its steps back to back, so on CUDA `timed` runs `calls` steps
between the waits and returns the time per step (its throughput). On the CPU a call runs
when it is made, and one step is timed.
"""
import time

import torch

CUDA_CALLS = 10      # steps queued back to back per CUDA measurement


def benchmark_device(name, script):
    """torch.device(name), or the benchmark stops in one line when it names a CUDA device this
    machine does not have."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: no CUDA device here (torch {torch.__version__}); run it on a machine with a "
                         "GPU, or ask for cpu")
    return device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, calls=CUDA_CALLS):
    """Seconds per call of fn(): one call on the CPU, `calls` back to back on CUDA."""
    calls = calls if device.type == "cuda" else 1
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls
