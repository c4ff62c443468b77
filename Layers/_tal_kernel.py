"""The TAL activation without a [..., basis] tensor.

    f_t(a) = relu(a) + sum_m alpha[t, m] relu(s_m - a)

is piecewise linear in ``a`` with kinks at the basis points. Sort the basis
(s_0 <= ... <= s_{M-1}) and let k(a) = #{m : s_m <= a} be the bucket of ``a``; the terms
m >= k are the active ones, so with the suffix tables

    A[t, k] = sum_{m >= k} alpha[t, m],      S[t, k] = sum_{m >= k} alpha[t, m] s_m

the activation is exactly ``relu(a) + S[t, k] - a A[t, k]`` -- memory O(elements).
For the backward pass, with G[t, k] = sum of the incoming gradient g over the elements
of task t in bucket k and H[t, k] = the same sum of g * a:

    dL/da          = g (1[a > 0] - A[t, k])
    dL/dalpha[t,m] = sum_{k <= m} (s_m G[t, k] - H[t, k])      (elements with s_m > a)
    dL/ds_m        = sum_t alpha[t, m] sum_{k <= m} G[t, k]

The forward pass keeps ``a`` and, for up to 255 basis functions, each element's bucket as
one byte; with more, the backward pass finds the buckets again (cheaper than keeping them).
Three backends compute the same formulas: a fused C++ loop on the CPU (built once with
``torch.utils.cpp_extension``; about a minute), fused Triton kernels on CUDA
(`Layers._tal_triton`, when the ``triton`` package is installed), and plain PyTorch ops,
the fallback and reference, everywhere else. ``TAAN_TAL_BACKEND=torch`` forces the PyTorch
path, ``=cpp`` requires the C++ one and ``=triton`` the Triton one.
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
import torch.nn.functional as F

from . import _tal_triton

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "tal_activation.cpp")
_OPENMP = ("-fopenmp",) if torch._C.has_openmp else ()   # else at::parallel_for runs on one thread
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", *_OPENMP)
_LDFLAGS = _OPENMP
BUILD_WAIT_S = 300.0   # how long to wait for another live process building the kernel
_ext = None
_ext_failed = False
_triton_failed = False
_lock = threading.Lock()
KEEP_BUCKETS_MAX_BASIS = 255   # up to here bucket ids are kept (uint8); above, found again


# ----------------------------------------------------------------------------- the C++ kernel
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


def _load_extension():
    """The C++ kernel (built on first use, then shared through ``build_directory()``), or
    None with a warning when it cannot be had: no compiler, or another process has been
    building it for more than ``TAAN_TAL_BUILD_WAIT`` seconds (default `BUILD_WAIT_S`)."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    with _lock:
        if _ext is not None or _ext_failed:
            return _ext
        try:
            _ext = _load_or_build(float(os.environ.get("TAAN_TAL_BUILD_WAIT", BUILD_WAIT_S)))
        except Exception as err:  # no compiler, no ninja, ...: the PyTorch path gives the same numbers
            _ext_failed = True
            if os.environ.get("TAAN_TAL_BACKEND", "auto") == "cpp":
                raise RuntimeError(f"TAAN_TAL_BACKEND=cpp but the C++ kernel could not be built: {err}") from err
            warnings.warn(f"TAL: C++ kernel unavailable ({type(err).__name__}: {err}); "
                          "using the pure-PyTorch path (same numbers, slower on the CPU).")
    return _ext


def backend_for(tensor, num_basis=0):
    """'cpp', 'triton' or 'torch': which implementation runs for a tensor on its device."""
    choice = os.environ.get("TAAN_TAL_BACKEND", "auto").lower()
    if choice not in ("auto", "cpp", "triton", "torch"):
        raise ValueError(f"TAAN_TAL_BACKEND must be auto, cpp, triton or torch, got {choice!r}")
    floating = tensor.dtype in (torch.float32, torch.float64)
    if choice == "cpp" and tensor.device.type != "cpu":
        raise ValueError("TAAN_TAL_BACKEND=cpp only applies to CPU tensors")
    if choice == "triton":
        if not _tal_triton.supports(tensor, num_basis):
            raise ValueError(f"TAAN_TAL_BACKEND=triton needs the triton package, a float32/64 CUDA tensor "
                             f"(or TRITON_INTERPRET=1 and a CPU one) and at most {_tal_triton.MAX_BASIS} "
                             f"basis points; got {tensor.dtype} on {tensor.device}, {num_basis} points")
        return "triton"
    if choice == "torch" or not floating:
        return "torch"
    if tensor.device.type == "cpu":
        return "cpp" if _load_extension() is not None else "torch"
    if tensor.is_cuda and not _triton_failed and _tal_triton.supports(tensor, num_basis):
        return "triton"
    return "torch"


def _cpp_forward(a, row_task, s, A, S, keep_buckets):
    none = a.new_empty(0)
    return _ext.forward(a, row_task, s, A, S, keep_buckets, none, none)


