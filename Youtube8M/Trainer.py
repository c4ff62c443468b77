"""Train, validate and test a multi-task model on the Youtube-8M video-level tasks.

    python Youtube8M/Trainer.py --model TAAN --regularize distance --saveto results/TAAN
    cd Youtube8M && python Trainer.py --model STL --saveto results/STL        # the original way

A training step takes one batch from every task (as the original: an epoch is
max_t(len_t) - 1 steps, and every task's loader restarts, reshuffled, every
min_t(len_t) - 1 steps) and minimises

    loss = (1/T) sum_t C_t * BCE(logits_t, y_t) + sum_layers layer.regularization(c)

with Adam (lr --lr, weight decay 0.005); c is --taan_constant for TAAN, --mrn_constant for
MRN, and there is no regulariser for the other models (DMTRL included, as in the original).
MRN re-estimates its covariances every --update_interval steps. After every epoch the
model is evaluated on the valid split (mean over tasks of mAP@10); the best model is kept
and training stops after --early_stop epochs without improvement. At the end the best
model is evaluated on the test split.

Files in --saveto (without it nothing is written, as in the original, and the best weights
are kept in memory for the test):
  {model}.pth                      best model (state_dict), replaced atomically
  {model}-training_state.pt        model, optimizer, engine, RNG and early stopping state
                                   after the last epoch (for --resume)
  {model}-config.json              the settings, to rebuild the model (Visualizer.py)
  {model}-task_mAP%K.txt           test mAP@10 of every task, one per line (np.savetxt)
  {model}-average_mAP%K.txt        mean test mAP@10 (np.savetxt)

--resume auto (or a file) continues from the training state: with the same --seed the
result is the same as an uninterrupted run (the batches depend only on seed and epoch).

Runs unchanged under `torchrun --nproc_per_node N Youtube8M/Trainer.py ...`: each process
reads its shard of the data, gradients and metrics are all-reduced, rank 0 writes files.
"""
import argparse
import json
import os
import sys

import ignite.distributed as idist
import torch
import torch.optim as optim
from ignite.engine import Engine, Events

from Training import (MultiTaskMAPAtK, RNGState, add_bool_argument, atomic_savetxt, atomic_write_text,
                      attach_early_stopping, attach_progress_bar, count_parameters, distributed_backend, launch,
                      load_checkpoint, make_checkpoints, metric_score, resolve_device, resolve_resume,
                      seed_everything, split_glued_booleans)
from Youtube8M.data import read_task_names
from Youtube8M.models import MODELS, build_model, multitask_loss
from Youtube8M.torch_loader import DEFAULT_DATA_PATH, MultiTask_Dataloader

IN_FEATURES = 1152
K = 10
METRIC = f'mAP@{K}'
WEIGHT_DECAY = 0.005


def build_parser():
    p = argparse.ArgumentParser(description='Train, validate and test a multi-task model on Youtube-8M.')
    # training setting (original flags)
    p.add_argument('--batch_size', default=256, type=int, help='batch size per task (default 256)')
    p.add_argument('--max_epoch', default=10, type=int, help='max number of epochs (default 10)')
    p.add_argument('--hidden_feature', default=1024, type=int, help='width of the hidden layers (default 1024)')
    p.add_argument('--lr', default=1e-4, type=float, help='learning rate (default 1e-4)')
    p.add_argument('--model', default='STL', choices=MODELS, help='model type (default STL)')
    p.add_argument('--saveto', default='', help='folder for the best model, training state and results')
    p.add_argument('--checkname', default='', help='folder with a {model}.pth to start from (with --max_epoch 0: '
                   'just test it)')
    p.add_argument('--early_stop', default=3, type=int, help='epochs without improvement before stopping (default 3)')
    # TAAN
    p.add_argument('--taan_constant', default=1.0, type=float, help='coefficient of the TAAN regulariser')
    p.add_argument('--regularize', default=None, choices=['tracenorm', 'cosine', 'distance'],
                   help='TAAN regulariser (default none)')
    p.add_argument('--basis', default=24, type=int, help='number of TAAN basis functions (default 24)')
    # MRN
    add_bool_argument(p, '--regularization_task', help='MRN: update the task covariance')
    add_bool_argument(p, '--regularization_feature', help='MRN: update the output-feature covariance')
    add_bool_argument(p, '--regularization_input', help='MRN: update the input-feature covariance')
    p.add_argument('--update_interval', default=50, type=int, help='MRN: steps between covariance updates')
    p.add_argument('--mrn_constant', default=1e-3, type=float, help='coefficient of the MRN regulariser')
    # DMTRL
    p.add_argument('--method', default='Tucker', choices=['Tucker', 'TT', 'LAF'], help='DMTRL tensor factorisation')
    # device
    p.add_argument('--gpu', default=None, help='GPU id (original flag): with --device auto, use cuda:GPU when '
                   'CUDA is available (default 0)')
    # added
    p.add_argument('--data_path', default=DEFAULT_DATA_PATH, help='folder of the HDF5 files and tasks.json '
                   '(default %(default)s)')
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    p.add_argument('--seed', default=0, type=int, help='random seed (default 0)')
    p.add_argument('--resume', default='', help="training state file to resume from, or 'auto' for "
                   "{saveto}/{model}-training_state.pt when it exists")
    p.add_argument('--num_workers', default=0, type=int, help='data loader worker processes (default 0)')
    return p


