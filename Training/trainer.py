"""The trainer core of both experiments, on pytorch-ignite.

A dataset script describes what is particular to it -- data, model, loss, metric, result
files -- as an `Experiment` and calls `run(experiment, args)`. The core does the rest, in
the shape of Ignite's cifar10 example:

    run(experiment, args)                         device; plain run, or one process of torchrun
      training(local_rank, experiment, args, ...)
        data = experiment.get_dataflow(device)    train / evaluate / test data and schedule
        model, optimizer = experiment.initialize(data, device)
        trainer = create_trainer(...)             one optimisation step per batch
        evaluator = create_evaluator(...)         the experiment's metrics
        ...                                       progress, early stopping, best-model and
                                                  training-state checkpoints (atomic), the
                                                  config file, resume_from with its checks
        trainer.run(...)                          unless the run is already done
        experiment.finish(run)                    test the best model, write result files

One training step minimises

    inputs = experiment.prepare(batch)                                 (data: batch draw, device copies)
    loss = experiment.loss(model, inputs) + model.regularization(c)     (c = experiment.regularization_constant)

with the experiment's optimizer, then calls `model.after_step(iteration)` when the model
has one (MRN re-estimates its covariances there). With `--compile` the loss and its
backward pass are compiled whole (`torch.compile(fullgraph=True)`; on CUDA with CUDA graphs,
mode 'reduce-overhead'); data preparation, the optimizer step and `after_step` stay eager.
The trainer never asks which model it trains. The evaluator runs after every epoch (or
every `eval_interval` iterations, and before the first step with `eval_first`); early
stopping and the best model follow the experiment's `score` metric (higher is better); the
training state is saved right after each evaluation. A resumed run (`--resume auto|FILE`)
continues exactly where the saved one stopped, and refuses settings that differ from the
saved ones.

Output: progress bars on a terminal (or with --progress true); otherwise, and besides the
bars, one plain line per evaluation with the mean training loss since the last one. A run
with a folder also writes there, at every evaluation, metrics.csv and TensorBoard events,
and at its end learning_curves.png (`Training.runlog`).
"""
import gc
import logging
import os
import sys
from dataclasses import dataclass, field

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, Timer

from .atomic import atomic_write_json, hold_folder, remove_stale_temporaries
from .checkpoint import (CheckpointError, RNGState, load_checkpoint, make_checkpoints, read_checkpoint, resolve_resume,
                         restore)
from .cli import UserError, add_bool_argument, count
from .runlog import RunLog, metric_columns
from .runtime import count_parameters, resolve_device, seed_everything


@dataclass
class Dataflow:
    """The data of one run and its schedule.

    train: the batches of one epoch (sized), or None when `Experiment.loss` draws its own
    batch every step; evaluate: the batches the evaluator runs on; test: the batches the
    experiment tests the best model on (if any). An epoch has `epoch_length` steps, a run
    at most `max_epochs` epochs; evaluation after every epoch (`eval_interval` None) or
    every `eval_interval` steps, and also before the first step when `eval_first`."""
    train: object
    evaluate: object
    epoch_length: int
    max_epochs: int
    test: object = None
    eval_interval: int = None
    eval_first: bool = False
    info: dict = field(default_factory=dict)      # facts about the data (classes, task names, ...)