def _cpp_backward(g, a, k, row_task, s, A, need_grad_a):
    none = a.new_empty(0)
    return _ext.backward(g, a, k, row_task, s, A, need_grad_a, none, none)[:2]


def _kernels(backend):
    """(forward, backward) of a backend: (a, row_task, s, A, S, keep_buckets) -> (out, k) and
    (g, a, k, row_task, s, A, need_grad_a) -> (grad_a, sums [2, T, M + 1] float64)."""
    if backend == "cpp":
        return _cpp_forward, _cpp_backward
    if backend == "triton":
        return _tal_triton.forward, _tal_triton.backward
    return _torch_forward, _torch_backward


def _forward(backend, *args):
    """The forward of `backend`; a Triton kernel that fails in auto mode falls back to PyTorch."""
    global _triton_failed
    try:
        return backend, _kernels(backend)[0](*args)
    except Exception as err:
        if backend != "triton" or os.environ.get("TAAN_TAL_BACKEND", "auto").lower() == "triton":
            raise
        _triton_failed = True
        warnings.warn(f"TAL: Triton kernel failed ({type(err).__name__}: {err}); "
                      "using the pure-PyTorch path (same numbers, slower).")
        return "torch", _torch_forward(*args)


# ----------------------------------------------------------------------------- PyTorch path
def _torch_forward(a, row_task, s, A, S, keep_buckets):
    K = A.shape[1]
    k = torch.searchsorted(s, a, right=True)                 # #{m : s_m <= a}
    idx = row_task.view(-1, 1) * K + k
    out = a.clamp_min(0) + S.reshape(-1)[idx] - a * A.reshape(-1)[idx]
    keep = keep_buckets and s.numel() <= 255
    return out, (k.to(torch.uint8) if keep else k.new_empty(0, a.shape[1], dtype=torch.uint8))


def _torch_backward(g, a, k, row_task, s, A, need_grad_a):
    T, K = A.shape
    k = k.long() if k.numel() else torch.searchsorted(s, a, right=True)
    idx = (row_task.view(-1, 1) * K + k).reshape(-1)
    gd = g.reshape(-1).double()
    sums = torch.zeros(2, T * K, dtype=torch.float64, device=a.device)
    sums[0].index_add_(0, idx, gd)
    sums[1].index_add_(0, idx, gd * a.reshape(-1).double())
    grad_a = g * ((a > 0).to(a.dtype) - A.reshape(-1)[idx].view_as(a)) if need_grad_a else None
    return grad_a, sums.view(2, T, K)


# ----------------------------------------------------------------------------- autograd
def _sorted_tables(alpha, basis):
    """Sorted basis s, its permutation, alpha in that order, suffix tables A and S [T, M+1]."""
    s, perm = basis.reshape(-1).sort()
    alpha_s = alpha.index_select(1, perm)
    suffix = torch.stack((alpha_s, alpha_s * s)).flip(-1).cumsum(-1).flip(-1)     # both tables at once:
    A, S = F.pad(suffix, (0, 1))                                                # fewer launches on a GPU
    return s.contiguous(), perm, alpha_s, A, S


def _parameter_grads(need_alpha, need_basis, sums, s, perm, alpha_s, dtype):
    """Gradients of alpha [T, M] and basis [1, M] from the per-bucket sums [2, T, M + 1]."""
    M = s.numel()
    cum_g, cum_ga = sums[:, :, :M].cumsum(2)                # sums over buckets k <= m
    grad_alpha = grad_basis = None
    if need_alpha:
        grad_alpha = torch.empty_like(alpha_s, dtype=dtype)
        grad_alpha[:, perm] = (s.double() * cum_g - cum_ga).to(dtype)
    if need_basis:
        grad_basis = torch.empty(1, M, dtype=dtype, device=s.device)
        grad_basis[0, perm] = (alpha_s.double() * cum_g).sum(0).to(dtype)
    return grad_alpha, grad_basis


class TALActivation(torch.autograd.Function):
    """out[r, n] = f_{row_task[r]}(a[r, n]); a is [R, N], row_task a LongTensor [R]."""

    @staticmethod
    def forward(ctx, a, alpha, basis, row_task):
        a, row_task = a.contiguous(), row_task.contiguous()
        s, perm, alpha_s, A, S = _sorted_tables(alpha.detach(), basis.detach())
        keep = s.numel() <= KEEP_BUCKETS_MAX_BASIS
        ctx.backend, (out, k) = _forward(backend_for(a, s.numel()), a, row_task, s, A, S, keep)
        ctx.save_for_backward(a, k, row_task, s, perm, alpha_s, A)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, k, row_task, s, perm, alpha_s, A = ctx.saved_tensors
        g = g.contiguous()
        need_a = ctx.needs_input_grad[0]
        grad_a, sums = _kernels(ctx.backend)[1](g, a, k, row_task, s, A, need_a)
        grad_alpha, grad_basis = _parameter_grads(ctx.needs_input_grad[1], ctx.needs_input_grad[2], sums,
                                                  s, perm, alpha_s, a.dtype)
        return (grad_a if need_a else None), grad_alpha, grad_basis, None


