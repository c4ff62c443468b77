"""The Triton kernels of the TAL activation (`Layers._tal_triton`) against the naive formula.

On a CUDA machine with the ``triton`` package these tests run the kernels on the GPU.
Without a GPU they run in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton, so each test reports as what it is.
The triton package is not a project dependency (a wheel of about 170 MB). So, on any machine:

    pip install triton==3.7.1          # the version paired with torch 2.13
    python -m pytest -q tests/test_tal_triton.py

Without triton every test here is skipped with the reason.
"""
import importlib.util
import os

import pytest
import torch

from Layers import _tal_kernel
from test_tal import assert_passes_opcheck, basis_case, inputs_for, naive_grouped

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"

if not HAVE_TRITON:
    _why = "triton is not installed (optional; see this file's docstring to run these tests)"
elif not (INTERPRETING or torch.cuda.is_available()):
    _why = "no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless it is set otherwise)"
else:
    _why = None
needs_kernels = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setattr(_tal_kernel, "_backend", "triton")


def case(R, N, T, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, N, generator=g, dtype=dtype)
    alpha = torch.randn(T, M, generator=g, dtype=dtype)
    basis = (2 * torch.rand(1, M, generator=g, dtype=dtype) - 1)
    rt = torch.randint(0, T, (R,), generator=g)
    grad = torch.randn(R, N, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (a, alpha, basis, rt, grad)]


def kernel_and_naive(a, alpha, basis, rt, grad):
    """(output, grads of a, alpha, basis) from the kernel and from the naive formula."""
    results = []
    for fn in (lambda *x: _tal_kernel.tal_activation(*x, rt),
               lambda a_, al, b: _tal_kernel.tal_activation_naive(a_, al[rt][:, None, :], b)):
        leaves = [t.detach().clone().requires_grad_() for t in (a, alpha, basis)]
        out = fn(*leaves)
        results.append((out.detach(),) + torch.autograd.grad(out, leaves, grad))
    return results


@needs_kernels
@pytest.mark.parametrize("M", [16, 64, 256])
@pytest.mark.parametrize("shape", [(37, 101), (2, 4301)], ids=["odd", "several-programs-per-row"])
def test_float32_per_row_tasks_match_naive(M, shape):
    got, want = kernel_and_naive(*case(*shape, T=5, M=M, dtype=torch.float32))
    assert _tal_kernel.backend_for(got[0], M) == "triton"
    for u, v, name in zip(got, want, ("out", "grad a", "grad alpha", "grad basis")):
        scale = v.abs().max().item() + 1
        assert (u - v).abs().max().item() <= 2e-5 * scale, name


@needs_kernels
@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize("keep", [True, False], ids=["buckets-kept", "buckets-found-again"])
def test_float64_equals_naive(M, keep, monkeypatch):
    if not keep:
        monkeypatch.setattr(_tal_kernel, "KEEP_BUCKETS_MAX_BASIS", 0)
    got, want = kernel_and_naive(*case(29, 77, T=3, M=M, dtype=torch.float64, seed=M))
    for u, v, name in zip(got, want, ("out", "grad a", "grad alpha", "grad basis")):
        assert (u - v).abs().max().item() < 1e-10, name


@needs_kernels
@pytest.mark.parametrize("shape", [(9, 23), (1, 3000), (3, 2500)], ids=["rows", "one-row-in-pieces", "pieces"])
def test_grouped_bases_float64_equal_naive(shape):
    """basis [G, M], task t in group t // Tg: one call for R runs stacked."""
    g = torch.Generator().manual_seed(5)
    G, Tg, M = 3, 2, 16
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    alpha = torch.randn(G * Tg, M, generator=g, dtype=torch.float64)
    basis = torch.randn(G, M, generator=g, dtype=torch.float64)
    rt = torch.randint(0, G * Tg, (shape[0],), generator=g)
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    leaves = [t.to(DEVICE).requires_grad_() for t in (a, alpha, basis)]
    out = _tal_kernel.tal_activation(*leaves, rt.to(DEVICE))
    ref = naive_grouped(*leaves, rt.to(DEVICE))
    assert (out - ref).abs().max().item() < 1e-10
    for u, v in zip(torch.autograd.grad(out, leaves, grad.to(DEVICE)), torch.autograd.grad(ref, leaves, grad.to(DEVICE))):
        assert (u - v).abs().max().item() < 1e-10


@needs_kernels
def test_backward_gives_the_same_bits_every_run():
    """No atomics: each program writes its own slot and a fixed-order reduction sums them."""
    a, alpha, basis, rt, grad = case(40, 5000, T=4, M=32, dtype=torch.float32, seed=9)
    runs = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (a, alpha, basis)]
        out = _tal_kernel.tal_activation(*leaves, rt)
        runs.append(torch.autograd.grad(out, leaves, grad))
    for later in runs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(runs[0], later))


@needs_kernels
def test_operator_passes_opcheck():
    a, alpha, basis, rt, grad = case(6, 40, T=3, M=5, dtype=torch.float64, seed=4)
    leaves = [t.requires_grad_() for t in (a, alpha, basis)]
    assert_passes_opcheck(torch.ops.taan.tal_activation.default, (*leaves, rt, True))


@needs_kernels
def test_gradcheck_float64():
    a, alpha, basis, rt, _ = case(3, 7, T=2, M=4, dtype=torch.float64, seed=3)
    leaves = [t.requires_grad_() for t in (a, alpha, basis)]
    assert torch.autograd.gradcheck(lambda *x: _tal_kernel.tal_activation(*x, rt), leaves, eps=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("which", ["random", "ties", "crowded", "equal", "one", "huge", "tiny", "large"])
def test_buckets_equal_searchsorted(which):
    """The same stress cases as the C++ kernel's (tests/test_tal.py)."""
    g = torch.Generator().manual_seed(7)
    s = basis_case(which, torch.float64, g)
    a = inputs_for(s, g, torch.float64)
    rt = torch.tensor([0, 2, 1, 1, 0, 2])
    alpha = torch.randn(3, s.numel(), generator=g, dtype=torch.float64)
    s_, _, _, A, S = _tal_kernel._tables(alpha, s.view(1, -1))
    from Layers import _tal_triton
    out, k = _tal_triton.forward(*(t.to(DEVICE) for t in (a, rt, s_, A, S)), 3, True)   # 3 tasks, 1 group
    ref_out, ref_k = _tal_kernel._torch_forward(a, alpha, s.view(1, -1), rt, True)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-15, atol=0, equal_nan=True)
    if k.numel():
        assert torch.equal(k.cpu()[~a.isnan()], ref_k[~a.isnan()])


@needs_kernels
def test_layer_uses_the_kernel_and_matches_the_torch_path(monkeypatch):
    from Layers import TAL_Conv2d
    torch.manual_seed(0)
    layer = TAL_Conv2d(3, 4, 3, 8, 5, padding=1).to(DEVICE)
    x = torch.randn(6, 3, 9, 7, device=DEVICE)
    ids = torch.tensor([4, 0, 2, 2, 1, 3], device=DEVICE)
    out = layer(x, ids, per_row=True)
    monkeypatch.setattr(_tal_kernel, "_backend", "torch")
    assert torch.allclose(out, layer(x, ids, per_row=True), atol=1e-6, rtol=0)
