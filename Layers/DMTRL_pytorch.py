"""Deep Multi-Task Representation Learning layers (Yang & Hospedales, ICLR 2017).

The weights of all tasks form one tensor W of shape [in, out, T] (for a convolution
`in` is in_channels * kh * kw). W is never a parameter itself: it is kept factorised
and rebuilt from its factors, so the tasks share structure through the factors:

  Tucker: W = S x_1 U_0 x_2 U_1 x_3 U_2            S [r1, r2, r3], U_n [n_n, r_n]
          W[i, o, t] = sum_{a,b,c} S[a,b,c] U_0[i,a] U_1[o,b] U_2[t,c]
  TT:     W[i, o, t] = sum_{a,b} U_0[0,i,a] U_1[a,o,b] U_2[b,t,0]   (tensor train)
  LAF:    W.reshape(in*out, T) = U V                U [in*out, r], V [r, T]

The factors come from decomposing W0 = 0.01 * N(0, 1) at construction with truncated
SVDs ranked by the rule of scipy's interpolative SVD (`scipy.linalg.interpolative.svd`,
rand=False, as the original code): eps_or_k = 0.5, a relative precision, for Tucker
(each mode unfolding) and TT (each sequential step), and eps_or_k = 5, a rank, for LAF.
At precision eps the pivoted QR behind it stops at the first rank r at which every
column of the residual (I - U U^T) A has norm at most eps * (the largest column norm of
A); the returned U S V^T is that projection U U^T A.

forward(x, task) = x @ W[:, :, task] + b[:, task]; only the tasks' slices of W are
built (each is W[:, :, t] = A @ M_t with A [in, r] shared by all tasks), never the
whole tensor. No activation inside: the layer replaces nn.Linear.
"""
import numpy as np
import torch
import torch.nn as nn
import scipy.linalg
from torch.nn.modules.utils import _pair

from Layers._tasks import parse_task, check_width, task_linear, task_conv2d
from Layers.MRN_pytorch import unfold

METHODS = ('Tucker', 'TT', 'LAF')
EPS_OR_K = {'Tucker': 0.5, 'TT': 0.5, 'LAF': 5}   # as in the original code


# ----------------------------------------------------------------------------------------
# Decompositions of a numpy array A [n0, n1, n2] (float64), returning named factors.

def truncated_svd(A, eps_or_k):
    """U, s, Vh with U diag(s) Vh = U U^T A, chosen by the rule of scipy's interpolative
    SVD, `scipy.linalg.interpolative.svd(A, eps_or_k, rand=False)`: a column-pivoted QR
    A P = Q R keeps r columns of Q, with r = eps_or_k if eps_or_k >= 1 (a rank), else
    (a relative precision) the smallest r >= 1 at which every remaining residual column
    is at most eps * the largest column norm of A, i.e. |R[r, r]| <= eps |R[0, 0]|
    (r = min(A.shape) if none). Same rule and result, but LAPACK's blocked pivoted QR
    makes it about 10x faster than scipy's unblocked one on a [1024, 16384] unfolding.

    The SVD of the projection Q_r Rr (Rr = Q_r^T A, r x n) comes from the small symmetric
    eigenproblem Rr Rr^T = E diag(s^2) E^T: U = Q_r E, Vh = diag(1/s) E^T Rr. That costs two
    products of Rr instead of an SVD of the n x r matrix (a [1024, 1024, 16] Tucker layer:
    seconds instead of a minute); with a precision, the pivoted QR's rule keeps Rr well
    conditioned, so squaring it loses nothing measurable (tests compare with scipy to 1e-10).
    A rank above A's own gives singular values 0: their rows of Vh are 0 (any unit row would
    do, as U diag(s) Vh is the same)."""
    A = np.asarray(A, dtype=np.float64)
    Q, R, piv = scipy.linalg.qr(A, mode='economic', pivoting=True)
    d = np.abs(np.diag(R))
    if eps_or_k >= 1:
        r = int(eps_or_k)
        if r > len(d):
            raise ValueError(f'rank {r} exceeds min(A.shape) = {len(d)}')
    else:
        small = np.flatnonzero(d[1:] <= eps_or_k * d[0])
        r = int(small[0]) + 1 if len(small) else len(d)
    Rr = np.empty((r, A.shape[1]))
    Rr[:, piv] = R[:r]                       # undo the column pivoting: Q_r Rr = Q_r Q_r^T A
    w, E = np.linalg.eigh(Rr @ Rr.T)
    w, E = w[::-1], E[:, ::-1]               # descending, as an SVD
    s = np.sqrt(np.maximum(w, 0.0))
    Vh = np.divide(E.T @ Rr, s[:, None], out=np.zeros((r, A.shape[1])), where=s[:, None] > 0)
    return Q[:, :r] @ E, s, Vh


