"""Multilinear Relationship Network layers (Long et al., NIPS 2017).

Every task t has its own weights W_t (a Linear or a Conv2d). Stacked, they form the
tensor W of shape [T, out, in] (for a convolution `in` is in_channels/groups * kh * kw).
MRN puts a tensor normal prior on W whose covariance is the Kronecker product of a task,
an output-feature and an input-feature covariance. With the precision matrices
(inverse covariances) Omega_T [T, T], Omega_C [out, out] and Omega_F [in, in], the
negative log prior is the penalty

    L(W) = vec(W)^T (Omega_T kron Omega_C kron Omega_F) vec(W)
         = sum_{t,o,i} W[t,o,i] * (W x_0 Omega_T x_1 Omega_C x_2 Omega_F)[t,o,i]

(x_n is the mode-n product, vec the row-major flattening), which `regularization(c)`
returns times c. `update()` re-estimates the precision matrices from the current W
(see its docstring); the trainers call it every `update_interval` iterations.

The k tasks of one call are computed together: one GEMM / batched matmul for Linear,
one grouped convolution for Conv2d; never a Python loop over tasks or rows.
"""
import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from Layers._tasks import parse_task, check_width, task_linear, task_conv2d

EPSILON = 1e-5        # ridge added to the covariance estimate before inverting it
TRACE_LIMIT = 3000.0  # precision matrices are rescaled so that their trace is at most this
SMALL_SINGULAR = 0.1  # singular values above this are inverted, the others kept
INPUT_STEP = 0.0003   # the input-feature precision moves by this times its new estimate


# ----------------------------------------------------------------------------------------
# Tensor-normal prior on the stacked weights.

def mode_product(W, A, mode):
    """(W x_mode A)[..., a, ...] = sum_j A[a, j] W[..., j, ...]."""
    return torch.movedim(torch.tensordot(A, W, dims=([1], [mode])), 0, mode)


def unfold(W, mode):
    """Mode-n unfolding: move `mode` first and flatten the rest (row-major)."""
    return torch.movedim(W, mode, 0).reshape(W.shape[mode], -1)


def covariance_estimate(W, mode, omegas):
    """S = W_(n) (Omega_a kron Omega_b) W_(n)^T + 1e-5 I for mode n, where a < b are the
    two other modes; computed with mode products, the Kronecker product is never built."""
    Z = W
    for m in range(W.dim()):
        if m != mode:
            Z = mode_product(Z, omegas[m], m)
    S = unfold(W, mode) @ unfold(Z, mode).T
    return S + EPSILON * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)


def precision_from(S):
    """SVD S = U diag(s) V^T; s -> 1/s where s > 0.1, else kept; rebuild; if the trace
    exceeds 3000 rescale the matrix to trace 3000."""
    U, s, Vh = torch.linalg.svd(S)
    s = torch.where(s > SMALL_SINGULAR, 1.0 / s, s)
    P = (U * s) @ Vh
    trace = torch.trace(P)
    return P * torch.where(trace > TRACE_LIMIT, TRACE_LIMIT / trace, torch.ones_like(trace))


class _MRNBase(nn.Module):
    """Precision matrices, penalty and their update for a layer with per-task weights.
    Subclasses define `weight_tensor()` -> W [T, out, in]."""

    def _init_mrn(self, tasks, out_size, in_size, dropout, regularization_task,
                  regularization_feature, regularization_input, update_interval):
        self.num_tasks = tasks
        self.regularization_task = regularization_task
        self.regularization_feature = regularization_feature
        self.regularization_input = regularization_input
        self.update_interval = update_interval   # read by after_step
        self.dropout = nn.Dropout(p=0.5) if dropout else None
        self.register_buffer('task_cov', torch.eye(tasks))        # Omega_T
        self.register_buffer('class_cov', torch.eye(out_size))    # Omega_C
        self.register_buffer('feature_cov', torch.eye(in_size))   # Omega_F

    def _omegas(self):
        return [self.task_cov, self.class_cov, self.feature_cov]

    def regularization(self, c):
        """c * vec(W)^T (Omega_T kron Omega_C kron Omega_F) vec(W); the float 0. if c == 0."""
        if c == 0:
            return 0.
        W = self.weight_tensor()
        Z = W
        for mode, omega in enumerate(self._omegas()):
            Z = mode_product(Z, omega, mode)
        return c * (W * Z).sum()

    def after_step(self, iteration):
        """Call after every optimizer step: `update()` every `update_interval` steps."""
        if iteration % self.update_interval == 0:
            self.update()

    @torch.no_grad()
    def update(self):
        """Re-estimate the enabled precision matrices from the current weights W.

        In this order (each step uses the matrices already updated):
          task:   Omega_T  = g(W_(0) (Omega_C kron Omega_F) W_(0)^T + 1e-5 I)
          output: Omega_C  = g(W_(1) (Omega_T kron Omega_F) W_(1)^T + 1e-5 I)
          input:  Omega_F += 0.0003 * g(W_(2) (Omega_T kron Omega_C) W_(2)^T + 1e-5 I)
        where g takes the SVD, maps each singular value s to 1/s if s > 0.1 (else keeps
        s), rebuilds the matrix and rescales it to trace 3000 if its trace is larger."""
        W = self.weight_tensor().detach().to(self.task_cov.dtype)
        if self.regularization_task:
            self.task_cov.copy_(precision_from(covariance_estimate(W, 0, self._omegas())))
        if self.regularization_feature:
            self.class_cov.copy_(precision_from(covariance_estimate(W, 1, self._omegas())))
        if self.regularization_input:
            self.feature_cov.add_(INPUT_STEP * precision_from(covariance_estimate(W, 2, self._omegas())))


