"""What both experiments share, on pytorch-ignite.

- trainer: the trainer core (`Experiment`, `Dataflow`, `run`): engines, progress, early
  stopping, checkpoints, resume, config file, distributed set-up;
- checkpoint: atomic best-model and training-state checkpoints, reading them with clear errors;
- metrics: mAP@K as a function (`map_at_k`) and as an Ignite metric (`MultiTaskMAPAtK`); mean +- sample std;
- cli: the user-error type, one-line errors, the entry-point wrapper, boolean and numeric flags;
- runtime: default folders, device choice, seeding, parameter count;
- atomic: every file written through a temporary file and `os.replace`; one live run per folder.
"""
from .atomic import (atomic_path, atomic_savefig, atomic_savetxt, atomic_torch_save, atomic_write, atomic_write_csv,
                     atomic_write_json, atomic_write_text, hold_folder, remove_stale_temporaries)
from .checkpoint import (CheckpointError, RNGState, best_model_checkpoint, load_checkpoint, make_checkpoints,
                         read_checkpoint, resolve_resume, restore, training_state_checkpoint)
from .cli import (ArgumentParser, UserError, add_bool_argument, count, entry_point, one_of, real, split_glued_booleans,
                  str2bool)
from .metrics import MultiTaskMAPAtK, ap_at_k_sum, format_mean_std, map_at_k, mean_std
from .runtime import count_parameters, default_path, project_home, resolve_device, seed_everything
from .trainer import Dataflow, Experiment, Run, add_run_arguments, run

__all__ = ['atomic_path', 'atomic_savefig', 'atomic_savetxt', 'atomic_torch_save',
           'atomic_write', 'atomic_write_csv', 'atomic_write_json', 'atomic_write_text', 'hold_folder',
           'remove_stale_temporaries',
           'CheckpointError', 'RNGState', 'best_model_checkpoint', 'load_checkpoint', 'make_checkpoints',
           'read_checkpoint', 'resolve_resume', 'restore', 'training_state_checkpoint',
           'ArgumentParser', 'UserError', 'add_bool_argument', 'count', 'entry_point', 'one_of', 'real',
           'split_glued_booleans', 'str2bool',
           'MultiTaskMAPAtK', 'ap_at_k_sum', 'format_mean_std', 'map_at_k', 'mean_std',
           'count_parameters', 'default_path', 'project_home', 'resolve_device', 'seed_everything',
           'Dataflow', 'Experiment', 'Run', 'add_run_arguments', 'run']
