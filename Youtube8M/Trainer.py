"""Train, validate and test a multi-task model on the Youtube-8M video-level tasks.

    python -m Youtube8M.Trainer --model TAAN --regularize distance --saveto results/TAAN
    cd Youtube8M && python Trainer.py --model STL --saveto results/STL      # the original way

A training step takes one batch from every task (as the original: an epoch is
max_t(len_t) - 1 steps, and every task's loader restarts, reshuffled, every
min_t(len_t) - 1 steps) and minimises

    loss = (1/T) sum_t C_t * BCE(logits_t, y_t) + model.regularization(c)

with Adam (lr --lr, weight decay 0.005); c is --taan_constant for TAAN, --mrn_constant for
MRN, and there is no regulariser for the other models (DMTRL included, as in the original).
MRN re-estimates its covariances every --update_interval steps. After every epoch the
model is evaluated on the valid split (mean over tasks of mAP@10); the best model is kept
and training stops after --early_stop epochs without improvement. At the end the best
model is evaluated on the test split. The engines, checkpoints and resume are the trainer
core's (`Training.trainer`).

Files in --saveto (without it nothing is written, as in the original, and the best weights
are kept in memory for the test):
  {model}.pth                      best model (state_dict), replaced atomically
  {model}-training_state.pt        model, optimizer, engine, RNG, early stopping and settings
                                   after the last epoch (for --resume)
  {model}-config.json              the settings, to rebuild the model (Visualizer.py)
  {model}-task_mAP%K.txt           test mAP@10 of every task, one per line (np.savetxt)
  {model}-task_mAP%K.csv           the same with the task names: columns task, mAP@10
  {model}-average_mAP%K.txt        mean test mAP@10 (np.savetxt)
  metrics.csv, learning_curves.png, events.out.tfevents.*   the validation curves (`Training.runlog`)

--resume auto (or a file) continues from the training state: with the same --seed the
result is the same as an uninterrupted run (the batches depend only on seed and epoch).

Runs unchanged under `torchrun --nproc_per_node N -m Youtube8M.Trainer ...`: each process
reads its shard of the data, gradients and metrics are all-reduced, rank 0 writes files.
"""
import os
import sys

import ignite.distributed as idist
import torch

from Layers.DMTRL_pytorch import METHODS
from Layers.TAL_pytorch import PAPER_REGULARIZERS, layer_regularizer
from Training import (ArgumentParser, Dataflow, Experiment, MultiTaskMAPAtK, UserError, add_bool_argument,
                      add_run_arguments, atomic_savetxt, atomic_write_csv, count, count_parameters, entry_point,
                      load_checkpoint, one_of, real, run, split_glued_booleans)
from Youtube8M.data import DEFAULT_DATA_PATH
from Youtube8M.datafolder import read_data_folder
from Youtube8M.models import MODELS, build_model, multitask_loss
from Youtube8M.torch_loader import EvalSteps, MultiTask_Dataloader, TrainSteps

K = 10
METRIC = f'mAP@{K}'
WEIGHT_DECAY = 0.005


def build_parser():
    p = ArgumentParser(description='Train, validate and test a multi-task model on Youtube-8M.')
    # training setting (original flags)
    p.add_argument('--batch_size', default=256, type=count(1), help='batch size per task (default 256)')
    p.add_argument('--max_epoch', default=10, type=count(0), help='max number of epochs (default 10)')
    p.add_argument('--hidden_feature', default=1024, type=count(1), help='width of the hidden layers (default 1024)')
    p.add_argument('--lr', default=1e-4, type=real(above=0), help='learning rate (default 1e-4)')
    p.add_argument('--model', default='STL', type=one_of(MODELS), choices=MODELS,
                   help='model type, any case (default STL)')
    p.add_argument('--checkname', default='', help='folder with a {model}.pth to start from (with --max_epoch 0: '
                   'just test it)')
    # TAAN
    p.add_argument('--taan_constant', default=1.0, type=real(low=0), help='coefficient of the TAAN regulariser')
    p.add_argument('--regularize', default=None, type=one_of(PAPER_REGULARIZERS), choices=PAPER_REGULARIZERS,
                   help='TAAN regulariser, any case (default none)')
    p.add_argument('--original_variant', action='store_true',
                   help="TAAN: the original code's tracenorm / cosine formulas (tracenorm_original, "
                        "cosine_original) instead of the paper's")
    p.add_argument('--basis', default=24, type=count(1), help='number of TAAN basis functions (default 24)')
    # MRN
    add_bool_argument(p, '--regularization_task', help='MRN: update the task covariance')
    add_bool_argument(p, '--regularization_feature', help='MRN: update the output-feature covariance')
    add_bool_argument(p, '--regularization_input', help='MRN: update the input-feature covariance')
    p.add_argument('--update_interval', default=50, type=count(1), help='MRN: steps between covariance updates')
    p.add_argument('--mrn_constant', default=1e-3, type=real(low=0), help='coefficient of the MRN regulariser')
    # DMTRL
    p.add_argument('--method', default='Tucker', type=one_of(METHODS), choices=METHODS,
                   help='DMTRL tensor factorisation, any case')
    # device
    p.add_argument('--gpu', default=None, help='GPU id (original flag): with --device auto, use cuda:GPU when '
                   'CUDA is available (default 0)')
    # added
    add_run_arguments(p, early_stop=3, early_stop_help='epochs without improvement before stopping (default 3)')
    p.add_argument('--data_path', default=DEFAULT_DATA_PATH, help='folder of the HDF5 files and tasks.json '
                   '(default %(default)s)')
    p.add_argument('--num_workers', default=0, type=count(0), help='data loader worker processes (default 0)')
    return p


