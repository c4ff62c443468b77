"""Where the time of a TAL layer and of a Youtube-8M TAAN step goes on a GPU.

    python benchmarks/cuda_profile.py [--device cuda]

For TAL_Linear(1024 -> 1024), 16 tasks, 4096 rows per-row, basis 64, forward + backward,
against nn.Linear + ReLU, and for one Youtube-8M training step of TAAN against Hard3
(benchmarks/youtube8m_step.py's sizes), it prints in milliseconds per call:
  * back to back: calls queued one after another (what training does);
  * issue: the CPU time to queue one call (when it exceeds the GPU's time, the GPU waits);
  * CUDA graph (layers only): the same call captured once and replayed, which removes the
    launch cost and leaves the kernels' own time;
  * GPU kernels: the sum of the CUDA kernels' own times (torch.profiler);
then the profiler's tables of the TAL call (by GPU time and by CPU time).
"""
import argparse
import time
import types

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import youtube8m_step as y8m  # benchmarks/youtube8m_step.py
from _timing import benchmark_device, sync, timed  # benchmarks/_timing.py

from Layers import TAL_Linear

ROWS, FEATURES, TASKS, BASIS = 4096, 1024, 16, 64


def issue_time(fn, device, calls=20):
    """CPU seconds to queue one call (no wait inside the loop)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - t) / calls
    sync(device)
    return seconds


def graphed(fn):
    """fn captured in a CUDA graph (after warm-up calls on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_time(fn, device, calls=5):
    """(seconds of CUDA kernels per call, the profile)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    kernels = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return kernels / calls / 1e6, prof


def ratio(t, base):
    return f"{t / base:.2f}x" if base > 0 else "n/a"


def row(label, fn, device, graph=True):
    fn()
    back_to_back, issue = timed(fn, device, 20), issue_time(fn, device)
    replay = timed(graphed(fn), device, 20) if graph else float("nan")
    kernels, prof = kernel_time(fn, device)
    print(f"{label:12s} {1e3 * back_to_back:13.3f} {1e3 * issue:9.3f} {1e3 * replay:11.3f} {1e3 * kernels:12.3f}")
    return back_to_back, replay, kernels, prof


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    device = benchmark_device(p.parse_args().device, "cuda_profile.py")
    if device.type != "cuda":
        raise SystemExit("cuda_profile.py profiles a CUDA device: --device cuda")
    torch.manual_seed(0)
    x = torch.randn(ROWS, FEATURES, device=device)
    ids = torch.arange(TASKS, device=device).repeat_interleave(ROWS // TASKS)
    grad = torch.randn(ROWS, FEATURES, device=device)
    layer = TAL_Linear(FEATURES, FEATURES, BASIS, TASKS).to(device)
    header = f"{'':12s} {'back to back':>13s} {'issue':>9s} {'CUDA graph':>11s} {'GPU kernels':>12s}   (ms per call)"

    print(f"TAL_Linear({FEATURES} -> {FEATURES}), {TASKS} tasks, {ROWS} rows per-row, basis {BASIS}, "
          f"forward + backward, on {torch.cuda.get_device_name(device)}")
    print(header)
    base = row("linear+relu", lambda: torch.relu(F.linear(x, layer.weight, layer.bias)).backward(grad), device)
    tal = row("tal", lambda: layer(x, ids, per_row=True).backward(grad), device)
    print("tal / linear+relu: " + ", ".join(f"{name} {ratio(t, b)}" for name, t, b in
                                            zip(("back to back", "CUDA graph", "GPU kernels"), tal, base)))
    print(tal[3].key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    print(tal[3].key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))

    args = types.SimpleNamespace(tasks=16, batch=256, in_features=1152, hidden=1024, classes=3862, basis=64)
    num_classes, xs, ys = y8m.make_batch(args, device)
    print(f"\nYoutube-8M training step, {args.tasks} tasks x {args.batch} rows, hidden {args.hidden}")
    print(header)
    steps = {}
    for label, name, kw, c in [("Hard3", "Hard3", {}, 0.0), ("TAAN", "TAAN", {"regularize": "distance"}, 1.0)]:
        model, opt = y8m.build(name, kw, args, device, num_classes)
        steps[label] = row(label, lambda: y8m.train_step(model, opt, xs, ys, c), device, graph=False)
    print(f"TAAN / Hard3: back to back {ratio(steps['TAAN'][0], steps['Hard3'][0])}, "
          f"GPU kernels {ratio(steps['TAAN'][2], steps['Hard3'][2])}")


if __name__ == "__main__":
    main()
