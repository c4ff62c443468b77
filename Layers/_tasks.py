"""The `task` argument shared by every multi-task layer.

A multi-task layer is called as ``layer(x, task)`` or ``layer(x, task, per_row=True)``:

* ``task`` an int ``t``: ``x`` is ``[B, *features]``, the output is that of task ``t``.
* ``task`` a 1-D LongTensor of ``k`` ids: ``x`` is ``[B, *features]`` (one input shared
  by the ``k`` tasks) or ``[B, k, *features]`` (one input per task); the output is
  ``[B, k, *out]``.
* ``per_row=True``: ``task`` is a LongTensor ``[B]`` giving the task of each row of
  ``x = [B, *features]``; the output is ``[B, *out]``, row ``i`` computed for task
  ``task[i]``. This lets a model push every task's batch through a shared layer in one
  call.

`parse_task` checks all of this once and returns a `TaskSpec`, so the layers never
fail silently on a bad id or shape.
"""
from dataclasses import dataclass
import functools
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair


@dataclass
class TaskSpec:
    kind: str              # 'single', 'multi' or 'rows'
    ids: torch.Tensor      # LongTensor of task ids on x's device ([1], [k] or [B])
    shared: bool = False   # 'multi' only: one input shared by the k tasks

    @property
    def k(self):
        return self.ids.numel()


def check_task_range(ids, num_tasks, error=IndexError, owner="this layer was built for"):
    """Every id in 0..num_tasks-1. In an eager call on the CPU at once (`error`, saying "...
    but {owner} N tasks"). On a GPU, and inside a compiled model, without waiting for the
    device, as PyTorch checks its own indices there: a device-side assert (reading the ids
    back would stall the device's queue at every call, and break a compiled graph), so a bad
    id stops the run at its next synchronisation."""
    if torch.compiler.is_compiling() or ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < num_tasks)).all(),
                            f"task id out of range: {owner} {num_tasks} tasks (valid ids 0..{num_tasks - 1})")
        return
    if not ids.numel():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tasks:
        raise error(f"task id out of range: got ids in [{lo}, {hi}], "
                    f"but {owner} {num_tasks} tasks (valid ids 0..{num_tasks - 1})")