def parse_args(argv=None):
    parser = build_parser()
    argv = split_glued_booleans(sys.argv[1:] if argv is None else list(argv), parser._option_string_actions)
    return parser.parse_args(argv)          # every numeric flag is checked by its type


def output_paths(saveto, model):
    return {'best': os.path.join(saveto, f'{model}.pth'),
            'state': os.path.join(saveto, f'{model}-training_state.pt'),
            'config': os.path.join(saveto, f'{model}-config.json'),
            'task': os.path.join(saveto, f'{model}-task_mAP%K.txt'),
            'task_csv': os.path.join(saveto, f'{model}-task_mAP%K.csv'),
            'average': os.path.join(saveto, f'{model}-average_mAP%K.txt')}


def to_device(tensors, device):
    return [t.to(device, non_blocking=True) for t in tensors]


class Youtube8M(Experiment):
    """One model on the Youtube-8M tasks: mean valid mAP@10 picks the best epoch, which is tested."""
    score = METRIC
    eval_split = 'valid'
    distributed = True
    resume_may_change = Experiment.resume_may_change + ('max_epoch', 'checkname', 'num_workers')

    def __init__(self, args):
        super().__init__(args)
        self.files = {k: os.path.basename(v) for k, v in output_paths('', args.model).items()}
        self.regularization_constant = {'TAAN': args.taan_constant, 'MRN': args.mrn_constant}.get(args.model, 0.0)

    def get_dataflow(self, device):
        args = self.args
        folder = read_data_folder(args.data_path)

        def split(mode, shuffle):
            return MultiTask_Dataloader(mode, args.batch_size, shuffle=shuffle, data_path=args.data_path,
                                        num_workers=args.num_workers, seed=args.seed, rank=idist.get_rank(),
                                        world_size=idist.get_world_size(), drop_last=False, folder=folder)[0]

        self.device, self.num_tasks = device, len(folder.tasks)
        train = split('train', True)
        if max(len(loader) for loader in train) < 2:
            largest = max(loader.num_samples for loader in train)
            raise UserError(f'--batch_size {args.batch_size} holds the whole training set of every task (the largest '
                            f'has {largest} videos), so an epoch -- max_t(batches of task t) - 1 steps, as in the '
                            f'original -- would have no step: use a batch size below {largest // idist.get_world_size()}')
        steps = TrainSteps(train)
        return Dataflow(train=steps, evaluate=EvalSteps(split('valid', False)), test=EvalSteps(split('test', False)),
                        epoch_length=len(steps), max_epochs=args.max_epoch,
                        info={'num_classes': folder.num_classes, 'in_features': folder.num_features,
                              'tasks': folder.tasks, 'synthetic': folder.synthetic})

    def initialize(self, data, device):
        args = self.args
        if args.model == 'DMTRL':
            self.log(f'DMTRL ({args.method}): decomposing the initial weight tensors of its three layers with the '
                     "original's rank rule (at hidden 1024 this takes a minute or more per layer)...")
        model = build_model(args.model, data.info['in_features'], args.hidden_feature, data.info['num_classes'],
                            basis=args.basis, regularize=layer_regularizer(args.regularize, args.original_variant),
                            method=args.method, regularization_task=args.regularization_task,
                            regularization_feature=args.regularization_feature,
                            regularization_input=args.regularization_input,
                            update_interval=args.update_interval).to(device)
        if args.checkname:
            load_checkpoint(os.path.join(args.checkname, f'{args.model}.pth'), {'model': model})
        return model, torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)

    def prepare(self, batch):
        return to_device(batch[0], self.device), to_device(batch[1], self.device)

    def loss(self, model, inputs):
        return multitask_loss(model(inputs[0]), inputs[1])[0]

    def eval_step(self, model, batch):
        return model(to_device(batch[0], self.device)), batch[1]

    def metrics(self, device):
        return {'mAP': MultiTaskMAPAtK(self.num_tasks, k=K, device=device)}

    def config(self, data):
        return dict(super().config(data), data_path=os.path.abspath(self.args.data_path), **data.info)

    def finish(self, run):
        """Test the best model; write the per-task and mean test mAP@10."""
        if run.main_process:
            run.log('END OF TRAINING.')
        idist.barrier()
        run.load_best()
        metrics = run.evaluate(run.data.test)
        per_task, mean = metrics['task_' + METRIC], metrics[METRIC]
        paths = output_paths(self.args.saveto, self.args.model) if run.paths else None
        if run.main_process:
            run.log(f'Test {METRIC} per task: {[round(v, 4) for v in per_task]}')
            run.log(f'Test mean {METRIC}: {mean:.4f}')
            if paths:
                atomic_savetxt(paths['task'], per_task)
                atomic_write_csv(paths['task_csv'], ['task', METRIC], zip(run.data.info['tasks'], per_task))
                atomic_savetxt(paths['average'], mean)
                run.log(f'Results written to {paths["task"]} (with task names: {paths["task_csv"]}) and '
                        f'{paths["average"]}')
        return {'task_mAP': per_task, 'mAP': mean, 'epochs': run.trainer.state.epoch, 'paths': paths,
                'parameters': count_parameters(run.model), 'seconds_per_step': run.seconds_per_step,
                'tasks': run.data.info['tasks'], 'synthetic': run.data.info['synthetic']}


def main(argv=None, setup_hook=None):
    """Parse the command line and run (under torchrun: one process of the group).
    Returns a dict with the test results (mAP, task_mAP, epochs, paths) and the run's parameters,
    seconds_per_step, tasks and whether the data is synthetic."""
    args = parse_args(argv)
    return run(Youtube8M(args), args, setup_hook=setup_hook)


cli = entry_point(main)

if __name__ == '__main__':
    cli()
