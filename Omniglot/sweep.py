"""Many Omniglot TAAN runs, trained R at a time: the engine of the lambda sweeps.

A sweep is a list of runs (`RunSpec`: regulariser, lambda, repeat j, seed); every run is
the run of `Omniglot/train.py` with those settings (same initialisation from its seed, same
batches, same loss, same evaluations, same early stopping). `train_runs` cuts the list, in
its order, into groups of `runs_at_once` runs and trains each group at once (`RunGroup`):
one Ignite engine whose step makes one iteration of every run of the group, through one
batched `TAANStack` with one Adam over the stacked parameters ('stacked', or 'union' with all
runs' activations in one kernel call: the CUDA default), or through the runs' own TAAN
networks and optimizers one after another ('separate', the CPU default: bit for bit what
train.py computes). Each run keeps its own seed, initialisation,
batch order (its own `TrainSampler`), lambda, regulariser, Adam state and early stopping
(its own Ignite `EarlyStopping`); a run that stops leaves the group at that evaluation, and
the group goes on without it.

The record of a finished run (its best accuracy, iterations, history) is the only result:
the caller keeps the records and writes its result files from them, so a line is never
written twice. The group's training state (networks, Adam, engine, samplers, early stopping,
histories) is saved after an evaluation round, at most every `save_every` seconds, to
`state_path`; a killed sweep started again continues from it and ends with the same
records. A group with no usable saved state starts again with all its runs, so every run
is always trained in the same company as in an uninterrupted sweep.
"""
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from ignite.metrics import Metric

from Omniglot.stack import build_runs, default_stacking
from Omniglot.TAAN import build_model
from Omniglot.train import DTYPES, EvalBatches, TrainSampler
from Training import (Experiment, UserError, read_checkpoint, remove_stale_temporaries, restore, seed_everything,
                      training_state_checkpoint)
from Training.runlog import RunLog
from Training.trainer import Settings, check_settings, create_evaluator, create_trainer

# settings every run of a group shares (the rest of a run is its RunSpec)
RUN_SETTINGS = ("basis", "lr", "batch", "num_iter", "test_interval", "early_stop", "eval_batch", "c0", "dtype")


QUIET = logging.getLogger(f"{__name__}.early_stopping")
QUIET.setLevel(logging.WARNING)


@dataclass(frozen=True)
class RunSpec:
    """One run: the regulariser by its paper name (none, tracenorm, distance, cosine), its
    weight, the repeat j (from 0), the seed, and what the layers get (e.g. 'cosine_original')."""
    regularizer: str
    lam: float
    repeat: int
    seed: int
    layer_regularize: str = None

    @property
    def key(self):
        return f"{self.regularizer}/{self.lam:g}/{self.repeat + 1}"


# Peak memory of a float32 training step per image of one run, by stacking (65 runs at once
# on an H200, rounded up; "union" is "stacked").
BYTES_PER_IMAGE_RUN = {"separate": 2.2e6, "stacked": 2.2e6, "union": 2.2e6}


