import importlib.util
import os
import sys

import h5py
import pytest
import torch

# Without a GPU, the optional Triton kernels are tested in Triton's interpreter
# (tests/test_tal_triton.py). It is chosen when triton is imported: importing torch does not.
if (importlib.util.find_spec("triton") is not None and "TRITON_INTERPRET" not in os.environ
        and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def quick_curves(request, monkeypatch):
    """A run's learning_curves.png costs about 0.15 s of matplotlib, and the suite trains hundreds of
    tiny runs: outside the tests that ask for `real_curves` (those of the pictures themselves), a run
    ends with a one-pixel PNG in its place. Everything else a run writes is real."""
    if "real_curves" in request.fixturenames:
        return
    from PIL import Image

    from Training import atomic_write, runlog

    def one_pixel(curves, score, path, title=""):
        atomic_write(path, lambda tmp: Image.new("L", (1, 1)).save(tmp, format="PNG"))
        return path
    monkeypatch.setattr(runlog, "draw_curves", one_pixel)


@pytest.fixture
def real_curves():
    """Runs draw their real learning_curves.png (see `quick_curves`)."""


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is fastest and leaves the shared cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def youtube8m_data(tmp_path_factory):
    """Tiny built-in Youtube-8M data (800 train, 400 valid/test videos), made once per session."""
    from Youtube8M.synthetic import ensure_builtin_data
    path = str(tmp_path_factory.mktemp("yt8m"))
    ensure_builtin_data(path, seed=0, num_train=800, num_valid=400, train_files=2, valid_files=2)
    return path


class Killed(Exception):
    """Raised by `kill_at` to simulate a run killed in the middle."""


def kill_at(event):
    """A trainer `setup_hook` that raises Killed when the trainer engine fires `event`
    (e.g. Events.EPOCH_COMPLETED(once=1))."""
    def hook(engine):
        @engine.on(event)
        def kill(_):
            raise Killed()
    return hook


def flip_byte(path, dataset, row, column=0):
    """Flip one bit of the stored (row, column) element of `dataset`, on disk."""
    with h5py.File(path, "r") as f:
        d = f[dataset]
        chunk = d.id.get_chunk_info_by_coord((row - row % d.chunks[0], 0))
        at = chunk.byte_offset + ((row % d.chunks[0]) * d.shape[1] + column) * d.dtype.itemsize
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x04]))