def _unfold_np(A, mode):
    return np.moveaxis(A, mode, 0).reshape(A.shape[mode], -1)


def tucker_decompose(A, eps_or_k):
    """U_n = left singular vectors of the mode-n unfolding, S = A x_1 U_0^T x_2 U_1^T x_3 U_2^T."""
    U = [truncated_svd(_unfold_np(A, n), eps_or_k)[0] for n in range(3)]
    S = np.einsum('iot,ia,ob,tc->abc', A, U[0], U[1], U[2], optimize=True)
    return {'U_0': U[0], 'U_1': U[1], 'U_2': U[2], 'S': S}


def tt_decompose(A, eps_or_k):
    """Tensor train by successive truncated SVDs: cores U_n [r_n, n_n, r_{n+1}], r_0 = r_3 = 1."""
    cores, r, C = [], 1, A
    for n in range(A.ndim - 1):
        U, s, Vh = truncated_svd(C.reshape(r * A.shape[n], -1), eps_or_k)
        cores.append(U.reshape(r, A.shape[n], U.shape[1]))
        r, C = U.shape[1], s[:, None] * Vh
    cores.append(C.reshape(r, A.shape[-1], 1))
    return {f'U_{n}': core for n, core in enumerate(cores)}


def laf_decompose(A, rank):
    """Last axis flattening: A.reshape(n0*n1, n2) = U V with V = diag(s) Vh, of rank
    min(rank, n0*n1, n2)."""
    M = A.reshape(-1, A.shape[-1])
    U, s, Vh = truncated_svd(M, min(rank, *M.shape))
    return {'U': U, 'V': s[:, None] * Vh}


def decompose(A, method):
    if method == 'Tucker':
        return tucker_decompose(A, EPS_OR_K[method])
    if method == 'TT':
        return tt_decompose(A, EPS_OR_K[method])
    return laf_decompose(A, EPS_OR_K[method])


def nuclear_norm(A):
    """Sum of the singular values of a matrix, taken on its tall side (the same values;
    torch's CPU SVD of a [1024, 16384] matrix is ~15x slower than of its transpose)."""
    return torch.linalg.svdvals(A.T if A.shape[0] < A.shape[1] else A).sum()


# ----------------------------------------------------------------------------------------

