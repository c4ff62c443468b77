"""Train one Omniglot network (TAAN, hard sharing or single-task) with pytorch-ignite.

    python Omniglot/train.py --data_root data/omniglot --model taan --regularize distance \\
        --lam 0.3 --saveto runs/omniglot/distance-0.3

One iteration takes `--batch` training images of every alphabet (one `sample_all` batch,
all tasks in one forward pass) and makes one Adam step on

    loss = (1/T) sum_t CE(logits_t, y_t) + lam * sum_layers R(layer)

(the regulariser only for TAAN with --regularize other than none and lam > 0). The test
accuracy -- correct / total over all test images of all alphabets, as the original -- is
measured before training and every --test_interval iterations; the best one is kept,
and training stops after --early_stop evaluations without a strictly higher accuracy or
after --num_iter iterations.

Files in --saveto (nothing is written without it):
  model_params.pt      best model (state_dict), replaced atomically when the accuracy improves
  training_state.pt    model, optimizer, engine, sampler, RNG, early stopping and best-model
                       state after every evaluation (for --resume)
  config.json          the settings and the alphabet names (to rebuild the model)
  result.json          best accuracy, iterations and the accuracy history, when the run ends
"""
import argparse
import json
import os

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from Omniglot.dataTools import OmniglotData, prepare
from Omniglot.TAAN import MODELS, build_model, multitask_loss, split_by_task
from Training import (RNGState, add_bool_argument, atomic_write_text, attach_early_stopping,
                      attach_progress_bar, count_parameters, load_checkpoint, make_checkpoints,
                      metric_score, resolve_device, resolve_resume, seed_everything)

REGULARIZERS = ("none", "tracenorm", "distance", "cosine")
METRIC = "accuracy"
BEST_NAME, STATE_NAME, CONFIG_NAME, RESULT_NAME = ("model_params.pt", "training_state.pt",
                                                   "config.json", "result.json")


