"""Train one Omniglot network (TAAN, hard sharing or single-task) with pytorch-ignite.

    python -m Omniglot.train --model taan --regularize distance --lam 0.3 --saveto runs/omniglot/distance-0.3

One iteration takes `--batch` training images of every alphabet (one `sample_all` batch,
all tasks in one forward pass) and makes one Adam step on

    loss = (1/T) sum_t CE(logits_t, y_t) + lam * sum_layers R(layer)

(the regulariser only for TAAN with --regularize other than none and lam > 0). The test
accuracy -- correct / total over all test images of all alphabets, as the original -- is
measured before training and every --test_interval iterations; the best one is kept,
and training stops after --early_stop evaluations without a strictly higher accuracy or
after --num_iter iterations. The engines, checkpoints and resume are the trainer core's
(`Training.trainer`).

Files in --saveto (nothing is written without it):
  model_params.pt      best model (state_dict), replaced atomically when the accuracy improves
  training_state.pt    model, optimizer, engine, sampler, RNG, early stopping, best-model and
                       settings after every evaluation (for --resume)
  config.json          the settings and the alphabet names (to rebuild the model)
  result.json          best accuracy, iterations and the accuracy history, when the run ends
  metrics.csv, learning_curves.png, events.out.tfevents.*
                       every evaluation's accuracy and the mean training loss before it, as a
                       table, a picture and TensorBoard events (`Training.runlog`)
"""
import os

import torch
from ignite.metrics import Metric

from Layers.TAL_pytorch import C0_ORIGINAL, layer_regularizer
from Omniglot.dataTools import DEFAULT_DATA_ROOT, OmniglotData, prepare
from Omniglot.results import REGULARIZERS
from Omniglot.TAAN import MODELS, build_model, multitask_loss
from Training import (ArgumentParser, Dataflow, Experiment, add_run_arguments, atomic_write_json, count,
                      count_parameters, entry_point, real, run)