def parse_task(task, num_tasks, x, feature_dims, per_row=False, name="layer"):
    """Validate ``(x, task)`` for a layer whose input has ``feature_dims`` trailing
    feature dimensions (1 for Linear, 3 for Conv2d) and return a `TaskSpec`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not per_row:
        if not torch.compiler.is_compiling():
            task = task.item()
        elif not (task.is_floating_point() or task.is_complex() or task.dtype == torch.bool):
            return _single(task.reshape(1).to(device=x.device, dtype=torch.long), num_tasks, x, feature_dims, name)
    if per_row:
        if not isinstance(task, torch.Tensor) or task.dim() != 1:
            raise TypeError(f"{name}: per_row=True needs task as a 1-D LongTensor with one id per row, "
                            f"got {task!r}")
    if isinstance(task, torch.Tensor):
        if task.dtype in (torch.bool,) or task.is_floating_point() or task.is_complex():
            raise TypeError(f"{name}: task ids must be integers (a LongTensor), got dtype {task.dtype}")
        if task.dim() != 1:
            raise ValueError(f"{name}: task must be an int or a 1-D tensor of ids, got shape {tuple(task.shape)}")
        ids = task.to(device=x.device, dtype=torch.long)
        check_task_range(ids, num_tasks)
        if per_row:
            if x.dim() != 1 + feature_dims or x.shape[0] != ids.numel():
                raise ValueError(f"{name}: per_row=True needs x of shape [B, ...] ({1 + feature_dims} dims) "
                                 f"and one task id per row; got x {tuple(x.shape)} and {ids.numel()} ids")
            return TaskSpec("rows", ids)
        if x.dim() == 1 + feature_dims:
            return TaskSpec("multi", ids, shared=True)
        if x.dim() == 2 + feature_dims:
            if x.shape[1] != ids.numel():
                raise ValueError(f"{name}: x is [B, k, ...] with k={x.shape[1]} but {ids.numel()} task ids "
                                 f"were given; they must match")
            return TaskSpec("multi", ids, shared=False)
        raise ValueError(f"{name}: with a tensor of task ids x must have {1 + feature_dims} dims (shared input) "
                         f"or {2 + feature_dims} dims ([B, k, ...]), got shape {tuple(x.shape)}")
    if task is None or isinstance(task, (bool, float)):
        raise TypeError(f"{name}: task must be an int or a LongTensor of task ids, got {task!r}")
    try:
        t = operator.index(task)
    except TypeError:
        raise TypeError(f"{name}: task must be an int or a LongTensor of task ids, got {type(task).__name__}") from None
    if not 0 <= t < num_tasks:
        raise IndexError(f"{name}: task id {t} out of range; this layer was built for {num_tasks} tasks "
                         f"(valid ids 0..{num_tasks - 1})")
    ids = torch.tensor([t], device=x.device) if torch.compiler.is_compiling() else _id_tensor(t, x.device)
    return _single(ids, None, x, feature_dims, name)


@functools.lru_cache(maxsize=4096)
def _id_tensor(t, device):
    """The LongTensor [t] on `device`, made once (an int task needs it at every call; the
    layers never write into it)."""
    return torch.tensor([t], device=device)


def _single(ids, num_tasks, x, feature_dims, name):
    """The TaskSpec of one task id (ids [1]; its range checked here unless num_tasks is None)."""
    if num_tasks is not None:
        check_task_range(ids, num_tasks)
    if x.dim() != 1 + feature_dims:
        raise ValueError(f"{name}: with an int task x must have {1 + feature_dims} dims, got shape "
                         f"{tuple(x.shape)} (a [B, k, ...] input needs a tensor of k task ids)")
    return TaskSpec("single", ids)


def check_width(x, expected, dim, name, what="features"):
    """Clear error for an input whose feature width does not match the layer."""
    if x.shape[dim] != expected:
        raise ValueError(f"{name}: expected {expected} input {what} in dim {dim}, got x of shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------
# Helpers shared by the multi-task layers: run the k tasks of a call in one batched op.

def rows_by_task(ids):
    """Group the rows of a per-row task vector without a Python loop.

    Returns (tasks, group, slot, size): `tasks` the distinct ids (sorted), row i belongs
    to group `group[i]` (its task is tasks[group[i]]) at position `slot[i]` within it,
    and `size` is the largest group. Scattering row i to [group[i], slot[i]] of a
    zero-padded [len(tasks), size, ...] tensor lines the rows up for one batched op."""
    tasks, group, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sorted_group, order = torch.sort(group, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(ids.numel(), device=ids.device) - start[sorted_group]
    return tasks, group, slot, int(counts.max())


# Per-row tasks with per-task weights: how many rows each task has is only known from the ids'
# values, so the grouping runs inside registered operators, which a compiled model calls as
# single nodes of fixed output shape (no graph break, no data-dependent shapes).

@torch.library.custom_op("taan::rows_linear", mutates_args=())
def rows_linear(h: Tensor, ids: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-row task linear maps: y[i] = h[i] @ weight[ids[i]]^T + bias[ids[i]] for h [B, r],
    ids [B], weight [T, out, r] (nn.Linear's layout per task), bias [T, out] or None. The rows
    of each task present are lined up in a zero-padded [k, rows, r] tensor and multiplied in
    one batched product; a registered operator, so torch.compile needs no sizes from the ids."""
    if not ids.numel():
        return h.new_zeros(0, weight.shape[1])
    tasks, group, slot, size = rows_by_task(ids)
    H = h.new_zeros(len(tasks), size, h.shape[-1])
    H[group, slot] = h
    M = weight[tasks].transpose(1, 2)
    Y = torch.bmm(H, M) if bias is None else torch.baddbmm(bias[tasks].unsqueeze(1), H, M)
    return Y[group, slot]


@rows_linear.register_fake
def _rows_linear_fake(h, ids, weight, bias):
    return h.new_empty(h.shape[0], weight.shape[1])


