"""Task Adaptive Layer (TAL) of TAAN and its functional regularisers.

A TAL shares the affine map of ``nn.Linear`` / ``nn.Conv2d`` across all tasks and gives
each task t its own piecewise-linear activation over a shared basis:

    a   = W x + b                      (optionally batch-normed)
    h_t = f_t(a) = relu(a) + sum_m alpha[t, m] relu(basis_m - a)

``alpha`` [T, M] ~ 0.01 N(0, 1) and ``basis`` [1, M] ~ U(-0.5, 0.5) are the only
task-specific parameters. The activation is computed exactly without building a
[..., M] tensor (see `Layers._tal_kernel`).

Functional regularisers treat f_t as functions of z ~ N(0, 1) (c0 = 1/sqrt(2 pi); the
original code rounds it to 0.4, our default for fidelity):

    G[m, n] = E[relu(b_m - z) relu(b_n - z)] = (1 + b_m b_n) Phi(lo) + c0 hi exp(-lo^2 / 2)
    u_m     = E[relu(z) relu(b_m - z)]        = (c0 b_m + 1/2 - Phi(b_m)) 1[b_m > 0]
    D[i, j] = (alpha_i - alpha_j)^T G (alpha_i - alpha_j)   = E[(f_i(z) - f_j(z))^2]
    K[i, j] = 1/2 + (alpha_i + alpha_j)^T u + alpha_i^T G alpha_j = E[f_i(z) f_j(z)]
    C       = K / sqrt(diag K diag K^T)

with lo, hi = min, max(b_m, b_n). Regularisers (``regularize=``, case-insensitive):

* ``'distance'``  (L_2N): mean(D)
* ``'cosine'``    (L_Cos): -mean(C), exact u, gradient through everything
* ``'cosine_original'``: the original code's variant: u multiplied by relu(b_m) instead
  of 1[b_m > 0]; u, G and the normaliser detached
* ``'tracenorm'``: the trace (nuclear) norm ||alpha||_* = sum of singular values
* ``'tracenorm_original'``: the original code's sum of row norms sum_t ||alpha_t||_2
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._tal_kernel import fused_batchnorm_applies, tal_activation, tal_batchnorm_activation  # noqa: F401 (public)
from ._tasks import parse_task, check_width

C0_ORIGINAL = 0.4                      # the original code's rounding of 1/sqrt(2 pi)
C0_EXACT = 1.0 / math.sqrt(2.0 * math.pi)
REGULARIZERS = ("tracenorm", "tracenorm_original", "distance", "cosine", "cosine_original")
PAPER_REGULARIZERS = ("tracenorm", "distance", "cosine")   # the paper's names; two have an "_original" variant


def layer_regularizer(name, original_variant=False):
    """A regulariser's name as a command line gives it -> the layers' ``regularize=``:
    None for None or 'none'; with ``original_variant`` the original code's formula where it
    differs from the paper's ('tracenorm' -> 'tracenorm_original', 'cosine' -> 'cosine_original')."""
    if name is None or str(name).lower() == "none":
        return None
    name = str(name).lower()
    if name not in PAPER_REGULARIZERS:
        raise ValueError(f"unknown regulariser {name!r}; choose none or one of {', '.join(PAPER_REGULARIZERS)}")
    return f"{name}_original" if original_variant and f"{name}_original" in REGULARIZERS else name


