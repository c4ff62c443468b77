"""Files written atomically: a temporary file in the same folder, then `os.replace`, so a
reader (or a crash) never sees a half-written file."""
import os

import numpy as np


def _atomic(path, write):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    _atomic(path, write)


def atomic_savetxt(path, values, **kwargs):
    """np.savetxt(path, values) written atomically (a scalar becomes one line)."""
    _atomic(path, lambda tmp: np.savetxt(tmp, np.atleast_1d(np.asarray(values, dtype=np.float64)), **kwargs))


def atomic_savefig(fig, path, **kwargs):
    """fig.savefig(path) written atomically (the format follows the file extension)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip('.') or None
    _atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
