"""Omniglot networks, trainer, lambda sweep, task-matrix figures and the built-in job, on
tiny synthetic data (CPU)."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events

from Omniglot import run_builtin, synthetic, train as trainer, visualization_full
from Omniglot.dataTools import read_split_lists
from Omniglot.TAAN import HEAD_LR_FACTOR, MODELS, HardSharing, SingleTask, TAAN, build_model, multitask_loss
from Training import load_checkpoint
from Training.runlog import read_metrics
from conftest import Killed, kill_at
from Training import UserError

CLASSES = [3, 4, 5]
TINY = dict(alphabets=3, drawers=6, min_chars=3, max_chars=5, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("omniglot_tiny"))
    synthetic.generate(path, **TINY)
    return path


@pytest.fixture(scope="module")
def data(root):
    return trainer.load_data(root, torch.device("cpu"))


def args_for(root, *extra):
    return trainer.build_parser().parse_args(
        ["--data_root", root, "--device", "cpu", "--progress", "false", "--basis", "4", "--lr", "1e-3",
         "--batch", "2", "--eval_batch", "2"] + [str(e) for e in extra])


@pytest.fixture(scope="module")
def taan_run(root, data, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("taan_run")), "run")
    args = args_for(root, "--model", "taan", "--regularize", "distance", "--lam", "0.3", "--num_iter", "6",
                    "--test_interval", "2", "--saveto", out)
    return out, trainer.train(args, data=data, log=lambda *a: None)


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 105, 105, generator=g) > 0.8).double()


def make(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    kw = {"basis": 6, "regularize": "distance"} if name == "taan" else {}
    return build_model(name, CLASSES, **kw).to(dtype)


def randomize_norm_and_alpha(model, seed=1):
    """Running statistics and task activations far from their initial values, so that a
    mix-up of tasks or channels shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if hasattr(m, "alpha"):
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=g))
    return model


# ------------------------------------------------------------------------------- networks

def test_every_model_is_built():
    assert set(MODELS) == {"taan", "hard", "stl"}
    assert [type(build_model(n, CLASSES)) for n in ("TAAN", "Hard", "stl")] == [TAAN, HardSharing, SingleTask]


