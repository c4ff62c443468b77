"""Youtube-8M models: shapes, one training step, the loss, and naive per-task references."""
import math

import pytest
import torch
import torch.nn.functional as F

from Youtube8M.models import MODELS, build_model, multitask_loss

IN, HIDDEN = 20, 16
NUM_CLASSES = [3, 5, 2, 7]
SIZES = [6, 3, 5, 4]                       # unequal per-task batch sizes
VARIANTS = [('STL', {}), ('Hard3', {}), ('MRN', {}), ('SoftOrder', {}),
            ('DMTRL', {'method': 'Tucker'}), ('DMTRL', {'method': 'TT'}), ('DMTRL', {'method': 'LAF'}),
            ('CrossStitch', {}), ('MMoE', {}), ('TAAN', {'basis': 5, 'regularize': 'distance'})]
IDS = [name + '-' + kw.get('method', '') if 'method' in kw else name for name, kw in VARIANTS]


def make(name, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return build_model(name, IN, HIDDEN, NUM_CLASSES, **kw).to(dtype)


def batch(dtype=torch.float32, sizes=SIZES):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, IN, generator=g, dtype=dtype) for b in sizes]
    ys = [(torch.rand(b, c, generator=g) < 0.3).to(dtype) for b, c in zip(sizes, NUM_CLASSES)]
    return xs, ys


def test_every_model_is_tested():
    assert {name for name, _ in VARIANTS} == set(MODELS)


