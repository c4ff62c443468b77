"""torch.compile(fullgraph=True) of every layer, model and run stack equals the eager run.

fullgraph=True makes any graph break an error, so these tests fail if a layer reads a value
back from a tensor or builds a shape from the data. Most cases compile with the
"aot_eager" backend: Dynamo and AOTAutograd trace forward and backward through the taan::
operators' fake kernels and registered autograd, quickly; a few representative ones run
Inductor's generated code too. Float64, so that equal means equal to 1e-10.
"""
import pytest
import torch

from Layers import DMTRL_Conv2d, DMTRL_Linear, MRN_Conv2d, MRN_Linear, TAL_Conv2d, TAL_Linear
from Omniglot.stack import TAANList, TAANStack
from Omniglot.TAAN import MODELS as OMNIGLOT_MODELS, build_model as build_omniglot, multitask_loss as omniglot_loss
from Youtube8M.models import MODELS as YOUTUBE8M_MODELS, build_model as build_youtube8m, multitask_loss

MODES = ["int", "ids_shared", "ids_per_task", "per_row"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_and_compiled(fn, params, *inputs, backend="aot_eager"):
    """(output, gradients of the inputs that need them and of params) of fn eager, then compiled."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        for p in params:
            p.grad = None
        out = f(*leaves)
        loss = out if out.dim() == 0 else torch.cos(out.nan_to_num(neginf=0.0)).sum()
        loss.backward()
        grads = [x.grad for x in leaves if x.requires_grad] + [p.grad for p in params]
        results.append((out.detach(), grads))
    return results


def assert_same(results, tol=1e-10):
    (out, grads), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out, rtol=tol, atol=tol, equal_nan=True)
    assert len(grads) == len(grads_c)
    for g, g_c in zip(grads, grads_c):
        assert (g is None) == (g_c is None)
        if g is not None:
            torch.testing.assert_close(g_c, g, rtol=tol, atol=tol)


def layer_call(kind, mode, g):
    """(x, task, per_row) for a layer's input features (6,) or (3, 5, 5)."""
    shape = (6,) if kind == "linear" else (3, 5, 5)
    B = 7
    if mode == "int":
        return torch.randn(B, *shape, generator=g, dtype=torch.float64), 2, False
    if mode == "ids_shared":
        return torch.randn(B, *shape, generator=g, dtype=torch.float64), torch.tensor([3, 0]), False
    if mode == "ids_per_task":
        return torch.randn(B, 2, *shape, generator=g, dtype=torch.float64), torch.tensor([1, 3]), False
    return torch.randn(B, *shape, generator=g, dtype=torch.float64), torch.tensor([0, 3, 3, 1, 2, 0, 3]), True


LAYERS = {
    "TAL_Linear": lambda: TAL_Linear(6, 5, 7, 4, regularize="distance"),
    "TAL_Conv2d": lambda: TAL_Conv2d(3, 4, 3, 7, 4, padding=1),
    "MRN_Linear": lambda: MRN_Linear(6, 5, 4, dropout=False),
    "MRN_Conv2d": lambda: MRN_Conv2d(3, 4, 3, 4, padding=1, dropout=False),
    "DMTRL_Linear[Tucker]": lambda: DMTRL_Linear(6, 5, 4, "Tucker"),
    "DMTRL_Linear[TT]": lambda: DMTRL_Linear(6, 5, 4, "TT"),
    "DMTRL_Linear[LAF]": lambda: DMTRL_Linear(6, 5, 4, "LAF"),
    "DMTRL_Conv2d": lambda: DMTRL_Conv2d(3, 4, 3, 4, "TT", padding=1),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_compiles_in_every_task_mode(name, mode):
    torch.manual_seed(0)
    layer = LAYERS[name]().double().train()
    kind = "conv" if "Conv" in name else "linear"
    x, task, per_row = layer_call(kind, mode, torch.Generator().manual_seed(1))
    params = list(layer.parameters())

    def fn(x):
        out = layer(x, task, per_row=per_row)
        reg = layer.regularization(0.1) if isinstance(layer, TAL_Linear) else 0.0
        return (torch.cos(out).sum() + reg) if kind == "linear" else out
    assert_same(eager_and_compiled(fn, params, x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_tal_conv2d_with_batch_norm_in_inductor(train):
    """Inductor's code around the taan:: operators (batch norm folded into the C++ kernel on
    the CPU in training mode, running statistics updated in the compiled graph)."""
    torch.manual_seed(0)
    layer = TAL_Conv2d(3, 4, 3, 7, 4, padding=1).double().train(train)
    x, ids, _ = layer_call("conv", "per_row", torch.Generator().manual_seed(2))
    before = layer.bn.running_mean.clone()
    results = eager_and_compiled(lambda x: layer(x, ids, per_row=True), list(layer.parameters()), x,
                                 backend="inductor")
    assert_same(results)
    if train:    # both calls updated the running statistics the same way: twice
        assert not torch.equal(layer.bn.running_mean, before) and int(layer.bn.num_batches_tracked) == 2


def test_tal_linear_per_row_in_inductor():
    torch.manual_seed(0)
    layer = TAL_Linear(6, 5, 7, 4).double()
    x, ids, _ = layer_call("linear", "per_row", torch.Generator().manual_seed(3))
    assert_same(eager_and_compiled(lambda x: torch.tanh(layer(x, ids, per_row=True)), list(layer.parameters()), x,
                                   backend="inductor"))


def test_task_ids_are_still_checked():
    """Eager on the CPU: the IndexError of today. Compiled: a device-side assert, which fails
    the call (on a GPU at the next synchronisation)."""
    layer = TAL_Linear(6, 5, 7, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    bad = torch.tensor([0, 4, 1])
    with pytest.raises(IndexError, match=r"task id out of range: got ids in \[0, 4\], but this layer was built "
                                         r"for 4 tasks \(valid ids 0\.\.3\)"):
        layer(x, bad, per_row=True)
    compiled = torch.compile(lambda x, ids: layer(x, ids, per_row=True), fullgraph=True, backend="aot_eager")
    compiled(x, torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match="task id out of range"):
        compiled(x, bad)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_rows_operators_equal_one_call_per_row_and_pass_opcheck(bias):
    """taan::rows_linear / rows_conv2d: row i with task ids[i]'s weights, as a loop over rows
    would compute it (tasks with no row, rows in any order), with gradcheck and opcheck."""
    from Layers import rows_conv2d, rows_linear
    from test_tal import assert_passes_opcheck
    g = torch.Generator().manual_seed(13)
    ids = torch.tensor([3, 0, 3, 1, 0])                      # task 2 has no row
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    want = torch.stack([w[t] @ h[i] + (b[t] if bias else 0) for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(rows_linear(h, ids, w, b), want, rtol=1e-12, atol=1e-12)
    leaves = (h, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda h, w, *b: rows_linear(h, ids, w, b[0] if b else None), leaves)
    assert_passes_opcheck(torch.ops.taan.rows_linear.default, (h, ids, w, b))
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(4, 3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    kb = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    conv = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    want = torch.cat([torch.nn.functional.conv2d(x[i:i + 1], k[t], kb[t] if bias else None, padding=1)
                      for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(rows_conv2d(x, ids, k, kb, **conv), want, rtol=1e-12, atol=1e-12)
    leaves = (x, k) + ((kb,) if bias else ())
    assert torch.autograd.gradcheck(lambda x, k, *kb: rows_conv2d(x, ids, k, kb[0] if kb else None, **conv), leaves)
    assert_passes_opcheck(torch.ops.taan.rows_conv2d.default, (x, ids, k, kb, [1, 1], [1, 1], [1, 1], 1))


YT_CLASSES, YT_SIZES = [3, 5, 2, 7], [6, 3, 5, 4]
YT_VARIANTS = [(name, {}) for name in YOUTUBE8M_MODELS if name not in ("DMTRL", "TAAN")] + \
    [("DMTRL", {"method": m}) for m in ("Tucker", "TT", "LAF")] + [("TAAN", {"basis": 8, "regularize": "distance"})]


@pytest.mark.parametrize("name, kw", YT_VARIANTS, ids=[f"{n}{kw.get('method', '')}" for n, kw in YT_VARIANTS])
def test_every_youtube8m_training_step_compiles(name, kw):
    torch.manual_seed(0)
    model = build_youtube8m(name, 10, 8, YT_CLASSES, **kw).double()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(b, 10, generator=g, dtype=torch.float64) for b in YT_SIZES]
    ys = [(torch.rand(b, c, generator=g) < 0.3).double() for b, c in zip(YT_SIZES, YT_CLASSES)]

    def step(*xs):
        return multitask_loss(model(list(xs)), ys)[0] + model.regularization(0.01)
    assert_same(eager_and_compiled(step, list(model.parameters()), *xs))


OMNI_CLASSES = [4, 6, 5]


def omniglot_batch(g, runs=None):
    lead = () if runs is None else (runs,)
    x = (torch.rand(*lead, 6, 1, 105, 105, generator=g) > 0.5).double()
    ids = torch.arange(3).repeat_interleave(2)
    y = torch.tensor([0, 3, 5, 1, 4, 2]).expand(*lead, 6)
    return x, y, ids


@pytest.mark.parametrize("name", OMNIGLOT_MODELS)
def test_every_omniglot_network_compiles(name):
    torch.manual_seed(0)
    model = build_omniglot(name, OMNI_CLASSES, basis=8, regularize="distance" if name == "taan" else None)
    model = model.double().train()
    x, y, ids = omniglot_batch(torch.Generator().manual_seed(5))
    assert_same(eager_and_compiled(lambda x: omniglot_loss(model(x, ids), y, ids, 3) + model.regularization(0.3),
                                   list(model.parameters()), x))


@pytest.mark.parametrize("stacked", [True, False], ids=["TAANStack", "TAANList"])
def test_omniglot_run_stacks_compile(stacked):
    models = []
    for seed, reg in enumerate(("distance", None, "tracenorm_original")):
        torch.manual_seed(seed)
        models.append(build_omniglot("taan", OMNI_CLASSES, basis=8, regularize=reg).double())
    lams = [0.2, 0.0, 0.1]
    runs = (TAANStack.from_models(models, lams) if stacked else TAANList(models, lams)).train()
    x, y, ids = omniglot_batch(torch.Generator().manual_seed(6), runs=3)
    assert_same(eager_and_compiled(lambda x: runs.run_losses(x, y, ids).sum() + runs.regularization(),
                                   list(runs.parameters()), x))


def test_compiled_single_task_network_refuses_another_layout():
    model = build_omniglot("stl", OMNI_CLASSES).double().eval()
    x, _, _ = omniglot_batch(torch.Generator().manual_seed(7))
    compiled = torch.compile(lambda x, ids: model(x, ids), fullgraph=True, backend="aot_eager")
    compiled(x, torch.arange(3).repeat_interleave(2))
    with pytest.raises(RuntimeError, match="grouped by task"):
        compiled(x, torch.tensor([1, 0, 0, 1, 2, 2]))


# ------------------------------------------------------------------------------- --compile in the trainers

def test_youtube8m_trainer_compile_equals_eager_and_resumes(youtube8m_data, tmp_path):
    """--compile gives the eager run's weights and mAP to float rounding; a compiled run is
    resumed by an eager one (and the other way round) from the same files."""
    from Youtube8M import Trainer
    tiny = ['--model', 'TAAN', '--regularize', 'distance', '--hidden_feature', '8', '--batch_size', '16', '--basis',
            '4', '--device', 'cpu', '--lr', '0.01', '--data_path', youtube8m_data, '--progress', 'false']
    eager = Trainer.main(tiny + ['--max_epoch', '2', '--saveto', str(tmp_path / 'eager')])
    half = Trainer.main(tiny + ['--max_epoch', '1', '--saveto', str(tmp_path / 'compiled'), '--compile'])
    assert half['epochs'] == 1
    resumed = Trainer.main(tiny + ['--max_epoch', '2', '--saveto', str(tmp_path / 'compiled'), '--resume', 'auto'])
    assert resumed['epochs'] == 2
    assert resumed['mAP'] == pytest.approx(eager['mAP'], abs=1e-4)
    want = torch.load(str(tmp_path / 'eager' / 'TAAN.pth'))
    got = torch.load(str(tmp_path / 'compiled' / 'TAAN.pth'))
    assert want.keys() == got.keys()           # the module's own names: nothing compiled is saved
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_omniglot_train_compile_equals_eager(tmp_path):
    from Omniglot import synthetic, train
    root = str(tmp_path / "data")
    synthetic.generate(root, alphabets=3, drawers=4, min_chars=2, max_chars=3)
    data = train.load_data(root, torch.device("cpu"))
    argv = ["--data_root", root, "--regularize", "distance", "--lam", "0.3", "--basis", "4", "--lr", "1e-3",
            "--batch", "2", "--num_iter", "6", "--test_interval", "3", "--dtype", "float64", "--device", "cpu",
            "--progress", "false"]
    quiet = dict(log=lambda *a, **k: None)
    eager = train.train(train.build_parser().parse_args(argv + ["--saveto", str(tmp_path / "eager")]), data=data,
                        **quiet)
    compiled = train.train(train.build_parser().parse_args(argv + ["--saveto", str(tmp_path / "compiled"),
                                                                   "--compile"]), data=data, **quiet)
    assert [i for i, _ in compiled["history"]] == [i for i, _ in eager["history"]] == [0, 3, 6]
    assert [a for _, a in compiled["history"]] == pytest.approx([a for _, a in eager["history"]], abs=1e-12)
    want = torch.load(str(tmp_path / "eager" / train.STATE_NAME))["model"]
    got = torch.load(str(tmp_path / "compiled" / train.STATE_NAME))["model"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10)