BEST_NAME, STATE_NAME, CONFIG_NAME, RESULT_NAME = ("model_params.pt", "training_state.pt",
                                                   "config.json", "result.json")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_training_arguments(p, outputs=True):
    """The options of one training run (shared with Evaluation_TAAN.py, which has its own
    output flags: outputs=False leaves out --saveto and --resume)."""
    p.add_argument("--data_root", default=DEFAULT_DATA_ROOT,
                   help="folder with images_background/ and images_evaluation/ (default %(default)s)")
    p.add_argument("--split_seed", type=count(0), default=0,
                   help="seed of the 90/10 train/test split, used when the lists are first written")
    p.add_argument("--alphabets", type=count(1), default=None,
                   help="use only the first N alphabets (in task order; default all)")
    p.add_argument("--basis", type=count(1), default=32, help="TAAN basis functions per layer (default 32)")
    p.add_argument("--lr", type=real(above=0), default=1e-5,
                   help="base learning rate; heads get 50x (default 1e-5)")
    p.add_argument("--batch", type=count(1), default=5, help="training images per alphabet per iteration (default 5)")
    p.add_argument("--num_iter", type=count(1), default=15000, help="maximum iterations (default 15000)")
    p.add_argument("--test_interval", type=count(1), default=100,
                   help="iterations between test evaluations (default 100)")
    p.add_argument("--eval_batch", type=count(1), default=10,
                   help="test images per alphabet in one evaluation step (memory only; default 10)")
    p.add_argument("--original_variant", action="store_true",
                   help="use the original code's tracenorm / cosine formulas (tracenorm_original, "
                        "cosine_original) instead of the paper's")
    p.add_argument("--c0", type=real(above=0), default=C0_ORIGINAL,
                   help="constant 1/sqrt(2 pi) of the regularisers' closed forms (original: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="floating-point type of the network (default float32; float64 for exactness checks)")
    add_run_arguments(p, early_stop=100, outputs=outputs,
                      early_stop_help="stop after this many evaluations without improvement (default 100)")


def build_parser():
    p = ArgumentParser(description="Train one network on the Omniglot alphabets (one task each).")
    p.add_argument("--model", default="taan", type=str.lower, choices=MODELS,
                   help="taan, hard (hard parameter sharing) or stl (one network per alphabet)")
    p.add_argument("--regularize", default="none", type=str.lower, choices=REGULARIZERS,
                   help="TAAN regulariser (default none)")
    p.add_argument("--lam", type=real(low=0), default=0.0, help="weight lambda of the regulariser (default 0)")
    add_training_arguments(p)
    return p


def check_args(parser, args):
    """Argparse errors for combinations no run can use (each numeric flag is checked by its type)."""
    if getattr(args, "model", "taan") != "taan" and getattr(args, "regularize", "none") != "none":
        parser.error(f"--regularize {args.regularize} needs --model taan (the {args.model} network has no TAL layers)")


def load_data(root, device, split_seed=0, alphabets=None):
    """(train, test) OmniglotData of root (its first `alphabets` alphabets, or all); writes
    the split lists and the cache if needed."""
    prepare(root, seed=split_seed)
    return OmniglotData(root, "train", device, alphabets=alphabets), OmniglotData(root, "test", device,
                                                                                  alphabets=alphabets)


class TrainSampler:
    """One `sample_all(batch)` draw per iteration from the run's own shuffled passes, with a
    state_dict so that a resumed run draws the same batches as an uninterrupted one (the
    generator and the run's position in each alphabet's shuffled pass). Several samplers
    may draw from the same data (runs trained at once)."""

    def __init__(self, data, batch, seed):
        self.data, self.batch = data, batch
        self.generator = torch.Generator().manual_seed(int(seed))
        self.passes = data.new_passes()

    def __call__(self):
        return self.data.sample_all(self.batch, self.generator, self.passes)

    def indices(self):
        """The global indices of the next batch (what __call__ would gather)."""
        return self.data.draw_all(self.batch, self.generator, self.passes)

    def state_dict(self):
        return dict(self.passes.state_dict(), generator=self.generator.get_state())

    def load_state_dict(self, state):
        self.passes.load_state_dict(state)
        self.generator.set_state(state["generator"])


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


class Omniglot(Experiment):
    """One network on the Omniglot alphabets; the best test accuracy is the result."""
    score = "accuracy"
    eval_split = "test"
    files = {"best": BEST_NAME, "state": STATE_NAME, "config": CONFIG_NAME}

    def __init__(self, args, data=None):
        super().__init__(args)
        self.data = data
        self.regularize = layer_regularizer(args.regularize, args.original_variant)
        self.regularization_constant = float(args.lam) if self.regularize is not None else 0.0

    def get_dataflow(self, device):
        args = self.args
        train, test = self.data or load_data(args.data_root, device, args.split_seed, args.alphabets)
        self.sampler = TrainSampler(train, args.batch, args.seed)
        return Dataflow(train=None, evaluate=EvalBatches(test, args.eval_batch), epoch_length=args.num_iter,
                        max_epochs=1, eval_interval=args.test_interval, eval_first=True,
                        info={"num_classes": train.num_classes, "tasks": train.tasks})

    def initialize(self, data, device):
        args = self.args
        model = build_model(args.model, data.info["num_classes"], basis=args.basis, regularize=self.regularize,
                            c0=args.c0).to(device=device, dtype=DTYPES[args.dtype])
        return model, model.make_optimizer(args.lr)

    def prepare(self, batch):
        """This step's batch: one sample_all draw of the run's own sampler."""
        x, y, ids = self.sampler()
        return x.to(DTYPES[self.args.dtype]), y, ids

    def loss(self, model, inputs):
        x, y, ids = inputs
        return multitask_loss(model(x, ids), y, ids, model.num_tasks)

    def eval_step(self, model, batch):
        x, y, ids = batch
        return int((model(x.to(DTYPES[self.args.dtype]), ids).argmax(-1) == y).sum()), y.numel()

    def metrics(self, device):
        return {self.score: PooledAccuracy()}

    def state_objects(self):
        return {"sampler": self.sampler}

    def config(self, data):
        return dict(super().config(data), data_root=os.path.abspath(self.args.data_root),
                    layer_regularize=self.regularize, **data.info)

    def finish(self, run):
        result = {"best_acc": float(run.early_stopping.best_score), "iterations": run.trainer.state.iteration,
                  "evaluations": len(run.history.points), "stopped_early": run.stopped_early,
                  "history": run.history.points, "parameters": count_parameters(run.model), "paths": None}
        if run.paths:
            result["paths"] = dict(run.paths, result=os.path.join(self.args.saveto, RESULT_NAME))
            atomic_write_json(result["paths"]["result"], {k: v for k, v in result.items() if k != "paths"})
        return result


def train(args, data=None, device=None, log=print, setup_hook=None):
    """Train one network with the settings in `args` (see build_parser; `data` = (train,
    test) OmniglotData to reuse, else loaded from args.data_root; `setup_hook(trainer)` may
    add handlers before the run starts). Returns a dict:
    best_acc, iterations, evaluations, stopped_early, history [(iteration, accuracy)], paths."""
    return run(Omniglot(args, data), args, device=device, setup_hook=setup_hook, log=log)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    result = train(args)
    print(f"{args.model} ({result['parameters']} parameters), regulariser {args.regularize}, lambda {args.lam}: "
          f"best test accuracy {result['best_acc']:.4f} after {result['iterations']} iterations"
          + (" (stopped early)" if result["stopped_early"] else ""))
    if result["paths"]:
        print(f"Best model: {result['paths']['best']}")
    return result


cli = entry_point(main)

if __name__ == "__main__":
    cli()
