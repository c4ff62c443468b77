"""Time and memory of one Youtube-8M training step of every model, side by side.

One step = forward of one batch per task, multitask_loss + model.regularization(c),
backward, Adam step (lr 1e-4, weight decay 0.005; fused=True, which on the CPU takes about
1/7 of the default implementation's time), as the trainer does it. Each model gets
one warm-up step (so Adam's state exists and any kernel is loaded/compiled); then all
models are timed in --repeats interleaved rounds and each keeps its fastest step (the one
least disturbed by other load on the machine); on CUDA a step is timed over several queued
back to back (see benchmarks/_timing.py). Ratios are to Hard3 measured in the same run.

Memory is the peak over one step of everything the model needs: weights, gradients, Adam
state, activations and temporaries.
  * CUDA: torch.cuda.max_memory_allocated() over one step, less the memory held by the
    other models.
  * CPU: measured in a fresh child process per model: the high-water resident set over one
    step (after a warm-up step) less the resident set before the model was built, with
    glibc told to return every large block at once (MALLOC_MMAP_THRESHOLD_=65536,
    MALLOC_TRIM_THRESHOLD_=0) so that resident memory follows the live tensors.

Sizes default to the original's (16 tasks, 256 rows per task per step as its per-task
loaders give, 1152 inputs, hidden 1024, 3862 classes split over the tasks). On a small CPU
use e.g. --tasks 4 --batch 64 --hidden 256; the sizes used are printed.

    python benchmarks/youtube8m_step.py --device cpu --tasks 4 --batch 64 --hidden 256
"""
import argparse
import json
import os
import sys
import time

import torch

from _peak import reset_peak, resident, run_child  # benchmarks/_peak.py
from _timing import benchmark_device, sync, timed  # benchmarks/_timing.py

from Youtube8M.models import DMTRL, MRN, build_model, multitask_loss

# (label, model name, build kwargs, regularisation constant c, target time ratio, target memory ratio)
VARIANTS = [
    ('Hard3', 'Hard3', {}, 0.0, None, None),
    ('STL', 'STL', {}, 0.0, 1.3, None),
    ('MRN', 'MRN', {}, 1e-3, None, None),
    ('SoftOrder', 'SoftOrder', {}, 0.0, 2.0, None),
    ('DMTRL-Tucker', 'DMTRL', {'method': 'Tucker'}, 0.0, 2.0, None),
    ('DMTRL-TT', 'DMTRL', {'method': 'TT'}, 0.0, 2.0, None),
    ('DMTRL-LAF', 'DMTRL', {'method': 'LAF'}, 0.0, 2.0, None),
    ('CrossStitch', 'CrossStitch', {}, 0.0, 1.5, None),
    ('MMoE', 'MMoE', {}, 0.0, 6.5, None),
    ('TAAN', 'TAAN', {'regularize': 'distance'}, 1.0, 1.10, 1.2),
]
CUDA_TARGETS = {'TAAN': (1.15, None)}   # (time, memory) where the GPU targets differ


def train_step(model, opt, xs, ys, c):
    opt.zero_grad(set_to_none=True)
    loss = multitask_loss(model(xs), ys)[0] + model.regularization(c)
    loss.backward()
    opt.step()
    return loss


def child_memory(label, args):
    """In a fresh process: peak resident bytes of one step of model `label` (printed as JSON)."""
    _, name, kw, c, *_ = next(v for v in VARIANTS if v[0] == label)
    device = torch.device('cpu')
    num_classes, xs, ys = make_batch(args, device)
    base = resident()
    model, opt = build(name, kw, args, device, num_classes)
    train_step(model, opt, xs, ys, c)                       # Adam state, kernel loaded
    reset_peak()
    train_step(model, opt, xs, ys, c)
    print(json.dumps({'peak': resident('VmHWM:') - base}))


def cpu_step_memory(label, args):
    argv = [os.path.abspath(__file__), '--child', label, '--tasks', str(args.tasks),
            '--batch', str(args.batch), '--in-features', str(args.in_features), '--hidden', str(args.hidden),
            '--classes', str(args.classes), '--basis', str(args.basis)]
    if args.threads:
        argv += ['--threads', str(args.threads)]
    return run_child(argv)['peak']


