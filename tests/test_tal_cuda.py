"""Every model gives the same outputs and gradients on CUDA as on the CPU.

On CUDA the TAL layers run the Triton kernels (or the PyTorch path without triton), the
other layers plain PyTorch ops; on the CPU the TAL layers run the C++ kernel. Skipped
without a CUDA device (benchmarks/cuda_check.sh runs these on a GPU machine). Float32,
with TF32 turned off so that the GPU's matrix products round like the CPU's.
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch

from Layers import TAL_Conv2d, TAL_Linear, _tal_kernel
from test_tal import assert_passes_opcheck
from Omniglot.TAAN import IMAGE_SIZE, MODELS as OMNIGLOT_MODELS, build_model as build_omniglot
from Youtube8M.models import MODELS as YOUTUBE8M_MODELS, build_model as build_youtube8m, multitask_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

YT_CLASSES, YT_SIZES = [3, 5, 2, 7], [6, 3, 5, 4]
YT_VARIANTS = [(name, {}) for name in YOUTUBE8M_MODELS if name not in ("DMTRL", "TAAN")] + \
    [("DMTRL", {"method": m}) for m in ("Tucker", "TT", "LAF")] + \
    [("TAAN", {"basis": 8, "regularize": "distance"}), ("TAAN", {"basis": 300})]
OMNI_CLASSES = [4, 6, 5]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def outputs_and_grads(model, inputs, loss_fn):
    """Eval-mode outputs, then the gradients of a training-mode loss (dropout off)."""
    model.eval()
    with torch.no_grad():
        outs = [o.detach().cpu() for o in model(*inputs)]
    model.zero_grad()
    for m in model.modules():                        # batch norm in training mode, no dropout
        m.train(isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    loss_fn(model(*inputs)).backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def mismatches(build, inputs, loss_fn, device="cuda"):
    """What differs between the model on CUDA and on the CPU: the outputs (rtol 1e-4) and the
    parameter gradients (rtol 1e-3) not close, and gradients present on one side only."""
    torch.manual_seed(0)
    cpu = build()
    gpu = copy.deepcopy(cpu).to(device)
    got = outputs_and_grads(gpu, [[t.to(device) for t in x] if isinstance(x, list) else x.to(device)
                                  for x in inputs], loss_fn)
    want = outputs_and_grads(cpu, inputs, loss_fn)
    bad = [f"output {i}" for i, (u, v) in enumerate(zip(got[0], want[0]))
           if not torch.allclose(u, v, rtol=1e-4, atol=1e-5)]
    bad += [f"gradient of {name} on one side only" for name in sorted(got[1].keys() ^ want[1].keys())]
    bad += [f"gradient of {name}" for name in sorted(want[1].keys() & got[1].keys())
            if not torch.allclose(got[1][name], want[1][name], rtol=1e-3, atol=1e-5)]
    return bad


@pytest.mark.parametrize("name,kw", YT_VARIANTS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in YT_VARIANTS])
def test_youtube8m_model_cuda_matches_cpu(name, kw):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, 20, generator=g) for b in YT_SIZES]
    ys = [(torch.rand(b, c, generator=g) < 0.3).float() for b, c in zip(YT_SIZES, YT_CLASSES)]

    def loss(logits):
        return multitask_loss(logits, [y.to(logits[0].device) for y in ys])[0]
    assert mismatches(lambda: build_youtube8m(name, 20, 16, YT_CLASSES, **kw), [xs], loss) == []


@pytest.mark.parametrize("name", OMNIGLOT_MODELS)
def test_omniglot_model_cuda_matches_cpu(name):
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(9, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.2).float()
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])

    def loss(logits):
        return sum(z.square().mean() for z in logits)
    assert mismatches(lambda: build_omniglot(name, OMNI_CLASSES, basis=8) if name == "taan"
                      else build_omniglot(name, OMNI_CLASSES), [x, ids], loss) == []


def test_cuda_runs_the_triton_kernel_when_triton_is_installed():
    pytest.importorskip("triton", reason="triton is not installed: CUDA runs the PyTorch path")
    assert _tal_kernel.backend_for(torch.zeros(1, device="cuda"), 64) == "triton"


def synchronisations(fn):
    """The warnings of PyTorch's sync debug mode while fn() runs: one per operation that made
    the CPU wait for the GPU (a read-back, a blocking copy)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


