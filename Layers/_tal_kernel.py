"""The TAL activation as registered operators, without a [..., basis] tensor.

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

**Grouped bases.** ``basis`` may be [G, M] with ``alpha`` [T, M], T a multiple of G: task t
then uses the basis of group t // (T / G). A TAL layer has one group; R runs of a sweep
stacked together are one call with G = R groups of T tasks, an M-point search per element.

**Operators** (namespace ``taan``, so that ``torch.compile`` traces them as single nodes
without graph breaks, and CUDA graphs capture them):

* ``taan::tal_activation(a, alpha, basis, row_task, keep_buckets) -> (out, buckets)`` and its
  backward ``taan::tal_activation_backward``; autograd is registered, and a fake kernel
  gives the shapes to the compiler.
* ``taan::tal_batchnorm_activation`` (+ backward) and ``taan::channel_stats``: batch norm
  folded into the CPU kernel (`tal_batchnorm_activation`).

Each has an implementation per device: the fused C++ kernel on the CPU
(`Layers._tal_build`, built on first use), fused Triton kernels on CUDA
(`Layers._tal_triton`), and plain PyTorch ops, the fallback and reference, elsewhere. The
tables are built inside the C++ kernel; a call is one function. The forward pass keeps
``a`` and, for up to 255 basis functions, each element's bucket as one byte; with more,
the backward pass finds the buckets again (cheaper than keeping them).

``TAAN_TAL_BACKEND`` (read once, when this module is imported) or `set_backend`:
``auto`` (default), ``torch`` forces the PyTorch path, ``cpp`` requires the C++ kernel,
``triton`` the Triton one.
"""
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _tal_build, _tal_triton

BACKENDS = ("auto", "cpp", "triton", "torch")
FLOATS = (torch.float32, torch.float64)
KEEP_BUCKETS_MAX_BASIS = 255   # up to here bucket ids are kept (uint8); above, found again
_backend = os.environ.get("TAAN_TAL_BACKEND", "auto").lower()
_triton_failed = False
_EMPTY = torch.empty(0)


# ----------------------------------------------------------------------------- backends
def set_backend(name):
    """Choose the implementation for the rest of the process: 'auto', 'cpp', 'triton' or
    'torch' (what ``TAAN_TAL_BACKEND`` sets at import). A compiled model keeps the choice
    it was compiled with. Returns the previous choice."""
    global _backend
    name = str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"the TAL backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    previous, _backend = _backend, name
    return previous


def backend_for(tensor, num_basis=0):
    """'cpp', 'triton' or 'torch': which implementation runs for a tensor on its device."""
    choice = _backend
    if choice == "auto":
        if tensor.dtype not in FLOATS:
            return "torch"
        if tensor.device.type == "cpu":
            return "cpp" if _tal_build.load_extension() is not None else "torch"
        if tensor.is_cuda and not _triton_failed and _tal_triton.supports(tensor, num_basis):
            return "triton"
        return "torch"
    if choice == "torch":
        return "torch"
    if choice == "cpp":
        if tensor.device.type != "cpu" or tensor.dtype not in FLOATS:
            raise ValueError(f"TAAN_TAL_BACKEND=cpp only applies to float32/64 CPU tensors, got {tensor.dtype} "
                             f"on {tensor.device}")
        _tal_build.load_extension(required=True)
        return "cpp"
    if choice == "triton":
        if not _tal_triton.supports(tensor, num_basis):
            raise ValueError(f"TAAN_TAL_BACKEND=triton needs the triton package, a float32/64 CUDA tensor "
                             f"(or TRITON_INTERPRET=1 and a CPU one) and at most {_tal_triton.MAX_BASIS} "
                             f"basis points; got {tensor.dtype} on {tensor.device}, {num_basis} points")
        return "triton"
    raise ValueError(f"TAAN_TAL_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")


@torch.compiler.assume_constant_result
def _cpu_runs_cpp():
    """Whether float CPU tensors run the C++ kernel (asked while tracing, not at every call)."""
    return backend_for(_EMPTY) == "cpp"


# ----------------------------------------------------------------------------- PyTorch path
def _tables(alpha, basis):
    """Each group's basis sorted stably (NaN last) with its permutation ([G, M] each), alpha
    in its group's order [T, M], and the suffix tables A, S [T, M + 1] -- what the C++ kernel
    builds in its prologue, with the same roundings on the CPU."""
    Tg = alpha.shape[0] // basis.shape[0]
    s, perm = basis.sort(dim=1, stable=True)
    alpha_s = alpha.gather(1, perm.repeat_interleave(Tg, 0))
    suffix = torch.stack((alpha_s, alpha_s * s.repeat_interleave(Tg, 0))).flip(-1).cumsum(-1).flip(-1)
    A, S = F.pad(suffix, (0, 1))
    return s, perm, alpha_s, A, S


