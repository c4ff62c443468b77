"""Small Ignite wiring shared by the trainers: early stopping, progress bars, launching
(single process or torchrun through `ignite.distributed`)."""
import os

import ignite.distributed as idist
from ignite.engine import Events
from ignite.handlers import EarlyStopping, ProgressBar


def metric_score(name):
    """score_function(engine) -> engine.state.metrics[name] (higher is better)."""
    def score(engine):
        return float(engine.state.metrics[name])
    return score


def attach_early_stopping(evaluator, trainer, score_function, patience):
    """Stop `trainer` after `patience` evaluations of `evaluator` without a strictly higher
    score. Returns the handler (it has a state_dict: save it to resume)."""
    handler = EarlyStopping(patience=patience, score_function=score_function, trainer=trainer)
    evaluator.add_event_handler(Events.COMPLETED, handler)
    return handler


def attach_progress_bar(engine, desc, output_name=None):
    """tqdm progress bar on rank 0 (nothing on other ranks); shows the step output as
    `output_name` when given."""
    if idist.get_rank() != 0:
        return None
    bar = ProgressBar(persist=False, desc=desc)
    transform = (lambda out: {output_name: out}) if output_name else None
    bar.attach(engine, output_transform=transform)
    return bar


def distributed_backend(device_type):
    """The torch.distributed backend for a torchrun launch (nccl on CUDA, gloo on CPU),
    or None for a plain single-process run."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return None
    return 'nccl' if device_type == 'cuda' else 'gloo'


def launch(function, *args, backend=None, nproc_per_node=None):
    """Run `function(local_rank, *args)` through idist.Parallel: in this process (backend
    None), in each torchrun process (backend set, nproc_per_node None), or in
    `nproc_per_node` processes spawned here."""
    if backend is None and nproc_per_node is None:
        return function(0, *args)     # a plain run: nothing to set up
    with idist.Parallel(backend=backend, nproc_per_node=nproc_per_node) as parallel:
        parallel.run(function, *args)
