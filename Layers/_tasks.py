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
import operator

import torch
import torch.nn.functional as F


@dataclass
class TaskSpec:
    kind: str              # 'single', 'multi' or 'rows'
    ids: torch.Tensor      # LongTensor of task ids on x's device ([1], [k] or [B])
    shared: bool = False   # 'multi' only: one input shared by the k tasks

    @property
    def k(self):
        return self.ids.numel()


def check_task_range(ids, num_tasks, error=IndexError, owner="this layer was built for"):
    """Every id in 0..num_tasks-1. On the CPU at once (`error`, saying "... but {owner} N
    tasks"); on a GPU without waiting for it, as PyTorch checks its own indices there: reading
    the ids back would stall the device's queue at every call, so a bad id stops the run at
    its next synchronisation with a device-side assert instead."""
    if not ids.numel():
        return
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < num_tasks)).all())
        return
    lo, hi = torch.aminmax(ids)
    if lo < 0 or hi >= num_tasks:
        raise error(f"task id out of range: got ids in [{int(lo)}, {int(hi)}], "
                    f"but {owner} {num_tasks} tasks (valid ids 0..{num_tasks - 1})")


def parse_task(task, num_tasks, x, feature_dims, per_row=False, name="layer"):
    """Validate ``(x, task)`` for a layer whose input has ``feature_dims`` trailing
    feature dimensions (1 for Linear, 3 for Conv2d) and return a `TaskSpec`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not per_row:
        task = task.item()
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
    if x.dim() != 1 + feature_dims:
        raise ValueError(f"{name}: with an int task x must have {1 + feature_dims} dims, got shape "
                         f"{tuple(x.shape)} (a [B, k, ...] input needs a tensor of k task ids)")
    return TaskSpec("single", torch.tensor([t], device=x.device))


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


def task_linear(h, spec, weights):
    """y = h @ M_t + b_t for the tasks of `spec` (a TaskSpec from parse_task).

    `weights(ids)` returns (M [k, r, out], b [k, out] or None) for a LongTensor of k ids.
    h is [B, r] (int task, shared input, per-row tasks) or [B, k, r] (one input per task).
    Output: [B, out] for an int task or per-row tasks, [B, k, out] for k ids."""
    if spec.kind == 'rows':
        tasks, group, slot, size = rows_by_task(spec.ids)
        M, b = weights(tasks)
        H = h.new_zeros(len(tasks), size, h.shape[-1])
        H[group, slot] = h
        Y = torch.bmm(H, M) if b is None else torch.baddbmm(b.unsqueeze(1), H, M)
        return Y[group, slot]
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

    `kernels(ids)` returns (K [k, out, C/groups, kh, kw], b [k, out] or None). The k inputs
    are stacked along channels and convolved with groups = k * groups, so task j only
    sees its own input channels. x is [B, C, H, W] (int task, shared, per-row) or
    [B, k, C, H, W]; output [B, out, H', W'] or [B, k, out, H', W']."""
    def stacked(X, K, b):     # X [N, k, C, H, W] -> [N, k, out, H', W']
        N, k = X.shape[:2]
        y = F.conv2d(X.reshape(N, -1, *X.shape[3:]), K.reshape(-1, *K.shape[2:]),
                     None if b is None else b.reshape(-1), stride, padding, dilation, k * groups)
        return y.view(N, k, K.shape[1], *y.shape[2:])

    if spec.kind == 'single':
        K, b = kernels(spec.ids)
        return F.conv2d(x, K[0], None if b is None else b[0], stride, padding, dilation, groups)
    if spec.kind == 'rows':
        tasks, group, slot, size = rows_by_task(spec.ids)
        K, b = kernels(tasks)
        X = x.new_zeros(size, len(tasks), *x.shape[1:])
        X[slot, group] = x
        return stacked(X, K, b)[slot, group]
    K, b = kernels(spec.ids)
    X = x.unsqueeze(1).expand(-1, spec.k, *x.shape[1:]) if spec.shared else x
    return stacked(X, K, b)