def add_training_arguments(p):
    """The options of one training run (shared with Evaluation_TAAN.py)."""
    p.add_argument("--data_root", default="data/omniglot",
                   help="folder with images_background/ and images_evaluation/ (default %(default)s)")
    p.add_argument("--split_seed", type=int, default=0,
                   help="seed of the 90/10 train/test split, used when the lists are first written")
    p.add_argument("--basis", type=int, default=32, help="TAAN basis functions per layer (default 32)")
    p.add_argument("--lr", type=float, default=1e-5, help="base learning rate; heads get 50x (default 1e-5)")
    p.add_argument("--batch", type=int, default=5, help="training images per alphabet per iteration (default 5)")
    p.add_argument("--num_iter", type=int, default=15000, help="maximum iterations (default 15000)")
    p.add_argument("--test_interval", type=int, default=100, help="iterations between test evaluations (default 100)")
    p.add_argument("--early_stop", type=int, default=100,
                   help="stop after this many evaluations without improvement (default 100)")
    p.add_argument("--eval_batch", type=int, default=10,
                   help="test images per alphabet in one evaluation step (memory only; default 10)")
    p.add_argument("--original_variant", action="store_true",
                   help="use the original code's tracenorm / cosine formulas (tracenorm_original, "
                        "cosine_original) instead of the paper's")
    p.add_argument("--c0", type=float, default=0.4,
                   help="constant 1/sqrt(2 pi) of the regularisers' closed forms (original: 0.4)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    add_bool_argument(p, "--progress", default=True, help="show a progress bar")


def build_parser():
    p = argparse.ArgumentParser(description="Train one network on the Omniglot alphabets (one task each).")
    p.add_argument("--model", default="taan", type=str.lower, choices=MODELS,
                   help="taan, hard (hard parameter sharing) or stl (one network per alphabet)")
    p.add_argument("--regularize", default="none", type=str.lower, choices=REGULARIZERS,
                   help="TAAN regulariser (default none)")
    p.add_argument("--lam", type=float, default=0.0, help="weight lambda of the regulariser (default 0)")
    add_training_arguments(p)
    p.add_argument("--saveto", default="", help="folder for the best model, training state and result")
    p.add_argument("--resume", default="", help="training state file to resume from, or 'auto' for "
                   "SAVETO/training_state.pt when it exists")
    return p


def check_args(parser, args):
    """Argparse errors for values no run can use."""
    for name in ("basis", "batch", "num_iter", "test_interval", "early_stop", "eval_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if getattr(args, "lam", 0.0) < 0:
        parser.error(f"--lam must be >= 0, got {args.lam}")
    if getattr(args, "model", "taan") != "taan" and getattr(args, "regularize", "none") != "none":
        parser.error(f"--regularize {args.regularize} needs --model taan (the {args.model} network has no TAL layers)")


def layer_regularizer(regularize, original_variant=False):
    """--regularize value -> the TAL layers' regularize= argument (None for 'none')."""
    if regularize not in REGULARIZERS:
        raise ValueError(f"unknown regulariser {regularize!r}; choose one of {', '.join(REGULARIZERS)}")
    if regularize == "none":
        return None
    if original_variant and regularize in ("tracenorm", "cosine"):
        return regularize + "_original"
    return regularize


def load_data(root, device, split_seed=0):
    """(train, test) OmniglotData of root; writes the split lists and the cache if needed."""
    prepare(root, seed=split_seed)
    return OmniglotData(root, "train", device), OmniglotData(root, "test", device)


class TrainSampler:
    """One `sample_all(batch)` draw per iteration, with a state_dict so that a resumed run
    draws the same batches as an uninterrupted one (the generator and the data's position
    in each alphabet's shuffled pass)."""

    def __init__(self, data, batch, seed):
        self.data, self.batch = data, batch
        self.generator = torch.Generator().manual_seed(int(seed))
        data.reset_sampling()      # every run starts new shuffled passes

    def __call__(self):
        return self.data.sample_all(self.batch, self.generator)

    def state_dict(self):
        return dict(self.data.sampling_state_dict(), generator=self.generator.get_state())

    def load_state_dict(self, state):
        self.data.load_sampling_state_dict(state)
        self.generator.set_state(state["generator"])


class History:
    """The (iteration, test accuracy) of every evaluation, kept in the training state."""

    def __init__(self):
        self.points = []

    def state_dict(self):
        return {"points": [[int(i), float(a)] for i, a in self.points]}

    def load_state_dict(self, state):
        self.points = [(int(i), float(a)) for i, a in state["points"]]


class EvalBatches:
    """Every test image once, `per_task` images of every alphabet per step (fewer at the
    end of an alphabet), grouped by task: (x, y, task_ids). Sized, for Ignite."""

    def __init__(self, data, per_task):
        self.data, self.per_task = data, per_task

    def __len__(self):
        return self.data.balanced_steps(self.per_task)

    def __iter__(self):
        return self.data.balanced_batches(self.per_task)


class PooledAccuracy(Metric):
    """correct / total over all evaluated images of all tasks (the original's test accuracy).
    update((correct, count)) with the counts of one step."""

    def reset(self):
        self._correct, self._count = 0, 0

    def update(self, output):
        correct, count = output
        self._correct += int(correct)
        self._count += int(count)

    def compute(self):
        if self._count == 0:
            raise ValueError("no test image was evaluated: the test split is empty")
        return self._correct / self._count


def evaluate_accuracy(model, batches):
    """Pooled test accuracy of `model` over `batches` (EvalBatches); a plain function for scripts."""
    metric = PooledAccuracy()
    metric.reset()
    for out in _eval_outputs(model, batches):
        metric.update(out)
    return metric.compute()


@torch.no_grad()
def _eval_step(model, batch):
    model.eval()
    x, y, ids = batch
    logits = model(x, ids)
    pred = torch.cat([z.argmax(-1) for z in logits])
    truth = torch.cat(split_by_task(y, ids, model.num_tasks))
    return int((pred == truth).sum()), truth.numel()


def _eval_outputs(model, batches):
    for batch in batches:
        yield _eval_step(model, batch)


def run_paths(saveto):
    return {k: os.path.join(saveto, name) for k, name in
            (("best", BEST_NAME), ("state", STATE_NAME), ("config", CONFIG_NAME), ("result", RESULT_NAME))}


def train(args, data=None, device=None, log=print, setup_hook=None):
    """Train one network with the settings in `args` (see build_parser; `data` = (train,
    test) OmniglotData to reuse, else loaded from args.data_root; `setup_hook(trainer)` may
    add handlers before the run starts). Returns a dict:
    best_acc, iterations, evaluations, stopped_early, history [(iteration, accuracy)], paths."""
    device = device or resolve_device(args.device)
    train_data, test_data = data or load_data(args.data_root, device, args.split_seed)
    T = train_data.num_tasks
    regularize = layer_regularizer(args.regularize, args.original_variant)
    lam = float(args.lam) if regularize is not None else 0.0

    seed_everything(args.seed)
    model = build_model(args.model, train_data.num_classes, basis=args.basis, regularize=regularize,
                        c0=args.c0).to(device)
    optimizer = model.make_optimizer(args.lr)
    sampler = TrainSampler(train_data, args.batch, args.seed)
    eval_batches = EvalBatches(test_data, args.eval_batch)

    def train_step(engine, _):
        model.train()
        x, y, ids = sampler()
        ce = multitask_loss(model(x, ids), split_by_task(y, ids, T))
        loss = ce + model.regularization(lam) if lam > 0 else ce
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return ce.item()

    trainer = Engine(train_step)
    evaluator = Engine(lambda engine, batch: _eval_step(model, batch))
    PooledAccuracy().attach(evaluator, METRIC)
    early_stopping = attach_early_stopping(evaluator, trainer, metric_score(METRIC), args.early_stop)
    bar = attach_progress_bar(trainer, "Train", "CE") if args.progress else None
    say = bar.log_message if bar is not None else log
    history = History()

    objects = {"model": model, "optimizer": optimizer, "trainer": trainer, "sampler": sampler,
               "rng": RNGState(), "early_stopping": early_stopping, "history": history}
    paths = run_paths(args.saveto) if getattr(args, "saveto", "") else None
    if paths:
        best, state = make_checkpoints(args.saveto, model, objects, BEST_NAME, STATE_NAME, metric_score(METRIC))
        evaluator.add_event_handler(Events.COMPLETED, best)
        objects["best_checkpoint"] = best

    def evaluate(engine):
        evaluator.run(eval_batches)
        acc = evaluator.state.metrics[METRIC]
        history.points.append((engine.state.iteration, acc))
        say(f"Iter {engine.state.iteration:05d} test accuracy {acc:.4f} "
            f"(best {early_stopping.best_score:.4f}, {early_stopping.counter} without gain)")

    @trainer.on(Events.STARTED)
    def evaluate_untrained(engine):      # the original also tests before the first step
        if engine.state.iteration == 0:
            evaluate(engine)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.test_interval), evaluate)
    if paths:      # after the evaluation, so the state holds its result
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=args.test_interval), state)

    resume = resolve_resume(getattr(args, "resume", ""), paths["state"] if paths else None)
    if paths:
        config = {k: v for k, v in vars(args).items() if k not in ("resume", "progress")}
        config.update(data_root=os.path.abspath(args.data_root), num_classes=train_data.num_classes,
                      tasks=train_data.tasks, layer_regularize=regularize)
        atomic_write_text(paths["config"], json.dumps(config, indent=1))
    if resume:
        load_checkpoint(resume, objects)
        if trainer.state.epoch_length != args.num_iter:
            raise ValueError(f"{resume} was saved by a run with --num_iter {trainer.state.epoch_length}; "
                             f"resume it with the same --num_iter (got {args.num_iter})")
        log(f"Resumed from {resume} at iteration {trainer.state.iteration} "
            f"(best accuracy {early_stopping.best_score:.4f}).")
    if setup_hook is not None:
        setup_hook(trainer)
    done = resume and (trainer.state.iteration >= args.num_iter or early_stopping.counter >= args.early_stop)
    if not done:
        trainer.run(None, max_epochs=1, epoch_length=args.num_iter)
    if bar is not None:
        bar.close()

    result = {"best_acc": float(early_stopping.best_score), "iterations": trainer.state.iteration,
              "evaluations": len(history.points), "stopped_early": early_stopping.counter >= args.early_stop,
              "history": history.points, "parameters": count_parameters(model), "paths": paths}
    if paths:
        atomic_write_text(paths["result"], json.dumps({k: v for k, v in result.items() if k != "paths"}, indent=1))
    return result


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = resolve_device(args.device)
    result = train(args, device=device)
    print(f"{args.model} ({result['parameters']} parameters), regulariser {args.regularize}, lambda {args.lam}: "
          f"best test accuracy {result['best_acc']:.4f} after {result['iterations']} iterations"
          + (" (stopped early)" if result["stopped_early"] else ""))
    if result["paths"]:
        print(f"Best model: {result['paths']['best']}")
    return result


if __name__ == "__main__":
    main()
