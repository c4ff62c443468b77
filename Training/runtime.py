"""Where the default data and results live, device choice, seeding, parameter count."""
import os

import torch
from ignite.utils import manual_seed

from .cli import UserError


def project_home():
    """The folder under which the default `data/` and `results/` folders live, whatever the
    current folder: $TAAN_HOME when set; else the source checkout the packages are
    imported from (an editable install or a clone: the folder holding pyproject.toml);
    else ~/taan (a regular install into site-packages)."""
    home = os.environ.get('TAAN_HOME')
    if home:
        return os.path.abspath(os.path.expanduser(home))
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, 'pyproject.toml')):
        return checkout
    return os.path.join(os.path.expanduser('~'), 'taan')


def default_path(*parts):
    """project_home()/parts..., e.g. default_path('data', 'omniglot')."""
    return os.path.join(project_home(), *parts)


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
            raise UserError(f'--device {device}: CUDA is not available on this machine; '
                            'use --device cpu (or auto)')
        index = local_rank if device == 'cuda' else device.split(':', 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise UserError(f'bad CUDA device {device!r}: the index must be an integer, e.g. cuda:0 '
                            '(for several GPUs launch one process per GPU with torchrun)') from None
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f'CUDA device {index} does not exist: this machine has '
                            f'{torch.cuda.device_count()} GPU(s) (0..{torch.cuda.device_count() - 1})')
        return torch.device('cuda', index)
    raise UserError(f'unknown device {device!r}: use auto, cpu, cuda or cuda:N')


def seed_everything(seed):
    """Seed Python's `random`, NumPy and torch (CPU and CUDA)."""
    manual_seed(int(seed))


def count_parameters(model):
    """Number of trainable scalars of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

