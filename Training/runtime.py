"""Device choice, seeding, parameter count and the boolean command-line flags."""
import argparse

import torch
from ignite.utils import manual_seed

BOOL_WORDS = {'true': True, '1': True, 'yes': True, 'y': True, 'on': True,
              'false': False, '0': False, 'no': False, 'n': False, 'off': False}


def str2bool(text):
    """'true/false/1/0/yes/no/on/off' (any case) -> bool; anything else is an argparse error."""
    if isinstance(text, bool):
        return text
    value = BOOL_WORDS.get(str(text).strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f'expected a boolean (true/false/1/0/yes/no), got {text!r}')
    return value


def add_bool_argument(parser, name, default=False, help=''):
    """`--name` alone means True; `--name true|false|1|0|yes|no` sets the value."""
    parser.add_argument(name, nargs='?', const=True, default=default, type=str2bool,
                        metavar='BOOL', help=f'{help} (true/false; a bare flag means true; default {default})')


def split_glued_booleans(argv, option_names):
    """Split tokens like 'False--mrn_constant' into 'False', '--mrn_constant'.

    A shell line ending in 'False\\' followed by a line starting with '--flag' (as in some
    published command lines) reaches the program as one glued token. A token is split only
    when its head is a boolean word and its tail is a known option, so nothing else changes.
    """
    out = []
    for token in argv:
        head, sep, tail = token.partition('--')
        if sep and head and head.lower() in BOOL_WORDS and ('--' + tail.split('=')[0]) in option_names:
            out += [head, '--' + tail]
        else:
            out.append(token)
    return out


def resolve_device(device='auto', gpu=None, local_rank=0):
    """The torch.device to run on.

    device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.
    gpu: the original `--gpu N` (an int or a string like '0'); with device 'auto' it picks
         cuda:N when CUDA is available and is ignored with a note otherwise.
    local_rank: the process index on this machine under torchrun; with CUDA and no explicit
         index each process takes cuda:local_rank.
    """
    device = str(device).strip().lower()
    cuda = torch.cuda.is_available()
    if device == 'auto':
        if not cuda:
            if gpu is not None:
                print(f'Note: --gpu {gpu} ignored: CUDA is not available, running on the CPU.')
            return torch.device('cpu')
        if gpu is None:
            return torch.device('cuda', local_rank)
        device = f'cuda:{gpu}'
    if device == 'cpu':
        return torch.device('cpu')
    if device == 'cuda' or device.startswith('cuda:'):
        if not cuda:
            raise ValueError(f'--device {device}: CUDA is not available on this machine; '
                             'use --device cpu (or auto)')
        index = local_rank if device == 'cuda' else device.split(':', 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise ValueError(f'bad CUDA device {device!r}: the index must be an integer, e.g. cuda:0 '
                             '(for several GPUs launch one process per GPU with torchrun)') from None
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f'CUDA device {index} does not exist: this machine has '
                             f'{torch.cuda.device_count()} GPU(s) (0..{torch.cuda.device_count() - 1})')
        return torch.device('cuda', index)
    raise ValueError(f'unknown device {device!r}: use auto, cpu, cuda or cuda:N')


def seed_everything(seed):
    """Seed Python's `random`, NumPy and torch (CPU and CUDA)."""
    manual_seed(int(seed))


def count_parameters(model):
    """Number of trainable scalars of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

