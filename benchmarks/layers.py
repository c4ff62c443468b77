"""TAL_Linear forward+backward against nn.Linear + ReLU and against the naive formula.

    python benchmarks/layers.py [--device cpu|cuda] [--basis 16 64 256] [--repeats 7]

Shape of the issue: 1024 -> 1024 features, 16 tasks, 4096 rows (256 per task) in the
per-row task mode. Times are the minimum over repeats, with the methods interleaved in
every repeat so that load on the machine hits them alike (on CUDA each over several calls
queued back to back, see benchmarks/_timing.py); ratios are taken within this run.
Peak memory is what one forward+backward adds on top of the inputs and parameters:
on CUDA `torch.cuda.max_memory_allocated`; on the CPU the high-water resident set of a
child process (glibc told to return every large block at once, so that resident memory
follows the live tensors).
"""
import argparse
import json
import os

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _peak import reset_peak, resident, run_child  # noqa: E402  (benchmarks/_peak.py)
from _timing import CUDA_CALLS, sync, timed  # noqa: E402  (benchmarks/_timing.py)
from Layers import TAL_Linear  # noqa: E402
from Layers import _tal_kernel  # noqa: E402
from Layers._tal_kernel import backend_for, tal_activation_naive  # noqa: E402

ROWS, FEATURES, TASKS = 4096, 1024, 16
METHODS = ("linear+relu", "tal", "tal[torch]", "naive")


def setup(method, basis, device):
    """Inputs and a closure running one forward+backward of `method`."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, FEATURES, device=device)
    ids = torch.arange(TASKS, device=device).repeat_interleave(ROWS // TASKS)
    grad = torch.randn(ROWS, FEATURES, device=device)
    layer = TAL_Linear(FEATURES, FEATURES, basis, TASKS).to(device)

    if method == "linear+relu":
        def step():
            torch.relu(F.linear(x, layer.weight, layer.bias)).backward(grad)
    elif method in ("tal", "tal[torch]"):
        def step():
            layer(x, ids, per_row=True).backward(grad)
    elif method == "naive":
        def step():
            a = F.linear(x, layer.weight, layer.bias)
            tal_activation_naive(a, layer.alpha[ids][:, None, :], layer.basis).backward(grad)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step


def set_backend(method):
    _tal_kernel.set_backend("torch" if method == "tal[torch]" else "auto")


def time_all(basis, device, repeats):
    steps = {}
    for m in METHODS:
        set_backend(m)
        steps[m] = setup(m, basis, device)
        steps[m]()                                            # warm up (and build the kernel once)
    best = {m: float("inf") for m in METHODS}
    for r in range(repeats):
        for m in METHODS:
            if m == "naive" and basis > 64 and r > 0:
                continue                                      # gigabytes per call: once is enough
            set_backend(m)
            best[m] = min(best[m], timed(steps[m], device, 1 if m == "naive" else CUDA_CALLS))
    return best


def peak_memory(method, basis, device):
    if device.type == "cuda":
        set_backend(method)
        step = setup(method, basis, device)
        step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    backend = "torch" if method == "tal[torch]" else "auto"
    return run_child([__file__, "--child", method, str(basis)], TAAN_TAL_BACKEND=backend)["peak"]


def child(method, basis):
    """One fresh process: warm up, reset the high-water mark, run once, report the rise."""
    step = setup(method, basis, torch.device("cpu"))
    step()
    reset_peak()
    base = resident()
    step()
    print(json.dumps({"peak": resident("VmHWM:") - base}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--basis", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    device = torch.device(args.device)
    probe = torch.empty(1, device=device)
    print(f"TAL_Linear({FEATURES} -> {FEATURES}), {TASKS} tasks, {ROWS} rows in per-row mode, "
          f"forward+backward, device {device}, {torch.get_num_threads()} threads, "
          f"'tal' runs the {backend_for(probe)} backend here")
    print(f"{'basis':>5} {'method':>12} {'time ms':>9} {'x lin+relu':>10} {'x naive':>8} "
          f"{'peak MiB':>9} {'x lin+relu':>10}")
    for basis in args.basis:
        t = time_all(basis, device, args.repeats)
        mem = {m: peak_memory(m, basis, device) for m in METHODS}
        for m in METHODS:
            print(f"{basis:>5} {m:>12} {1e3 * t[m]:>9.1f} {t[m] / t['linear+relu']:>10.2f} "
                  f"{t[m] / t['naive']:>8.3f} {mem[m] / 2 ** 20:>9.1f} {mem[m] / mem['linear+relu']:>10.2f}")


if __name__ == "__main__":
    main()
