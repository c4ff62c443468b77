"""DMTRL layers: the initial decomposition against scipy's rule and its error bound, the
forward against the fully rebuilt tensor, the trace-norm penalty against numpy, bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import interpolative

from Layers.DMTRL_pytorch import DMTRL_Linear, DMTRL_Conv2d, truncated_svd, laf_decompose

EPS = 0.5


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def unfold(A, n):
    return np.moveaxis(A, n, 0).reshape(A.shape[n], -1)


def params(layer):
    return {k: v.detach().numpy() for k, v in layer.named_parameters()}


def naive_full_weight(layer):
    """W [in, out, T] rebuilt from the factors with the textbook formula of each method."""
    p = params(layer)
    if layer.method == 'Tucker':
        return np.einsum('abc,ia,ob,tc->iot', p['S'], p['U_0'], p['U_1'], p['U_2'])
    if layer.method == 'TT':
        return np.einsum('xia,aob,bty->iot', p['U_0'], p['U_1'], p['U_2'])
    return (p['U'] @ p['V']).reshape(layer.n_in, layer.n_out, layer.tasks)


def initial_W0(seed, shape):
    torch.manual_seed(seed)
    return (0.01 * torch.randn(*shape, dtype=torch.float64)).numpy()


def build(cls, seed, *args, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw)


def projection_residual(A, U):
    """Residual of the projection of A onto span(U): (I - U U^T) A."""
    return A - U @ (U.T @ A)


# ---------------------------------------------------------------- initial decomposition

@pytest.mark.parametrize('shape', [(20, 300), (300, 20), (16, 400), (7, 5), (60, 60)])
@pytest.mark.parametrize('eps_or_k', [0.5, 0.2, 3])
def test_truncated_svd_follows_scipy_interpolative_rule(shape, eps_or_k):
    rng = np.random.default_rng(sum(shape))
    A = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, size=shape[1])   # columns of unequal norm
    U0, s0, V0 = interpolative.svd(A.copy(), eps_or_k, rand=False)
    U, s, Vh = truncated_svd(A, eps_or_k)
    assert U.shape == U0.shape and Vh.shape == V0.T.shape
    np.testing.assert_allclose((U * s) @ Vh, (U0 * s0) @ V0.T, atol=1e-10)
    np.testing.assert_allclose((U * s) @ Vh, U @ (U.T @ A), atol=1e-10)   # the projection U U^T A
    np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-12)
    if eps_or_k < 1:   # scipy's precision rule: residual columns within eps * largest column
        res = np.linalg.norm(projection_residual(A, U), axis=0)
        assert res.max() <= eps_or_k * np.linalg.norm(A, axis=0).max() * (1 + 1e-9)


def test_tucker_initial_factors_within_scipy_precision(float64):
    shape = (12, 10, 6)
    W0 = initial_W0(0, shape)
    layer = build(DMTRL_Linear, 0, *shape, method='Tucker')
    p = params(layer)
    bound_sq, residual_sq = 0.0, 0.0
    for n in range(3):
        A, U = unfold(W0, n), p[f'U_{n}']
        np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-12)
        R = projection_residual(A, U)
        cols = np.linalg.norm(A, axis=0)
        # precision eps: every residual column is within eps * the largest column of A
        assert np.linalg.norm(R, axis=0).max() <= EPS * cols.max() * (1 + 1e-9)
        residual_sq += (R ** 2).sum()
        bound_sq += (A.shape[1] - U.shape[1]) * (EPS * cols.max()) ** 2   # the r pivot columns are exact
    W = layer.full_weight().detach().numpy()
    np.testing.assert_allclose(W, naive_full_weight(layer), atol=1e-14)
    err = np.linalg.norm(W - W0)
    # HOSVD bound ||W - W0||^2 <= sum_n ||(I - U_n U_n^T) W0_(n)||^2 <= sum_n (cols - r_n) (eps max col)^2
    assert err <= np.sqrt(residual_sq) * (1 + 1e-9)
    # eps bound on the relative error (weak: with eps = 0.5 on three modes it can exceed 1)
    rel = err / np.linalg.norm(W0)
    assert rel <= np.sqrt(bound_sq) / np.linalg.norm(W0)
    # a real truncation (error > 0, some rank below its dimension), not the zero tensor (error 1)
    assert 0.0 < rel < 1.0
    assert layer.ranks == p['S'].shape and all(1 <= r <= d for r, d in zip(layer.ranks, shape))
    assert any(r < d for r, d in zip(layer.ranks, shape))


def test_tt_initial_cores_within_scipy_precision(float64):
    shape = (12, 10, 6)
    W0 = initial_W0(1, shape)
    layer = build(DMTRL_Linear, 1, *shape, method='TT')
    p = params(layer)
    r1, r2 = layer.ranks
    assert p['U_0'].shape == (1, 12, r1) and p['U_1'].shape == (r1, 10, r2) and p['U_2'].shape == (r2, 6, 1)
    C, residual_sq, bound_sq = W0.reshape(12, -1), 0.0, 0.0
    for n, r in enumerate((r1, r2)):                  # replay the two sequential SVD steps
        U = p[f'U_{n}'].reshape(-1, r)
        np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-12)
        R = projection_residual(C, U)
        cols = np.linalg.norm(C, axis=0)
        assert np.linalg.norm(R, axis=0).max() <= EPS * cols.max() * (1 + 1e-9)
        residual_sq += (R ** 2).sum()
        bound_sq += (C.shape[1] - r) * (EPS * cols.max()) ** 2
        C = (U.T @ C).reshape(r * shape[n + 1], -1)
    W = layer.full_weight().detach().numpy()
    np.testing.assert_allclose(W, naive_full_weight(layer), atol=1e-14)
    err = np.linalg.norm(W - W0)
    # TT-SVD: the step residuals are orthogonal, so ||W - W0||^2 is exactly their sum
    np.testing.assert_allclose(err ** 2, residual_sq, rtol=1e-9)
    rel = err / np.linalg.norm(W0)
    assert rel <= np.sqrt(bound_sq) / np.linalg.norm(W0)
    assert 0.0 < rel < 1.0 and 1 <= r1 <= 12 and 1 <= r2 <= 6


def test_laf_rank5_truncation_close_to_optimal(float64):
    shape = (12, 10, 8)
    W0 = initial_W0(2, shape)
    layer = build(DMTRL_Linear, 2, *shape, method='LAF')
    assert layer.ranks == (5,) and layer.U.shape == (120, 5) and layer.V.shape == (5, 8)
    W = layer.full_weight().detach().numpy()
    np.testing.assert_allclose(W, naive_full_weight(layer), atol=1e-14)
    s = np.linalg.svd(W0.reshape(120, 8), compute_uv=False)
    optimal = np.sqrt((s[5:] ** 2).sum())   # numpy's rank-5 SVD truncation (Eckart-Young)
    err = np.linalg.norm(W - W0)
    assert optimal * (1 - 1e-12) <= err <= 1.15 * optimal
    assert np.linalg.matrix_rank(W.reshape(120, 8)) == 5


def test_laf_equals_svd_truncation_when_pivoting_is_optimal():
    # orthogonal columns of distinct norms: the pivoted QR keeps the 5 largest, which is the SVD's choice
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 7)))
    norms = np.array([3.0, 0.5, 2.0, 0.1, 5.0, 1.0, 0.7])
    A = (Q * norms).reshape(5, 6, 7)
    f = laf_decompose(A, 5)
    err = np.linalg.norm(f['U'] @ f['V'] - A.reshape(30, 7))
    np.testing.assert_allclose(err, np.sqrt(0.5 ** 2 + 0.1 ** 2), rtol=1e-10)


def test_a_rank_above_the_tensors_own_gives_finite_factors():
    """LAF keeps rank 5 whatever the weights: on a rank-1 tensor with exact zeros the extra
    singular values are 0 and the factors stay finite and exact (no 0 / 0)."""
    A = np.zeros((4, 3, 6))
    A[:, 0, 0] = [1.0, -2.0, 0.5, 3.0]
    f = laf_decompose(A, 5)
    assert np.isfinite(f['U']).all() and np.isfinite(f['V']).all()
    np.testing.assert_allclose(f['U'] @ f['V'], A.reshape(12, 6), atol=1e-14)


def test_laf_rank_capped_by_task_count(float64):
    W0 = initial_W0(4, (3, 2, 3))
    layer = build(DMTRL_Linear, 4, 3, 2, 3, method='LAF')
    assert layer.ranks == (3,)
    np.testing.assert_allclose(layer.full_weight().detach().numpy(), W0, atol=1e-14)


# ---------------------------------------------------------------- forward, penalty

def perturb(layer, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize('method', ['Tucker', 'TT', 'LAF'])
def test_linear_forward_equals_full_tensor(method, float64):
    layer = build(DMTRL_Linear, 5, 7, 6, 5, method=method)
    perturb(layer, 6)      # any parameter values, not only the initial decomposition
    W = torch.from_numpy(naive_full_weight(layer))
    b = layer.b.detach()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 7, generator=gen)
    ref = lambda x, t: x @ W[:, :, t] + b[:, t]
    torch.testing.assert_close(layer(x, 3), ref(x, 3))
    ids = torch.tensor([4, 0, 4])
    torch.testing.assert_close(layer(x, ids), torch.stack([ref(x, int(t)) for t in ids], 1))
    xk = torch.randn(4, 3, 7, generator=gen)
    torch.testing.assert_close(layer(xk, ids), torch.stack([ref(xk[:, j], int(t)) for j, t in enumerate(ids)], 1))
    rows = torch.tensor([1, 4, 1, 1])
    torch.testing.assert_close(layer(x, rows, per_row=True),
                               torch.stack([ref(x[i], int(t)) for i, t in enumerate(rows)]))
    torch.testing.assert_close(layer.full_weight(), W)


def test_linear_gradcheck_per_row(float64):
    layer = build(DMTRL_Linear, 8, 4, 3, 3, method='Tucker')
    x = torch.randn(5, 4, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    rows = torch.tensor([2, 0, 2, 1, 0])
    f = lambda x, *v: torch.func.functional_call(layer, dict(zip(names, v)), (x, rows), {'per_row': True})
    assert torch.autograd.gradcheck(f, (x, *values))


@pytest.mark.parametrize('method', ['Tucker', 'TT', 'LAF'])
def test_regularization_is_sum_of_unfolding_nuclear_norms(method, float64):
    layer = build(DMTRL_Linear, 9, 6, 5, 6, method=method)
    perturb(layer, 10)
    W = naive_full_weight(layer)
    expected = sum(np.linalg.svd(unfold(W, n), compute_uv=False).sum() for n in range(3))
    reg = layer.regularization(0.3)
    np.testing.assert_allclose(reg.item(), 0.3 * expected, rtol=1e-10)
    reg.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in layer.named_parameters() if n != 'b')
    assert layer.regularization(0) == 0. and isinstance(layer.regularization(0), float)


@pytest.mark.parametrize('method', ['Tucker', 'TT', 'LAF'])
def test_conv_forward_equals_conv2d_with_full_kernel(method, float64):
    layer = build(DMTRL_Conv2d, 11, 3, 4, (3, 2), 5, method=method, stride=(1, 2), padding=1, dilation=1)
    perturb(layer, 12)
    W = torch.from_numpy(naive_full_weight(layer))            # [3*3*2, 4, 5]
    assert W.shape == (18, 4, 5)
    kernel = lambda t: W[:, :, t].T.reshape(4, 3, 3, 2)
    ref = lambda x, t: F.conv2d(x, kernel(t), layer.b[:, t].detach(), (1, 2), 1)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 6, 5, generator=gen)
    torch.testing.assert_close(layer(x, 2), ref(x, 2))
    ids = torch.tensor([4, 1])
    torch.testing.assert_close(layer(x, ids), torch.stack([ref(x, int(t)) for t in ids], 1))
    xk = torch.randn(2, 2, 3, 6, 5, generator=gen)
    torch.testing.assert_close(layer(xk, ids), torch.stack([ref(xk[:, j], int(t)) for j, t in enumerate(ids)], 1))
    rows = torch.tensor([3, 3])
    torch.testing.assert_close(layer(x, rows, per_row=True), ref(x, 3))
    assert f'ranks={layer.ranks}' in repr(layer)


def test_conv_without_bias(float64):
    layer = build(DMTRL_Conv2d, 14, 2, 3, 2, 2, method='TT', bias=False)
    assert layer.b is None
    W = torch.from_numpy(naive_full_weight(layer))
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(layer(x, 1), F.conv2d(x, W[:, :, 1].T.reshape(3, 2, 2, 2)))


# ---------------------------------------------------------------- bad input

def test_bad_input_errors():
    with pytest.raises(ValueError, match='Tucker, TT, LAF'):
        DMTRL_Linear(4, 3, 2, method='tucker')
    with pytest.raises(ValueError, match='Tucker, TT, LAF'):
        DMTRL_Conv2d(2, 3, 3, 2, method='CP')
    layer = DMTRL_Linear(6, 5, 4)
    assert f'ranks={layer.ranks}' in repr(layer)
    with pytest.raises(IndexError, match='out of range'):
        layer(torch.randn(3, 6), 4)
    with pytest.raises(IndexError, match='out of range'):
        layer(torch.randn(3, 6), torch.tensor([3, 0, -1]), per_row=True)
    with pytest.raises(ValueError, match='expected 6 input features'):
        layer(torch.randn(3, 5), 1)
    with pytest.raises(ValueError, match='dims'):
        layer(torch.randn(3, 2, 2, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='int task'):
        layer(torch.randn(3, 2, 6), 0)
    conv = DMTRL_Conv2d(2, 3, 3, 2)
    with pytest.raises(ValueError, match='expected 2 input channels'):
        conv(torch.randn(1, 3, 5, 5), 0)