def own_logits(out, ids, t):
    """The rows of task t of per-row logits [B, C_max], cut to task t's classes."""
    return out[ids == t][:, :CLASSES[t]]


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes(name):
    """Logits [B, C_max]: each row its own task's C_t classes, then -inf."""
    model = make(name, torch.float32).eval()
    ids = torch.tensor([2, 0, 2, 2, 0])                  # task 1 has no image
    out = model(images(5).float(), ids)
    assert out.shape == (5, max(CLASSES))
    classes = torch.tensor(CLASSES)[ids]
    finite = torch.isfinite(out)
    assert torch.equal(finite, torch.arange(max(CLASSES))[None, :] < classes[:, None])
    assert torch.all(out[~finite] == float("-inf"))
    model.train()                                        # training batches: equal counts per task
    out = model(images(6).float(), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out.shape == (6, 5) and torch.isfinite(out[:, :3]).all()


@pytest.mark.parametrize("name", MODELS)
def test_batched_forward_equals_per_task_forward(name):
    model = randomize_norm_and_alpha(make(name)).eval()
    ids = torch.tensor([1, 2, 0, 2, 1, 1, 0, 2, 0, 1, 2])     # shuffled task order, unequal counts
    x = images(len(ids))
    with torch.no_grad():
        out = model(x, ids)
        for t in range(3):
            expected = model.forward_task(x[ids == t], t)
            torch.testing.assert_close(own_logits(out, ids, t), expected, rtol=0, atol=1e-12)
        if name == "taan":      # the tasks' activations differ, so a task mix-up would show
            assert (model.convs[0](x, 0) - model.convs[0](x, 1)).abs().max() > 1e-3


def _naive_trunk(model, x, t):
    """The network of task t written out with the plain formulas (eval mode)."""
    def bn(a, norm):
        shape = (1, -1, 1, 1)
        return ((a - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
                * norm.weight.view(shape) + norm.bias.view(shape))

    def act(a, layer):
        if layer is None:
            return F.relu(a)
        b = layer.basis.reshape(-1)
        return F.relu(a) + (layer.alpha[t] * F.relu(b - a.unsqueeze(-1))).sum(-1)

    tal = isinstance(model, TAAN)
    for i, conv in enumerate(model.convs):
        norm = conv.bn if tal else model.bns[i]
        a = bn(F.conv2d(x, conv.weight, conv.bias), norm)
        x = F.max_pool2d(act(a, conv if tal else None), 2)
    return act(x.flatten(1) @ model.fc.weight.t() + model.fc.bias, model.fc if tal else None)


@pytest.mark.parametrize("name", ["taan", "hard"])
def test_forward_task_equals_the_formula(name):
    model = randomize_norm_and_alpha(make(name)).eval()
    x = images(4, seed=3)
    with torch.no_grad():
        for t in range(3):
            expected = model.heads[t](_naive_trunk(model, x, t))
            torch.testing.assert_close(model.forward_task(x, t), expected, rtol=1e-10, atol=1e-10)


def test_single_task_is_independent_networks():
    model = randomize_norm_and_alpha(make("stl"))
    T, t = 3, 1
    # (1) a plain network built from the slices of group t gives task t's outputs, in training
    # mode (batch statistics of task t's images alone) and in eval mode
    convs, bns = [], []
    for conv, bn in zip(model.convs, model.bns):
        co, ci = conv.out_channels // T, conv.in_channels // T
        c = nn.Conv2d(ci, co, 3).double()
        n = nn.BatchNorm2d(co).double()
        with torch.no_grad():
            c.weight.copy_(conv.weight[t * co:(t + 1) * co])
            c.bias.copy_(conv.bias[t * co:(t + 1) * co])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(n, name).copy_(getattr(bn, name)[t * co:(t + 1) * co])
        convs.append(c)
        bns.append(n)
    fc = nn.Linear(1024, 512).double()
    with torch.no_grad():
        fc.weight.copy_(model.fc.weight[t * 512:(t + 1) * 512, :, 0])
        fc.bias.copy_(model.fc.bias[t * 512:(t + 1) * 512])

    def plain(x):
        for c, n in zip(convs, bns):
            x = F.max_pool2d(F.relu(n(c(x))), 2)
        return model.heads[t](F.relu(fc(x.flatten(1))))

    ids = torch.arange(T).repeat_interleave(3)[torch.tensor([4, 0, 7, 2, 8, 1, 5, 3, 6])]
    x = images(len(ids), seed=5)
    for mode in (True, False):
        model.train(mode)
        for m in convs + bns:
            m.train(mode)
        torch.testing.assert_close(own_logits(model(x, ids), ids, t), plain(x[ids == t]), rtol=1e-10, atol=1e-10)
    # (2) task t's loss has a gradient only in group t's weights and head t
    model.train()
    model.zero_grad()
    out = model(x, ids)
    F.cross_entropy(own_logits(out, ids, t), torch.tensor([0, 1, 2])).backward()
    for layer in list(model.convs) + list(model.bns) + [model.fc]:
        g = layer.weight.grad
        co = g.shape[0] // T
        assert g[t * co:(t + 1) * co].abs().sum() > 0
        assert torch.count_nonzero(g[:t * co]) == 0 and torch.count_nonzero(g[(t + 1) * co:]) == 0
    assert all(model.heads[s].weight.grad is None or torch.count_nonzero(model.heads[s].weight.grad) == 0
               for s in range(T) if s != t)


@pytest.mark.parametrize("name", ["taan", "hard"])
def test_batch_norm_uses_the_statistics_of_all_tasks_at_once(name):
    """Difference from the original (one forward per alphabet): in training the first batch
    norm sees all tasks' images together and updates its running mean once, by momentum
    times the mean over the whole batch."""
    model = make(name).train()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(9, 1, 105, 105, generator=g, dtype=torch.float64).round()
    ids = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1])
    conv = model.convs[0]
    bn = conv.bn if name == "taan" else model.bns[0]
    a = F.conv2d(x, conv.weight, conv.bias)
    before = bn.running_mean.clone()
    model(x, ids)
    expected = (1 - bn.momentum) * before + bn.momentum * a.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_multitask_loss_by_hand():
    inf = float("inf")
    # rows: task 2, task 0, task 2 (task 0 has 2 classes, task 2 three; task 1 has no row)
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.0, math.log(3.0), -inf], [1.0, 1.0, 1.0]])
    labels, ids = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2])
    # task 0: -log(3/4); task 2: -log(1/3) for both rows; task 1 does not count
    expected = (-math.log(0.75) + math.log(3.0)) / 2
    assert multitask_loss(logits, labels, ids, 3).item() == pytest.approx(expected, rel=1e-6)
    # a leading dimension (runs) gives one loss per run; labels may be shared
    two = multitask_loss(torch.stack([logits, logits.flip(0)]), labels, ids, 3)
    assert two.shape == (2,) and two[0].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no task has any row"):
        multitask_loss(logits[:0], labels[:0], ids[:0], 3)


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_lowers_the_loss(name):
    model = make(name, torch.float32, seed=2).train()
    optimizer = model.make_optimizer(1e-4)          # heads 5e-3: larger first Adam steps overshoot
    ids = torch.arange(3).repeat_interleave(4)
    x = images(len(ids), seed=7).float()
    y = torch.cat([torch.randint(0, c, (4,), generator=torch.Generator().manual_seed(c)) for c in CLASSES])

    def loss():
        return multitask_loss(model(x, ids), y, ids, 3) + model.regularization(0.3)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert math.isfinite(before.item()) and after < before.item() - 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_heads_get_50x_learning_rate(name):
    model = make(name, torch.float32)
    optimizer = model.make_optimizer(2e-4)
    trunk, heads = optimizer.param_groups
    assert trunk["lr"] == 2e-4 and heads["lr"] == pytest.approx(2e-4 * HEAD_LR_FACTOR) and HEAD_LR_FACTOR == 50
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    all_ids = [id(p) for p in trunk["params"] + heads["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())      # each once
    assert trunk["weight_decay"] == heads["weight_decay"] == 0.005
    # Adam's first step moves every entry by about lr: 50x more in the heads
    before = [p.detach().clone() for p in (model.fc.weight, model.heads[0].weight)]
    loss = multitask_loss(model(images(3).float(), torch.arange(3)), torch.zeros(3, dtype=torch.long), torch.arange(3), 3)
    loss.backward()
    optimizer.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip((model.fc.weight, model.heads[0].weight), before)]
    assert moved[0] == pytest.approx(2e-4, rel=0.05) and moved[1] == pytest.approx(1e-2, rel=0.05)


def test_labels_through_the_loader_are_character_number_minus_one(root, data):
    train_data, _ = data
    lists = read_split_lists(root, "train")
    for t, (alphabet, items) in enumerate(lists):
        y = torch.cat([yb for _, yb in train_data.task_batches(t, 4)])
        folders = [os.path.basename(os.path.dirname(p)) for p, _ in items]
        assert y.tolist() == [int(re.fullmatch(r"character(\d\d)", f).group(1)) - 1 for f in folders]
        assert train_data.num_classes[t] == len(set(folders))


# ------------------------------------------------------------------------------- trainer

def naive_accuracy(model, test_data):
    """correct / total over every test image, one task at a time."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for t in range(test_data.num_tasks):
            for x, y in test_data.task_batches(t, 7):
                correct += int((model.forward_task(x, t).argmax(-1) == y).sum())
                total += y.numel()
    return correct / total


def test_train_end_to_end(taan_run, data):
    out, result = taan_run
    files = [f for f in sorted(os.listdir(out)) if not f.startswith("events.out.tfevents.")]
    assert files == [".lock", "config.json", "learning_curves.png", "metrics.csv", "model_params.pt", "result.json",
                     "training_state.pt"]
    saved = json.load(open(os.path.join(out, "result.json")))
    accs = [a for _, a in saved["history"]]
    assert [i for i, _ in saved["history"]] == [0, 2, 4, 6]
    rows = read_metrics(os.path.join(out, "metrics.csv"))      # one row per evaluation, as the history
    assert [(r["iteration"], r["test_accuracy"]) for r in rows] == [tuple(h) for h in saved["history"]]
    assert math.isnan(rows[0]["train_loss"]) and all(r["train_loss"] > 0 for r in rows[1:])
    assert saved["best_acc"] == max(accs) == result["best_acc"] and saved["iterations"] == 6
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tasks"] == data[0].tasks and config["num_classes"] == data[0].num_classes
    model = build_model(config["model"], config["num_classes"], basis=config["basis"],
                        regularize=config["layer_regularize"])
    load_checkpoint(os.path.join(out, "model_params.pt"), {"model": model})
    # an alphabet runs out of test images before the last evaluation step (eval_batch 2)
    steps = max(-(-n // 2) for n in data[1].sizes)
    assert min(data[1].sizes) < 2 * (steps - 1)
    assert naive_accuracy(model, data[1]) == pytest.approx(saved["best_acc"], abs=1e-12)


def test_resume_reproduces_the_uninterrupted_run(root, data, tmp_path):
    # batch 8 of ~23 images: every alphabet is reshuffled every 2-3 iterations, so the
    # sampler's generator and positions must be restored exactly
    common = ["--model", "taan", "--regularize", "cosine", "--lam", "0.2", "--num_iter", "6",
              "--test_interval", "2", "--early_stop", "10", "--batch", "8"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    trainer.train(args_for(root, *common, "--saveto", full), data=data, log=lambda *a: None)

    with pytest.raises(Killed):
        trainer.train(args_for(root, *common, "--saveto", part), data=data, log=lambda *a: None,
                      setup_hook=kill_at(Events.ITERATION_COMPLETED(once=3)))
    assert torch.load(os.path.join(part, "training_state.pt"))["trainer"]["iteration"] == 2
    assert not os.path.exists(os.path.join(part, "result.json"))
    messages = []
    trainer.train(args_for(root, *common, "--saveto", part, "--resume", "auto"), data=data, log=messages.append)
    assert any("Resumed" in m and "iteration 2" in m for m in messages)
    a = torch.load(os.path.join(full, "training_state.pt"))
    b = torch.load(os.path.join(part, "training_state.pt"))
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for s, u in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], u[k]) for k in s)
    assert json.load(open(os.path.join(full, "result.json"))) == json.load(open(os.path.join(part, "result.json")))


# ------------------------------------------------------------------------------- sweep

def test_run_builtin_fresh_and_resume(tmp_path):
    argv = ["--data_root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--alphabets", "2",
            "--drawers", "4", "--min_chars", "2", "--max_chars", "3", "--regularizers", "none", "distance",
            "--lambdas", "0.2", "--repeats", "2", "--num_iter", "2", "--test_interval", "1", "--basis", "4",
            "--batch", "2", "--device", "cpu"]
    first = run_builtin.main(argv)
    out = tmp_path / "out"
    assert set(first["table"]) == {"none", "distance"}
    assert [len(v) for t in first["table"].values() for v in t.values()] == [2, 2]
    for f in first["figure"] + first["matrices"]:
        assert open(f, "rb").read(4) in (b"\x89PNG", b"%PDF")
    texts = {reg: (out / f"Results-TAAN-Omniglot-{reg}.txt").read_text() for reg in ("none", "distance")}
    assert texts["none"].count("Lambda") == 1 and texts["distance"].count("Experiment") == 2
    run_builtin.main(argv + ["--resume"])          # finished: nothing is added
    run_builtin.main(argv)                         # a new job: fresh files, not appended
    assert {reg: (out / f"Results-TAAN-Omniglot-{reg}.txt").read_text() for reg in texts} == texts
    bad = list(argv)
    bad[bad.index("--repeats") + 1] = "3"
    with pytest.raises(ValueError, match="other settings.*repeats: 2 there, 3 now"):
        run_builtin.main(bad + ["--resume"])


# ------------------------------------------------------------------------------- figures

def test_visualization_writes_png_and_pdf_of_the_saved_model(taan_run, tmp_path):
    out, _ = taan_run
    written = visualization_full.main(["--models", os.path.dirname(out), "--out", str(tmp_path), "--matrix", "both"])
    names = sorted(os.path.basename(p) for p in written)
    stem = f"distance-{os.path.basename(out)}"
    assert names == sorted(f"{stem}-{k}.{e}" for k in ("cosine", "distance") for e in ("pdf", "png"))
    for p in written:
        head = open(p, "rb").read(5)
        assert head in (b"\x89PNG\r", b"%PDF-") and os.path.getsize(p) > 3000
    model, config = visualization_full.load_model(out)
    state = torch.load(os.path.join(out, "model_params.pt"))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    mats = dict(visualization_full.layer_matrices(model, "distance"))
    assert list(mats) == ["conv1", "conv2", "conv3", "conv4", "dense1"]
    # D[i, j] = E[(f_i(z) - f_j(z))^2], checked by Monte Carlo on conv1
    layer = model.convs[0]
    z = torch.randn(400000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, a = layer.basis.detach().double().reshape(-1), layer.alpha.detach().double()
    f = [F.relu(z) + (a[t] * F.relu(b - z[:, None])).sum(-1) for t in range(a.shape[0])]
    mc = np.array([[((f[i] - f[j]) ** 2).mean().item() for j in range(len(f))] for i in range(len(f))])
    np.testing.assert_allclose(mats["conv1"], mc, rtol=0.05, atol=1e-9)   # c0 = 0.4, not 1/sqrt(2 pi)
    assert np.all(np.diag(mats["conv1"]) == 0) and mats["conv1"].max() > 0


# ------------------------------------------------------------------------------- bad input

def test_bad_inputs_are_clear_errors(root, data, tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet'; choose one of taan, hard, stl"):
        build_model("resnet", CLASSES)
    for name in ("hard", "stl"):
        with pytest.raises(ValueError, match="no TAL layers: regularize must be None"):
            build_model(name, CLASSES, regularize="distance")
    with pytest.raises(SystemExit):
        trainer.check_args(trainer.build_parser(), trainer.build_parser().parse_args(
            ["--model", "hard", "--regularize", "cosine"]))
    for name in MODELS:
        model = make(name, torch.float32).eval()
        with pytest.raises(ValueError, match=r"shape \[B, 1, 105, 105\], got \(2, 1, 28, 28\)"):
            model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"task id out of range: got ids in \[0, 3\].*valid ids 0\.\.2"):
            model(torch.zeros(2, 1, 105, 105), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match=r"task id out of range: got ids in \[-1, 0\]"):
            model(torch.zeros(2, 1, 105, 105), torch.tensor([-1, 0]))
        with pytest.raises(ValueError, match="one task id per image"):
            model(torch.zeros(2, 1, 105, 105), torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"task must be an int in 0\.\.2, got 3"):
            model.forward_task(torch.zeros(1, 1, 105, 105), 3)
    with pytest.raises(ValueError, match="same number of images for every task"):
        make("stl", torch.float32).train()(torch.zeros(3, 1, 105, 105), torch.tensor([0, 0, 1]))
    with pytest.raises(UserError, match=r"does not exist.*Omniglot\.synthetic"):
        trainer.train(args_for(str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match=r"Omniglot\.train --saveto"):
        visualization_full.find_runs(str(tmp_path / "no_models"))