class MRN_Linear(_MRNBase):
    """One linear map per task, tied by the MRN tensor-normal prior.

    For task t:  h = dropout(BN(relu(x W_t^T + b_t)))   (BN and dropout optional).

    Parameters: `weight` [T, out, in] and `bias` [T, out], each task initialised as an
    nn.Linear (U(-1/sqrt(in), 1/sqrt(in)), which is kaiming-uniform with a=sqrt(5)).
    Buffers: `task_cov` [T, T], `class_cov` [out, out], `feature_cov` [in, in], the
    precision matrices Omega_T, Omega_C, Omega_F (identity at start). One BatchNorm1d is
    shared by all tasks (applied to the [B*k, out] rows); dropout p=0.5 in training only.

    forward(x, task, per_row=False): task an int (x [B, in] -> [B, out]), a LongTensor of
    k ids (x [B, in] shared or [B, k, in] -> [B, k, out]), or with per_row=True one id per
    row (x [B, in] -> [B, out]).
    """

    def __init__(self, in_features, out_features, tasks, dropout=True, bn=True, regularization_task=True,
                 regularization_feature=True, regularization_input=True, update_interval=50):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(tasks, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(tasks, out_features))
        self.bn = nn.BatchNorm1d(out_features) if bn else None
        self._init_mrn(tasks, out_features, in_features, dropout, regularization_task,
                       regularization_feature, regularization_input, update_interval)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def weight_tensor(self):
        return self.weight

    def forward(self, x, task, per_row=False):
        spec = parse_task(task, self.num_tasks, x, feature_dims=1, per_row=per_row, name='MRN_Linear')
        check_width(x, self.in_features, x.dim() - 1, 'MRN_Linear')
        y = torch.relu(task_linear(x, spec, lambda ids: (self.weight[ids].transpose(1, 2), self.bias[ids])))
        if self.bn is not None:
            y = self.bn(y.reshape(-1, self.out_features)).view(y.shape)
        if self.dropout is not None:
            y = self.dropout(y)
        return y

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, tasks={self.num_tasks}'


class MRN_Conv2d(_MRNBase):
    """One Conv2d per task, tied by the MRN tensor-normal prior.

    For task t:  h = dropout(BN(relu(conv2d(x, K_t) + b_t)))   (BN2d and dropout optional).

    Parameters: `weight` [T, out, in/groups, kh, kw] and `bias` [T, out] (None if
    bias=False), each task initialised as an nn.Conv2d. For the prior the kernels are
    flattened to W [T, out, in/groups*kh*kw], so `feature_cov` is that size. Inputs:
    as MRN_Linear with [B, C, H, W] per image ([B, k, C, H, W] for one input per task).
    The k tasks of a call run as one grouped convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, tasks, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, dropout=True, bn=True, regularization_task=True,
                 regularization_feature=True, regularization_input=True, update_interval=50):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'MRN_Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must both be divisible by groups ({groups})')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.groups = _pair(padding), _pair(dilation), groups
        self.weight = nn.Parameter(torch.empty(tasks, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(tasks, out_channels)) if bias else None
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_mrn(tasks, out_channels, fan_in, dropout, regularization_task,
                       regularization_feature, regularization_input, update_interval)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.feature_cov.shape[0])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def weight_tensor(self):
        return self.weight.flatten(2)

    def forward(self, x, task, per_row=False):
        spec = parse_task(task, self.num_tasks, x, feature_dims=3, per_row=per_row, name='MRN_Conv2d')
        check_width(x, self.in_channels, x.dim() - 3, 'MRN_Conv2d', what='channels')
        kernels = lambda ids: (self.weight[ids], None if self.bias is None else self.bias[ids])
        y = torch.relu(task_conv2d(x, spec, kernels, self.stride, self.padding, self.dilation, self.groups))
        if self.bn is not None:
            y = self.bn(y.reshape(-1, *y.shape[-3:])).view(y.shape)
        if self.dropout is not None:
            y = self.dropout(y)
        return y

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, tasks={self.num_tasks}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'bias={self.bias is not None}')