class Experiment:
    """What a dataset script tells the core. The core reads args.saveto, args.resume,
    args.seed, args.early_stop, args.progress, args.device (and args.gpu if present).

    Set in a subclass:
      score                    the evaluator metric to maximise (early stopping, best model)
      eval_split               the split the evaluator runs on, for the log lines
      files                    {'best', 'state', 'config'} file names inside --saveto
      regularization_constant  c in model.regularization(c) (0: none)
      resume_may_change        settings a resumed run may change (all others must match)
      distributed              whether it may run as one process of torchrun
    and define get_dataflow, initialize, loss, eval_step, metrics, config and finish (and
    prepare, when a step's data needs work that is not the model's: it is never compiled).
    `self.log(message)` prints a line (on the main process of a distributed run).
    """
    score = 'score'
    eval_split = 'valid'
    files = {'best': 'model.pt', 'state': 'training_state.pt', 'config': 'config.json'}
    regularization_constant = 0.0
    resume_may_change = ('resume', 'progress', 'debug', 'device', 'gpu', 'saveto', 'compile')
    distributed = False
    log = staticmethod(print)

    def __init__(self, args):
        self.args = args

    def get_dataflow(self, device):
        raise NotImplementedError

    def initialize(self, data, device):
        """(model, optimizer) on `device`."""
        raise NotImplementedError

    def prepare(self, batch):
        """What `loss` takes, from the trainer's batch (eager, outside a compiled step)."""
        return batch

    def loss(self, model, inputs):
        """The task loss of one step (a scalar tensor), without the regulariser."""
        raise NotImplementedError

    def eval_step(self, model, batch):
        """What the metrics are updated with, for one evaluation batch (under no_grad)."""
        raise NotImplementedError

    def metrics(self, device):
        """{name: ignite Metric} attached to every evaluator."""
        raise NotImplementedError

    def state_objects(self):
        """Other objects with a state_dict that the training state must hold."""
        return {}

    def config(self, data):
        """The settings written to the config file and compared on resume (JSON-able)."""
        return {k: v for k, v in vars(self.args).items() if k not in ('resume', 'progress', 'debug')}

    def finish(self, run):
        """The result of the run (a dict), after training; write result files here."""
        return {}


class History:
    """(iteration, score) of every evaluation, kept in the training state."""

    def __init__(self):
        self.points = []

    def state_dict(self):
        return {'points': [[int(i), float(a)] for i, a in self.points]}

    def load_state_dict(self, state):
        self.points = [(int(i), float(a)) for i, a in state['points']]


class Settings:
    """The run's config, saved in the training state so that a resumed run can be compared."""

    def __init__(self, config):
        self.config = config

    def state_dict(self):
        return {'config': self.config}

    def load_state_dict(self, state):
        pass


@dataclass
class Run:
    """What `Experiment.finish` gets: the trained model and the run's handlers."""
    experiment: Experiment
    model: torch.nn.Module
    data: Dataflow
    device: torch.device
    trainer: Engine
    early_stopping: EarlyStopping
    history: History
    paths: dict
    progress: bool
    log: object
    best_weights: dict
    step_timer: Timer

    @property
    def seconds_per_step(self):
        """Mean time of a training step in this process (evaluations excluded), or None."""
        return self.step_timer.value() if self.step_timer.step_count else None

    @property
    def main_process(self):
        return idist.get_rank() == 0

    @property
    def stopped_early(self):
        return self.early_stopping.counter >= self.early_stopping.patience

    def load_best(self):
        """Put the best weights of the run (by the score) into the model."""
        if self.paths and os.path.isfile(self.paths['best']):
            load_checkpoint(self.paths['best'], {'model': self.model})
        elif self.best_weights:
            self.model.load_state_dict(self.best_weights['state'])

    def evaluate(self, batches, desc='Test'):
        """The experiment's metrics of the model over `batches`."""
        evaluator = create_evaluator(self.model, self.experiment, metric_device(self.device), self.progress, desc)
        return evaluator.run(batches).metrics


def add_run_arguments(parser, early_stop, early_stop_help, outputs=True):
    """The flags every trainer has, with the same names and meaning (outputs=False leaves
    out --saveto and --resume, for a script that places its runs' folders itself)."""
    parser.add_argument('--early_stop', default=early_stop, type=count(1), help=early_stop_help)
    if outputs:
        parser.add_argument('--saveto', default='', help='folder for the best model, training state, config and '
                            'results (nothing is written without it)')
        parser.add_argument('--resume', default='', help="training state file to resume from, or 'auto' for the "
                            'one in --saveto when it exists')
    parser.add_argument('--seed', default=0, type=count(0),
                        help='seed of the initialisation and the batches (default 0)')
    parser.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    add_bool_argument(parser, '--progress', default=None, help='show progress bars (auto: only on a terminal)')
    add_bool_argument(parser, '--compile', help='compile the training step with torch.compile (on CUDA with CUDA '
                      'graphs); the first steps take longer while it compiles')


