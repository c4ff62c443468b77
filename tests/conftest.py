import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is fastest and leaves the shared cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