def load_saved_sweep(path, settings, if_damaged, if_other_settings):
    """The JSON object a sweep saved in `path` (its 'settings', its 'records' as a dict, ...).
    A damaged file is a UserError ending in `if_damaged` (what to do); one saved with other
    `settings` a UserError `if_other_settings`, whose {} lists the differences."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        saved_settings, saved["records"] = saved["settings"], dict(saved["records"])
        differ = [f"{k}: {saved_settings.get(k)!r} there, {v!r} now" for k, v in settings.items()
                  if saved_settings.get(k) != v]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}): {if_damaged}") from None
    if differ:
        raise UserError(if_other_settings.format("; ".join(differ)))
    return saved


def default_runs_at_once(device, runs, images_per_step, stacking=None):
    """All runs at once on CUDA, as many as fit in 70% of the free memory (BYTES_PER_IMAGE_RUN
    of `stacking`, default the device's); one at a time on the CPU, where stacked runs measured
    slower than the same runs one by one (grouped convolutions: 2 runs stacked took 3.6x one
    run's step)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_run = BYTES_PER_IMAGE_RUN[stacking or default_stacking(device)] * images_per_step
    return max(1, min(runs, int(0.7 * free / per_run)))


class RunAccuracies(Metric):
    """correct / total of every run of the group over all evaluated images (each run's
    `PooledAccuracy`). update((correct [R], count)); compute() -> [R] floats."""

    def reset(self):
        self._correct, self._count = None, 0

    def update(self, output):
        correct, count = output
        self._correct = correct if self._correct is None else self._correct + correct
        self._count += int(count)

    def compute(self):
        if not self._count:
            raise ValueError("no test image was evaluated: the test split is empty")
        return [int(c) / self._count for c in self._correct.tolist()]


class _Run:
    """The state of one run of a group: its sampler, early stopping and history."""

    def __init__(self, spec, sampler, patience, folder=None):
        self.spec, self.sampler = spec, sampler
        self.score, self.history = None, []
        self.log, self.losses = RunLog(folder, "test_accuracy"), []      # the run's metrics.csv and curves
        self.stop = Engine(lambda engine, batch: None)      # EarlyStopping terminates this one
        self.early_stopping = EarlyStopping(patience, lambda _: self.score, self.stop)
        self.early_stopping.logger = QUIET      # a run that stops is reported by the sweep

    def state_dict(self):
        return {"sampler": self.sampler.state_dict(), "early_stopping": self.early_stopping.state_dict(),
                "history": [[int(i), float(a)] for i, a in self.history], "log": self.log.state_dict()}

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state["sampler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.history = [(int(i), float(a)) for i, a in state["history"]]
        if "log" in state:      # saved before the runs kept their metrics
            self.log.load_state_dict(state["log"])

    def evaluated(self, epoch, iteration, accuracy):
        """Note an evaluation: the history, and the row of metrics.csv with the mean training loss
        since the previous one (the state is saved after evaluations only, so no loss is kept in it)."""
        self.score = accuracy
        self.history.append((iteration, accuracy))
        loss = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses = []
        self.log.add(epoch, iteration, loss, {"test_accuracy": accuracy})

    def record(self, iteration):
        """What a finished run leaves: the fields of train.py's result.json and its spec."""
        es = self.early_stopping
        return {"regularizer": self.spec.regularizer, "lambda": self.spec.lam, "repeat": self.spec.repeat + 1,
                "seed": self.spec.seed, "layer_regularize": self.spec.layer_regularize,
                "best_acc": float(es.best_score), "iterations": int(iteration), "evaluations": len(self.history),
                "stopped_early": es.counter >= es.patience, "history": [[i, a] for i, a in self.history]}


class RunGroup(Experiment):
    """The runs of `specs` trained at once (settings in `args`, see RUN_SETTINGS), on
    (train, test) OmniglotData `data`, computed as `stacking` says. `runs` are the ones still
    training, in the order of the networks in `net`."""
    score = "accuracy"
    eval_split = "test"

    def __init__(self, specs, args, data, device, stacking, run_folder=None):
        super().__init__(args)
        self.train_data, self.test_data = data
        self.dtype = DTYPES[args.dtype]
        models = []
        for spec in specs:          # as train.py: the global seed, then the network's initialisation
            seed_everything(spec.seed)
            models.append(build_model("taan", self.train_data.num_classes, basis=args.basis,
                                      regularize=spec.layer_regularize, c0=args.c0).to(device=device,
                                                                                      dtype=self.dtype))
        self.stacking = stacking
        self.net = build_runs(models, [spec.lam for spec in specs], stacking)      # on the models' device and dtype
        self.optimizer = self.net.make_optimizer(args.lr)
        self.runs = [_Run(spec, TrainSampler(self.train_data, args.batch, spec.seed), args.early_stop,
                          run_folder(spec) if run_folder is not None else None) for spec in specs]
        self.task_ids = self.train_data.all_task_ids(args.batch)
        self.keys = [spec.key for spec in specs]

    def prepare(self, batch):
        """This step's batches: every run's own draw, gathered at once ([R, B, ...])."""
        x, y = self.train_data.gather(torch.stack([run.sampler.indices() for run in self.runs]))
        return x.to(self.dtype), y

    def loss(self, net, inputs):
        """Each run's multitask loss, every run on its own batch ([R]; the trainer minimises the sum)."""
        x, y = inputs
        return net.run_losses(x, y, self.task_ids)

    def eval_step(self, net, batch):
        x, y, ids = batch
        return net.run_correct(x.to(self.dtype), y, ids).cpu(), y.numel()

    def metrics(self, device):
        return {self.score: RunAccuracies()}

    def state_dict(self):
        return {"group": self.keys, "stacking": self.stacking,
                "runs": {run.spec.key: run.state_dict() for run in self.runs}}

    def load_state_dict(self, state):
        for run in self.runs:
            run.load_state_dict(state["runs"][run.spec.key])

    def drop(self, slots):
        """Remove the runs at `slots` from the group and its networks."""
        keep = [s for s in range(len(self.runs)) if s not in set(slots)]
        self.net.keep(keep, self.optimizer)
        self.runs = [self.runs[s] for s in keep]


def _settings(args):
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def train_group(specs, args, data, device, state_path=None, save_every=0.0, on_round=None, on_best=None,
                on_finish=None, stacking=None, setup_hook=None, log=print, run_folder=None):
    """Train the runs of `specs` at once, resuming from `state_path` when it holds this group.
    run_folder(spec): the folder where a run writes its metrics.csv, learning_curves.png and
    TensorBoard events (`Training.runlog`; None: nothing).

    on_finish(spec, record, state) is called when a run ends (state(): its network as a TAAN
    state_dict); on_best(spec, state) when a run's accuracy improves; on_round(group,
    iteration) after every evaluation round; `stacking` how the runs are computed (see
    `Omniglot.stack`; None: the device's default). `setup_hook(trainer)` may add handlers (tests)."""
    group = RunGroup(specs, args, data, device, stacking or default_stacking(device), run_folder)
    net = group.net
    trainer = create_trainer(net, group.optimizer, group.loss, regularization=net.regularization,
                             prepare=group.prepare, compile_on=device if getattr(args, "compile", False) else None)
    evaluator = create_evaluator(net, group, torch.device("cpu"))
    eval_batches = EvalBatches(group.test_data, args.eval_batch)
    objects = {"net": net, "optimizer": group.optimizer, "trainer": trainer, "group": group,
               "settings": Settings(_settings(args))}
    checkpoint = None
    if state_path:
        checkpoint = training_state_checkpoint(os.path.dirname(os.path.abspath(state_path)), objects,
                                               os.path.basename(state_path))
    saved_at = [time.monotonic()]

    def finish(slots, iteration):
        for slot in slots:
            run = group.runs[slot]
            if on_finish is not None:
                on_finish(run.spec, run.record(iteration), lambda s=slot: net.run_state_dict(s))
            run.log.close()
            run.log.draw()
        group.drop(slots)

    def note_losses(engine):
        for run, loss in zip(group.runs, engine.state.output):
            run.losses.append(loss)

    def evaluate(engine):
        evaluator.run(eval_batches)
        iteration = engine.state.iteration
        done = []
        for slot, (run, accuracy) in enumerate(zip(group.runs, evaluator.state.metrics[group.score])):
            before = run.early_stopping.best_score
            run.evaluated(engine.state.epoch, iteration, accuracy)
            run.early_stopping(evaluator)
            if on_best is not None and (before is None or accuracy > before):
                on_best(run.spec, lambda s=slot: net.run_state_dict(s))
            if run.stop.should_terminate or iteration >= args.num_iter:
                done.append(slot)
        finish(done, iteration)
        if on_round is not None:
            on_round(group, iteration)
        if not group.runs:
            engine.terminate()
        elif checkpoint is not None and iteration and time.monotonic() - saved_at[0] >= save_every:
            checkpoint(engine)      # after the round: the state holds its results
            saved_at[0] = time.monotonic()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, note_losses)        # before an evaluation
    trainer.add_event_handler(Events.STARTED, lambda e: evaluate(e) if e.state.iteration == 0 else None)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.test_interval), evaluate)
    trainer.add_event_handler(Events.COMPLETED, lambda e: finish(range(len(group.runs)), e.state.iteration))
    if state_path and os.path.isfile(state_path):
        state = read_checkpoint(state_path)
        saved = state.get("group", {}) if isinstance(state, dict) else {}
        saved_group = saved.get("group")
        if saved_group == group.keys and saved.get("stacking") == group.stacking:
            check_settings(state_path, state, _settings(args), ())
            active = state["group"]["runs"]
            group.drop([s for s, run in enumerate(group.runs) if run.spec.key not in active])   # recorded
            restore(state_path, state, objects)
            log(f"Resumed {len(group.runs)} run(s) at iteration {trainer.state.iteration} from {state_path}.")
        else:
            log(f"Note: {state_path} holds another group of runs ({', '.join(saved_group or ['unknown'])}, "
                f"{saved.get('stacking')}); this group ({group.stacking}) starts afresh.")
    if state_path:
        remove_stale_temporaries(os.path.dirname(os.path.abspath(state_path)))
    if setup_hook is not None:
        setup_hook(trainer)
    try:
        if group.runs:
            trainer.run(None, max_epochs=1, epoch_length=args.num_iter)
    finally:
        for run in group.runs:      # killed: what the runs in training logged so far stays readable
            run.log.close()
    if state_path and os.path.isfile(state_path):
        os.remove(state_path)


