"""Time of one Omniglot training iteration: TAAN vs hard sharing vs single-task, side by side.

One iteration = what `Omniglot/train.py` does per step: 5 images of each of the 50
alphabets (one [250, 1, 105, 105] batch with its task ids) through the network in one
forward pass, the mean over tasks of the per-task cross-entropy (+ lambda * the distance
regulariser for TAAN), backward, and one Adam step (heads at 50x lr, weight decay 0.005).
Every network gets two warm-up steps; then the networks are timed in --repeats
interleaved rounds and each keeps its fastest step (the one least disturbed by other load
on the machine); on CUDA a step is timed over several queued back to back (see
benchmarks/_timing.py). Ratios are to the hard-sharing network measured in the same run.

A second table times the shared trunk alone (the four conv + batch norm + activation +
pooling blocks and the dense layer, everything but the heads; forward and backward of a
fixed gradient): TAL activations with per-row tasks against the same trunk with ReLU.

    python benchmarks/omniglot_step.py [--device cpu] [--repeats 5] [--tasks 50 --batch 5]
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from _timing import benchmark_device, timed  # benchmarks/_timing.py

from Layers._tal_kernel import backend_for
from Omniglot.TAAN import IMAGE_SIZE, build_model, multitask_loss

# (label, model name, build kwargs, lambda, target time ratio to hard sharing)
VARIANTS = [("hard", "hard", {}, 0.0, None),
            ("TAAN", "taan", {"basis": 32, "regularize": "distance"}, 0.1, 1.3),
            ("STL", "stl", {}, 0.0, None)]
TRUNK_TARGET = 1.1     # TAL trunk / ReLU trunk, forward + backward


def train_step(model, opt, x, y, ids, lam):
    model.train()
    loss = multitask_loss(model(x, ids), y, ids, model.num_tasks)
    if lam:
        loss = loss + model.regularization(lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def trunk(model, x, ids):
    """The shared trunk, everything but the heads: [B, 512] features."""
    if hasattr(model, "features"):                     # hard sharing: conv, BN, ReLU, pool; dense, ReLU
        return model.features(x)
    for conv in model.convs:
        x = F.max_pool2d(conv(x, ids, per_row=True), 2)
    return model.fc(x.flatten(1), ids, per_row=True)


def timed_trunk(model, x, ids, grad, device):
    model.train()
    return timed(lambda: trunk(model, x, ids).backward(grad), device)


def timed_step(model, opt, x, y, ids, lam, device):
    return timed(lambda: train_step(model, opt, x, y, ids, lam), device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--batch", type=int, default=5, help="images per task per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--models", nargs="*", default=None, help="labels to run besides hard (TAAN, STL)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = benchmark_device(args.device, "omniglot_step.py")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_classes = rng.integers(14, 56, size=args.tasks).tolist()     # ~ the real alphabets' sizes
    B = args.tasks * args.batch
    x = (torch.rand(B, 1, IMAGE_SIZE, IMAGE_SIZE) > 0.2).float().to(device)
    ids = torch.arange(args.tasks).repeat_interleave(args.batch).to(device)
    y = torch.cat([torch.randint(0, c, (args.batch,)) for c in num_classes]).to(device)

    variants = [v for v in VARIANTS if v[0] == "hard" or args.models is None or v[0] in args.models]
    runs = {}
    for label, name, kw, lam, target in variants:
        model = build_model(name, num_classes, **kw).to(device)
        opt = model.make_optimizer(1e-4)
        for _ in range(2):
            train_step(model, opt, x, y, ids, lam)
        runs[label] = (model, opt, lam, target)
    times = {label: [] for label in runs}
    trunks = {label: [] for label in ("hard", "TAAN") if label in runs}
    grad = torch.randn(B, 512, generator=torch.Generator().manual_seed(1)).to(device)
    for _ in range(args.repeats):
        for label, (model, opt, lam, _) in runs.items():
            times[label].append(timed_step(model, opt, x, y, ids, lam, device))
        for label in trunks:
            trunks[label].append(timed_trunk(runs[label][0], x, ids, grad, device))

    print(f"Omniglot training iteration: {args.tasks} tasks x {args.batch} images of {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"device {device}, {torch.get_num_threads()} threads, TAL backend {backend_for(x)}, "
          f"fastest of {args.repeats} interleaved repeats")
    base = min(times["hard"])
    print(f"{'model':6s} {'params':>10s} {'s/iter':>8s} {'iter/s':>7s} {'ratio':>6s}  target")
    for label, (model, _, _, target) in runs.items():
        t = min(times[label])
        params = sum(q.numel() for q in model.parameters())
        verdict = "" if target is None else f"<= {target}: {'met' if t / base <= target else 'NOT met'}"
        print(f"{label:6s} {params:10d} {t:8.4f} {1 / t:7.2f} {t / base:6.2f}  {verdict}")
    if len(trunks) == 2:
        hard, tal = min(trunks["hard"]), min(trunks["TAAN"])
        spread = ", ".join(f"{t / h:.2f}" for t, h in zip(trunks["TAAN"], trunks["hard"]))
        print(f"trunk forward+backward: ReLU {1e3 * hard:.1f} ms, TAL {1e3 * tal:.1f} ms, ratio {tal / hard:.2f} "
              f"(<= {TRUNK_TARGET}: {'met' if tal / hard <= TRUNK_TARGET else 'NOT met'}; per round: {spread})")


if __name__ == "__main__":
    main()
