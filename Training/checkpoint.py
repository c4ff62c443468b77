"""Checkpoints with Ignite's `Checkpoint` (written atomically through `Training.atomic`), and resuming.

Two files per run, both under fixed names so that a new save replaces the old one in a
single `os.replace` (a crash never leaves a half-written file or no file at all):

- the best model: the model's state_dict alone, replaced whenever the validation score
  improves (`best_model_checkpoint`, attach to the evaluator's COMPLETED event);
- the training state: model, optimizer, trainer engine (epoch/iteration), RNG states and
  any other handler with a state_dict (early stopping, the best-model checkpoint),
  replaced after every epoch or every N iterations (`training_state_checkpoint`).

`load_checkpoint` restores objects from a file after checking the CRC-32 of every part of
it (`verify_checkpoint`), and turns a damaged or foreign file into a clear error that names
the file.
"""
import os
import random
import zipfile

import ignite.distributed as idist
import numpy as np
import torch
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler

from .atomic import atomic_torch_save
from .cli import UserError


class CheckpointError(UserError):
    """A checkpoint file that cannot be used (truncated, corrupt or of another kind)."""


class ReplacingSaver(BaseSaveHandler):
    """Save handler for fixed file names: rank 0 writes `dirname/filename` atomically, so
    the next save replaces the file in one step and the old one is never deleted first
    (Ignite removes a replaced checkpoint before writing its successor)."""

    def __init__(self, dirname):
        self.dirname = os.fspath(dirname)

    def __call__(self, checkpoint, filename, metadata=None):
        if idist.get_rank() == 0:
            atomic_torch_save(checkpoint, os.path.join(self.dirname, filename))

    def remove(self, filename):
        pass


class RNGState:
    """The random number generators (Python, NumPy, torch CPU and CUDA) as a state_dict,
    so that a resumed run draws the same random numbers (dropout, shuffles) as an
    uninterrupted one."""

    def state_dict(self):
        np_state = np.random.get_state()
        state = {'python': random.getstate(),
                 'numpy_keys': torch.from_numpy(np_state[1].astype(np.int64)),
                 'numpy_rest': [int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 'torch': torch.get_rng_state()}
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))
        pos, has_gauss, cached = state['numpy_rest']
        np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])


def best_model_checkpoint(dirname, model, filename, score_function, score_name='score'):
    """Keep the model with the highest `score_function(engine)` as `dirname/filename`
    (a plain state_dict of the model). Saved by rank 0 only."""
    return Checkpoint({'model': model}, ReplacingSaver(dirname), score_function=score_function,
                      score_name=score_name, n_saved=1, filename_pattern=filename)


def training_state_checkpoint(dirname, objects, filename):
    """Save `objects` (name -> object with state_dict) as `dirname/filename` each time the
    handler is called. Saved by rank 0 only."""
    return Checkpoint(objects, ReplacingSaver(dirname), n_saved=1, filename_pattern=filename)


def make_checkpoints(dirname, model, objects, best_filename, state_filename, score_function):
    """Both handlers of a run: (best model, full training state). The best-model handler
    is added to `objects` so that a resumed run keeps comparing against the best score."""
    best = best_model_checkpoint(dirname, model, best_filename, score_function)
    state = training_state_checkpoint(dirname, dict(objects, best_checkpoint=best), state_filename)
    return best, state


def verify_checkpoint(path):
    """CheckpointError unless every entry of the checkpoint's zip container (torch.save's
    format) matches the CRC-32 stored with it: a flipped byte anywhere in the weights, or a
    file cut short, is found before anything is loaded. Files in torch's legacy (non-zip)
    format carry no checksums and pass unchecked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise damaged_checkpoint(path, f'{type(e).__name__}: {e}') from None
    if bad:
        raise damaged_checkpoint(path, f'the data of {bad} fails its checksum')


def damaged_checkpoint(path, detail):
    return CheckpointError(f'checkpoint {path} is damaged ({detail}). Delete it, or pass another checkpoint '
                           'file (a resumed run can also start afresh without --resume).')


def read_checkpoint(path):
    """torch.load a checkpoint file (weights only) after verifying its checksums, with clear errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist: check the path (a run with --saveto DIR writes its '
                        'checkpoints into DIR)')
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        lines = str(e).strip().splitlines() or ['']
        detail = lines[0][:160]
        if 'Weights only load failed' in detail:
            detail = 'it holds objects that this project never saves'
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({type(e).__name__}: {detail}). '
                              'Delete it, or pass another checkpoint file.') from None


def restore(path, state, objects):
    """Load every object in `objects` (name -> object with load_state_dict) from the
    checkpoint `state` read from `path`."""
    if len(objects) > 1:
        missing = [name for name in objects if not isinstance(state, dict) or name not in state]
        if missing:
            raise CheckpointError(f'checkpoint {os.fspath(path)} lacks {", ".join(missing)}: it is not a training '
                                  'state saved by this program. Delete it, or pass another checkpoint file.')
    try:
        Checkpoint.load_objects(objects, state)
    except Exception as e:
        raise CheckpointError(f'checkpoint {os.fspath(path)} does not fit this run ({mismatch(objects, state, e)}). '
                              'Delete it, or pass the checkpoint of a run with the same settings.') from None


def mismatch(objects, state, error):
    """What differs between a checkpoint and the modules it was loaded into, in a few words
    (for a module: counts of missing, unexpected and reshaped entries, with one example
    each); else the first line of the error."""
    parts = []
    for name, obj in objects.items():
        saved = state[name] if isinstance(state, dict) and isinstance(state.get(name), dict) else state
        if not isinstance(obj, torch.nn.Module) or not isinstance(saved, dict):
            continue
        here = obj.state_dict()
        missing = [k for k in here if k not in saved]
        unexpected = [k for k in saved if k not in here]
        reshaped = [k for k in here if k in saved and torch.is_tensor(saved[k]) and saved[k].shape != here[k].shape]
        if missing:
            parts.append(f'{len(missing)} entries missing, e.g. {missing[0]}')
        if unexpected:
            parts.append(f'{len(unexpected)} not in this model, e.g. {unexpected[0]}')
        if reshaped:
            k = reshaped[0]
            parts.append(f'{len(reshaped)} of another shape, e.g. {k}: {list(saved[k].shape)} saved, '
                         f'{list(here[k].shape)} here')
    if parts:
        return '; '.join(parts)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {first[:200]}'


def load_checkpoint(path, objects):
    """Restore every object in `objects` (name -> object with load_state_dict) from `path`."""
    state = read_checkpoint(path)
    restore(path, state, objects)
    return state


def resolve_resume(resume, default_path):
    """--resume value -> the file to resume from, or None to start afresh.

    'auto': `default_path` if it exists (None otherwise); any other value is a file that
    must exist. An empty value or None means no resume."""
    if not resume:
        return None
    if resume == 'auto':
        if default_path is None:
            raise UserError('--resume auto needs an output folder (--saveto DIR) to look for the training state')
        return default_path if os.path.isfile(default_path) else None
    if not os.path.isfile(resume):
        raise UserError(f'--resume {resume}: no such checkpoint file (use --resume auto to resume '
                        'from the output folder when a training state is there)')
    return resume
