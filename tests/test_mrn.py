"""MRN layers: penalty and covariance update against explicit Kronecker formulas, forward
against a naive per-task loop, buffers, gradients and bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from Layers.MRN_pytorch import MRN_Linear, MRN_Conv2d, precision_from


def random_spd(n, gen):
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return A @ A.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


def set_random_covs(layer, gen):
    for name in ('task_cov', 'class_cov', 'feature_cov'):
        buf = getattr(layer, name)
        buf.copy_(random_spd(buf.shape[0], gen))


def kron3(A, B, C):
    return torch.kron(torch.kron(A, B), C)


# ---------------------------------------------------------------- penalty and update

def test_regularization_equals_explicit_kronecker_form():
    gen = torch.Generator().manual_seed(0)
    layer = MRN_Linear(5, 4, 3).double()
    set_random_covs(layer, gen)
    w = layer.weight.detach().reshape(-1)
    K = kron3(layer.task_cov, layer.class_cov, layer.feature_cov)
    expected = 0.7 * w @ K @ w
    reg = layer.regularization(0.7)
    torch.testing.assert_close(reg, expected, rtol=1e-12, atol=0)
    reg.backward()   # d/dW of c w^T K w with K symmetric is 2 c K w
    torch.testing.assert_close(layer.weight.grad.reshape(-1), 2 * 0.7 * K @ w, rtol=1e-10, atol=1e-12)
    assert layer.regularization(0) == 0. and isinstance(layer.regularization(0.), float)


def test_conv_regularization_uses_flattened_kernels():
    gen = torch.Generator().manual_seed(1)
    layer = MRN_Conv2d(4, 2, (2, 3), tasks=3, groups=2).double()
    assert layer.feature_cov.shape == (2 * 2 * 3, 2 * 2 * 3)
    set_random_covs(layer, gen)
    w = layer.weight.detach().reshape(-1)
    K = kron3(layer.task_cov, layer.class_cov, layer.feature_cov)
    torch.testing.assert_close(layer.regularization(1.5), 1.5 * w @ K @ w, rtol=1e-12, atol=0)


def reference_g(S):
    """The original's precision update, written out: SVD, s -> 1/s if s > 0.1 else s, rebuild, clip the
    trace to 3000."""
    U, s, Vh = torch.linalg.svd(S)
    s = torch.tensor([1.0 / v if v > 0.1 else v for v in s.tolist()], dtype=S.dtype)
    P = U @ torch.diag(s) @ Vh
    trace = float(torch.trace(P))
    return P / trace * 3000.0 if trace > 3000.0 else P


def reference_update(W, Ot, Oc, Of, task, feature, inp):
    T, O, I = W.shape
    eye = lambda n: 1e-5 * torch.eye(n, dtype=W.dtype)
    if task:
        W0 = W.reshape(T, O * I)
        Ot = reference_g(W0 @ torch.kron(Oc, Of) @ W0.T + eye(T))
    if feature:
        W1 = W.permute(1, 0, 2).reshape(O, T * I)
        Oc = reference_g(W1 @ torch.kron(Ot, Of) @ W1.T + eye(O))
    if inp:
        W2 = W.permute(2, 0, 1).reshape(I, T * O)
        Of = Of + 0.0003 * reference_g(W2 @ torch.kron(Ot, Oc) @ W2.T + eye(I))
    return Ot, Oc, Of


@pytest.mark.parametrize('flags', list(itertools.product([True, False], repeat=3)))
def test_update_equals_direct_implementation(flags):
    gen = torch.Generator().manual_seed(2)
    layer = MRN_Linear(5, 4, 3, regularization_task=flags[0], regularization_feature=flags[1],
                       regularization_input=flags[2]).double()
    set_random_covs(layer, gen)
    with torch.no_grad():   # make one task, one output and one input tiny: singular values below 0.1
        layer.weight[2] *= 0.01
        layer.weight[:, 1] *= 0.01
        layer.weight[:, :, 3] *= 0.01
    before = [b.clone() for b in (layer.task_cov, layer.class_cov, layer.feature_cov)]
    expected = reference_update(layer.weight.detach(), *before, *flags)
    layer.update()
    for got, want, old, flag in zip((layer.task_cov, layer.class_cov, layer.feature_cov), expected, before, flags):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert torch.equal(got, old) != flag      # changed iff its flag is on
    assert layer.weight.grad is None


def test_precision_trace_clipped_to_3000():
    gen = torch.Generator().manual_seed(3)
    n = 400   # all singular values in (0.1, 0.13] -> 1/s >= 7.7, trace > 3000 before the clip
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = 0.1 + 0.03 * torch.rand(n, generator=gen, dtype=torch.float64)
    s[:5] = torch.tensor([0.01, 0.02, 0.05, 0.08, 0.1], dtype=torch.float64)   # kept as they are
    S = Q @ torch.diag(s) @ Q.T
    P = precision_from(S)
    torch.testing.assert_close(P, reference_g(S), rtol=1e-9, atol=1e-12)
    assert abs(float(torch.trace(P)) - 3000.0) < 1e-8
    small = torch.eye(3, dtype=torch.float64) * 0.5   # trace 6: no clip, s -> 2
    torch.testing.assert_close(precision_from(small), 2 * torch.eye(3, dtype=torch.float64))


def test_buffers_in_state_dict_and_follow_to():
    layer = MRN_Linear(5, 4, 3)
    sd = layer.state_dict()
    for name, n in (('task_cov', 3), ('class_cov', 4), ('feature_cov', 5)):
        assert torch.equal(sd[name], torch.eye(n))
    layer.update()
    other = MRN_Linear(5, 4, 3)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.task_cov, layer.task_cov) and not torch.equal(other.task_cov, torch.eye(3))
    layer.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in (layer.task_cov, layer.class_cov, layer.feature_cov))
    layer.to('cpu')
    assert layer.feature_cov.device.type == 'cpu'
    layer.update()   # runs in the layer's dtype
    assert layer.task_cov.dtype == torch.float64


# ---------------------------------------------------------------- forward

def randomize_bn(bn, gen):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen, dtype=torch.float64))
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))


def bn_eval(y, bn, channel_dim):
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    v = lambda t: t.view(shape)
    return (y - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)


def naive_linear(layer, x, t):
    y = torch.relu(F.linear(x, layer.weight[t], layer.bias[t]))
    return bn_eval(y, layer.bn, -1) if layer.bn is not None else y


def test_linear_forward_all_task_modes_match_naive_loop():
    gen = torch.Generator().manual_seed(4)
    layer = MRN_Linear(6, 5, 4).double()
    randomize_bn(layer.bn, gen)
    layer.eval()
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    ids = torch.tensor([3, 0, 3])
    torch.testing.assert_close(layer(x, 2), naive_linear(layer, x, 2))
    torch.testing.assert_close(layer(x, torch.tensor(1)), naive_linear(layer, x, 1))
    shared = torch.stack([naive_linear(layer, x, int(t)) for t in ids], 1)
    torch.testing.assert_close(layer(x, ids), shared)
    xk = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    per_task = torch.stack([naive_linear(layer, xk[:, j], int(t)) for j, t in enumerate(ids)], 1)
    torch.testing.assert_close(layer(xk, ids), per_task)
    rows = torch.tensor([2, 0, 2, 2, 0, 3, 2])     # task 1 absent, groups of unequal size
    per_row = torch.stack([naive_linear(layer, x[i:i + 1], int(t))[0] for i, t in enumerate(rows)])
    torch.testing.assert_close(layer(x, rows, per_row=True), per_row)


def test_linear_training_mode_bn_over_all_rows_and_dropout():
    gen = torch.Generator().manual_seed(5)
    layer = MRN_Linear(6, 5, 4, dropout=False).double().train()
    xk = torch.randn(8, 2, 6, generator=gen, dtype=torch.float64)
    ids = torch.tensor([1, 3])
    a = torch.stack([torch.relu(F.linear(xk[:, j], layer.weight[t], layer.bias[t])) for j, t in enumerate(ids)], 1)
    flat = a.reshape(-1, 5)   # one BatchNorm shared by the tasks, statistics over the B*k rows
    expected = ((flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)).view(8, 2, 5)
    torch.testing.assert_close(layer(xk, ids), expected)

    layer = MRN_Linear(6, 5, 4, bn=False).double()
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    ref = torch.relu(F.linear(x, layer.weight[0], layer.bias[0]))
    torch.manual_seed(0)
    y = layer.train()(x, 0)
    dropped = y == 0
    assert 0 < int((dropped & (ref > 0)).sum()) < int((ref > 0).sum())
    torch.testing.assert_close(y[~dropped], 2 * ref[~dropped])   # p = 0.5 keeps and doubles
    torch.testing.assert_close(layer.eval()(x, 0), ref)           # no dropout in eval mode


def test_linear_gradcheck_float64():
    gen = torch.Generator().manual_seed(6)
    layer = MRN_Linear(4, 3, 3, dropout=False, bn=False).double()
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    xk = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([2, 0, 2, 1, 0])
    w, b = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    call = lambda *args, **kw: torch.func.functional_call(layer, {'weight': args[1], 'bias': args[2]},
                                                          (args[0],) + args[3:], kw)
    assert torch.autograd.gradcheck(lambda x, w, b: call(x, w, b, 1), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: call(x, w, b, torch.tensor([2, 0])), (xk, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: call(x, w, b, rows, per_row=True), (x, w, b))


def naive_conv(layer, x, t):
    y = torch.relu(F.conv2d(x, layer.weight[t], layer.bias[t], layer.stride, layer.padding, layer.dilation,
                            layer.groups))
    return bn_eval(y, layer.bn, 1)


def test_conv_forward_all_task_modes_match_naive_loop():
    gen = torch.Generator().manual_seed(7)
    layer = MRN_Conv2d(4, 6, 3, tasks=3, stride=2, padding=1, dilation=1, groups=2).double()
    randomize_bn(layer.bn, gen)
    layer.eval()
    x = torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64)
    ids = torch.tensor([2, 1, 2])
    torch.testing.assert_close(layer(x, 1), naive_conv(layer, x, 1))
    torch.testing.assert_close(layer(x, ids), torch.stack([naive_conv(layer, x, int(t)) for t in ids], 1))
    xk = torch.randn(3, 3, 4, 7, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer(xk, ids),
                               torch.stack([naive_conv(layer, xk[:, j], int(t)) for j, t in enumerate(ids)], 1))
    rows = torch.tensor([2, 0, 2])
    per_row = torch.cat([naive_conv(layer, x[i:i + 1], int(t)) for i, t in enumerate(rows)])
    torch.testing.assert_close(layer(x, rows, per_row=True), per_row)


def test_conv_without_bias_and_gradcheck():
    gen = torch.Generator().manual_seed(8)
    layer = MRN_Conv2d(2, 3, 2, tasks=2, bias=False, bn=False, dropout=False).double()
    assert layer.bias is None
    x = torch.randn(2, 2, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().requires_grad_()
    f = lambda x, w: torch.func.functional_call(layer, {'weight': w}, (x, torch.tensor([1, 0])))
    ref = torch.stack([torch.relu(F.conv2d(x[:, j], layer.weight[t])) for j, t in enumerate([1, 0])], 1)
    torch.testing.assert_close(f(x, w), ref)
    assert torch.autograd.gradcheck(f, (x, w))


# ---------------------------------------------------------------- bad input

def test_bad_input_errors():
    layer = MRN_Linear(6, 5, 4)
    with pytest.raises(ValueError, match='expected 6 input features'):
        layer(torch.randn(3, 7), 0)
    with pytest.raises(IndexError, match='out of range'):
        layer(torch.randn(3, 6), 4)
    with pytest.raises(IndexError, match='out of range'):
        layer(torch.randn(3, 6), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='int task'):
        layer(torch.randn(3, 2, 6), 1)
    with pytest.raises(ValueError, match='must match'):
        layer(torch.randn(3, 2, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError):
        layer(torch.randn(3, 6), None)
    conv = MRN_Conv2d(4, 6, 3, tasks=2)
    with pytest.raises(ValueError, match='expected 4 input channels'):
        conv(torch.randn(2, 3, 5, 5), 0)
    with pytest.raises(ValueError, match='divisible by groups'):
        MRN_Conv2d(4, 6, 3, tasks=2, groups=4)
