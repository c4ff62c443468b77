"""TAL layers: exactness against the naive formula, gradients, regularisers, errors."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from Layers import DMTRL_Conv2d, DMTRL_Linear, MRN_Conv2d, MRN_Linear, TAL_Conv2d, TAL_Linear
from Layers import TAL_pytorch as tal
from Layers import _tal_build, _tal_kernel

BACKENDS = ["torch", "cpp"]


def assert_passes_opcheck(op, args):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT tracing), every check passed."""
    results = torch.library.opcheck(op, args)
    assert results and set(results.values()) == {"SUCCESS"}, results


def use_backend(monkeypatch, name):
    """Run the rest of the test on the TAL backend `name` (restored afterwards)."""
    monkeypatch.setattr(_tal_kernel, "_backend", _tal_kernel._backend)
    _tal_kernel.set_backend(name)
    if name == "cpp":
        assert _tal_build.load_extension() is not None, "the C++ kernel must build on this machine"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(monkeypatch, request.param)
    return request.param


def naive_layer(layer, x, task, per_row=False):
    """The original algorithm written out: affine, BN, then relu(a) + sum_m alpha relu(b_m - a)."""
    conv = isinstance(layer, TAL_Conv2d)
    fd = 3 if conv else 1
    per_task_input = isinstance(task, torch.Tensor) and not per_row and x.dim() == 2 + fd
    xin = x.flatten(0, 1) if per_task_input else x
    a = layer._conv_forward(xin, layer.weight, layer.bias) if conv else F.linear(xin, layer.weight, layer.bias)
    if layer.bn is not None:
        a = layer.bn(a)
    b = layer.basis.reshape(-1)
    pad = (1,) * (a.dim() - 1)                       # broadcast alpha over the feature dims
    if isinstance(task, int):
        return tal_act(a, layer.alpha[task].view(*pad, -1), b)
    if per_row:
        return tal_act(a, layer.alpha[task].view(a.shape[0], *pad, -1), b)
    B, k = x.shape[0], task.numel()
    a = a.view(B, -1, *a.shape[1:])                  # [B, 1 or k, ...]
    return tal_act(a, layer.alpha[task].view(1, k, *pad, -1), b)


def tal_act(a, alpha, b):
    return torch.relu(a) + (torch.relu(b - a.unsqueeze(-1)) * alpha).sum(-1)


def make(kind, bn, normalize=False, tasks=5, basis=7, dropout=False):
    torch.manual_seed(1)
    if kind == "linear":
        layer = TAL_Linear(6, 9, basis, tasks, bn=bn, normalize=normalize, dropout=dropout)
    else:
        layer = TAL_Conv2d(3, 4, 3, basis, tasks, padding=1, bn=bn, normalize=normalize, dropout=dropout)
    with torch.no_grad():                            # alpha large enough that the test means something
        layer.alpha.normal_()
    return layer.double()


def inputs(kind, B, k=None):
    shape = (6,) if kind == "linear" else (3, 5, 4)
    lead = (B,) if k is None else (B, k)
    return torch.randn(*lead, *shape, dtype=torch.float64)


MODES = ["int", "ids_shared", "ids_per_task", "per_row"]


def call(layer, kind, mode, B=11):
    g = torch.Generator().manual_seed(2)
    if mode == "int":
        return inputs(kind, B), 3, False
    if mode == "ids_shared":
        return inputs(kind, B), torch.tensor([4, 0, 2, 2]), False
    if mode == "ids_per_task":
        return inputs(kind, B, 3), torch.tensor([1, 4, 0]), False
    return inputs(kind, B), torch.randint(0, layer.tasks, (B,), generator=g), True


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn", [False, True])
def test_matches_naive_formula(backend, kind, mode, bn):
    layer = make(kind, bn)
    layer.eval()
    x, task, per_row = call(layer, kind, mode)
    out = layer(x, task, per_row=per_row)
    ref = naive_layer(layer, x, task, per_row)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-10