@torch.library.custom_op("taan::rows_linear_backward", mutates_args=())
def _rows_linear_backward(grad: Tensor, h: Tensor, ids: Tensor, weight: Tensor,
                          with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of h [B, r], weight [T, out, r] and bias [T, out] ([0] without a bias)."""
    T, out = weight.shape[:2]
    grad_h, grad_w = h.new_zeros(h.shape), weight.new_zeros(weight.shape)
    grad_b = weight.new_zeros((T, out) if with_bias else (0,))
    if ids.numel():
        tasks, group, slot, size = rows_by_task(ids)
        H = h.new_zeros(len(tasks), size, h.shape[-1])
        H[group, slot] = h
        G = grad.new_zeros(len(tasks), size, out)
        G[group, slot] = grad
        grad_h = torch.bmm(G, weight[tasks])[group, slot]
        grad_w[tasks] = torch.bmm(G.transpose(1, 2), H)
        if with_bias:
            grad_b[tasks] = G.sum(1)
    return grad_h, grad_w, grad_b


@_rows_linear_backward.register_fake
def _rows_linear_backward_fake(grad, h, ids, weight, with_bias):
    T, out = weight.shape[:2]
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty((T, out) if with_bias else (0,))


def _rows_linear_setup(ctx, inputs, output):
    h, ids, weight, bias = inputs
    ctx.with_bias = bias is not None
    ctx.save_for_backward(h, ids, weight)


def _rows_linear_grad(ctx, grad):
    h, ids, weight = ctx.saved_tensors
    grad_h, grad_w, grad_b = _rows_linear_backward(grad, h, ids, weight, ctx.with_bias)
    return grad_h, None, grad_w, (grad_b if ctx.with_bias else None)


rows_linear.register_autograd(_rows_linear_grad, setup_context=_rows_linear_setup)


def _grid(x, ids):
    """(tasks, group, slot, X): the rows x [B, C, H, W] of each task present in channel group j
    of X [rows, k * C, H, W] (zero-padded)."""
    tasks, group, slot, size = rows_by_task(ids)
    X = x.new_zeros(size, len(tasks), *x.shape[1:])
    X[slot, group] = x
    return tasks, group, slot, X.view(size, -1, *x.shape[2:])


@torch.library.custom_op("taan::rows_conv2d", mutates_args=())
def rows_conv2d(x: Tensor, ids: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """y[i] = conv2d(x[i], weight[ids[i]]) + bias[ids[i]] for x [B, C, H, W], ids [B], weight
    [T, out, C / groups, kh, kw]: the rows of the k tasks present as one grouped convolution."""
    T, out = weight.shape[:2]
    if not ids.numel():
        return x.new_zeros(_conv_out_shape(x, weight, stride, padding, dilation))
    tasks, group, slot, X = _grid(x, ids)
    K = weight[tasks]
    y = F.conv2d(X, K.reshape(-1, *K.shape[2:]), None if bias is None else bias[tasks].reshape(-1),
                 stride, padding, dilation, len(tasks) * groups)
    return y.view(y.shape[0], len(tasks), out, *y.shape[2:])[slot, group]


def _conv_out_shape(x, weight, stride, padding, dilation):
    """[B, out, H', W'] of a convolution of x [B, C, H, W] with kernels [T, out, C/g, kh, kw]."""
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(x.shape[2:], weight.shape[3:], stride, padding, dilation)]
    return (x.shape[0], weight.shape[1], *size)


@rows_conv2d.register_fake
def _rows_conv2d_fake(x, ids, weight, bias, stride, padding, dilation, groups):
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation))


@torch.library.custom_op("taan::rows_conv2d_backward", mutates_args=())
def _rows_conv2d_backward(grad: Tensor, x: Tensor, ids: Tensor, weight: Tensor, with_bias: bool, stride: list[int],
                          padding: list[int], dilation: list[int], groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, weight and bias ([0] without a bias) of `rows_conv2d`."""
    from torch.nn.grad import conv2d_input, conv2d_weight
    T, out = weight.shape[:2]
    grad_x, grad_w = x.new_zeros(x.shape), weight.new_zeros(weight.shape)
    grad_b = weight.new_zeros((T, out) if with_bias else (0,))
    if ids.numel():
        tasks, group, slot, X = _grid(x, ids)
        k = len(tasks)
        G = grad.new_zeros(X.shape[0], k, *grad.shape[1:])
        G[slot, group] = grad
        G = G.view(X.shape[0], k * out, *grad.shape[2:])
        K = weight[tasks].reshape(k * out, *weight.shape[2:])
        grad_X = conv2d_input(X.shape, K, G, stride, padding, dilation, k * groups)
        grad_x = grad_X.view(X.shape[0], k, *x.shape[1:])[slot, group]
        grad_w[tasks] = conv2d_weight(X, K.shape, G, stride, padding, dilation, k * groups).view(k, *weight.shape[1:])
        if with_bias:
            grad_b[tasks] = G.sum((0, 2, 3)).view(k, out)
    return grad_x, grad_w, grad_b


@_rows_conv2d_backward.register_fake
def _rows_conv2d_backward_fake(grad, x, ids, weight, with_bias, stride, padding, dilation, groups):
    T, out = weight.shape[:2]
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((T, out) if with_bias else (0,))


def _rows_conv2d_setup(ctx, inputs, output):
    x, ids, weight, bias, stride, padding, dilation, groups = inputs
    ctx.with_bias, ctx.conv = bias is not None, (stride, padding, dilation, groups)
    ctx.save_for_backward(x, ids, weight)


def _rows_conv2d_grad(ctx, grad):
    x, ids, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _rows_conv2d_backward(grad, x, ids, weight, ctx.with_bias, *ctx.conv)
    return grad_x, None, grad_w, (grad_b if ctx.with_bias else None), None, None, None, None


rows_conv2d.register_autograd(_rows_conv2d_grad, setup_context=_rows_conv2d_setup)

ALL_TASKS = slice(None)     # what `weights` / `kernels` get for the per-row mode: every task's


def task_linear(h, spec, weights):
    """y = h @ M_t + b_t for the tasks of `spec` (a TaskSpec from parse_task).

    `weights(ids)` returns (M [k, r, out], b [k, out] or None) for a LongTensor of k ids, or
    for ALL_TASKS (a slice) every task's. h is [B, r] (int task, shared input, per-row tasks)
    or [B, k, r] (one input per task). Output: [B, out] for an int task or per-row tasks,
    [B, k, out] for k ids."""
    if spec.kind == 'rows':
        M, b = weights(ALL_TASKS)
        return rows_linear(h, spec.ids, M.transpose(1, 2), b)
    M, b = weights(spec.ids)
    k, r, out = M.shape
    if spec.kind == 'single':
        y = h @ M[0]
    elif spec.shared:     # one GEMM for all k tasks
        y = (h @ M.transpose(0, 1).reshape(r, k * out)).view(-1, k, out)
    else:                 # [B, k, r]: one batched matmul over the task dim
        y = torch.bmm(h.transpose(0, 1), M).transpose(0, 1)
    if b is not None:
        y = y + (b[0] if spec.kind == 'single' else b)
    return y


def task_conv2d(x, spec, kernels, stride, padding, dilation, groups):
    """Per-task 2-D convolution for the tasks of `spec`, as one grouped convolution.

    `kernels(ids)` returns (K [k, out, C/groups, kh, kw], b [k, out] or None), for ids as in
    `task_linear`. The k inputs
    are stacked along channels and convolved with groups = k * groups, so task j only
    sees its own input channels. x is [B, C, H, W] (int task, shared, per-row) or
    [B, k, C, H, W]; output [B, out, H', W'] or [B, k, out, H', W']."""
    def stacked(X, K, b):     # X [N, k, C, H, W] -> [N, k, out, H', W']
        N, k = X.shape[:2]
        y = F.conv2d(X.reshape(N, k * X.shape[2], *X.shape[3:]), K.reshape(-1, *K.shape[2:]),
                     None if b is None else b.reshape(-1), stride, padding, dilation, k * groups)
        return y.view(N, k, K.shape[1], *y.shape[2:])

    if spec.kind == 'single':
        K, b = kernels(spec.ids)
        return F.conv2d(x, K[0], None if b is None else b[0], stride, padding, dilation, groups)
    if spec.kind == 'rows':
        return rows_conv2d(x, spec.ids, *kernels(ALL_TASKS), list(_pair(stride)), list(_pair(padding)),
                           list(_pair(dilation)), groups)
    K, b = kernels(spec.ids)
    X = x.unsqueeze(1).expand(-1, spec.k, *x.shape[1:]) if spec.shared else x
    return stacked(X, K, b)