def show_progress(flag):
    return sys.stderr.isatty() if flag is None else bool(flag)


def metric_device(device):
    """Where metrics accumulate: the run's device in a distributed run (for the all-reduce), else the CPU."""
    return device if idist.get_world_size() > 1 else torch.device('cpu')


def quiet_engine(step):
    """An Ignite Engine that does not log the exception ending its run ("Current run is
    terminating due to exception: ..."): the exception reaches the command, which reports it
    once (one line for a user error, the traceback otherwise)."""
    engine = Engine(step)
    engine.logger.setLevel(logging.CRITICAL)
    return engine


def compile_step(fn, device):
    """fn compiled whole (fullgraph: a graph break is an error, not a slow step); on CUDA with
    CUDA graphs (mode 'reduce-overhead': a step's kernels replayed without the host issuing
    them one by one)."""
    return torch.compile(fn, fullgraph=True, mode='reduce-overhead' if torch.device(device).type == 'cuda' else None)


def create_trainer(model, optimizer, loss_fn, regularization=None, after_step=None, prepare=None,
                   compile_on=None):
    """Engine whose step minimises loss_fn(model, prepare(batch)) + regularization() and
    returns the task loss as a float (a loss vector, one entry per run of a group trained at once:
    its sum is minimised and the step returns the list); after_step(iteration) runs after every
    optimizer step. compile_on: a device to compile the loss and its backward pass for (None: eager)."""
    def objective(model, inputs):
        loss = loss_fn(model, inputs)
        total = loss if loss.dim() == 0 else loss.sum()
        return loss, (total + regularization() if regularization is not None else total)

    if compile_on is not None:
        objective = compile_step(objective, compile_on)

    def step(engine, batch):
        model.train()
        loss, total = objective(model, prepare(batch) if prepare is not None else batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if after_step is not None:
            after_step(engine.state.iteration)
        return loss.item() if loss.dim() == 0 else loss.tolist()
    return quiet_engine(step)


def create_evaluator(model, experiment, device, progress=False, desc='Evaluate'):
    """Engine running experiment.eval_step in eval mode, with the experiment's metrics."""
    @torch.no_grad()
    def step(engine, batch):
        model.eval()
        return experiment.eval_step(model, batch)
    evaluator = quiet_engine(step)
    for name, metric in experiment.metrics(device).items():
        metric.attach(evaluator, name)
    if progress and idist.get_rank() == 0:
        ProgressBar(persist=False, desc=desc).attach(evaluator)
    return evaluator


class LossMean:
    """Mean of the trainer's output since the last `take()` (the training loss of a round)."""

    def __init__(self, trainer):
        self.total, self.count = 0.0, 0
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.add)

    def add(self, engine):
        self.total += float(engine.state.output)
        self.count += 1

    def take(self):
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def check_settings(path, state, config, may_change):
    """UserError listing the settings that differ between a saved run and this one."""
    saved = (state.get('settings') or {}).get('config') if isinstance(state, dict) else None
    if not saved:
        return
    differ = [f'{key}: {saved[key]!r} there, {config[key]!r} now' for key in config
              if key in saved and key not in may_change and saved[key] != config[key]]
    if differ:
        raise UserError(f'{path} was saved by a run with other settings ({"; ".join(differ)}): resume with the '
                        'same settings, or start afresh without --resume (or with another --saveto)')


def training(local_rank, experiment, args, device, result, setup_hook=None, log=print):
    """Train, evaluate and finish one run in this process (of a possibly distributed run);
    the experiment's result is put into the dict `result`. `setup_hook(trainer)` may add
    handlers before the run starts (tests). The run's --saveto folder is held by it alone
    while it runs (a second run into it is refused, see `hold_folder`)."""
    with hold_folder(getattr(args, 'saveto', None) if idist.get_rank() == 0 else None, '--saveto'):
        _training(experiment, args, device, result, setup_hook, log)