@pytest.mark.parametrize('name,kw', VARIANTS, ids=IDS)
def test_forward_shapes(name, kw):
    model = make(name, **kw)
    xs, _ = batch()
    out = model(xs)
    assert [tuple(o.shape) for o in out] == [(b, c) for b, c in zip(SIZES, NUM_CLASSES)]
    assert all(torch.isfinite(o).all() for o in out)
    # equal batch sizes take the unpadded path and agree with the padded one row by row
    same = model([x[:3] for x in xs])
    for o, s in zip(out, same):
        torch.testing.assert_close(s, o[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name,kw', VARIANTS, ids=IDS)
def test_one_task_at_a_time_with_the_other_batches_empty(name, kw):
    model = make(name, **kw).eval()
    xs, _ = batch()
    with torch.no_grad():
        full = model(xs)
        for t in range(len(xs)):
            out = model([x if j == t else x[:0] for j, x in enumerate(xs)])
            torch.testing.assert_close(out[t], full[t], rtol=1e-5, atol=1e-6)
            assert [tuple(o.shape) for j, o in enumerate(out) if j != t] == \
                   [(0, c) for j, c in enumerate(NUM_CLASSES) if j != t]


@pytest.mark.parametrize('name,kw', VARIANTS, ids=IDS)
def test_one_adam_step_lowers_the_loss(name, kw):
    model = make(name, **kw)
    xs, ys = batch()
    c = 0.1

    def loss():
        return multitask_loss(model(xs), ys)[0] + model.regularization(c)

    model.eval()
    with torch.no_grad():
        before = float(loss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    opt.zero_grad()
    loss().backward()
    opt.step()
    if hasattr(model, 'update'):      # MRN: re-estimate the covariances, as after_step does every update_interval steps
        model.update()
    model.eval()
    with torch.no_grad():
        after = float(loss())
    assert math.isfinite(before) and after < before - 1e-4


def test_multitask_loss_by_hand():
    logits = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-1.0], [1.0]])]
    labels = [torch.tensor([[1, 0]]), torch.tensor([[0.0], [1.0]])]
    # BCE(z, y) = log(1 + e^z) - y z; task 0 has C=2 classes (mean * 2 = sum), task 1 has C=1
    l0 = math.log(2.0) + math.log(1 + math.e ** 2)
    l1 = (math.log(1 + math.e ** -1) + (math.log(1 + math.e) - 1.0)) / 2
    total, per_task = multitask_loss(logits, labels)
    assert per_task[0].item() == pytest.approx(l0, rel=1e-6)
    assert per_task[1].item() == pytest.approx(l1, rel=1e-6)
    assert total.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_multitask_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='shape'):
        multitask_loss([torch.zeros(2, 3)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match='one label batch'):
        multitask_loss([torch.zeros(2, 3)], [])


# ---------------------------------------------------------------- naive per-task references

def lin(x, layer):
    return x @ layer.weight.t() + layer.bias


def tal(x, layer, t):
    a = lin(x, layer)
    return F.relu(a) + (layer.alpha[t] * F.relu(layer.basis[0] - a.unsqueeze(-1))).sum(-1)


def reference(model, xs):
    """The model's function written as a loop over tasks (and columns/experts)."""
    name, out = type(model).__name__, []
    for t, x in enumerate(xs):
        if name == 'STL':
            h = x
            for layer in model.layers:
                h = F.relu(h @ layer.weight[t] + layer.bias[t])
        elif name == 'Hard3':
            h = x
            for layer in model.backbone[::2]:
                h = F.relu(lin(h, layer))
        elif name == 'SoftOrder':
            s = torch.softmax(model.S[t], dim=-1)
            h = F.relu(lin(x, model.first))
            for d in range(2):
                h = sum(s[d, l] * F.relu(lin(h, model.shared[l])) for l in range(2))
        elif name == 'CrossStitch':      # as the original: all T columns see task t's batch
            cols = [x] * model.tasks
            for layer, A in zip(model.columns, model.stitch):
                g = [F.relu(c @ layer.weight[j] + layer.bias[j]) for j, c in enumerate(cols)]
                cols = [sum(A[i, j] * g[j] for j in range(model.tasks)) for i in range(model.tasks)]
            h = cols[t]
        elif name == 'MMoE':
            experts = []
            for k in range(model.experts):
                e = x
                for layer in model.layers:
                    e = F.relu(e @ layer.weight[k] + layer.bias[k])
                experts.append(e)
            g = torch.softmax(x @ model.gates[t].t(), dim=-1)
            h = sum(g[:, k:k + 1] * experts[k] for k in range(model.experts))
        elif name == 'TAAN':
            h = x
            for layer in model.layers:
                h = tal(h, layer, t)
        elif name == 'MRN':              # the layers' own single-task path
            h = x
            for layer in model.layers:
                h = layer(h, t)
        elif name == 'DMTRL':
            h = x
            for layer in model.layers:
                h = F.relu(layer(h, t))
        out.append(lin(h, model.heads[t]))
    return out


@pytest.mark.parametrize('name,kw', VARIANTS, ids=IDS)
def test_single_call_equals_per_task_loop(name, kw):
    model = make(name, dtype=torch.float64, **kw).eval()
    xs, _ = batch(torch.float64)
    with torch.no_grad():
        got = model(xs)                  # CrossStitch normalises its stitch rows here
        want = reference(model, xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_cross_stitch_rows_are_rescaled_to_unit_norm():
    model = make('CrossStitch')
    T = model.tasks
    with torch.no_grad():
        model.stitch.copy_(torch.arange(1.0, 1.0 + 3 * T * T).view(3, T, T))
    expect = model.stitch.detach() / model.stitch.detach().norm(dim=-1, keepdim=True)
    model(batch()[0])
    torch.testing.assert_close(model.stitch.detach(), expect)
    torch.testing.assert_close(model.stitch.detach().norm(dim=-1), torch.ones(3, T))


def test_cross_stitch_gradient_reaches_every_stitch_matrix():
    model = make('CrossStitch')
    xs, ys = batch()
    multitask_loss(model(xs), ys)[0].backward()
    assert model.stitch.grad is not None and (model.stitch.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_regularization_sums_the_layers():
    model = make('TAAN', basis=5, regularize='distance')
    want = sum(layer.regularization(0.3) for layer in model.layers)
    assert model.regularization(0.3).item() == pytest.approx(want.item(), rel=1e-12)
    assert model.regularization(0.3).item() > 0
    assert model.reg_layers() == list(model.layers)
    hard = make('Hard3')
    assert hard.regularization(0.3) == 0. and hard.reg_layers() == []


def test_soft_order_matrix_is_sized_by_the_number_of_tasks():
    assert tuple(make('SoftOrder').S.shape) == (len(NUM_CLASSES), 2, 2)


def test_unknown_model_is_a_value_error_listing_the_models():
    with pytest.raises(ValueError, match='Hard3'):
        build_model('Hard4', IN, HIDDEN, NUM_CLASSES)


def test_bad_inputs_are_value_errors():
    model = make('Hard3')
    xs, _ = batch()
    with pytest.raises(ValueError, match='4 input batches'):
        model(xs[:3])
    with pytest.raises(ValueError, match='task 1'):
        model([xs[0], xs[1][:, :5], xs[2], xs[3]])
    with pytest.raises(ValueError, match='num_classes'):
        build_model('Hard3', IN, HIDDEN, [])
    with pytest.raises(ValueError, match='hidden_feature'):
        build_model('Hard3', IN, 0, NUM_CLASSES)



@pytest.mark.parametrize('name,kw', VARIANTS, ids=IDS)
def test_single_call_gradients_equal_per_task_loop(name, kw):
    """The batched layouts (stacking, padding, unbinding) must also be exact in backward."""
    model = make(name, dtype=torch.float64, **kw).eval()
    xs, _ = batch(torch.float64)
    weights = [torch.randn(x.shape[0], c, dtype=torch.float64) for x, c in zip(xs, model.num_classes)]

    def grads(outputs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)

    with torch.no_grad():
        model(xs)                        # CrossStitch normalises its stitch rows in forward
    got, want = grads(model(xs)), grads(reference(model, xs))
    for (pname, _), g, w in zip(model.named_parameters(), got, want):
        if w is None:
            assert g is None or not g.abs().any(), pname
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=pname)
