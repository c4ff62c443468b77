"""TAL_Linear forward+backward against nn.Linear + ReLU and against the naive formula.

    python benchmarks/layers.py [--device cpu|cuda] [--basis 16 64 256] [--repeats 7] [--no-compile]

Three tables, each measured side by side in one run:

1. Host time of a tiny call, where nothing but the cost of issuing the work counts (what
   bounds a layer on a GPU): TAL_Linear(64 -> 64), 4 tasks, 32 rows, basis 16, one thread,
   forward + backward with the gradients set to None first (as a training step does), for an
   int task and for per-row tasks, against nn.Linear + ReLU; with the number of aten
   operators each call dispatches (counted by a TorchDispatchMode, forward and backward).
2. The large call below, eager and compiled (torch.compile, default mode; on CUDA also
   'reduce-overhead', CUDA graphs), against Linear + ReLU compiled the same way.
3. The large call against the naive formula, with peak memory.

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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _peak import reset_peak, resident, run_child  # noqa: E402  (benchmarks/_peak.py)
from _timing import CUDA_CALLS, benchmark_device, sync, timed  # noqa: E402  (benchmarks/_timing.py)
from Layers import TAL_Linear  # noqa: E402
TINY_IN, TINY_ROWS, TINY_TASKS, TINY_BASIS = 64, 32, 4, 16
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


class OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_steps(device):
    """name -> closure of one tiny forward+backward (gradients set to None first)."""
    torch.manual_seed(0)
    layer = TAL_Linear(TINY_IN, TINY_IN, TINY_BASIS, TINY_TASKS).to(device)
    linear = torch.nn.Linear(TINY_IN, TINY_IN).to(device)
    x, grad = torch.randn(TINY_ROWS, TINY_IN, device=device), torch.randn(TINY_ROWS, TINY_IN, device=device)
    ids = torch.arange(TINY_TASKS, device=device).repeat_interleave(TINY_ROWS // TINY_TASKS)

    def step(module, call):
        def run():
            for p in module.parameters():
                p.grad = None
            call().backward(grad)
        return run
    return {"linear+relu": step(linear, lambda: torch.relu(linear(x))),
            "tal, int task": step(layer, lambda: layer(x, 1)),
            "tal, per-row": step(layer, lambda: layer(x, ids, per_row=True))}


def host_time(device, repeats, calls=300):
    """Seconds per tiny call (best of `repeats` rounds of `calls`, the methods interleaved) and
    aten operators per call, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = tiny_steps(device)
    ops = {}
    for name, run in steps.items():
        run()
        with OpCount() as counter:
            run()
        ops[name] = counter.count
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            best[name] = min(best[name], timed(lambda: [run() for _ in range(calls)], device, 1) / calls)
    torch.set_num_threads(threads)
    return best, ops


def compiled_times(device, basis, repeats):
    """Large call: (mode, method) -> seconds per forward+backward, eager and compiled."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, FEATURES, device=device)
    ids = torch.arange(TASKS, device=device).repeat_interleave(ROWS // TASKS)
    grad = torch.randn(ROWS, FEATURES, device=device)
    layer = TAL_Linear(FEATURES, FEATURES, basis, TASKS).to(device)
    fns = {"linear+relu": lambda: torch.relu(F.linear(x, layer.weight, layer.bias)),
           "tal": lambda: layer(x, ids, per_row=True)}
    modes = ["eager", "default"] + (["reduce-overhead"] if device.type == "cuda" else [])
    steps = {}
    for mode in modes:
        for name, fn in fns.items():
            f = fn if mode == "eager" else torch.compile(fn, fullgraph=True, mode=None if mode == "default" else mode)

            def run(f=f):
                for p in layer.parameters():
                    p.grad = None
                f().backward(grad)
            for _ in range(3):              # compile, warm up (and record the CUDA graphs)
                run()
            steps[mode, name] = run
    best = {key: float("inf") for key in steps}
    for _ in range(repeats):
        for key, run in steps.items():
            best[key] = min(best[key], timed(run, device))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--basis", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled table")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    device = benchmark_device(args.device, "layers.py")
    probe = torch.empty(1, device=device)
    backend = backend_for(probe)

    t, ops = host_time(device, args.repeats)
    print(f"Tiny call: TAL_Linear({TINY_IN} -> {TINY_IN}), {TINY_TASKS} tasks, {TINY_ROWS} rows, basis {TINY_BASIS}, "
          f"forward+backward, one thread, device {device} ({backend} backend)")
    print(f"{'method':>14} {'host us':>8} {'x lin+relu':>10} {'aten ops':>9}")
    for name in t:
        print(f"{name:>14} {1e6 * t[name]:>8.1f} {t[name] / t['linear+relu']:>10.2f} {ops[name]:>9}")

    if args.compile:
        basis = 64
        c = compiled_times(device, basis, args.repeats)
        print(f"\nLarge call, eager and compiled: TAL_Linear({FEATURES} -> {FEATURES}), {TASKS} tasks, {ROWS} rows "
              f"per-row, basis {basis}, forward+backward, {torch.get_num_threads()} threads")
        print(f"{'mode':>16} {'lin+relu ms':>11} {'tal ms':>8} {'tal x lin+relu':>14} {'x eager tal':>11}")
        for mode in dict.fromkeys(m for m, _ in c):
            lin, tal = c[mode, "linear+relu"], c[mode, "tal"]
            print(f"{mode:>16} {1e3 * lin:>11.2f} {1e3 * tal:>8.2f} {tal / lin:>14.2f} "
                  f"{tal / c['eager', 'tal']:>11.2f}")

    print(f"\nLarge call: TAL_Linear({FEATURES} -> {FEATURES}), {TASKS} tasks, {ROWS} rows in per-row mode, "
          f"forward+backward, device {device}, {torch.get_num_threads()} threads, "
          f"'tal' runs the {backend} backend here")
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
