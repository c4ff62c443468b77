"""Many Omniglot runs trained at once and the lambda sweep, on tiny synthetic data (CPU): the
stacked network against the TAAN networks it holds, runs trained at once against the same runs
trained one by one by train.py, and the files of Evaluation_TAAN after a kill."""
import json
import os
import re

import pytest
import torch
from ignite.engine import Events

from Omniglot import Evaluation_TAAN, results, synthetic, train as trainer
from Omniglot.stack import TAANStack
from Omniglot.sweep import RunSpec, default_runs_at_once, train_runs
from Omniglot.TAAN import TAAN, multitask_loss, split_by_task
from Training import UserError
from conftest import Killed, kill_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = [3, 2, 3]
QUIET = dict(log=lambda *a, **k: None)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("omniglot_runs"))
    synthetic.generate(path, alphabets=3, drawers=4, min_chars=2, max_chars=3)
    return path


@pytest.fixture(scope="module")
def data(root):
    return trainer.load_data(root, torch.device("cpu"))


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 105, 105, generator=g) > 0.8).double()


def network(seed, regularize=None):
    """A float64 TAAN with task activations far from their initial values."""
    torch.manual_seed(seed)
    model = TAAN(CLASSES, basis=4, regularize=regularize).double()
    with torch.no_grad():
        for layer in list(model.convs) + [model.fc]:
            layer.alpha.normal_()
    return model


def kill_in_group(n, event):
    """A setup_hook that raises Killed at `event` of the n-th group's engine."""
    engines = []

    def hook(engine):
        engines.append(engine)
        if len(engines) == n:
            kill_at(event)(engine)
    return hook


# ------------------------------------------------------------------------------- the stacked network

RUNS = [(0, None, 0.0), (1, "distance", 0.3), (2, "cosine_original", 0.2)]


def test_stack_holds_each_network_and_drops_runs_with_their_adam_state():
    models = [network(seed, reg) for seed, reg, _ in RUNS]
    stack = TAANStack.from_models(models, [lam for _, _, lam in RUNS])
    assert stack.runs == 3 and stack.regularizers == [None, "distance", "cosine_original"]
    for r, model in enumerate(models):
        state, expected = stack.run_state_dict(r), model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    optimizer = stack.make_optimizer(1e-3)
    ids = torch.arange(3).repeat_interleave(2)
    x, y = torch.stack([images(6, seed=r) for r in range(3)]), torch.tensor([[0, 2, 1, 0, 2, 2]] * 3)
    for _ in range(2):
        optimizer.zero_grad()
        (stack.task_losses(stack(x, ids), y, ids).sum() + stack.regularization()).backward()
        optimizer.step()
    # the padded rows of the heads (task 1 has 2 classes of 3) never move
    assert torch.count_nonzero(stack.heads.weight[:, 1, 2:]) == 0
    before = [stack.run_state_dict(r) for r in range(3)]
    adam = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in stack.parameters()}
    stack.keep([2, 0], optimizer)
    assert stack.runs == 2 and stack.lams == [0.2, 0.0] and stack.regularizers == ["cosine_original", None]
    for r, old in ((0, 2), (1, 0)):
        assert all(torch.equal(stack.run_state_dict(r)[k], before[old][k]) for k in before[old])
    for p in stack.parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"], adam[p]["exp_avg"][[2, 0]])
        assert torch.equal(optimizer.state[p]["step"], adam[p]["step"])
    optimizer.zero_grad()
    stack.task_losses(stack(x[[2, 0]], ids), y[:2], ids).sum().backward()      # the smaller stack trains on
    optimizer.step()


def _run_grads(stack, r):
    """Run r's gradients as a TAAN state_dict (of the parameters)."""
    params = list(stack.parameters())
    for p in params:
        p.data, p.grad = p.grad, p.data
    try:
        return stack.run_state_dict(r)
    finally:
        for p in params:
            p.data, p.grad = p.grad, p.data


