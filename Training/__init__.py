"""Training utilities shared by the experiments' trainers (built on pytorch-ignite).

- runtime: device choice (`resolve_device`), seeding, parameter count, boolean flags;
- metrics: mAP@K as a function (`map_at_k`) and as an Ignite metric (`MultiTaskMAPAtK`);
- checkpoint: atomic best-model and training-state checkpoints, resuming, clear errors;
- handlers: early stopping, progress bars, launching through `ignite.distributed`;
- atomic: result files written through a temporary file and `os.replace`.
"""
from .atomic import atomic_savefig, atomic_savetxt, atomic_write_text
from .checkpoint import (CheckpointError, RNGState, best_model_checkpoint, load_checkpoint, make_checkpoints,
                         read_checkpoint, resolve_resume, training_state_checkpoint)
from .handlers import attach_early_stopping, attach_progress_bar, distributed_backend, launch, metric_score
from .metrics import MultiTaskMAPAtK, ap_at_k_sum, map_at_k
from .runtime import (add_bool_argument, count_parameters, resolve_device, seed_everything, split_glued_booleans,
                      str2bool)

__all__ = ['atomic_savefig', 'atomic_savetxt', 'atomic_write_text', 'CheckpointError', 'RNGState',
           'best_model_checkpoint', 'load_checkpoint', 'make_checkpoints', 'read_checkpoint', 'resolve_resume',
           'training_state_checkpoint', 'attach_early_stopping', 'attach_progress_bar', 'distributed_backend',
           'launch', 'metric_score', 'MultiTaskMAPAtK', 'ap_at_k_sum', 'map_at_k',
           'add_bool_argument', 'count_parameters', 'resolve_device', 'seed_everything', 'split_glued_booleans',
           'str2bool']