def test_output_shapes_follow_the_original():
    lin, conv = make("linear", False), make("conv", True)
    assert lin(inputs("linear", 4), 1).shape == (4, 9)
    assert lin(inputs("linear", 4), torch.tensor([0, 1])).shape == (4, 2, 9)
    assert lin(inputs("linear", 4, 2), torch.tensor([0, 1])).shape == (4, 2, 9)
    assert conv(inputs("conv", 4), 1).shape == (4, 4, 5, 4)
    assert conv(inputs("conv", 4, 2), torch.tensor([0, 1])).shape == (4, 2, 4, 5, 4)
    assert lin.output_num() == (9, ()) and conv.output_num() == (4, ())


def test_batchnorm_in_training_mode(backend):
    layer = make("linear", bn=True)
    layer.train()
    x, task, _ = call(layer, "linear", "ids_per_task")
    out = layer(x, task)
    ref = naive_layer(layer, x, task)                # BN in train mode normalises with batch stats
    assert (out - ref).abs().max().item() < 1e-10


def test_per_row_equals_per_task_calls(backend):
    layer = make("linear", bn=False).eval()
    x = inputs("linear", 12)
    ids = torch.tensor([0, 3, 3, 1, 4, 0, 2, 2, 1, 0, 4, 3])
    rows = layer(x, ids, per_row=True)
    for i in range(12):
        assert torch.allclose(rows[i], layer(x[i:i + 1], int(ids[i]))[0], atol=1e-12, rtol=0)


def test_dropout_follows_training_flag(backend):
    layer = make("linear", bn=False, dropout=True)
    x = inputs("linear", 64)
    ref = naive_layer(layer, x, 2)
    layer.eval()
    assert (layer(x, 2) - ref).abs().max().item() < 1e-10           # the original dropped in eval too
    layer.train()
    out = layer(x, 2)
    kept = out != 0
    assert 0.3 < kept.double().mean().item() < 0.7
    assert torch.allclose(out[kept], 2 * ref[kept], atol=1e-12, rtol=0)


def test_normalize_rescales_alpha_rows(backend):
    layer = make("linear", bn=False, normalize=True).eval()
    x = inputs("linear", 8)
    out = layer(x, 1)
    norms = layer.alpha.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)
    assert (out - naive_layer(layer, x, 1)).abs().max().item() < 1e-10