@pytest.mark.parametrize("batching", ["loop", "union"])
def test_stacked_network_computes_each_network(batching):
    models = [network(seed, reg) for seed, reg, _ in RUNS]
    stack = TAANStack.from_models(models, [lam for _, _, lam in RUNS], batching=batching)
    # evaluation: one batch for all runs, tasks in a shuffled order with unequal counts
    stack.eval()
    ids = torch.tensor([1, 2, 0, 2, 1, 1, 0, 2])
    x = images(len(ids), seed=9)
    with torch.no_grad():
        logits = stack(x, ids)
        for r, model in enumerate(models):
            out = model.eval()(x, ids)
            for t, classes in enumerate(CLASSES):
                torch.testing.assert_close(logits[r, ids == t, :classes], out[t], rtol=0, atol=1e-12)
                assert torch.all(logits[r, ids == t, classes:] == float("-inf"))
    # training: every run its own images; losses, regularisers, gradients and batch-norm statistics
    stack.train()
    ids = torch.arange(3).repeat_interleave(2)
    xs, ys = torch.stack([images(6, seed=r) for r in range(3)]), torch.tensor([[0, 1, 1, 0, 2, 0]] * 3)
    losses = stack.task_losses(stack(xs, ids), ys, ids) + stack.regularizations()
    losses.sum().backward()
    for r, (model, (_, _, lam)) in enumerate(zip(models, RUNS)):
        model.train()
        loss = multitask_loss(model(xs[r], ids), split_by_task(ys[r], ids, 3)) + model.regularization(lam)
        loss.backward()
        assert losses[r].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
        grads = _run_grads(stack, r)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
        state = stack.run_state_dict(r)
        for name, buffer in model.named_buffers():
            torch.testing.assert_close(state[name], buffer, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- at once = one by one

EXACT = ["--basis", "4", "--lr", "1e-3", "--batch", "1", "--eval_batch", "3", "--num_iter", "24", "--test_interval",
         "3", "--early_stop", "3", "--dtype", "float64", "--device", "cpu", "--progress", "false"]
SPECS = [RunSpec("none", 0.0, 0, 0, None), RunSpec("distance", 0.3, 1, 1, "distance"),
         RunSpec("cosine", 0.2, 0, 0, "cosine_original"), RunSpec("tracenorm", 0.1, 2, 2, "tracenorm")]


@pytest.fixture(scope="module")
def one_by_one(root, data, tmp_path_factory):
    """train.py's result and final weights of every run of SPECS."""
    out = {}
    for spec in SPECS:
        saveto = str(tmp_path_factory.mktemp("one_by_one") / "run")
        argv = ["--data_root", root, "--regularize", spec.regularizer, "--lam", str(spec.lam), "--seed",
                str(spec.seed), "--saveto", saveto] + EXACT
        if spec.layer_regularize and spec.layer_regularize.endswith("_original"):
            argv.append("--original_variant")
        result = trainer.train(trainer.build_parser().parse_args(argv), data=data, **QUIET)
        out[spec.key] = result, torch.load(os.path.join(saveto, trainer.STATE_NAME))["model"]
    return out


@pytest.mark.parametrize("batching", ["loop", "union"])
def test_runs_trained_at_once_equal_the_same_runs_trained_one_by_one(root, data, one_by_one, batching):
    """float64, different regularisers and lambdas in one stack, runs leaving it early."""
    args = trainer.build_parser().parse_args(["--data_root", root] + EXACT)
    got = {}
    train_runs(SPECS, args, data, torch.device("cpu"), len(SPECS), {},
               lambda spec, record, state: got.__setitem__(spec.key, (record, state())), batching=batching, **QUIET)
    for spec in SPECS:
        (result, final), (record, state) = one_by_one[spec.key], got[spec.key]
        assert record["best_acc"] == result["best_acc"]
        assert (record["iterations"], record["stopped_early"]) == (result["iterations"], result["stopped_early"])
        assert record["history"] == [list(point) for point in result["history"]]
        assert state.keys() == final.keys()
        worst = max((state[k].double() - final[k].double()).abs().max().item() for k in final)
        assert worst < 1e-10, (spec.key, worst)
    iterations = sorted(record["iterations"] for record, _ in got.values())
    assert iterations[0] < 24 and iterations[-1] == 24          # some left the stack early, some ran to the end
    assert len({record["best_acc"] for record, _ in got.values()}) > 1


def test_default_runs_at_once_on_the_cpu_is_one():
    assert default_runs_at_once(torch.device("cpu"), 65, 250) == 1


# ------------------------------------------------------------------------------- Evaluation_TAAN

def test_sweep_writes_the_original_format_from_its_records_and_resumes_after_a_kill(root, tmp_path):
    out, models = str(tmp_path / "res"), str(tmp_path / "models")
    argv = ["--regularize", "distance", "--lambdas", "0.1", "0.2", "--repeats", "2", "--num_iter", "2",
            "--test_interval", "1", "--results_dir", out, "--save_models", models, "--data_root", root,
            "--basis", "4", "--lr", "1e-3", "--batch", "2", "--device", "cpu", "--progress", "false"]
    made = Evaluation_TAAN.main(argv)
    path = results.results_path(out, "distance")
    text = open(path).read()
    lines = text.splitlines()
    assert lines[0] == "---------------Lambda = 0.100000.---------------"
    assert lines[3] == "---------------Lambda = 0.200000.---------------"
    for line in lines[1:3] + lines[4:6]:
        assert re.fullmatch(r"Experiment [12], ACC: [01]\.\d{4}\.", line), line
    assert len(lines) == 6
    # round trip through the parser: the accuracies of the runs, rounded as written
    assert results.parse_results(path) == {lam: [round(a, 4) for a in accs] for lam, accs in made.items()}
    # every run folder holds its best model, config and result (for visualization_full.py)
    folder = os.path.join(models, "distance")
    runs = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
    assert runs == [f"TAAN-Lambda-{lam}-{j}" for lam in ("0.10", "0.20") for j in (1, 2)]
    for run in runs:
        assert sorted(os.listdir(os.path.join(folder, run))) == ["config.json", "model_params.pt", "result.json"]
    records = json.load(open(os.path.join(folder, Evaluation_TAAN.SWEEP_NAME)))["records"]
    assert sorted(records) == ["distance/0.1/1", "distance/0.1/2", "distance/0.2/1", "distance/0.2/2"]
    # --resume after a finished sweep: nothing runs, nothing is added
    assert Evaluation_TAAN.main(argv + ["--resume"]) == {}
    assert open(path).read() == text
    # killed after a record, before the file was written: the file is written from the records
    with open(path, "w") as f:
        f.write("\n".join(lines[:2]) + "\n")
    assert Evaluation_TAAN.main(argv + ["--resume"]) == {}
    assert open(path).read() == text
    # a new sweep into an empty file, killed in its last run after its first saved test: the resumed
    # sweep continues that run from its training state
    os.remove(path)
    with pytest.raises(Killed):
        Evaluation_TAAN.run_sweep(Evaluation_TAAN.parse_args(argv + ["--save_every", "0"]), **QUIET,
                                  setup_hook=kill_in_group(4, Events.ITERATION_COMPLETED(once=1)))
    assert os.path.isfile(os.path.join(folder, trainer.STATE_NAME))
    assert open(path).read() == text[:text.rindex("Experiment 2")]
    assert list(Evaluation_TAAN.main(argv + ["--resume"])) == [0.2]
    assert open(path).read() == text and not os.path.exists(os.path.join(folder, trainer.STATE_NAME))
    # a new sweep (no --resume) adds a second block after what the file held, as the original did
    Evaluation_TAAN.main(argv[:2] + ["--lambdas", "0.1", "--repeats", "1"] + argv[7:])
    assert open(path).read() == text + "\n".join(lines[:2]) + "\n"
    with pytest.raises(UserError, match=r"other settings \(lr: 0\.001 there, 0\.002 now\)"):
        Evaluation_TAAN.main(argv + ["--resume", "--lr", "2e-3"])