# ------------------------------------------------------------------------ closed forms
def _Phi(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def basis_gram(basis, c0=C0_ORIGINAL):
    """G[m, n] = E[relu(b_m - z) relu(b_n - z)], z ~ N(0, 1); basis [1, M] or [M]."""
    b = basis.reshape(-1)
    lo = torch.minimum(b[:, None], b[None, :])
    hi = torch.maximum(b[:, None], b[None, :])
    return (1 + b[:, None] * b[None, :]) * _Phi(lo) + c0 * hi * torch.exp(-0.5 * lo ** 2)


def basis_relu_moment(basis, c0=C0_ORIGINAL, original=False):
    """u_m = E[relu(z) relu(b_m - z)] = (c0 b_m + 1/2 - Phi(b_m)) 1[b_m > 0].
    ``original=True`` multiplies by relu(b_m) instead, as the original code does."""
    b = basis.reshape(-1)
    core = c0 * b + 0.5 - _Phi(b)
    return core * (F.relu(b) if original else (b > 0).to(b.dtype))


def _params(alpha, basis, c0):
    """Accept either (alpha, basis) or a TAL layer as the first argument."""
    if isinstance(alpha, nn.Module):
        layer = alpha
        return layer.alpha, layer.basis, (layer.c0 if c0 is None else c0)
    if basis is None:
        raise ValueError("pass a TAL layer, or both alpha [T, M] and basis [1, M]")
    return alpha, basis, (C0_ORIGINAL if c0 is None else c0)


def task_distance_matrix(alpha, basis=None, c0=None):
    """D[i, j] = E[(f_i(z) - f_j(z))^2] for z ~ N(0, 1): a [T, T] tensor.
    ``alpha`` may be a TAL layer (then its basis and c0 are used)."""
    alpha, basis, c0 = _params(alpha, basis, c0)
    G = basis_gram(basis, c0)
    diff = alpha[None, :, :] - alpha[:, None, :]                    # [T, T, M]
    return ((diff @ G) * diff).sum(-1)


def task_inner_product_matrix(alpha, basis=None, c0=None, original=False):
    """K[i, j] = E[f_i(z) f_j(z)] for z ~ N(0, 1): a [T, T] tensor."""
    alpha, basis, c0 = _params(alpha, basis, c0)
    G, u = basis_gram(basis, c0), basis_relu_moment(basis, c0, original)
    if original:
        G, u = G.detach(), u.detach()
    au = alpha @ u
    return 0.5 + au[:, None] + au[None, :] + alpha @ G @ alpha.t()


def task_cosine_matrix(alpha, basis=None, c0=None, original=False):
    """C[i, j] = K[i, j] / sqrt(K[i, i] K[j, j]): the cosine similarity of the task
    activations as functions of z ~ N(0, 1). ``original=True`` reproduces the original
    code (relu(b) factor in u; u, G and the normaliser detached)."""
    K = task_inner_product_matrix(alpha, basis, c0, original)
    norm = torch.sqrt(torch.diagonal(K))
    if original:
        norm = norm.detach()
    return K / norm[:, None] / norm[None, :]


def LossTraceNorm(matrix):
    """The original code's 'trace norm': sum of the row L2 norms, sum_t ||alpha_t||_2."""
    return torch.sqrt(torch.diagonal(matrix @ matrix.t())).sum()


def LossNuclearNorm(matrix):
    """The trace (nuclear) norm ||alpha||_* = sum of singular values."""
    return torch.linalg.matrix_norm(matrix, ord="nuc")


def LossDis(alpha, basis, c0=C0_ORIGINAL):
    """Distance regulariser L_2N: returns (mean(D), D) like the original."""
    D = task_distance_matrix(alpha, basis, c0)
    return D.mean(), D


def LossCosine(alpha, basis, c0=C0_ORIGINAL, original=False):
    """Cosine regulariser L_Cos: returns (-mean(C), C) like the original.
    ``original=True`` gives the original code's formula exactly."""
    C = task_cosine_matrix(alpha, basis, c0, original)
    return -C.mean(), C


def tal_regularizer(name, alpha, basis, c0=C0_ORIGINAL):
    """The value of the regulariser `name` (see the module docstring; None: 0.) for alpha
    [T, M] and basis [1, M]: what a TAL layer's regularization(1) returns."""
    name = _regularizer(name)
    if name is None:
        return 0.
    if name == "tracenorm":
        return LossNuclearNorm(alpha)
    if name == "tracenorm_original":
        return LossTraceNorm(alpha)
    if name == "distance":
        return LossDis(alpha, basis, c0)[0]
    return LossCosine(alpha, basis, c0, original=name == "cosine_original")[0]


def _regularizer(name):
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in REGULARIZERS:
        raise ValueError(f"unknown regularize={name!r}; choose None or one of {', '.join(REGULARIZERS)}")
    return name.lower()


# ------------------------------------------------------------------------ layers
class _TAL:
    """What TAL_Linear and TAL_Conv2d share: parameters, task modes, regularisation."""

    def _init_tal(self, out_size, basis, tasks, bn_layer, dropout, normalize, regularize, c0):
        if int(tasks) < 1 or int(basis) < 1:
            raise ValueError(f"tasks and basis must be >= 1, got tasks={tasks}, basis={basis}")
        self.alpha = nn.Parameter(0.01 * torch.randn(tasks, basis))
        self.basis = nn.Parameter(torch.rand(1, basis) - 0.5)
        self.tasks, self.dropout, self.normalize = tasks, dropout, normalize
        self.regularize = regularize
        self._reg = _regularizer(regularize)
        self.c0 = c0
        self.bn = bn_layer(out_size) if bn_layer is not None else None

    def regularization(self, c):
        """c * L for the configured regulariser; the float 0. when there is none."""
        if self._reg is None:
            return 0.
        return c * tal_regularizer(self._reg, self.alpha, self.basis, self.c0)

    def task_distance(self):
        """The [T, T] matrix E[(f_i(z) - f_j(z))^2] of this layer."""
        return task_distance_matrix(self)

    def task_cosine(self):
        """The [T, T] cosine similarity matrix of this layer's task activations."""
        return task_cosine_matrix(self)

    def _tal_forward(self, x, task, per_row, feature_dims, affine):
        name = type(self).__name__
        spec = parse_task(task, self.tasks, x, feature_dims, per_row, name)
        check_width(x, self._in_size, -feature_dims, name, "features" if feature_dims == 1 else "channels")
        alpha = self.alpha
        if self.normalize:
            with torch.no_grad():
                self.alpha.div_(self.alpha.norm(dim=-1, keepdim=True))
            alpha = self.alpha.clone()     # what this call's backward uses, whatever later calls rescale
        B, multi = x.shape[0], spec.kind == "multi"
        a = affine(x.flatten(0, 1) if multi and not spec.shared else x)      # [rows, *out]
        ids = spec.ids.expand(B) if spec.kind == "single" else spec.ids
        if self.bn is not None:
            if not multi and fused_batchnorm_applies(a, self.bn):            # batch norm in the kernel
                return self._dropout(tal_batchnorm_activation(a, self.bn, alpha, self.basis, ids))
            a = self.bn(a)
        if not multi:
            return self._dropout(tal_activation(a, alpha, self.basis, ids))
        k, out_shape = spec.k, a.shape[1:]
        n = math.prod(out_shape)                           # explicit sizes: B may be 0
        a = a.reshape(B, 1 if spec.shared else k, n).expand(B, k, n).reshape(B * k, n)
        return self._dropout(tal_activation(a, alpha, self.basis, ids.repeat(B)).view(B, k, *out_shape))

    def _dropout(self, h):
        return F.dropout(h, p=0.5, training=self.training) if self.dropout else h

    def output_num(self):
        return self._out_size, ()

    def extra_repr(self):
        return (f"{super().extra_repr()}, basis={self.alpha.shape[1]}, tasks={self.tasks}, "
                f"regularize={self.regularize}")


class TAL_Linear(_TAL, nn.Linear):
    """``nn.Linear`` with a per-task adaptive activation (TAAN, eq. h_t = f_t(Wx + b)).

    forward(x, task, per_row=False):
      * task int: x [B, in] -> [B, out]
      * task LongTensor [k]: x [B, in] (shared) or [B, k, in] -> [B, k, out]
      * per_row=True, task LongTensor [B]: x [B, in] -> [B, out], row i for task task[i]
    """

    def __init__(self, in_features, out_features, basis, tasks, bias=True, bn=False,
                 dropout=False, normalize=False, regularize=None, *, c0=C0_ORIGINAL):
        super().__init__(in_features, out_features, bias)
        self._in_size, self._out_size = in_features, out_features
        self._init_tal(out_features, basis, tasks, nn.BatchNorm1d if bn else None,
                       dropout, normalize, regularize, c0)

    def forward(self, x, task, per_row=False):
        return self._tal_forward(x, task, per_row, 1, lambda v: F.linear(v, self.weight, self.bias))


class TAL_Conv2d(_TAL, nn.Conv2d):
    """``nn.Conv2d`` with a per-task adaptive activation; BatchNorm2d on by default.

    forward(x, task, per_row=False):
      * task int: x [B, C, H, W] -> [B, C', H', W']
      * task LongTensor [k]: x [B, C, H, W] (shared) or [B, k, C, H, W] -> [B, k, C', H', W']
      * per_row=True, task LongTensor [B]: x [B, C, H, W] -> [B, C', H', W']
    """

    def __init__(self, in_channels, out_channels, kernel_size, basis, tasks, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode='zeros', bn=True, dropout=False,
                 normalize=False, regularize=None, *, c0=C0_ORIGINAL):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
        self._in_size, self._out_size = in_channels, out_channels
        self._init_tal(out_channels, basis, tasks, nn.BatchNorm2d if bn else None,
                       dropout, normalize, regularize, c0)

    def forward(self, x, task, per_row=False):
        return self._tal_forward(x, task, per_row, 3, lambda v: self._conv_forward(v, self.weight, self.bias))