def _training(experiment, args, device, result, setup_hook, log):
    distributed = idist.get_world_size() > 1
    device = idist.device() if distributed else device
    main_process = idist.get_rank() == 0
    progress = show_progress(args.progress) and main_process
    experiment.log = log if main_process else (lambda *a, **k: None)      # for messages of its own
    paths = {k: os.path.join(args.saveto, name) for k, name in experiment.files.items()} if args.saveto else None
    resume = resolve_resume(args.resume, paths['state'] if paths else None)     # bad flags fail before any work
    seed_everything(args.seed)     # the same on every process: models built from random draws agree

    data = experiment.get_dataflow(device)
    core, optimizer = experiment.initialize(data, device)
    model = idist.auto_model(core) if distributed else core
    if main_process:
        log(f'Model has {count_parameters(core)} parameters.')
        log(f'Device: {device}' + (f', {idist.get_world_size()} processes ({idist.backend()})' if distributed else ''))

    c = experiment.regularization_constant
    trainer = create_trainer(model, optimizer, experiment.loss,
                             regularization=(lambda: core.regularization(c)) if c else None,
                             after_step=getattr(core, 'after_step', None), prepare=experiment.prepare,
                             compile_on=device if getattr(args, 'compile', False) else None)
    evaluator = create_evaluator(core, experiment, metric_device(device), progress,
                                 desc=experiment.eval_split.capitalize())
    step_timer = Timer(average=True)
    step_timer.attach(trainer, start=Events.STARTED, resume=Events.ITERATION_STARTED,
                      pause=Events.ITERATION_COMPLETED, step=Events.ITERATION_COMPLETED)
    bar = None
    if progress:
        bar = ProgressBar(persist=False, desc='Train')
        bar.attach(trainer, output_transform=lambda loss: {'loss': loss})
    say = (bar.log_message if bar is not None else log) if main_process else (lambda *a, **k: None)

    def score(engine):
        return float(engine.state.metrics[experiment.score])

    early_stopping = EarlyStopping(patience=args.early_stop, score_function=score, trainer=trainer)
    early_stopping.logger.setLevel(logging.WARNING)     # no timestamped INFO line: the run says "Stopped early"
    evaluator.add_event_handler(Events.COMPLETED, early_stopping)
    history, losses = History(), LossMean(trainer)
    runlog = RunLog(args.saveto if paths else None, f'{experiment.eval_split}_{experiment.score}',
                    write=main_process)
    objects = {'model': model, 'optimizer': optimizer, 'trainer': trainer, 'rng': RNGState(),
               'early_stopping': early_stopping, 'history': history, **experiment.state_objects()}
    config = experiment.config(data)
    best_weights = {}
    if paths:
        objects['settings'], objects['runlog'] = Settings(config), runlog
        best, save_state = make_checkpoints(args.saveto, model, objects, experiment.files['best'],
                                            experiment.files['state'], score)
        objects['best_checkpoint'] = best
        evaluator.add_event_handler(Events.COMPLETED, best)
    else:   # no folder: keep the best weights in memory for the experiment's test

        @evaluator.on(Events.COMPLETED)
        def keep_best(engine):
            if not best_weights or score(engine) > best_weights['score']:
                best_weights.update(score=score(engine),
                                    state={k: v.detach().clone() for k, v in core.state_dict().items()})

    def evaluate(engine):
        evaluator.run(data.evaluate)
        value = score(evaluator)
        history.points.append((engine.state.iteration, value))
        where = (f'Epoch {engine.state.epoch:03d}' if data.eval_interval is None
                 else f'Iter {engine.state.iteration:05d}')
        loss = losses.take()
        runlog.add(engine.state.epoch, engine.state.iteration, loss,
                   metric_columns(experiment.eval_split, evaluator.state.metrics, data.info.get('tasks')))
        say(f'{where}: train loss {"-" if loss is None else f"{loss:.4f}"}, {experiment.eval_split} '
            f'{experiment.score} {value:.4f} (best {early_stopping.best_score:.4f}, '
            f'{early_stopping.counter} without gain)')

    if hasattr(data.train, 'set_epoch'):      # a new sample order every epoch, as a DistributedSampler's
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: data.train.set_epoch(engine.state.epoch - 1))
    every = (Events.EPOCH_COMPLETED if data.eval_interval is None
             else Events.ITERATION_COMPLETED(every=data.eval_interval))
    if data.eval_first:
        trainer.add_event_handler(Events.STARTED, lambda engine: evaluate(engine) if engine.state.iteration == 0
                                  else None)
    trainer.add_event_handler(every, evaluate)
    if paths:
        trainer.add_event_handler(every, save_state)      # after the evaluation: the state holds its result
        if main_process:
            remove_stale_temporaries(args.saveto)
    if resume:
        resume_from(resume, objects, config, experiment, data, trainer, early_stopping, say)
    elif args.resume == 'auto':
        say(f'No training state in {args.saveto}: starting afresh.')
    if main_process and paths:
        atomic_write_json(paths['config'], config)
    if setup_hook is not None:
        setup_hook(trainer)

    done = (trainer.state.iteration >= data.max_epochs * data.epoch_length
            or early_stopping.counter >= early_stopping.patience)
    try:
        if not done:
            trainer.run(data.train, max_epochs=data.max_epochs, epoch_length=data.epoch_length)
    finally:
        runlog.close()
    runlog.draw()
    if bar is not None:
        bar.close()
    run = Run(experiment, core, data, device, trainer, early_stopping, history, paths, progress, say, best_weights,
              step_timer)
    if main_process and run.stopped_early:
        log(f'Stopped early: {early_stopping.patience} evaluations without a higher {experiment.score}.')
    result.update(experiment.finish(run))


