"""Run-iterations per second of Omniglot TAAN runs trained R at once, against one at a time.

A run-iteration is one training iteration of one run of the paper's protocol: 50 alphabets x 5
images of 105 x 105 through the conv TAAN (basis 32), the loss, the run's regulariser, backward
and an Adam step. "One at a time" is the TAAN network of Omniglot/TAAN.py stepped alone (what
train.py does); "R at once" is one iteration of R runs as Omniglot.sweep makes it (the runs
cycle through the figure's regularisers distance / none / tracenorm / cosine), for each
--stacking: stacked (one batched TAANStack, every layer's activation one call with grouped
bases; union is the same) or separate (the runs' own networks one after another). On every device the
configurations are stepped in interleaved rounds after warm-up steps, and each keeps its
fastest step (the one least disturbed by other load). A configuration that would not fit in
memory (Omniglot.sweep.BYTES_PER_IMAGE_RUN per image per run, measured; R runs at once hold
R runs' activations until the backward, whatever the stacking) is skipped and says so.

For one at a time and for the fastest configuration on a device, the time of the paper's
whole figure is projected: ceil(65 / R) groups x (15000 iterations + 151 tests of every run
on 3,200 test images, about the real test split), with the test time measured too. It is an
upper bound: runs that stop early leave their group.

    python benchmarks/omniglot_sweep.py                       # the CPU, and CUDA when there is one
    python benchmarks/omniglot_sweep.py --devices cuda --runs 1 5 13 65 --stacking stacked separate
"""
import argparse
import math

import numpy as np
import torch

from _timing import benchmark_device, timed  # benchmarks/_timing.py

from Layers._tal_kernel import backend_for
from Omniglot.stack import STACKINGS, build_runs
from Omniglot.sweep import BYTES_PER_IMAGE_RUN
from Omniglot.TAAN import IMAGE_SIZE, build_model, multitask_loss

FIGURE_RUNS, FIGURE_ITERATIONS, TEST_EVERY, TEST_IMAGES = 65, 15000, 100, 3200
# run r's regulariser and lambda; run 0 is the one-at-a-time network's (distance, 0.2)
RUN_KINDS = [("distance", 0.2), (None, 0.0), ("tracenorm_original", 0.1), ("cosine_original", 0.3)]


def free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class Configuration:
    """A network and its Adam, stepped on fixed batches."""

    def step(self):
        self.net.train()
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def test(self, x, y, ids):
        self.net.eval()
        self.predict(x, y, ids)


class OneAtATime(Configuration):
    """The TAAN network of train.py, one run."""
    label = "one at a time (TAAN)"

    def __init__(self, classes, device, x, y, ids):
        torch.manual_seed(0)
        self.net = build_model("taan", classes, basis=32, regularize=RUN_KINDS[0][0]).to(device)
        self.opt = self.net.make_optimizer(1e-5)
        self.x, self.y, self.ids, self.runs = x[0], y[0], ids, 1

    def loss(self):
        loss = multitask_loss(self.net(self.x, self.ids), self.y, self.ids, self.net.num_tasks)
        return loss + self.net.regularization(RUN_KINDS[0][1])

    def predict(self, x, y, ids):
        self.net(x, ids)


class AtOnce(Configuration):
    """R runs at once, computed as `stacking` says."""

    def __init__(self, runs, stacking, classes, device, x, y, ids):
        models = []
        for r in range(runs):
            torch.manual_seed(r)
            models.append(build_model("taan", classes, basis=32, regularize=RUN_KINDS[r % 4][0]).to(device))
        self.net = build_runs(models, [RUN_KINDS[r % 4][1] for r in range(runs)], stacking).to(device)
        self.opt = self.net.make_optimizer(1e-5)
        self.x, self.y, self.ids, self.runs = x[:runs], y[:runs], ids, runs
        self.label = f"{runs} at once ({stacking})"

    def loss(self):
        return self.net.run_losses(self.x, self.y, self.ids).sum() + self.net.regularization()

    def predict(self, x, y, ids):
        self.net.run_correct(x, y, ids)


def test_time(config, device, per_task, tasks):
    """Seconds to test every run of `config` on TEST_IMAGES images (steps of per_task images of every alphabet)."""
    step_images = per_task * tasks
    x = (torch.rand(step_images, 1, IMAGE_SIZE, IMAGE_SIZE, device=device) > 0.2).float()
    ids = torch.arange(tasks, device=device).repeat_interleave(per_task)
    y = torch.zeros(step_images, dtype=torch.long, device=device)
    config.test(x, y, ids)
    return timed(lambda: config.test(x, y, ids), device, calls=1) * TEST_IMAGES / step_images