def test_normalize_allows_several_calls_before_backward(backend):
    """The original called the layer once per task, then summed the losses: every call
    renormalises alpha in place, and each call's backward uses the alpha it computed with."""
    layer = make("linear", bn=False, normalize=True)
    x = inputs("linear", 5)
    (layer(x, 0).sum() + layer(x, 3).sum()).backward()
    got = layer.alpha.grad.clone()
    layer.alpha.grad = None
    alpha = layer.alpha.detach().clone().requires_grad_()      # already unit rows: renormalising changes nothing
    a = F.linear(x, layer.weight, layer.bias)
    want = torch.autograd.grad(sum(tal_act(a, alpha[t], layer.basis.reshape(-1)).sum() for t in (0, 3)), alpha)[0]
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["int", "ids_shared", "per_row"])
def test_gradcheck(backend, kind, mode):
    layer = make(kind, bn=False, tasks=3, basis=4)
    x, task, per_row = call(layer, kind, mode, B=3)
    if kind == "conv":                                   # a small conv keeps gradcheck quick
        torch.manual_seed(3)
        layer = TAL_Conv2d(2, 2, 2, 4, 3, bn=False).double()
        with torch.no_grad():
            layer.alpha.normal_()
        x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    if mode == "int":
        task = 2
    if mode == "ids_shared":
        task = torch.tensor([2, 0])
    if mode == "per_row":
        task = torch.tensor([2, 0, 2])
    x.requires_grad_(True)
    params = (layer.weight, layer.alpha, layer.basis)

    def f(x, w, alpha, basis):
        return torch.func.functional_call(layer, {"weight": w, "alpha": alpha, "basis": basis,
                                                  "bias": layer.bias}, (x, task), {"per_row": per_row})
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def naive_grouped(a, alpha, basis, rt):
    """The activation with grouped bases, as written: row r uses alpha[t] and basis[t // (T / G)]."""
    b = basis[rt // (alpha.shape[0] // basis.shape[0])]                       # [R, M]
    return torch.relu(a) + (torch.relu(b[:, None, :] - a[:, :, None]) * alpha[rt][:, None, :]).sum(-1)


@pytest.mark.parametrize("G, Tg, M", [(1, 5, 7), (3, 4, 6), (2, 1, 300), (4, 2, 1)])
def test_grouped_bases_match_naive_formula(backend, G, Tg, M):
    """basis [G, M]: task t uses group t // Tg's basis (R runs stacked in one call)."""
    g = torch.Generator().manual_seed(G * 100 + M)
    a = torch.randn(9, 23, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = torch.randn(G * Tg, M, dtype=torch.float64, generator=g, requires_grad=True)
    basis = torch.randn(G, M, dtype=torch.float64, generator=g, requires_grad=True)
    rt = torch.randint(0, G * Tg, (9,), generator=g)
    out = _tal_kernel.tal_activation(a, alpha, basis, rt)
    ref = naive_grouped(a, alpha, basis, rt)
    assert (out - ref).abs().max().item() < 1e-10
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for u, v in zip(torch.autograd.grad(out, (a, alpha, basis), grad), torch.autograd.grad(ref, (a, alpha, basis), grad)):
        assert (u - v).abs().max().item() < 1e-10
    small = [t.detach()[:, :2].clone().requires_grad_() if t is a else t for t in (a, alpha, basis)]
    assert torch.autograd.gradcheck(lambda *x: _tal_kernel.tal_activation(*x, rt), small,
                                    eps=1e-6, atol=1e-7)


def test_grouped_call_equals_one_call_per_group(backend):
    """R runs stacked (basis [R, M], alpha [R * T, M]) give each run what its own call gives."""
    g = torch.Generator().manual_seed(11)
    R, T, M = 3, 4, 5
    a = torch.randn(R, 6, 10, dtype=torch.float64, generator=g)
    alpha = torch.randn(R, T, M, dtype=torch.float64, generator=g)
    basis = torch.randn(R, 1, M, dtype=torch.float64, generator=g)
    ids = torch.randint(0, T, (6,), generator=g)
    rows = (torch.arange(R)[:, None] * T + ids[None, :]).reshape(-1)
    stacked = _tal_kernel.tal_activation(a.reshape(R * 6, 10), alpha.reshape(R * T, M), basis.reshape(R, M), rows)
    for r in range(R):
        assert torch.equal(stacked.view(R, 6, 10)[r], _tal_kernel.tal_activation(a[r], alpha[r], basis[r], ids))


@pytest.mark.parametrize("keep", [True, False], ids=["buckets-kept", "buckets-found-again"])
def test_operators_pass_opcheck(backend, keep):
    """The registered operators: schema, fake kernels (shapes for the compiler), autograd
    registration and AOT tracing with dynamic shapes (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(12)
    a = torch.randn(6, 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    basis = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    rt = torch.tensor([0, 5, 3, 2, 2, 1])
    ops = torch.ops.taan
    assert_passes_opcheck(ops.tal_activation.default, (a, alpha, basis, rt, keep))
    out, k = ops.tal_activation(a.detach(), alpha.detach(), basis.detach(), rt, keep)
    assert k.shape == ((6, 10) if keep else (0, 10))
    assert_passes_opcheck(ops.tal_activation_backward.default,
                          (torch.randn_like(out), a.detach(), k, alpha.detach(), basis.detach(), rt, True))
    if backend == "cpp":     # batch norm inside the kernel: the C++ kernel only
        z = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.rand(3, dtype=torch.float64, generator=g).requires_grad_()
        b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
        assert_passes_opcheck(ops.channel_stats.default, (z.detach(), 3))
        mean, var = ops.channel_stats(z.detach(), 3)
        assert torch.allclose(mean, z.detach().mean((0, 2, 3))) and torch.allclose(var, z.detach().var((0, 2, 3), unbiased=False))
        invstd = torch.rsqrt(var + 1e-5)
        rt2 = torch.tensor([0, 4, 2, 2])
        al = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
        bs = torch.randn(1, 4, dtype=torch.float64, generator=g, requires_grad=True)
        for weight, bias, batch_stats in ((w, b, True), (w, b, False), (None, None, True)):
            assert_passes_opcheck(ops.tal_batchnorm_activation.default,
                                  (z, weight, bias, mean, invstd, al, bs, rt2, batch_stats, keep))


def test_a_second_derivative_is_refused(backend):
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    alpha, basis = torch.randn(2, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    out = _tal_kernel.tal_activation(a, alpha, basis, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out.sum(), a, create_graph=True)


@pytest.mark.parametrize("groups", [1, 3])
def test_backends_agree_in_float32(groups, monkeypatch):
    """The C++ kernel and the PyTorch path build the same tables and sum in float64: the same
    float32 bits, outputs and gradients (grouped bases too)."""
    torch.manual_seed(0)
    a = torch.randn(37, 101)
    alpha = torch.randn(4 * groups, 9, requires_grad=True)
    basis = (torch.rand(groups, 9) - .5).requires_grad_()
    rt = torch.randint(0, 4 * groups, (37,))
    g = torch.randn(37, 101)
    res = {}
    for be in BACKENDS:
        use_backend(monkeypatch, be)
        aa = a.clone().requires_grad_()
        out = _tal_kernel.tal_activation(aa, alpha, basis, rt)
        res[be] = (out,) + torch.autograd.grad(out, (aa, alpha, basis), g)
    for u, v in zip(res["torch"], res["cpp"]):
        assert torch.equal(u, v)


def test_activation_saves_memory_linear_in_elements(backend):
    """No [elements, basis] tensor: what autograd keeps is O(elements), independent of M."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    a = torch.randn(64, 128, requires_grad=True)
    rt = torch.zeros(64, dtype=torch.long)
    for M in (8, 256):
        saved.clear()
        alpha, basis = torch.randn(3, M, requires_grad=True), torch.rand(1, M, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _tal_kernel.tal_activation(a, alpha, basis, rt)
        out.sum().backward()
        per_elem = 4 + (1 if M <= _tal_kernel.KEEP_BUCKETS_MAX_BASIS else 0)   # a, and uint8 buckets
        assert sum(saved) <= a.numel() * per_elem + 8 * (3 * (M + 1) + 2 * M + 64 + 3 * M)


def test_large_basis_finds_buckets_again_in_backward(backend):
    """Above 255 basis functions the bucket ids are not kept; the backward recomputes them."""
    torch.manual_seed(4)
    M = 300
    a = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, M, dtype=torch.float64, requires_grad=True)
    basis = (4 * torch.rand(1, M, dtype=torch.float64) - 2).requires_grad_()
    rt = torch.tensor([0, 2, 1, 1, 0, 2])
    out = _tal_kernel.tal_activation(a, alpha, basis, rt)
    ref = _tal_kernel.tal_activation_naive(a, alpha[rt][:, None, :], basis)
    assert (out - ref).abs().max().item() < 1e-10
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (a, alpha, basis), g)
    want = torch.autograd.grad(ref, (a, alpha, basis), g)
    for u, v in zip(got, want):
        assert (u - v).abs().max().item() < 1e-9


def test_buckets_recomputed_on_request_give_the_same_numbers(backend, monkeypatch):
    """KEEP_BUCKETS_MAX_BASIS = 0 trades the kept uint8 buckets for a second search in
    backward: the same values and gradients, one byte less per element saved."""
    torch.manual_seed(5)
    a = torch.randn(8, 50, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    basis = torch.randn(1, 12, dtype=torch.float64, requires_grad=True)
    rt = torch.tensor([0, 3, 1, 2, 2, 0, 3, 1])
    g = torch.randn(8, 50, dtype=torch.float64)

    def run():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = _tal_kernel.tal_activation(a, alpha, basis, rt)
        return out, torch.autograd.grad(out, (a, alpha, basis), g), saved

    out_keep, grads_keep, saved_keep = run()
    monkeypatch.setattr(_tal_kernel, "KEEP_BUCKETS_MAX_BASIS", 0)
    out_new, grads_new, saved_new = run()
    assert torch.equal(out_keep, out_new)
    for u, v in zip(grads_keep, grads_new):
        assert torch.equal(u, v)
    uint8 = lambda saved: sum(t.numel() for t in saved if t.dtype == torch.uint8)  # noqa: E731
    assert uint8(saved_keep) == a.numel() and uint8(saved_new) == 0


# ------------------------------------------------------------------------ regularisers
def mc_functions(alpha, basis, z):
    """f_t(z) for all tasks, [n, T], straight from the definition."""
    return tal_act(z[:, None], alpha[None, :, :], basis.reshape(-1))


@pytest.fixture(scope="module")
def mc():
    g = torch.Generator().manual_seed(123)
    z = torch.randn(10 ** 6, generator=g, dtype=torch.float64)
    alpha = torch.randn(4, 6, generator=g, dtype=torch.float64)
    basis = (2 * torch.rand(1, 6, generator=g, dtype=torch.float64) - 1)
    basis[0, 0] = -0.3                          # both signs present
    basis[0, 1] = 0.4
    return z, alpha, basis, mc_functions(alpha, basis, z)


def within_4se(closed, samples):
    est = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return ((closed - est).abs() <= 4 * se + 1e-12).all().item()


def test_gram_and_u_match_monte_carlo(mc):
    z, _, basis, _ = mc
    b = basis.reshape(-1)
    r = torch.relu(b[None, :] - z[:, None])                       # [n, M]
    G = tal.basis_gram(basis, tal.C0_EXACT)
    assert within_4se(G, r[:, :, None] * r[:, None, :])
    u = tal.basis_relu_moment(basis, tal.C0_EXACT)
    assert within_4se(u, torch.relu(z)[:, None] * r)
    # the original's variant carries an extra factor relu(b): it does not match E[relu(z) relu(b - z)]
    u_orig = tal.basis_relu_moment(basis, tal.C0_EXACT, original=True)
    assert not torch.allclose(u, u_orig)


def test_distance_matrix_matches_monte_carlo(mc):
    z, alpha, basis, f = mc
    D = tal.task_distance_matrix(alpha, basis, c0=tal.C0_EXACT)
    samples = (f[:, :, None] - f[:, None, :]) ** 2
    assert within_4se(D.reshape(-1), samples.reshape(len(z), -1))
    assert torch.allclose(torch.diagonal(D), torch.zeros(4, dtype=D.dtype))


def test_inner_products_and_cosine_match_monte_carlo(mc):
    z, alpha, basis, f = mc
    K = tal.task_inner_product_matrix(alpha, basis, c0=tal.C0_EXACT)
    assert within_4se(K.reshape(-1), (f[:, :, None] * f[:, None, :]).reshape(len(z), -1))
    C = tal.task_cosine_matrix(alpha, basis, c0=tal.C0_EXACT)
    fn = f / f.pow(2).mean(0).sqrt()
    C_mc = (fn[:, :, None] * fn[:, None, :]).mean(0)
    assert (C - C_mc).abs().max().item() < 5e-3
    assert torch.allclose(torch.diagonal(C), torch.ones(4, dtype=C.dtype))


def original_formulas(alpha, basis):
    """The original code's LossDis / LossCosine, transcribed, with c0 = 0.4."""
    Phi = lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731
    M = basis.shape[1]
    B, Bt = basis.repeat(M, 1), basis.t().repeat(1, M)
    lo, hi = torch.min(B, Bt), torch.max(B, Bt)
    W = (1 + B * Bt) * Phi(lo) + 0.4 * hi * torch.exp(-0.5 * lo ** 2)
    diff = alpha[None] - alpha[:, None]
    dis = (torch.tensordot(diff, W, dims=([-1], [0])) * diff).sum(-1)
    U = ((0.4 * basis + 0.5 - Phi(basis)) * torch.relu(basis)).squeeze()
    plus = alpha[None] + alpha[:, None]
    K = plus @ U + alpha @ W @ alpha.t() + 0.5
    d = torch.sqrt(torch.diagonal(K))[None]
    cos = K / d / d.t()
    return dis.mean(), dis, -cos.mean(), cos


def test_c0_04_variant_equals_original_formulas(mc):
    _, alpha, basis, _ = mc
    dis_m, dis, cos_m, cos = original_formulas(alpha, basis)
    m, D = tal.LossDis(alpha, basis)                         # default c0 = 0.4
    assert torch.allclose(D, dis, atol=1e-14) and torch.allclose(m, dis_m, atol=1e-14)
    m, C = tal.LossCosine(alpha, basis, original=True)
    assert torch.allclose(C, cos, atol=1e-14) and torch.allclose(m, cos_m, atol=1e-14)


def test_trace_norms():
    alpha = torch.randn(5, 7, dtype=torch.float64)
    assert math.isclose(tal.LossNuclearNorm(alpha).item(), np.linalg.svd(alpha.numpy())[1].sum(), rel_tol=1e-12)
    assert math.isclose(tal.LossTraceNorm(alpha).item(), np.linalg.norm(alpha.numpy(), axis=1).sum(),
                        rel_tol=1e-12)


@pytest.mark.parametrize("name", tal.REGULARIZERS)
def test_regularization_scales_and_backpropagates(name):
    layer = TAL_Linear(4, 3, 6, 5, regularize=name.upper()).double()
    r1, r2 = layer.regularization(1.0), layer.regularization(0.25)
    assert torch.allclose(r2, 0.25 * r1)
    expected = {"tracenorm": tal.LossNuclearNorm(layer.alpha),
                "tracenorm_original": tal.LossTraceNorm(layer.alpha),
                "distance": tal.LossDis(layer.alpha, layer.basis)[0],
                "cosine": tal.LossCosine(layer.alpha, layer.basis)[0],
                "cosine_original": tal.LossCosine(layer.alpha, layer.basis, original=True)[0]}[name]
    assert torch.allclose(r1, expected)
    r1.backward()
    assert layer.alpha.grad.abs().sum() > 0
    assert TAL_Linear(4, 3, 6, 5).regularization(1.0) == 0.


def test_distance_gradient_reaches_basis():
    layer = TAL_Linear(4, 3, 6, 5, regularize="distance").double()
    assert torch.autograd.gradcheck(lambda a, b: tal.LossDis(a, b)[0], (layer.alpha, layer.basis))
    layer.regularization(1.0).backward()
    assert layer.basis.grad.abs().sum() > 0


def test_layer_matrix_helpers():
    layer = TAL_Linear(4, 3, 6, 5, c0=tal.C0_EXACT)
    assert torch.allclose(layer.task_distance(), tal.task_distance_matrix(layer.alpha, layer.basis, tal.C0_EXACT))
    assert layer.task_cosine().shape == (5, 5)


# ------------------------------------------------------------------------ state and errors
def test_state_dict_keeps_original_names_and_moves_with_to():
    layer = TAL_Conv2d(2, 3, 3, 4, 6)
    assert {"weight", "bias", "alpha", "basis", "bn.weight", "bn.running_mean"} <= set(layer.state_dict())
    assert layer.alpha.shape == (6, 4) and layer.basis.shape == (1, 4)
    assert -0.5 <= layer.basis.min() and layer.basis.max() <= 0.5
    layer = layer.to(torch.float64)
    assert layer.alpha.dtype == torch.float64 and layer.bn.running_mean.dtype == torch.float64


def test_bad_inputs_raise_clear_errors():
    layer = TAL_Linear(6, 9, 7, 5)
    x = torch.randn(4, 6)
    with pytest.raises(IndexError, match="out of range"):
        layer(x, 5)
    with pytest.raises(IndexError, match="out of range"):
        layer(x, torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="task"):
        layer(x, None)
    with pytest.raises(TypeError, match="task"):
        layer(x, 1.0)
    with pytest.raises(TypeError, match="integers"):
        layer(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expected 6 input features"):
        layer(torch.randn(4, 5), 0)
    with pytest.raises(ValueError, match="int task"):
        layer(torch.randn(4, 2, 6), 0)
    with pytest.raises(ValueError, match="must match"):
        layer(torch.randn(4, 3, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="per_row"):
        layer(x, torch.tensor([0, 1]), per_row=True)
    with pytest.raises(ValueError, match="unknown regularize"):
        TAL_Linear(6, 9, 7, 5, regularize="l1")
    with pytest.raises(ValueError, match="dims"):
        TAL_Conv2d(3, 4, 3, 7, 5)(torch.randn(4, 3, 8), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    layer = make("conv", bn=True).float().eval()
    x, task, per_row = call(layer, "conv", "per_row")
    x = x.float()
    out_cpu = layer(x, task, per_row=per_row)
    layer_gpu = layer.to("cuda")
    out_gpu = layer_gpu(x.to("cuda"), task.to("cuda"), per_row=per_row)
    assert torch.allclose(out_cpu, out_gpu.cpu(), atol=1e-4)


# ------------------------------------------------------------------------ C++ bucket lookup
def basis_case(case, dtype, g):
    """Sorted basis points that stress the C++ kernel's grid lookup of buckets."""
    if case == "random":
        s = torch.rand(64, generator=g, dtype=dtype) - 0.5
    elif case == "ties":                                   # repeated points
        s = torch.cat([torch.full((10,), 0.1, dtype=dtype), torch.rand(20, generator=g, dtype=dtype) - 0.5])
    elif case == "crowded":                                # > 8 points in one grid cell
        s = torch.cat([0.2 + 1e-7 * torch.arange(20, dtype=dtype), torch.rand(12, generator=g, dtype=dtype)])
    elif case == "equal":                                  # zero span
        s = torch.full((5,), -0.3, dtype=dtype)
    elif case == "one":
        s = torch.tensor([0.25], dtype=dtype)
    elif case == "huge":                                   # the span overflows to inf in float32
        s = torch.tensor([-3e38, -1.0, 0.0, 2.0, 3e38], dtype=dtype)
    elif case == "tiny":                                   # denormal span: G / span overflows
        s = torch.tensor([0.0, 1e-45, 1e-45, 3e-45], dtype=dtype)
    elif case == "large":                                  # buckets not kept: found again in backward
        s = torch.randn(300, generator=g, dtype=dtype)
    return s.sort().values


def inputs_for(s, g, dtype):
    """Rows of N(0, 1) values, every basis point itself, its neighbours, +-inf and NaN."""
    lo, hi = torch.full_like(s, -float("inf")), torch.full_like(s, float("inf"))
    special = torch.cat([s, torch.nextafter(s, lo), torch.nextafter(s, hi),
                         torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)])
    a = torch.randn(6, 257, generator=g, dtype=dtype)
    a.view(-1)[torch.randperm(a.numel(), generator=g)[:special.numel()]] = special
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["random", "ties", "crowded", "equal", "one", "huge", "tiny", "large"])
def test_cpp_buckets_equal_searchsorted(case, dtype):
    """The kernel's bucket of every element is #{m : s_m <= a} exactly, whatever the basis."""
    assert _tal_build.load_extension() is not None, "the C++ kernel must build on this machine"
    g = torch.Generator().manual_seed(7)
    s = basis_case(case, dtype, g)
    basis = s[torch.randperm(s.numel(), generator=g)].view(1, -1)       # the kernel sorts it
    M, T = s.numel(), 3
    a = inputs_for(s, g, dtype)
    rt = torch.tensor([0, 2, 1, 1, 0, 2])
    alpha = torch.randn(T, M, generator=g, dtype=dtype)
    out, k = _tal_kernel._cpp_forward(a, alpha, basis, rt, True)
    ref_out, ref_k = _tal_kernel._torch_forward(a, alpha, basis, rt, True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)   # same buckets, same rounding
    if M <= 255:        # NaN: bucket 0 here, M in searchsorted; the output is NaN either way
        assert torch.equal(k[~a.isnan()], ref_k[~a.isnan()])
    finite = torch.nan_to_num(a, nan=0.0, posinf=1e3, neginf=-1e3)       # finite sums to compare
    gr = torch.randn(a.shape, generator=g, dtype=dtype)
    k = _tal_kernel._cpp_forward(finite, alpha, basis, rt, True)[1]
    got = _tal_kernel._cpp_backward(gr, finite, k, alpha, basis, rt, True)
    want = _tal_kernel._torch_backward(gr, finite, ref_k[:0], alpha, basis, rt, True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for u, v in zip(got[1:], want[1:]):
        torch.testing.assert_close(u, v, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-9)


# ------------------------------------------------------------------------ batch norm in the kernel
def run_conv(layer, x, task, per_row, backend, monkeypatch):
    """Output, gradients (x, conv, batch norm, alpha, basis), batch norm buffers after one call,
    and how many times batch norm ran inside the kernel."""
    use_backend(monkeypatch, backend)
    fused_calls = []

    def counted(*args):
        fused_calls.append(1)
        return _tal_kernel.tal_batchnorm_activation(*args)
    monkeypatch.setattr(tal, "tal_batchnorm_activation", counted)
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_()
    out = layer(x, task, per_row=per_row)
    params = [x, layer.weight, layer.bias, layer.bn.weight, layer.bn.bias, layer.alpha, layer.basis]
    grads = torch.autograd.grad(out, params, torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out, grads, [b.clone() for b in layer.bn.buffers()], len(fused_calls)


@pytest.mark.parametrize("mode", ["int", "per_row"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_in_the_kernel_equals_batchnorm_then_activation(mode, train, momentum, monkeypatch):
    """TAL_Conv2d on the C++ kernel folds batch norm into the activation (the normalised
    tensor is never stored); the result is nn.BatchNorm2d followed by the activation, running
    statistics included."""
    assert _tal_build.load_extension() is not None, "the C++ kernel must build on this machine"
    layer = make("conv", bn=True)
    layer.bn.momentum = momentum
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.2, 0.2)
        layer.bn.running_mean.uniform_(-0.1, 0.1)
    layer.train(train)
    x, task, per_row = call(layer, "conv", mode)
    fused = run_conv(layer, x, task, per_row, "cpp", monkeypatch)
    plain = run_conv(layer, x, task, per_row, "torch", monkeypatch)
    assert (fused[3], plain[3]) == (1, 0)          # batch norm in the kernel, then outside it
    assert (fused[0] - plain[0]).abs().max().item() < 1e-10
    for u, v in zip(fused[1], plain[1]):
        assert (u - v).abs().max().item() < 1e-9
    for u, v in zip(fused[2], plain[2]):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)


def test_batchnorm_in_the_kernel_gradcheck(monkeypatch):
    use_backend(monkeypatch, "cpp")
    torch.manual_seed(3)
    layer = TAL_Conv2d(2, 2, 2, 4, 3, bn=True).double()
    with torch.no_grad():
        layer.alpha.normal_()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, 0, 2])
    names = ["weight", "alpha", "basis", "bn.weight", "bn.bias"]
    params = [dict(layer.named_parameters())[n] for n in names]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, ids), {"per_row": True})
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ empty batches
EMPTY_LAYERS = {
    "TAL_Linear": lambda: (TAL_Linear(8, 5, 4, 3), (8,), (5,)),
    "TAL_Linear[bn]": lambda: (TAL_Linear(8, 5, 4, 3, bn=True).eval(), (8,), (5,)),
    "TAL_Conv2d": lambda: (TAL_Conv2d(2, 3, 3, 4, 3, padding=1).eval(), (2, 5, 5), (3, 5, 5)),
    "MRN_Linear": lambda: (MRN_Linear(8, 5, 3).eval(), (8,), (5,)),
    "MRN_Conv2d": lambda: (MRN_Conv2d(2, 3, 3, 3, padding=1).eval(), (2, 5, 5), (3, 5, 5)),
    "DMTRL_Linear": lambda: (DMTRL_Linear(8, 5, 3, "TT"), (8,), (5,)),
    "DMTRL_Conv2d": lambda: (DMTRL_Conv2d(2, 3, 3, 3, "TT", padding=1), (2, 5, 5), (3, 5, 5)),
}


@pytest.mark.parametrize("mode", ["int", "ids_shared", "ids_per_task", "per_row"])
@pytest.mark.parametrize("name", list(EMPTY_LAYERS))
def test_an_empty_batch_works_in_every_layer_and_mode(backend, name, mode):
    """As nn.Linear: 0 rows in, 0 rows out, and a backward pass with zero gradients."""
    torch.manual_seed(0)
    layer, shape, out_shape = EMPTY_LAYERS[name]()
    ids = torch.tensor([0, 2])
    x, task, per_row, want = {
        "int": (torch.randn(0, *shape), 1, False, (0, *out_shape)),
        "ids_shared": (torch.randn(0, *shape), ids, False, (0, 2, *out_shape)),
        "ids_per_task": (torch.randn(0, 2, *shape), ids, False, (0, 2, *out_shape)),
        "per_row": (torch.randn(0, *shape), torch.zeros(0, dtype=torch.long), True, (0, *out_shape)),
    }[mode]
    x.requires_grad_()
    out = layer(x, task, per_row=per_row)
    assert out.shape == want
    (out.sum() + 0 * sum(p.sum() for p in layer.parameters())).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