def parse_args(argv=None):
    parser = build_parser()
    argv = split_glued_booleans(sys.argv[1:] if argv is None else list(argv), parser._option_string_actions)
    args = parser.parse_args(argv)
    for name in ('batch_size', 'hidden_feature', 'basis', 'update_interval', 'early_stop'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.max_epoch < 0 or args.num_workers < 0:
        parser.error('--max_epoch and --num_workers must be >= 0')
    return args


def regularization_constant(args):
    return {'TAAN': args.taan_constant, 'MRN': args.mrn_constant}.get(args.model, 0.0)


def output_paths(args):
    d = args.saveto
    return {'best': os.path.join(d, f'{args.model}.pth'),
            'state': os.path.join(d, f'{args.model}-training_state.pt'),
            'config': os.path.join(d, f'{args.model}-config.json'),
            'task': os.path.join(d, f'{args.model}-task_mAP%K.txt'),
            'average': os.path.join(d, f'{args.model}-average_mAP%K.txt')}


class TrainSteps:
    """The training batches of one epoch, as in the original: step s yields one batch of
    every task; all loaders restart together, reshuffled, every `cycle` = min_t(len_t) - 1
    steps, and an epoch has max_t(len_t) - 1 steps. The order of a pass depends only on
    (epoch, restart number), so a resumed run sees the same batches; the epoch is read
    from `epoch_fn` (the trainer's, 1-based) when the epoch starts."""

    def __init__(self, loaders, epoch_fn):
        lengths = [len(loader) for loader in loaders]
        self.loaders, self.epoch_fn = loaders, epoch_fn
        self.cycle = max(min(lengths) - 1, 1)
        self.steps = max(max(lengths) - 1, 1)

    def __len__(self):
        return self.steps

    def __iter__(self):
        epoch, iters = self.epoch_fn() - 1, []
        try:
            for step in range(self.steps):
                if step % self.cycle == 0:
                    for it in iters:
                        it.close()
                    iters = [loader.iter_epoch(epoch, step // self.cycle) for loader in self.loaders]
                batches = [next(it) for it in iters]
                yield [x for x, _ in batches], [y for _, y in batches]
        finally:
            for it in iters:
                it.close()


class EvalSteps:
    """All batches of every task of an evaluation split, one batch of every task per step
    (empty batches for the tasks already exhausted)."""

    def __init__(self, loaders, num_classes):
        self.loaders, self.num_classes = loaders, num_classes
        self.steps = max(len(loader) for loader in loaders)

    def __len__(self):
        return self.steps

    def __iter__(self):
        iters = [iter(loader) for loader in self.loaders]
        for _ in range(self.steps):
            xs, ys = [], []
            for it, c in zip(iters, self.num_classes):
                x, y = next(it, (torch.zeros(0, IN_FEATURES), torch.zeros(0, c)))
                xs.append(x)
                ys.append(y)
            yield xs, ys


def load_split(args, mode, shuffle):
    return MultiTask_Dataloader(mode, args.batch_size, shuffle=shuffle, data_path=args.data_path,
                                num_workers=args.num_workers, seed=args.seed, rank=idist.get_rank(),
                                world_size=idist.get_world_size(), drop_last=False)


def task_names(data_path, num_tasks):
    return read_task_names(data_path, num_tasks) or [f'task {t}' for t in range(num_tasks)]


def to_device(tensors, device):
    return [t.to(device, non_blocking=True) for t in tensors]


def training(local_rank, args, device, result, setup_hook=None):
    """Train, validate and test (one process of a possibly distributed run) on `device`
    (in a distributed run: this process's device). The test results are put in the dict
    `result`; `setup_hook(trainer)` (tests) may add handlers to the trainer."""
    rank, distributed = idist.get_rank(), idist.get_world_size() > 1
    device = idist.device() if distributed else device
    main = rank == 0
    seed_everything(args.seed)     # the same on every process: models built from random draws agree

    train_loaders, num_classes = load_split(args, 'train', shuffle=True)
    valid_loaders, _ = load_split(args, 'valid', shuffle=False)
    test_loaders, _ = load_split(args, 'test', shuffle=False)
    T = len(num_classes)
    num_classes = [int(c) for c in num_classes]

    model = build_model(args.model, IN_FEATURES, args.hidden_feature, num_classes, basis=args.basis,
                        regularize=args.regularize, method=args.method,
                        regularization_task=args.regularization_task,
                        regularization_feature=args.regularization_feature,
                        regularization_input=args.regularization_input,
                        update_interval=args.update_interval).to(device)
    if args.checkname:
        load_checkpoint(os.path.join(args.checkname, f'{args.model}.pth'), {'model': model})
    core = model
    if main:
        print(f'Model has {count_parameters(core)} parameters.')
        print(f'Device: {device}' + (f', {idist.get_world_size()} processes ({idist.backend()})' if distributed else ''))
    model = idist.auto_model(model) if distributed else model
    optimizer = optim.Adam(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    c = regularization_constant(args)

    def train_step(engine, batch):
        model.train()
        xs, ys = to_device(batch[0], device), to_device(batch[1], device)
        loss, _ = multitask_loss(model(xs), ys)
        if c:
            loss = loss + core.regularization(c)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.model == 'MRN' and engine.state.iteration % args.update_interval == 0:
            core.update()
        return loss.item()

    @torch.no_grad()
    def eval_step(engine, batch):
        core.eval()
        xs = to_device(batch[0], device)
        return core(xs), batch[1]

    def make_evaluator(desc):
        engine = Engine(eval_step)
        MultiTaskMAPAtK(T, k=K, device=device if distributed else 'cpu').attach(engine, 'mAP')
        attach_progress_bar(engine, desc)
        return engine

    trainer, evaluator, tester = Engine(train_step), make_evaluator('Validate'), make_evaluator('Test')
    attach_progress_bar(trainer, 'Train', 'loss')

    train_steps = TrainSteps(train_loaders, lambda: trainer.state.epoch)
    valid_steps, test_steps = EvalSteps(valid_loaders, num_classes), EvalSteps(test_loaders, num_classes)

    early_stopping = attach_early_stopping(evaluator, trainer, metric_score(METRIC), args.early_stop)
    state_objects = {'model': model, 'optimizer': optimizer, 'trainer': trainer, 'rng': RNGState(),
                     'early_stopping': early_stopping}
    paths = output_paths(args) if args.saveto else None
    best_weights = {}
    if paths:
        best, state = make_checkpoints(args.saveto, model, state_objects, os.path.basename(paths['best']),
                                       os.path.basename(paths['state']), metric_score(METRIC))
        evaluator.add_event_handler(Events.COMPLETED, best)
        state_objects['best_checkpoint'] = best
    else:   # no folder: keep the best weights in memory

        @evaluator.on(Events.COMPLETED)
        def keep_best(engine):
            score = engine.state.metrics[METRIC]
            if not best_weights or score > best_weights['score']:
                best_weights.update(score=score, state={k: v.detach().clone() for k, v in core.state_dict().items()})

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        evaluator.run(valid_steps)
        if main:
            m = evaluator.state.metrics
            print(f'Epoch {engine.state.epoch:03d}: valid {METRIC} per task '
                  f'{[round(v, 4) for v in m["task_" + METRIC]]}')
            print(f'Epoch {engine.state.epoch:03d}: valid mean {METRIC} = {m[METRIC]:.4f}')

    if paths:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, state)   # after validation: holds its results

    resume = resolve_resume(args.resume, paths['state'] if paths else None)
    if main and paths:
        config = dict(vars(args), data_path=os.path.abspath(args.data_path), num_classes=num_classes,
                      in_features=IN_FEATURES, tasks=task_names(args.data_path, T))
        atomic_write_text(paths['config'], json.dumps(config, indent=1))
    if resume:
        load_checkpoint(resume, state_objects)
        if trainer.state.epoch_length != len(train_steps):
            raise ValueError(f'{resume} was saved by a run with {trainer.state.epoch_length} steps per epoch, this '
                             f'one has {len(train_steps)}: resume with the same --batch_size and data')
        if main:
            print(f'Resumed from {resume} after epoch {trainer.state.epoch}.')
    elif args.resume == 'auto' and main:
        print(f'No training state in {args.saveto}: starting afresh.')
    if setup_hook is not None:
        setup_hook(trainer)

    done = trainer.state.epoch >= args.max_epoch or early_stopping.counter >= args.early_stop
    if not done:
        trainer.run(train_steps, max_epochs=args.max_epoch, epoch_length=len(train_steps))
    if main:
        print('END OF TRAINING.')

    # test the best model
    idist.barrier()
    if paths and os.path.isfile(paths['best']):
        load_checkpoint(paths['best'], {'model': core})
    elif best_weights:
        core.load_state_dict(best_weights['state'])
    tester.run(test_steps)
    per_task, mean = tester.state.metrics['task_' + METRIC], tester.state.metrics[METRIC]
    if main:
        print(f'Test {METRIC} per task: {[round(v, 4) for v in per_task]}')
        print(f'Test mean {METRIC}: {mean:.4f}')
        if paths:
            atomic_savetxt(paths['task'], per_task)
            atomic_savetxt(paths['average'], mean)
            print(f'Results written to {paths["task"]} and {paths["average"]}')
    result.update(task_mAP=per_task, mAP=mean, epochs=trainer.state.epoch, paths=paths)


def main(argv=None, setup_hook=None):
    """Parse the command line and run (under torchrun: one process of the group).
    Returns a dict with the test results (mAP, task_mAP, epochs, paths)."""
    args = parse_args(argv)
    device = resolve_device(args.device, args.gpu, local_rank=int(os.environ.get('LOCAL_RANK', 0)))
    result = {}
    launch(training, args, device, result, setup_hook, backend=distributed_backend(device.type))
    return result


if __name__ == '__main__':
    main()
