"""The fused CPU kernel of the TAL activation (``csrc/tal_activation.cpp``): its build.

Built on first use with ``torch.utils.cpp_extension`` (about a minute) into one folder per
build key under torch's extension root, shared by every checkout and installed copy on a
machine; `load_extension` returns the loaded module, or None when it cannot be built (the
PyTorch path then gives the same numbers). A killed build never blocks later runs.
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading
import time
import warnings

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "tal_activation.cpp")
_OPENMP = ("-fopenmp",) if torch._C.has_openmp else ()   # else at::parallel_for runs on one thread
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", *_OPENMP)
_LDFLAGS = _OPENMP
BUILD_WAIT_S = 300.0   # how long to wait for another live process building the kernel
_ext = None
_ext_error = None
_lock = threading.Lock()


def _cpu_flags():
    """The CPU's feature flags: -march=native compiles for them, so they key the build."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build_key():
    """What makes a built kernel usable here: its source, compile flags, torch, Python, CPU."""
    parts = {"source": hashlib.sha256(_read(_SRC)).hexdigest(), "cflags": _CFLAGS, "ldflags": _LDFLAGS,
             "torch": torch.__version__, "torch_git": torch.version.git_version,
             "python": sys.implementation.cache_tag, "machine": platform.machine(), "cpu_flags": _cpu_flags()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


def build_directory(key=None):
    """Where the kernel is built: one folder per build key under torch's extension root
    (``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions), shared by every checkout."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, f"taan_tal_{key or build_key()[0]}")


@contextlib.contextmanager
def _build_lock(directory, wait_s):
    """Hold an exclusive ``flock`` on ``directory/build.flock`` (the OS drops it when its
    holder dies, so a killed build never blocks anyone); TimeoutError after ``wait_s``."""
    import fcntl
    fd = os.open(os.path.join(directory, "build.flock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building the TAL kernel in {directory} "
                                       f"for over {wait_s:.0f} s") from None
                if not told:
                    print(f"TAL: waiting (at most {wait_s:.0f} s) for another process building the "
                          f"fused CPU kernel in {directory}...", file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)                      # releases the lock


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write_atomically(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _import(directory, name):
    from torch.utils.cpp_extension import LIB_EXT
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, name + LIB_EXT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_or_build(wait_s):
    """The kernel module from ``build_directory()``, built there first if it is not yet.

    A finished build is marked by the file ``built``; loading it needs no lock. Building
    takes the ``flock`` of `_build_lock`; every builder holds it while torch's own ``lock``
    file (torch.utils.file_baton) exists, so a ``lock`` found by the holder was left by a
    killed build and is removed (torch would otherwise wait for it forever). The source
    is copied into the folder, so every checkout writes the same ninja file."""
    key, parts = build_key()
    name, directory = f"taan_tal_{key}", build_directory(key)
    done = os.path.join(directory, "built")
    if os.path.exists(done):
        return _import(directory, name)
    os.makedirs(directory, exist_ok=True)
    with _build_lock(directory, wait_s):
        if os.path.exists(done):          # built by the process we waited for
            return _import(directory, name)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            os.remove(stale)
            print(f"TAL: removed {stale}, left by a killed build", file=sys.stderr, flush=True)
        source, copy = _read(_SRC), os.path.join(directory, "tal_activation.cpp")
        if not os.path.exists(copy) or _read(copy) != source:   # same bytes: keep the mtime ninja saw
            _write_atomically(copy, source)
        try:   # the `ninja` wheel puts its binary next to the interpreter; make sure torch finds it
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        from torch.utils.cpp_extension import load
        print(f"TAL: building the fused CPU kernel in {directory} (first use only, about a minute)...",
              file=sys.stderr, flush=True)
        module = load(name=name, sources=[copy], extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                      build_directory=directory, verbose=False)
        _write_atomically(done, json.dumps(parts, indent=1).encode())
        return module


def load_extension(required=False):
    """The C++ kernel (built on first use, then shared through ``build_directory()``), or
    None with a warning when it cannot be had: no compiler, or another process has been
    building it for more than ``TAAN_TAL_BUILD_WAIT`` seconds (default `BUILD_WAIT_S`).
    ``required``: a RuntimeError instead of the warning. Asked once per process."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        with _lock:
            if _ext is None and _ext_error is None:
                try:
                    _ext = _load_or_build(float(os.environ.get("TAAN_TAL_BUILD_WAIT", BUILD_WAIT_S)))
                except Exception as err:  # no compiler, no ninja, ...: the PyTorch path gives the same numbers
                    _ext_error = f"{type(err).__name__}: {err}"
                    if not required:
                        warnings.warn(f"TAL: C++ kernel unavailable ({_ext_error}); "
                                      "using the pure-PyTorch path (same numbers, slower on the CPU).")
    if _ext is None and required:
        raise RuntimeError(f"the C++ kernel of the TAL activation could not be built: {_ext_error}")
    return _ext