def test_tal_layers_never_wait_for_the_gpu():
    """Forward and backward of both TAL layers, and a Youtube-8M TAAN step's forward and
    backward, queue their work without reading anything back: the GPU never idles on them.
    (A read-back under the same watch is seen, so the watch works.)"""
    g = torch.Generator().manual_seed(3)
    linear, conv = TAL_Linear(8, 6, 5, 3).to("cuda"), TAL_Conv2d(2, 4, 3, 5, 3).to("cuda")
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0], device="cuda")
    x, img = torch.randn(7, 8, generator=g).to("cuda"), torch.randn(7, 2, 6, 6, generator=g).to("cuda")
    model = build_youtube8m("TAAN", 20, 16, YT_CLASSES, basis=8, regularize="distance").to("cuda")
    xs = [torch.randn(b, 20, generator=g).to("cuda") for b in YT_SIZES]

    def layers():
        (linear(x, ids, per_row=True).sum() + conv(img, ids, per_row=True).sum()).backward()

    def taan_step():
        (sum(z.sum() for z in model(xs)) + model.regularization(1.0)).backward()
    assert synchronisations(lambda: int(ids.max())) != []
    assert synchronisations(layers) == []
    assert synchronisations(taan_step) == []


def test_a_bad_task_id_on_cuda_stops_the_run_at_the_next_synchronisation():
    """On CUDA the ids are checked on the device (no read-back): a bad one fails the device's
    assertion kernel, as PyTorch's own indexing does there, instead of a silent wrong read."""
    code = ("import torch; from Layers import TAL_Linear; "
            "layer = TAL_Linear(4, 3, 5, 2).to('cuda'); "
            "layer(torch.randn(3, 4, device='cuda'), torch.tensor([0, 1, 2], device='cuda'), per_row=True); "
            "torch.cuda.synchronize()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "_assert_async" in done.stderr, done.stderr[-2000:]


def test_operators_pass_opcheck_on_cuda():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(6, 2, 5, dtype=torch.float64, generator=g).to("cuda").requires_grad_()
    alpha = torch.randn(6, 4, dtype=torch.float64, generator=g).to("cuda").requires_grad_()
    basis = torch.randn(2, 4, dtype=torch.float64, generator=g).to("cuda").requires_grad_()
    rt = torch.tensor([0, 5, 3, 2, 2, 1], device="cuda")
    assert_passes_opcheck(torch.ops.taan.tal_activation.default, (a, alpha, basis, rt, True))
    h = torch.randn(5, 3, dtype=torch.float64, generator=g).to("cuda").requires_grad_()
    w = torch.randn(4, 2, 3, dtype=torch.float64, generator=g).to("cuda").requires_grad_()
    assert_passes_opcheck(torch.ops.taan.rows_linear.default, (h, torch.tensor([3, 0, 3, 1, 0], device="cuda"), w, None))


def test_gpu_gradients_are_the_same_bits_every_run():
    """The Triton backward has no atomics (or the PyTorch path runs, which sums by index_add)."""
    pytest.importorskip("triton", reason="triton is not installed: CUDA runs the PyTorch path")
    g = torch.Generator().manual_seed(9)
    a = torch.randn(4096, 1024, generator=g).to("cuda")
    alpha, basis = torch.randn(16, 64, generator=g).to("cuda"), torch.randn(1, 64, generator=g).to("cuda")
    rt = torch.randint(0, 16, (4096,), generator=g).to("cuda")
    grad = torch.randn(4096, 1024, generator=g).to("cuda")
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (a, alpha, basis)]
        runs.append(torch.autograd.grad(_tal_kernel.tal_activation(*leaves, rt), leaves, grad))
    for later in runs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(runs[0], later))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "cuda-graphs"])
def test_compiled_youtube8m_taan_step_on_cuda_equals_eager(mode):
    """The training step compiled with Inductor (Triton code around the taan:: operators) and,
    in 'reduce-overhead' mode, replayed as CUDA graphs: the eager step's loss and gradients."""
    torch.manual_seed(0)
    model = build_youtube8m("TAAN", 20, 16, YT_CLASSES, basis=8, regularize="distance").to("cuda")
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(b, 20, generator=g).to("cuda") for b in YT_SIZES]
    ys = [(torch.rand(b, c, generator=g) < 0.3).float().to("cuda") for b, c in zip(YT_SIZES, YT_CLASSES)]

    def step(xs):
        return multitask_loss(model(xs), ys)[0] + model.regularization(1.0)
    compiled = torch.compile(step, fullgraph=True, mode=mode)
    results = []
    for f in (step, compiled, compiled, compiled):       # the CUDA graphs are recorded, then replayed
        model.zero_grad(set_to_none=True)
        loss = f(xs)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for u, v in zip(grads, results[0][1]):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