class _DMTRLBase(nn.Module):
    """Factorised weight tensor W [n_in, n_out, T] and bias b [n_out, T]."""

    def _init_dmtrl(self, n_in, n_out, tasks, method, bias, name):
        if method not in METHODS:
            raise ValueError(f"{name}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.method, self.tasks, self.num_tasks = method, tasks, tasks
        self.n_in, self.n_out = n_in, n_out
        W0 = 0.01 * torch.randn(n_in, n_out, tasks, dtype=torch.float64)   # torch.manual_seed controls it
        for key, factor in decompose(W0.numpy(), method).items():
            setattr(self, key, nn.Parameter(torch.tensor(factor, dtype=torch.get_default_dtype())))
        self.b = nn.Parameter(torch.ones(n_out, tasks)) if bias else None

    @property
    def ranks(self):
        """Tucker: (r1, r2, r3) of the core; TT: the two inner TT ranks; LAF: (rank,)."""
        if self.method == 'Tucker':
            return tuple(self.S.shape)
        if self.method == 'TT':
            return (self.U_0.shape[2], self.U_1.shape[2])
        return (self.U.shape[1],)

    def left_factor(self):
        """A [n_in, r] with W[:, :, t] = A @ M_t for every task (None: A is the identity)."""
        if self.method == 'Tucker':
            return self.U_0
        if self.method == 'TT':
            return self.U_0[0]
        return None

    def core_slices(self, ids):
        """Tucker: G_t = S x_3 U_2[t] as [k, r1, r2], so that W[:, :, t] = U_0 G_t U_1^T."""
        return torch.tensordot(self.U_2[ids], self.S, dims=([1], [2]))

    def right_factors(self, ids):
        """M [k, r, n_out] for the k task ids (or a slice of them), contracting the task factor first."""
        if self.method == 'Tucker':
            return self.core_slices(ids) @ self.U_1.T
        if self.method == 'TT':
            return torch.einsum('aob,bk->kao', self.U_1, self.U_2[:, ids, 0])
        return (self.V[:, ids].T @ self.U.T).view(-1, self.n_in, self.n_out)

    def task_weight(self, ids):
        """W[:, :, ids] as [k, n_in, n_out]."""
        A, M = self.left_factor(), self.right_factors(ids)
        return M if A is None else A @ M

    def full_weight(self):
        """The whole tensor W [n_in, n_out, T]."""
        ids = torch.arange(self.tasks, device=next(self.parameters()).device)
        return self.task_weight(ids).permute(1, 2, 0)

    def _bias(self, ids):
        return None if self.b is None else self.b[:, ids].T

    def regularization(self, c):
        """Tensor trace norm of the DMTRL paper: c * sum_{n=1..3} ||W_(n)||_* (the nuclear
        norms of the three mode unfoldings of the rebuilt W); the float 0. if c == 0.
        Costs one SVD per unfolding: for a 1024x1024 layer with 16 tasks two [16384, 1024]
        and one [1048576, 16] (about 20 s forward+backward on 2 CPU cores)."""
        if c == 0:
            return 0.
        W = self.full_weight()
        return c * sum(nuclear_norm(unfold(W, n)) for n in range(3))


class DMTRL_Linear(_DMTRLBase):
    """Linear layer whose per-task weights W[:, :, t] ([in, out]) are slices of one
    factorised tensor W [in, out, T] (method 'Tucker', 'TT' or 'LAF', see the module
    docstring); y = x @ W[:, :, t] + b[:, t], b [out, T] initialised to ones.

    forward(x, task, per_row=False): task an int (x [B, in] -> [B, out]), a LongTensor of
    k ids (x [B, in] shared or [B, k, in] -> [B, k, out]), or with per_row=True one id per
    row (x [B, in] -> [B, out]). Computed as (x @ A) @ M_t + b_t without building W
    (Tucker: ((x @ U_0) @ G_t) @ U_1^T + b_t, the shared U_1 applied once to all rows).
    """

    def __init__(self, in_feature, out_feature, tasks, method='Tucker'):
        super().__init__()
        self.in_feature, self.out_feature = in_feature, out_feature
        self._init_dmtrl(in_feature, out_feature, tasks, method, True, 'DMTRL_Linear')

    def forward(self, x, task, per_row=False):
        spec = parse_task(task, self.tasks, x, feature_dims=1, per_row=per_row, name='DMTRL_Linear')
        check_width(x, self.in_feature, x.dim() - 1, 'DMTRL_Linear')
        A = self.left_factor()
        h = x if A is None else x @ A
        if self.method != 'Tucker':
            return task_linear(h, spec, lambda ids: (self.right_factors(ids), self._bias(ids)))
        # Tucker: ((x U_0) G_t) U_1^T + b_t. U_1 is shared by all tasks, so it is applied
        # to all rows in one product instead of being multiplied into every G_t.
        y = task_linear(h, spec, lambda ids: (self.core_slices(ids), None)) @ self.U_1.T
        b = self._bias(spec.ids)
        return y + (b[0] if spec.kind == 'single' else b)

    def extra_repr(self):
        return (f'in_feature={self.in_feature}, out_feature={self.out_feature}, tasks={self.tasks}, '
                f'method={self.method!r}, ranks={self.ranks}')


class DMTRL_Conv2d(_DMTRLBase):
    """Conv2d whose per-task kernels are slices of one factorised tensor
    W [in_channels*kh*kw, out_channels, T]: K_t = W[:, :, t]^T reshaped to
    [out, in, kh, kw]; y = conv2d(x, K_t) + b[:, t]. Inputs as DMTRL_Linear with
    [B, C, H, W] images ([B, k, C, H, W] for one input per task); the k tasks of a call
    run as one grouped convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, tasks, method='Tucker', stride=1, padding=0,
                 dilation=1, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        n_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_dmtrl(n_in, out_channels, tasks, method, bias, 'DMTRL_Conv2d')

    def kernels(self, ids):
        """Conv kernels [k, out, in, kh, kw] of the k tasks, and their biases [k, out]."""
        K = self.task_weight(ids).transpose(1, 2).reshape(-1, self.out_channels, self.in_channels,
                                                          *self.kernel_size)
        return K, self._bias(ids)

    def forward(self, x, task, per_row=False):
        spec = parse_task(task, self.tasks, x, feature_dims=3, per_row=per_row, name='DMTRL_Conv2d')
        check_width(x, self.in_channels, x.dim() - 3, 'DMTRL_Conv2d', what='channels')
        return task_conv2d(x, spec, self.kernels, self.stride, self.padding, self.dilation, 1)

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, tasks={self.tasks}, '
                f'method={self.method!r}, ranks={self.ranks}, stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, bias={self.b is not None}')