def resume_from(path, objects, config, experiment, data, trainer, early_stopping, say):
    """Restore every object from the training state `path` after checking that it was
    saved by a run with the same settings and the same epoch length."""
    state = read_checkpoint(path)
    check_settings(path, state, config, experiment.resume_may_change)
    if isinstance(state, dict):     # saved before the settings or the evaluation rows were kept
        objects = {k: v for k, v in objects.items() if k not in ('settings', 'runlog') or k in state}
    restore(path, state, objects)
    if trainer.state.epoch_length != data.epoch_length:
        raise CheckpointError(f'{path} was saved by a run with {trainer.state.epoch_length} steps per epoch, this '
                              f'one has {data.epoch_length}: resume with the same settings and data')
    trainer.state.max_epochs = data.max_epochs       # a run may be resumed to train longer
    say(f'Resumed from {path} at epoch {trainer.state.epoch}, iteration {trainer.state.iteration} '
        f'(best {experiment.score} {early_stopping.best_score:.4f}).')


def distributed_backend(device_type):
    """The torch.distributed backend for a torchrun launch (nccl on CUDA, gloo on CPU),
    or None for a plain single-process run."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return None
    return 'nccl' if device_type == 'cuda' else 'gloo'


def run(experiment, args, device=None, setup_hook=None, log=print):
    """Resolve the device and run `training` (under torchrun: as one process of the group,
    each process on its own device). Returns the experiment's result dict."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = device or resolve_device(args.device, getattr(args, 'gpu', None), local_rank=local_rank)
    backend = distributed_backend(device.type)
    result = {}
    if backend is None:
        training(0, experiment, args, device, result, setup_hook, log)
        return result
    if not experiment.distributed:
        raise UserError(f'{type(experiment).__name__} runs in one process: start it without torchrun')
    for name in ('ignite.distributed.launcher.Parallel', 'ignite.distributed.auto.auto_model'):
        logging.getLogger(name).setLevel(logging.WARNING)   # no timestamped INFO lines: the core says it plainly
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(training, experiment, args, device, result, setup_hook, log)
        # Free the run's engines and model (reference cycles) while Python is alive, so that closing
        # the process group joins its threads now: left to exit, one of them may abort the process.
        gc.collect()
    return result