def tal_activation(a, alpha, basis, row_task):
    """TAL activation of ``a`` [R, N] where row r uses task ``row_task[r]``."""
    return TALActivation.apply(a, alpha, basis, row_task)


class TALBatchNormActivation(torch.autograd.Function):
    """out[r] = f_{row_task[r]}(a[r]) with a = BN(z) = (z - mean) invstd weight + bias per
    channel, for z [R, C, *]: batch norm folded into the C++ kernel, so that a is never
    stored (the backward pass recomputes it from z, which batch norm keeps anyway).

    Backward, with g_a = dL/da = g f'(a), n elements per channel, x = (z - mean) invstd:
        dL/dweight = sum g_a x,   dL/dbias = sum g_a,
        dL/dz = weight invstd (g_a - mean(g_a) - x mean(g_a x))   (batch statistics)
              = weight invstd g_a                                  (running statistics)."""

    @staticmethod
    def forward(ctx, z, weight, bias, mean, invstd, alpha, basis, row_task, batch_stats):
        shape = z.shape
        z, row_task = z.contiguous().view(shape[0], -1), row_task.contiguous()
        gamma = weight.detach() if weight is not None else torch.ones_like(mean)
        beta = bias.detach() if bias is not None else torch.zeros_like(mean)
        scale = (gamma * invstd).to(z.dtype).contiguous()
        shift = (beta - mean * scale).to(z.dtype).contiguous()
        s, perm, alpha_s, A, S = _sorted_tables(alpha.detach(), basis.detach())
        out, k = _ext.forward(z, row_task, s, A, S, s.numel() <= KEEP_BUCKETS_MAX_BASIS, scale, shift)
        ctx.save_for_backward(z, k, row_task, s, perm, alpha_s, A, scale, shift, mean, invstd, gamma)
        ctx.shape, ctx.batch_stats = shape, batch_stats
        return out.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, k, row_task, s, perm, alpha_s, A, scale, shift, mean, invstd, gamma = ctx.saved_tensors
        g = g.contiguous().view_as(z)
        grad, sums, (sum_ga, sum_gaz) = _ext.backward(g, z, k, row_task, s, A, True, scale, shift)
        need = ctx.needs_input_grad
        grad_alpha, grad_basis = _parameter_grads(need[5], need[6], sums, s, perm, alpha_s, z.dtype)
        mean, invstd, gamma = mean.double(), invstd.double(), gamma.double()
        sum_gax = invstd * (sum_gaz - mean * sum_ga)            # sum of g_a x per channel
        c1 = gamma * invstd                                     # dL/dz = c1 g_a + c2 z + c3
        if ctx.batch_stats:
            n = z.numel() // mean.numel()
            c2 = -c1 * invstd * sum_gax / n
            c3 = -c1 * sum_ga / n - c2 * mean
        else:
            c2 = c3 = torch.zeros_like(c1)
        _ext.channel_affine_(grad, z, c1, c2, c3)
        return (grad.view(ctx.shape) if need[0] else None, sum_gax.to(z.dtype) if need[1] else None,
                sum_ga.to(z.dtype) if need[2] else None, None, None, grad_alpha, grad_basis, None, None)


def fused_batchnorm_applies(z, bn, num_basis):
    """Whether `tal_batchnorm_activation` can take z [R, C, H, W] and bn (the C++ kernel)."""
    return (type(bn) is torch.nn.BatchNorm2d and z.dim() == 4 and z.device.type == "cpu"
            and backend_for(z, num_basis) == "cpp")


def tal_batchnorm_activation(z, bn, alpha, basis, row_task):
    """f_t(bn(z)) for z [R, C, H, W], row r with task row_task[r], and a BatchNorm2d `bn`,
    which behaves as in ``bn(z)``: batch statistics and the running-statistics update in
    training mode, the running statistics in eval mode."""
    batch_stats = bn.training or bn.running_mean is None
    with torch.no_grad():
        if batch_stats:
            n = z.numel() // z.shape[1]
            if n <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(z.shape)}")
            mean, var = (t.to(z.dtype) for t in _ext.channel_stats(z.contiguous().view(z.shape[0], -1), z.shape[1]))
            if bn.training and bn.track_running_stats:
                bn.num_batches_tracked.add_(1)
                m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                bn.running_mean.copy_(m * mean + (1 - m) * bn.running_mean)
                bn.running_var.copy_(m * var * (n / (n - 1)) + (1 - m) * bn.running_var)
        else:
            mean, var = bn.running_mean, bn.running_var
        invstd = torch.rsqrt(var + bn.eps)
    return TALBatchNormActivation.apply(z, bn.weight, bn.bias, mean, invstd, alpha, basis, row_task, batch_stats)


def tal_activation_naive(a, alpha_rows, basis):
    """The formula as written, building the [..., M] tensor: for tests and benchmarks.
    ``alpha_rows`` broadcasts against ``a[..., None]`` (e.g. alpha[row_task][:, None, :])."""
    return torch.relu(a) + (torch.relu(basis.reshape(-1) - a.unsqueeze(-1)) * alpha_rows).sum(-1)