def measure(device, args):
    tasks, batch = args.tasks, args.batch
    rng = np.random.default_rng(0)
    classes = rng.integers(14, 56, size=tasks).tolist()         # ~ the real alphabets' sizes
    images = tasks * batch
    largest = max(args.runs)
    x = (torch.rand(largest, images, 1, IMAGE_SIZE, IMAGE_SIZE, device=device) > 0.2).float()
    y = torch.stack([torch.cat([torch.randint(0, c, (batch,)) for c in classes]) for _ in range(largest)]).to(device)
    ids = torch.arange(tasks, device=device).repeat_interleave(batch)
    stackings = args.stacking or (["stacked", "separate"] if device.type == "cuda" else ["separate", "stacked"])
    configs, skipped = [OneAtATime(classes, device, x, y, ids)], []
    for runs in args.runs:
        for stacking in stackings:          # every way keeps all R runs' activations until the backward
            need = BYTES_PER_IMAGE_RUN[stacking] * images * runs * (2 if device.type == "cpu" else 1)  # CPU: half free
            if need > free_memory(device):
                skipped.append(f"{runs} at once ({stacking}): skipped, needs about {need / 1e9:.0f} GB, "
                               f"{free_memory(device) / 1e9:.0f} GB free")
            else:
                configs.append(AtOnce(runs, stacking, classes, device, x, y, ids))
    peaks, fitting = {}, []
    for config in configs:
        try:
            for _ in range(args.warmup):
                config.step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                timed(config.step, device, calls=1)
                peaks[config.label] = torch.cuda.max_memory_allocated(device)
            fitting.append(config)
        except torch.OutOfMemoryError:          # the estimate was too low: say so, go on with the others
            skipped.append(f"{config.label}: skipped, out of memory")
            config.net = config.opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    configs = fitting
    times = {config.label: [] for config in configs}
    for _ in range(args.repeats):
        for config in configs:
            times[config.label].append(timed(config.step, device, calls=1))
    best = {k: min(v) for k, v in times.items()}
    fastest = max(configs[1:] or configs, key=lambda c: c.runs / best[c.label])
    tests = {config.label: test_time(config, device, 10, tasks) for config in (configs[0], fastest)}
    return configs, best, peaks, tests, skipped


def report(device, configs, best, peaks, tests, skipped, args):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    probe = torch.zeros(1, device=device)
    print(f"\nOmniglot runs at once on {device} ({name}), TAL backend {backend_for(probe, 32)}: {args.tasks} alphabets "
          f"x {args.batch} images per run-iteration, fastest of {args.repeats} interleaved repeats after "
          f"{args.warmup} warm-up steps" + (", cuDNN benchmark mode" if args.cudnn_benchmark else ""))
    base = best[configs[0].label]
    print(f"{'configuration':26s} {'s/iteration':>11s} {'run-iter/s':>10s} {'vs one at a time':>17s}"
          + ("  peak memory" if peaks else ""))
    for config in configs:
        t = best[config.label]
        line = f"{config.label:26s} {t:11.4f} {config.runs / t:10.2f} {base * config.runs / t:16.2f}x"
        if peaks:
            line += f"  {peaks[config.label] / 2 ** 30:8.2f} GiB"
        print(line)
    for line in skipped:
        print(line)
    for config in [c for c in configs if c.label in tests]:
        groups = math.ceil(FIGURE_RUNS / config.runs)
        total = groups * (FIGURE_ITERATIONS * best[config.label] + (FIGURE_ITERATIONS // TEST_EVERY + 1) *
                          tests[config.label])
        print(f"Whole figure ({FIGURE_RUNS} runs x {FIGURE_ITERATIONS} iterations, tests every {TEST_EVERY}) "
              f"projected from {config.label}: {total / 3600:.2f} h = {total / 60:.0f} min "
              f"(a test of {config.runs} run(s) on {TEST_IMAGES} images: {tests[config.label]:.2f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    p.add_argument("--runs", type=int, nargs="+", default=[1, 5, 13, 65], help="runs at once (default 1 5 13 65)")
    p.add_argument("--stacking", nargs="+", choices=STACKINGS, default=None,
                   help="how runs at once are computed (default: separate and stacked on the CPU, all three on CUDA)")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--batch", type=int, default=5, help="images per alphabet per iteration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for these shapes and keep the fastest")
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for device in [benchmark_device(name, "omniglot_sweep.py") for name in names]:    # all checked first
        report(device, *measure(device, args), args)


if __name__ == "__main__":
    main()