def _buckets(a, s, row_task, Tg):
    """k = #{m : s_m <= a} against each row's group basis."""
    if s.shape[0] == 1:
        return torch.searchsorted(s[0], a, right=True)
    return torch.searchsorted(s[torch.div(row_task, Tg, rounding_mode="floor")], a, right=True)


def _torch_forward(a, alpha, basis, row_task, keep_buckets):
    s, _, _, A, S = _tables(alpha, basis)
    K = A.shape[1]
    k = _buckets(a, s, row_task, alpha.shape[0] // basis.shape[0])
    idx = row_task.view(-1, 1) * K + k
    out = a.clamp_min(0) + S.reshape(-1)[idx] - a * A.reshape(-1)[idx]
    keep = keep_buckets and s.shape[1] <= 255
    return out, (k.to(torch.uint8) if keep else k.new_empty(0, a.shape[1], dtype=torch.uint8))


def _parameter_grads(sums, s, perm, alpha_s, alpha, basis):
    """Gradients of alpha [T, M] and basis [G, M] from the per-bucket sums [2, T, M + 1]
    (float64), in the order of the C++ kernel's sums."""
    G, M = s.shape
    Tg = alpha_s.shape[0] // G
    cum_g, cum_ga = sums[:, :, :M].cumsum(2)                      # sums over buckets k <= m
    rows = (s.double().repeat_interleave(Tg, 0) * cum_g - cum_ga).to(alpha.dtype)
    grad_alpha = torch.empty_like(alpha).scatter_(1, perm.repeat_interleave(Tg, 0), rows)
    per_group = (alpha_s.double() * cum_g).view(G, Tg, M).sum(1)
    grad_basis = torch.empty_like(basis).scatter_(1, perm, per_group.to(basis.dtype))
    return grad_alpha, grad_basis


def _torch_backward(g, a, k, alpha, basis, row_task, need_grad_a):
    s, perm, alpha_s, A, _ = _tables(alpha, basis)
    T, K = A.shape
    k = k.long() if k.numel() else _buckets(a, s, row_task, T // basis.shape[0])
    idx = (row_task.view(-1, 1) * K + k).reshape(-1)
    gd = g.reshape(-1).double()
    sums = torch.zeros(2, T * K, dtype=torch.float64, device=a.device)
    sums[0].index_add_(0, idx, gd)
    sums[1].index_add_(0, idx, gd * a.reshape(-1).double())
    grad_a = g * ((a > 0).to(a.dtype) - A.reshape(-1)[idx].view_as(a)) if need_grad_a else a.new_empty(0)
    return (grad_a, *_parameter_grads(sums.view(2, T, K), s, perm, alpha_s, alpha, basis))


def _triton_forward(a, alpha, basis, row_task, keep_buckets):
    s, _, _, A, S = _tables(alpha, basis)
    return _tal_triton.forward(a, row_task, s, A, S, alpha.shape[0] // basis.shape[0], keep_buckets)


def _triton_backward(g, a, k, alpha, basis, row_task, need_grad_a):
    s, perm, alpha_s, A, _ = _tables(alpha, basis)
    grad_a, sums = _tal_triton.backward(g, a, k, row_task, s, A, alpha.shape[0] // basis.shape[0], need_grad_a)
    return (grad_a, *_parameter_grads(sums, s, perm, alpha_s, alpha, basis))


def _cpp_forward(a, alpha, basis, row_task, keep_buckets):
    return tuple(_tal_build._ext.forward(a, row_task, alpha, basis, keep_buckets, _EMPTY, _EMPTY))


def _cpp_backward(g, a, k, alpha, basis, row_task, need_grad_a):
    return tuple(_tal_build._ext.backward(g, a, k, row_task, alpha, basis, need_grad_a, _EMPTY, _EMPTY)[:3])


_FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "torch": _torch_forward}
_BACKWARD = {"cpp": _cpp_backward, "triton": _triton_backward, "torch": _torch_backward}


def _run(table, backend, *args):
    """table[backend](*args); a Triton kernel that fails in auto mode hands over to PyTorch."""
    global _triton_failed
    try:
        return table[backend](*args)
    except Exception as err:
        if backend != "triton" or _backend == "triton":
            raise
        _triton_failed = True
        warnings.warn(f"TAL: Triton kernel failed ({type(err).__name__}: {err}); "
                      "using the pure-PyTorch path (same numbers, slower).")
        return table["torch"](*args)


def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


def _rows(t):
    """t [R, *] as a contiguous [R, N]."""
    t = t.contiguous()
    return t if t.dim() == 2 else t.view(t.shape[0], math.prod(t.shape[1:]))


def _forward_impl(a, alpha, basis, row_task, keep_buckets):
    """(out shaped like a, buckets [R, N]) by the implementation `backend_for` picks for a's device."""
    alpha, basis, row_task = _contiguous(alpha, basis, row_task)
    out, buckets = _run(_FORWARD, backend_for(a, basis.shape[1]), _rows(a), alpha, basis, row_task, keep_buckets)
    return out.view(a.shape), buckets


def _backward_impl(grad, a, buckets, alpha, basis, row_task, need_grad_a):
    """(grad of a or an empty tensor, grad of alpha, grad of basis), likewise."""
    alpha, basis, row_task, buckets = _contiguous(alpha, basis, row_task, buckets)
    grad_a, grad_alpha, grad_basis = _run(_BACKWARD, backend_for(a, basis.shape[1]), _rows(grad), _rows(a),
                                          buckets, alpha, basis, row_task, need_grad_a)
    return (grad_a.view(a.shape) if need_grad_a else grad_a), grad_alpha, grad_basis


# ----------------------------------------------------------------------------- the operators
@torch.library.custom_op("taan::tal_activation", mutates_args=())
def _activation_op(a: Tensor, alpha: Tensor, basis: Tensor, row_task: Tensor,
                   keep_buckets: bool) -> tuple[Tensor, Tensor]:
    """out = f_{row_task[r]}(a[r]) for a [R, *] and the buckets (uint8 [R, N], N the elements of
    a row, or [0, N] when not kept): the C++ kernel on the CPU, Triton on CUDA, the PyTorch path
    elsewhere."""
    return _forward_impl(a, alpha, basis, row_task, keep_buckets)


@_activation_op.register_fake
def _activation_fake(a, alpha, basis, row_task, keep_buckets):
    keep = keep_buckets and basis.shape[1] <= 255
    return a.new_empty(a.shape), a.new_empty((a.shape[0] if keep else 0, math.prod(a.shape[1:])), dtype=torch.uint8)


@torch.library.custom_op("taan::tal_activation_backward", mutates_args=())
def _activation_backward_op(grad: Tensor, a: Tensor, buckets: Tensor, alpha: Tensor, basis: Tensor,
                            row_task: Tensor, need_grad_a: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad of a, or [0] when not wanted; grad of alpha; grad of basis)."""
    return _backward_impl(grad, a, buckets, alpha, basis, row_task, need_grad_a)


@_activation_backward_op.register_fake
def _activation_backward_fake(grad, a, buckets, alpha, basis, row_task, need_grad_a):
    return a.new_empty(a.shape if need_grad_a else (0,)), alpha.new_empty(alpha.shape), basis.new_empty(basis.shape)


def _activation_setup(ctx, inputs, output):
    a, alpha, basis, row_task, _ = inputs
    ctx.save_for_backward(a, output[1], alpha, basis, row_task)


def _activation_grad(ctx, grad, _):
    a, buckets, alpha, basis, row_task = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_a, grad_alpha, grad_basis = _activation_backward_op(grad, a, buckets, alpha, basis, row_task, need[0])
    return (grad_a if need[0] else None), (grad_alpha if need[1] else None), (grad_basis if need[2] else None), \
        None, None


_activation_op.register_autograd(_activation_grad, setup_context=_activation_setup)
_ACTIVATION = torch.ops.taan.tal_activation.default


class _EagerActivation(torch.autograd.Function):
    """The operator's forward and backward for eager calls, without the operator's dispatch
    (about 100 us of host time per call, more than the kernels of a small layer). Compiled
    code calls the operator; both run the same implementations."""

    @staticmethod
    def forward(ctx, a, alpha, basis, row_task, keep_buckets):
        out, buckets = _forward_impl(a, alpha, basis, row_task, keep_buckets)
        ctx.save_for_backward(a, buckets, alpha, basis, row_task)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("the TAL activation has no second derivative (backward with create_graph=True)")
        a, buckets, alpha, basis, row_task = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_a, grad_alpha, grad_basis = _backward_impl(grad, a, buckets, alpha, basis, row_task, need[0])
        return (grad_a if need[0] else None), (grad_alpha if need[1] else None), \
            (grad_basis if need[2] else None), None, None


def tal_activation(a, alpha, basis, row_task):
    """The TAL activation of ``a`` [R, *], row r for task ``row_task[r]`` (a LongTensor [R]):
    out[r] = relu(a[r]) + sum_m alpha[t, m] relu(basis[g, m] - a[r]) with t = row_task[r] and
    g = t // (T / G), for ``alpha`` [T, M] and ``basis`` [G, M] (G = 1: [1, M] or [M]).
    Shaped like ``a``."""
    if basis.dim() != 2:
        basis = basis.view(-1, alpha.shape[1])
    keep = basis.shape[1] <= KEEP_BUCKETS_MAX_BASIS
    if torch.compiler.is_compiling():
        return _ACTIVATION(a, alpha, basis, row_task, keep)[0]
    if a.device.type == "cpu" and backend_for(a, basis.shape[1]) == "cpp":     # its autograd node in C++ too
        return _tal_build._ext.activation(a, alpha, basis, row_task, keep)
    return _EagerActivation.apply(a, alpha, basis, row_task, keep)


def tal_activation_naive(a, alpha_rows, basis):
    """The formula as written, building the [..., M] tensor: for tests and benchmarks.
    ``alpha_rows`` broadcasts against ``a[..., None]`` (e.g. alpha[row_task][:, None, :])."""
    return torch.relu(a) + (torch.relu(basis.reshape(-1) - a.unsqueeze(-1)) * alpha_rows).sum(-1)


# ----------------------------------------------------------------------------- batch norm folded in
@torch.library.custom_op("taan::channel_stats", mutates_args=(), device_types="cpu")
def _channel_stats_op(z: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (float64 [C]) of z [R, C, *] by two passes (C++)."""
    return tuple(_tal_build.load_extension(required=True).channel_stats(_rows(z),
                                                                         channels))


@_channel_stats_op.register_fake
def _channel_stats_fake(z, channels):
    return z.new_empty(channels, dtype=torch.float64), z.new_empty(channels, dtype=torch.float64)


def _scale_shift(weight, bias, mean, invstd, dtype):
    """a = z * scale + shift per channel: batch norm as an affine map."""
    scale = (invstd if weight is None else weight * invstd).to(dtype)
    shift = ((0 if bias is None else bias) - mean * scale).to(dtype)
    return scale.contiguous(), shift.contiguous()


@torch.library.custom_op("taan::tal_batchnorm_activation", mutates_args=(), device_types="cpu")
def _bn_activation_op(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                      alpha: Tensor, basis: Tensor, row_task: Tensor, batch_stats: bool,
                      keep_buckets: bool) -> tuple[Tensor, Tensor]:
    """out = f_t(z * scale + shift) for z [R, C, *] (C++): batch norm inside the kernel.
    ``batch_stats``: mean and invstd are z's own statistics (their gradient flows to z)."""
    scale, shift = _scale_shift(weight, bias, mean, invstd, z.dtype)
    out, k = _tal_build.load_extension(required=True).forward(
        _rows(z), row_task.contiguous(), alpha.contiguous(), basis.contiguous(),
        keep_buckets, scale, shift)
    return out.view(z.shape), k


@_bn_activation_op.register_fake
def _bn_activation_fake(z, weight, bias, mean, invstd, alpha, basis, row_task, batch_stats, keep_buckets):
    keep = keep_buckets and basis.shape[1] <= 255
    return z.new_empty(z.shape), z.new_empty((z.shape[0] if keep else 0, math.prod(z.shape[1:])), dtype=torch.uint8)


@torch.library.custom_op("taan::tal_batchnorm_activation_backward", mutates_args=(), device_types="cpu")
def _bn_activation_backward_op(grad: Tensor, z: Tensor, buckets: Tensor, weight: Optional[Tensor],
                               bias: Optional[Tensor], mean: Tensor, invstd: Tensor, alpha: Tensor, basis: Tensor,
                               row_task: Tensor, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of z, the batch norm's weight and bias, alpha and basis (see
    `tal_batchnorm_activation`)."""
    ext = _tal_build.load_extension(required=True)
    shape, z = z.shape, _rows(z)
    scale, shift = _scale_shift(weight, bias, mean, invstd, z.dtype)
    grad_z, grad_alpha, grad_basis, (sum_ga, sum_gaz) = ext.backward(
        grad.contiguous().view_as(z), z, buckets.contiguous(), row_task.contiguous(), alpha.contiguous(),
        basis.contiguous(), True, scale, shift)
    mean, invstd = mean.double(), invstd.double()
    gamma = torch.ones_like(invstd) if weight is None else weight.double()
    sum_gax = invstd * (sum_gaz - mean * sum_ga)            # sum of g_a x per channel
    c1 = gamma * invstd                                     # dL/dz = c1 g_a + c2 z + c3
    if batch_stats:
        n = z.numel() // mean.numel()
        c2 = -c1 * invstd * sum_gax / n
        c3 = -c1 * sum_ga / n - c2 * mean
    else:
        c2 = c3 = torch.zeros_like(c1)
    ext.channel_affine_(grad_z, z, c1, c2, c3)
    return grad_z.view(shape), sum_gax.to(z.dtype), sum_ga.to(z.dtype), grad_alpha, grad_basis


@_bn_activation_backward_op.register_fake
def _bn_activation_backward_fake(grad, z, buckets, weight, bias, mean, invstd, alpha, basis, row_task, batch_stats):
    C = mean.shape[0]
    return (z.new_empty(z.shape), z.new_empty(C), z.new_empty(C), alpha.new_empty(alpha.shape),
            basis.new_empty(basis.shape))


def _bn_activation_setup(ctx, inputs, output):
    z, weight, bias, mean, invstd, alpha, basis, row_task, batch_stats, _ = inputs
    ctx.batch_stats = batch_stats
    ctx.save_for_backward(z, output[1], weight, bias, mean, invstd, alpha, basis, row_task)


def _bn_activation_grad(ctx, grad, _):
    z, buckets, weight, bias, mean, invstd, alpha, basis, row_task = ctx.saved_tensors
    grads = _bn_activation_backward_op(grad, z, buckets, weight, bias, mean, invstd, alpha, basis, row_task,
                                       ctx.batch_stats)
    need = ctx.needs_input_grad
    grad_z, grad_weight, grad_bias, grad_alpha, grad_basis = (g if n else None for g, n in
                                                              zip(grads, (need[0], need[1], need[2], need[5], need[6])))
    return grad_z, grad_weight, grad_bias, None, None, grad_alpha, grad_basis, None, None, None


_bn_activation_op.register_autograd(_bn_activation_grad, setup_context=_bn_activation_setup)
_BN_ACTIVATION = torch.ops.taan.tal_batchnorm_activation.default


def fused_batchnorm_applies(z, bn):
    """Whether `tal_batchnorm_activation` can take z [R, C, H, W] and bn: a BatchNorm2d, and
    float CPU tensors that run the C++ kernel."""
    return (type(bn) is torch.nn.BatchNorm2d and z.dim() == 4 and z.device.type == "cpu" and z.dtype in FLOATS
            and _cpu_runs_cpp())


def tal_batchnorm_activation(z, bn, alpha, basis, row_task):
    """f_t(bn(z)) for z [R, C, H, W], row r with task row_task[r], and a BatchNorm2d `bn`,
    which behaves as in ``bn(z)``: batch statistics and the running-statistics update in
    training mode, the running statistics in eval mode. Batch norm is computed inside the
    kernel, so the normalised tensor is never stored (the backward pass recomputes it from
    z, which batch norm keeps anyway). Backward, with g_a = dL/da = g f'(a), n elements per
    channel, x = (z - mean) invstd:

        dL/dweight = sum g_a x,   dL/dbias = sum g_a,
        dL/dz = weight invstd (g_a - mean(g_a) - x mean(g_a x))   (batch statistics)
              = weight invstd g_a                                  (running statistics)."""
    batch_stats = bn.training or bn.running_mean is None
    with torch.no_grad():
        if batch_stats:
            n = z.numel() // z.shape[1]
            if n <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(z.shape)}")
            mean, var = (t.to(z.dtype) for t in _channel_stats_op(z, z.shape[1]))
            if bn.training and bn.track_running_stats:
                bn.num_batches_tracked.add_(1)
                m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                bn.running_mean.copy_(m * mean + (1 - m) * bn.running_mean)
                bn.running_var.copy_(m * var * (n / (n - 1)) + (1 - m) * bn.running_var)
        else:
            mean, var = bn.running_mean, bn.running_var
        invstd = torch.rsqrt(var + bn.eps)
    basis = basis.view(-1, alpha.shape[1])
    return _BN_ACTIVATION(z, bn.weight, bn.bias, mean, invstd, alpha, basis, row_task, batch_stats,
                          basis.shape[1] <= KEEP_BUCKETS_MAX_BASIS)[0]