def make_batch(args, device):
    """Class counts per task and one seeded batch (inputs, multi-hot labels) per task."""
    T = args.tasks
    num_classes = [args.classes // T + (t < args.classes % T) for t in range(T)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, args.in_features, generator=g).to(device) for _ in range(T)]
    ys = [(torch.rand(args.batch, c, generator=g) < 0.01).float().to(device) for c in num_classes]
    return num_classes, xs, ys


def build(name, kw, args, device, num_classes):
    torch.manual_seed(0)
    model = build_model(name, args.in_features, args.hidden, num_classes, basis=args.basis, **kw).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0.005, fused=True)


def step_memory(label, model, opt, xs, ys, c, device, args):
    """Peak bytes of one step of this model alone (see the module docstring)."""
    if device.type != 'cuda':
        return cpu_step_memory(label, args)
    opt.zero_grad(set_to_none=True)
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    own += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.is_cuda)
    sync(device)
    others = torch.cuda.memory_allocated(device) - own      # e.g. the other models' weights
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, opt, xs, ys, c)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - others


def timed_step(model, opt, xs, ys, c, device):
    return timed(lambda: train_step(model, opt, xs, ys, c), device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
    p.add_argument('--tasks', type=int, default=16)
    p.add_argument('--batch', type=int, default=256, help='rows per task per step')
    p.add_argument('--in-features', type=int, default=1152)
    p.add_argument('--hidden', type=int, default=1024)
    p.add_argument('--classes', type=int, default=3862, help='total classes, split evenly over the tasks')
    p.add_argument('--basis', type=int, default=64, help='TAAN basis functions')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s choice)')
    p.add_argument('--models', nargs='*', default=None, help='labels to run (Hard3 is always run)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()

    device = benchmark_device(args.device, "youtube8m_step.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(args.child, args)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('--device cuda given but CUDA is not available; use --device cpu')
    if args.tasks < 1 or args.batch < 1 or args.classes < args.tasks:
        sys.exit('--tasks and --batch must be >= 1 and --classes >= --tasks')
    variants = [v for v in VARIANTS if args.models is None or v[0] == 'Hard3' or v[0] in args.models]

    T = args.tasks
    num_classes, xs, ys = make_batch(args, device)

    print(f'device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; tasks {T}, '
          f'{args.batch} rows per task ({T * args.batch} per step), in {args.in_features}, '
          f'hidden {args.hidden}, classes {sum(num_classes)}, TAAN basis {args.basis}, '
          f'fastest of {args.repeats} interleaved steps')
    print('memory: ' + ('peak CUDA memory of one step' if device.type == 'cuda' else
                        'peak resident memory of one step, measured in a fresh process per model'))
    print(f'{"model":<14}{"time (s)":>10}{"x Hard3":>9}{"target":>8}{"memory (MiB)":>14}{"x Hard3":>9}{"target":>8}')
    # build every model and warm it up (Adam state, kernels); then time the models in
    # interleaved rounds so that a burst of other load on the machine hits all of them alike,
    # and keep each model's fastest step.
    built = []
    for label, name, kw, c, t_target, m_target in variants:
        if device.type == 'cuda':
            t_target, m_target = CUDA_TARGETS.get(label, (t_target, m_target))
        model, opt = build(name, kw, args, device, num_classes)
        train_step(model, opt, xs, ys, c)
        built.append((label, model, opt, c, t_target, m_target))
    times = {label: [] for label, *_ in built}
    for _ in range(args.repeats):
        for label, model, opt, c, *_ in built:
            times[label].append(timed_step(model, opt, xs, ys, c, device))
    notes = []
    for label, model, opt, c, t_target, m_target in built:
        seconds, memory = min(times[label]), step_memory(label, model, opt, xs, ys, c, device, args)
        if label == 'Hard3':
            base_t, base_m = seconds, memory
        tt = f'{t_target:.2f}' if t_target else ''
        mt = f'{m_target:.2f}' if m_target else ''
        print(f'{label:<14}{seconds:>10.3f}{seconds / base_t:>9.2f}{tt:>8}{memory / 2**20:>14.1f}'
              f'{memory / base_m:>9.2f}{mt:>8}', flush=True)
        if isinstance(model, MRN):
            notes.append(f'MRN update() (every {model.update_interval} steps, not in the step time): '
                         f'{timed_update(model, device):.3f} s')
        if isinstance(model, DMTRL):
            notes.append(f'{label} ranks per layer: {[layer.ranks for layer in model.layers]}')
    for note in notes:
        print(note)


def timed_update(model, device):
    sync(device)
    t0 = time.perf_counter()
    model.update()
    sync(device)
    return time.perf_counter() - t0


if __name__ == '__main__':
    main()