def train_runs(specs, args, data, device, runs_at_once, records, on_record, state_path=None, save_every=0.0,
               on_round=None, on_best=None, stacking=None, setup_hook=None, log=print, run_folder=None):
    """Train every run of `specs` that has no record in `records` (a dict key -> record),
    `runs_at_once` at a time: the list is cut in its order into groups of that size, and a
    group with an unrecorded run is trained (all its runs, so that each run always has the
    same company). on_record(spec, record, state) is called for each finished run; it is
    expected to put the record into `records`. See `train_group` for the other arguments."""
    if runs_at_once < 1:
        raise ValueError(f"runs_at_once must be >= 1, got {runs_at_once}")
    for start in range(0, len(specs), runs_at_once):
        group = specs[start:start + runs_at_once]
        if all(spec.key in records for spec in group):
            continue
        train_group(group, args, data, device, state_path, save_every, on_round, on_best, on_record, stacking,
                    setup_hook, log, run_folder)
    if state_path and os.path.isfile(state_path):     # left by a kill after the last record of its group
        os.remove(state_path)


class Progress:
    """One line per evaluation round: runs finished / running / waiting, the best accuracy
    so far of every (regulariser, lambda), and at most how long the rest takes (the time
    per iteration of this group so far, times the iterations left if no run stops early)."""

    def __init__(self, specs, records, num_iter, runs_at_once, log=print):
        self.specs, self.records, self.num_iter, self.runs_at_once, self.log = (specs, records, num_iter,
                                                                               runs_at_once, log)
        self.clock = None

    def groups_waiting(self, running):
        """Groups with a run that is neither recorded nor running (those still to train)."""
        return sum(any(spec.key not in self.records and spec.key not in running
                       for spec in self.specs[start:start + self.runs_at_once])
                   for start in range(0, len(self.specs), self.runs_at_once))

    def __call__(self, group, iteration):
        now = time.monotonic()
        if self.clock is None or self.clock[0] is not group:
            self.clock = (group, now, iteration)
        running = {run.spec.key for run in group.runs}
        finished = sum(spec.key in self.records and spec.key not in running for spec in self.specs)
        best = {}
        for spec in self.specs:
            record = self.records.get(spec.key)
            score = record["best_acc"] if record is not None and spec.key not in running else None
            for run in group.runs:
                if run.spec.key == spec.key:
                    score = run.early_stopping.best_score
            if score is not None:
                cell = (spec.regularizer, spec.lam)
                best[cell] = max(best.get(cell, score), score)
        parts = []
        for reg in dict.fromkeys(spec.regularizer for spec in self.specs):
            cells = [f"{lam:g} {100 * acc:.2f}" for (r, lam), acc in best.items() if r == reg]
            if cells:
                parts.append(f"{reg} " + ", ".join(cells) if reg != "none" else f"none {cells[0].split()[1]}")
        _, start, first = self.clock
        left = "time left unknown yet"
        if iteration > first:
            per_iteration = (now - start) / (iteration - first)
            todo = (self.num_iter - iteration if group.runs else 0) + self.groups_waiting(running) * self.num_iter
            left = f"at most {format_duration(per_iteration * todo)} left"
        self.log(f"Iter {iteration:05d}/{self.num_iter}: runs {finished} finished, {len(running)} running, "
                 f"{len(self.specs) - finished - len(running)} waiting; best test accuracy (%) "
                 f"{' | '.join(parts) or '-'}; {left}")


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
