"""Files written atomically: a temporary file in the same folder, then `os.replace`, so a
reader (or a crash) never sees a half-written file. Every file this project writes goes
through here, except the Youtube-8M converter's task files: those are written into a staging
folder that then replaces the data folder as a whole (`Youtube8M.data.convert`).

The temporary file of `path` is `.{name}.{pid}.tmp` beside it. A process killed while
writing leaves it behind; `remove_stale_temporaries(folder)` (called by the trainers when
they start) removes those whose process is gone.

`hold_folder(folder)` makes a run the one owner of its output folder while it trains.
"""
import contextlib
import csv
import fcntl
import io
import json
import os
import re

import numpy as np
import torch

from .cli import UserError

_TEMPORARY = re.compile(r'^\.(.+)\.(\d+)\.tmp$')


def temporary_path(path):
    """Where `path` is written before it is renamed (same folder, so os.replace is atomic)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f'.{name}.{os.getpid()}.tmp')


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp:` write the file `tmp`; on success it becomes `p`, on an
    exception it is removed and `p` is left as it was."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, write):
    """Call `write(tmp)` to write the file, then rename it to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + '\n')


def atomic_write_csv(path, header, rows):
    """A CSV file (comma-separated, quoted where needed, '\\n' line ends) of `header` and `rows`, atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def atomic_savetxt(path, values, **kwargs):
    """np.savetxt(path, values) written atomically (a scalar becomes one line)."""
    atomic_write(path, lambda tmp: np.savetxt(tmp, np.atleast_1d(np.asarray(values, dtype=np.float64)), **kwargs))


def atomic_savefig(fig, path, **kwargs):
    """fig.savefig(path) written atomically (the format follows the file extension)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip('.') or None
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def atomic_torch_save(obj, path):
    """torch.save(obj, path) written atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def process_alive(pid):
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder):
    """Remove the temporary files of killed writers in `folder` (those whose process is
    gone). Returns the names removed."""
    if not folder or not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        if match and not process_alive(int(match.group(2))):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                continue
            os.remove(path)
            removed.append(name)
    return removed


LOCK_NAME = '.lock'


class FolderInUse(UserError):
    """Another live process holds the folder (see `hold_folder`)."""


@contextlib.contextmanager
def hold_folder(folder, flag):
    """Hold an exclusive lock on `folder` (created if needed) while the block runs: an
    operating-system lock (flock) on `folder/.lock`, which holds the owner's process id.
    FolderInUse, naming the command-line `flag` that gave the folder, if another process
    holds it. The system drops the lock when its process ends, so a killed run never blocks
    the next one. `folder` empty or None: no lock."""
    if not folder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
            raise FolderInUse(f'{flag} {folder} is in use by another run (process {owner}): wait for it to end, '
                              'or write to another folder') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
        yield
    finally:
        os.close(fd)                       # releases the lock
