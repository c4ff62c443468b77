"""The fused CPU kernel's build: never hangs on a killed build's lock, shared by checkouts.

Each test runs the first TAL forward of a fresh Python process, as a user's run does. They
reuse the kernel already built in the normal cache (the first of them builds it, about a
minute, if no test has yet), putting that folder into the state a scenario needs while
holding its build lock, and restoring the finished build's mark afterwards.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from Layers import _tal_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first TAL forward of a fresh process, checked against the naive formula.
CHILD = r"""
import json, sys, time, warnings
t0 = time.monotonic()
import torch
from Layers import _tal_kernel as K
g = torch.Generator().manual_seed(0)
a = torch.randn(7, 33, dtype=torch.float64, generator=g)
alpha = torch.randn(3, 5, dtype=torch.float64, generator=g)
basis = torch.randn(1, 5, dtype=torch.float64, generator=g)
rt = torch.tensor([0, 2, 1, 1, 0, 2, 2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = K.tal_activation(a, alpha, basis, rt)
err = (out - K.tal_activation_naive(a, alpha[rt][:, None, :], basis)).abs().max().item()
from Layers import _tal_build
print(json.dumps({"backend": K.backend_for(a), "err": err, "seconds": time.monotonic() - t0,
                  "module": K.__file__, "directory": _tal_build.build_directory(),
                  "warnings": [str(w.message) for w in caught]}))
"""


def first_forward(bound_s, cwd=ROOT, **env):
    """Run CHILD in a fresh process; fail if it takes longer than bound_s seconds."""
    env = {**os.environ, "TAAN_TAL_BACKEND": "auto", **env}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=bound_s)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the first TAL forward did not finish within {bound_s} s: {err.stderr}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"], result["wall"] = done.stderr, time.monotonic() - start
    return result


@pytest.fixture
def unfinished_build():
    """The build folder as a killed build leaves it: no `built` mark. Yields the folder and
    a context manager holding its build lock; puts the mark back if the test did not."""
    assert _tal_build.load_extension() is not None, "the C++ kernel must build on this machine"
    directory = _tal_build.build_directory()
    mark = os.path.join(directory, "built")
    aside = f"{mark}.{os.getpid()}.aside"
    with _tal_build._build_lock(directory, wait_s=600):     # no live builder meanwhile
        os.replace(mark, aside)
    try:
        yield directory, lambda: _tal_build._build_lock(directory, wait_s=600)
    finally:
        with _tal_build._build_lock(directory, wait_s=600):
            if os.path.exists(mark):
                os.remove(aside)
            else:
                os.replace(aside, mark)


def test_stale_torch_lock_of_a_killed_build_is_cleared(unfinished_build):
    """torch's `lock` file left by a killed build used to make every later run wait forever."""
    directory, hold = unfinished_build
    with hold():
        open(os.path.join(directory, "lock"), "w").close()
    result = first_forward(bound_s=240)     # a no-op ninja run, or a rebuild of about a minute
    assert result["backend"] == "cpp" and result["err"] < 1e-10
    # Usually the child clears the lock ("removed ..., left by a killed build"); on a machine
    # where other TAAN processes run, one of them may do it first. Had nobody cleared it,
    # whoever took the build lock would wait for it forever and the child would time out.
    assert not os.path.exists(os.path.join(directory, "lock"))
    assert os.path.exists(os.path.join(directory, "built"))


def test_waits_for_a_live_builder_only_until_the_deadline(unfinished_build):
    """Another process building (it holds the lock): wait TAAN_TAL_BUILD_WAIT seconds, then
    run on the pure-PyTorch path with a warning, with the same numbers."""
    directory, hold = unfinished_build
    with hold():
        result = first_forward(bound_s=60, TAAN_TAL_BUILD_WAIT="2")
    assert result["backend"] == "torch" and result["err"] < 1e-10
    assert any("pure-PyTorch path" in w and "building" in w for w in result["warnings"]), result["warnings"]
    assert "waiting" in result["stderr"]


def test_checkouts_at_other_paths_share_the_build(tmp_path):
    """An installed (non-editable) copy elsewhere finds its source beside the module, keys
    the build by content and loads the kernel already built, without building again."""
    assert _tal_build.load_extension() is not None, "the C++ kernel must build on this machine"
    shutil.copytree(os.path.join(ROOT, "Layers"), tmp_path / "Layers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = first_forward(bound_s=120, cwd=tmp_path, PYTHONPATH=str(tmp_path))
    assert result["module"].startswith(str(tmp_path))
    assert result["directory"] == _tal_build.build_directory()
    assert result["backend"] == "cpp" and result["err"] < 1e-10
    assert "building" not in result["stderr"]


def test_build_key_covers_what_makes_binaries_incompatible():
    key, parts = _tal_build.build_key()
    assert set(parts) >= {"source", "cflags", "torch", "python", "cpu_flags"}
    assert "-march=native" in parts["cflags"]
    assert os.path.basename(_tal_build.build_directory()) == f"taan_tal_{key}"
