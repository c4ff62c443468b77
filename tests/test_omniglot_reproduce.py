"""Many Omniglot runs trained at once, the lambda sweep and the whole figure from one command,
on tiny synthetic data (CPU): the stacked network against the TAAN networks it holds, runs
trained at once against the same runs trained one by one by train.py, the files of
Evaluation_TAAN and reproduce, and sweeps killed at any moment against uninterrupted ones."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest
import torch
from ignite.engine import Events

from Omniglot import Evaluation_TAAN, reproduce, results, synthetic, train as trainer
from Omniglot.stack import TAANStack, default_stacking
from Omniglot.sweep import RunSpec, default_runs_at_once, train_runs
from Omniglot.TAAN import TAAN, multitask_loss
from Training import UserError
from Training.runlog import read_metrics
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
    for r, old in ((0, 2), (1, 0)):
        after = stack.run_state_dict(r)
        assert not torch.equal(after["fc.weight"], before[old]["fc.weight"])


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


def test_stacked_network_computes_each_network():
    models = [network(seed, reg) for seed, reg, _ in RUNS]
    stack = TAANStack.from_models(models, [lam for _, _, lam in RUNS])
    # evaluation: one batch for all runs, tasks in a shuffled order with unequal counts
    stack.eval()
    ids = torch.tensor([1, 2, 0, 2, 1, 1, 0, 2])
    x = images(len(ids), seed=9)
    with torch.no_grad():
        logits = stack(x, ids)
        for r, model in enumerate(models):
            out = model.eval()(x, ids)
            torch.testing.assert_close(logits[r], out, rtol=0, atol=1e-12)
            for t, classes in enumerate(CLASSES):
                assert torch.all(logits[r, ids == t, classes:] == float("-inf"))
    # training: every run its own images; losses, regularisers, gradients and batch-norm statistics
    stack.train()
    ids = torch.arange(3).repeat_interleave(2)
    xs, ys = torch.stack([images(6, seed=r) for r in range(3)]), torch.tensor([[0, 1, 1, 0, 2, 0]] * 3)
    losses = stack.task_losses(stack(xs, ids), ys, ids) + stack.regularizations()
    losses.sum().backward()
    for r, (model, (_, _, lam)) in enumerate(zip(models, RUNS)):
        model.train()
        loss = multitask_loss(model(xs[r], ids), ys[r], ids, 3) + model.regularization(lam)
        loss.backward()
        assert losses[r].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
        grads = _run_grads(stack, r)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
        state, params = stack.run_state_dict(r), dict(model.named_parameters())
        assert state.keys() == model.state_dict().keys()
        for name, buffer in model.state_dict().items():
            if name not in params:
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
        out[spec.key] = dict(result, folder=saveto), torch.load(os.path.join(saveto, trainer.STATE_NAME))["model"]
    return out


def trained_at_once(root, data, stacking, specs=SPECS, extra=(), folder=None):
    """{run key: (record, final weights)} of `specs` trained at once (run folders in `folder`)."""
    args = trainer.build_parser().parse_args(["--data_root", root] + EXACT + list(extra))
    got = {}
    train_runs(specs, args, data, torch.device("cpu"), len(specs), {},
               lambda spec, record, state: got.__setitem__(spec.key, (record, state())), stacking=stacking, **QUIET,
               run_folder=(lambda spec: os.path.join(folder, spec.regularizer)) if folder else None)
    return got


def curves(folder):
    """The rows of a run's metrics.csv without the (wall-clock) seconds."""
    rows = read_metrics(os.path.join(folder, "metrics.csv"))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("stacking", ["separate", "stacked", "union"])
def test_runs_trained_at_once_equal_the_same_runs_trained_one_by_one(root, data, one_by_one, stacking, tmp_path):
    """float64, different regularisers and lambdas at once, runs leaving the group early: the
    stacked network's weights within 1e-8 of train.py's after 24 Adam steps (its batched sums add
    in another order, and Adam's first steps magnify that: 1.3e-10 on some CPUs), the separate
    networks bit for bit; so are the rows of each run's metrics.csv (the mean training loss of each round)."""
    got = trained_at_once(root, data, stacking, folder=str(tmp_path))
    for spec in SPECS:
        (result, final), (record, state) = one_by_one[spec.key], got[spec.key]
        ours, alone = curves(str(tmp_path / spec.regularizer)), curves(result["folder"])
        assert [r.keys() for r in ours] == [r.keys() for r in alone] and len(ours) == record["evaluations"]
        for a, b in zip(ours, alone):
            assert a == b if stacking == "separate" else a == pytest.approx(b, rel=1e-9, nan_ok=True)
        assert record["best_acc"] == result["best_acc"]
        assert (record["iterations"], record["stopped_early"]) == (result["iterations"], result["stopped_early"])
        assert record["history"] == [list(point) for point in result["history"]]
        assert state.keys() == final.keys()
        worst = max((state[k].double() - final[k].double()).abs().max().item() for k in final)
        assert worst == 0 if stacking == "separate" else worst < 1e-8, (spec.key, worst)
    iterations = sorted(record["iterations"] for record, _ in got.values())
    assert iterations[0] < 24 and iterations[-1] == 24          # some left the group early, some ran to the end
    assert len({record["best_acc"] for record, _ in got.values()}) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stacking", ["stacked", "union"])
def test_runs_trained_at_once_on_cuda_equal_the_cpu_runs_one_by_one(root, one_by_one, stacking):
    """The CUDA default (all runs stacked, TAL on the Triton kernels when triton is there)
    trains the same runs as train.py on the CPU: float64, the same histories, weights within 1e-9
    (the GPU's atomics add in another order)."""
    cuda = torch.device("cuda")
    args = trainer.build_parser().parse_args(["--data_root", root] + EXACT + ["--device", "cuda"])
    got = {}
    train_runs(SPECS, args, trainer.load_data(root, cuda), cuda, len(SPECS), {},
               lambda spec, record, state: got.__setitem__(spec.key, (record, state())), stacking=stacking, **QUIET)
    for spec in SPECS:
        (result, final), (record, state) = one_by_one[spec.key], got[spec.key]
        assert record["history"] == [list(point) for point in result["history"]]
        worst = max((state[k].double().cpu() - final[k].double()).abs().max().item() for k in final)
        assert worst < 1e-9, (spec.key, worst)


def test_separate_runs_at_once_are_train_py_bit_for_bit_in_float32(root, data, tmp_path):
    float32 = ["--dtype", "float32", "--num_iter", "12"]
    got = trained_at_once(root, data, "separate", SPECS[:2], float32)
    for spec in SPECS[:2]:
        argv = ["--data_root", root, "--regularize", spec.regularizer, "--lam", str(spec.lam), "--seed",
                str(spec.seed), "--saveto", str(tmp_path / spec.regularizer)] + EXACT + float32
        result = trainer.train(trainer.build_parser().parse_args(argv), data=data, **QUIET)
        final = torch.load(str(tmp_path / spec.regularizer / trainer.STATE_NAME))["model"]
        record, state = got[spec.key]
        assert record["history"] == [list(point) for point in result["history"]]
        assert all(torch.equal(state[k], final[k]) for k in final)


def test_default_runs_at_once_and_stacking_on_the_cpu():
    assert default_runs_at_once(torch.device("cpu"), 65, 250) == 1
    assert default_stacking(torch.device("cpu")) == "separate" and default_stacking("cuda:0") == "stacked"


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
        files = sorted(f for f in os.listdir(os.path.join(folder, run)) if not f.startswith("events.out.tfevents."))
        assert files == ["config.json", "learning_curves.png", "metrics.csv", "model_params.pt", "result.json"]
        history = json.load(open(os.path.join(folder, run, "result.json")))["history"]
        rows = read_metrics(os.path.join(folder, run, "metrics.csv"))
        assert [[r["iteration"], r["test_accuracy"]] for r in rows] == history
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
    with open(os.path.join(folder, Evaluation_TAAN.SWEEP_NAME), "w") as f:
        f.write('{"settings": ')                        # a sweep file cut short
    with pytest.raises(UserError, match=r"sweep\.json is damaged \(JSONDecodeError: .*\): delete it"):
        Evaluation_TAAN.main(argv + ["--resume"])
    # the probe: a results file holding something else used to be kept and appended to
    for garbage, why in ((b"my notes\n", r" line 1: expected a '---Lambda = x\.---' header .*got 'my notes'"),
                         (b"\xff\xfe\x00", r" is not a text file \(.*codec can't decode")):
        open(path, "wb").write(garbage)
        with pytest.raises(UserError, match=re.escape(path) + why + ".*fix it, or move it"):
            Evaluation_TAAN.main(argv)
        assert open(path, "rb").read() == garbage


# ------------------------------------------------------------------------------- reproduce

REPRO = ["--lambdas", "0.3", "--repeats", "2", "--num_iter", "4", "--test_interval", "2", "--early_stop", "2",
         "--basis", "4", "--batch", "1", "--eval_batch", "3", "--lr", "1e-3", "--device", "cpu", "--runs_at_once", "3",
         "--stacking", "stacked"]
OUTPUTS = [f"Results-TAAN-Omniglot-{reg}.txt" for reg in results.REGULARIZERS] + [
    "table.md", "table.csv", "lambda.png", "lambda.pdf", "records.json"]


def repro(root, out, *extra, data=None, hook=None):
    args = reproduce.parse_args(["--data_root", root, "--results_dir", out] + REPRO + list(extra))
    return reproduce.reproduce(args, data=data, setup_hook=hook, **QUIET)


def contents(folder):
    """The outputs' bytes, and the run folders' metrics.csv without the seconds column."""
    files = {name: open(os.path.join(folder, name), "rb").read() for name in OUTPUTS}
    for reg in results.REGULARIZERS:
        for run in sorted(os.listdir(os.path.join(folder, "runs", reg))):
            for j in sorted(os.listdir(os.path.join(folder, "runs", reg, run))):
                files[f"runs/{reg}/{run}/{j}"] = curves(os.path.join(folder, "runs", reg, run, j))
    return files


@pytest.fixture(scope="module")
def uninterrupted(root, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce") / "full")
    return out, repro(root, out, data=data), contents(out)


def test_reproduce_writes_results_table_and_figure_from_its_records(uninterrupted):
    out, result, files = uninterrupted
    records = json.loads(files["records.json"])
    assert (records["runs_at_once"], records["stacking"], len(records["records"])) == (3, "stacked", 2 + 3 * 2)
    assert records["settings"]["paper_formulas"] is False
    layers = {r["regularizer"]: r["layer_regularize"] for r in records["records"].values()}
    assert layers == {"none": None, "tracenorm": "tracenorm_original", "distance": "distance",
                      "cosine": "cosine_original"}
    for reg in results.REGULARIZERS:
        text = files[f"Results-TAAN-Omniglot-{reg}.txt"].decode()
        assert text.startswith("# Omniglot.reproduce: the original code's formulas") and "NOT the paper's" in text
        expected = {}
        for record in sorted(records["records"].values(), key=lambda r: r["repeat"]):
            if record["regularizer"] == reg:
                expected.setdefault(record["lambda"], []).append(round(record["best_acc"], 4))
        assert results.parse_results(os.path.join(out, f"Results-TAAN-Omniglot-{reg}.txt")) == expected
    assert result["table"]["distance"][0.3] == [records["records"][f"distance/0.3/{j}"]["best_acc"] for j in (1, 2)]
    rows = list(csv.DictReader(files["table.csv"].decode().splitlines()))
    assert [(row["regularizer"], row["lambda"]) for row in rows] == [
        ("none", "0"), ("tracenorm", "0.3"), ("distance", "0.3"), ("cosine", "0.3")]
    none = [records["records"][f"none/0/{j}"]["best_acc"] * 100 for j in (1, 2)]
    for row in rows:
        accs = [a * 100 for a in result["table"][row["regularizer"]][float(row["lambda"])]]
        mean = sum(accs) / 2
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5, abs=1e-4)   # sample std
        if row["regularizer"] != "none":
            assert float(row["mean_minus_none"]) == pytest.approx(mean - sum(none) / 2, abs=1e-4)
        assert (row["formulas"], row["protocol"]) == ("original", "not the paper's")
    # the reported numbers beside ours are the original's (README, Results), by hand:
    # (83.68 + 85.60 + 84.17 + 83.58 + 83.53) / 5
    reported = {(row["regularizer"], row["lambda"]): row for row in rows}
    assert float(reported["none", "0"]["reported_mean"]) == pytest.approx(84.112, abs=1e-4)
    assert float(reported["distance", "0.3"]["reported_mean"]) == pytest.approx(86.724, abs=1e-4)
    assert float(reported["tracenorm", "0.3"]["reported_minus_none"]) == pytest.approx(76.188 - 84.112, abs=1e-4)
    assert float(reported["cosine", "0.3"]["reported_std"]) == pytest.approx(2.7314, abs=1e-4)
    md = files["table.md"].decode()
    assert "| distance | 0.3 | 2 |" in md and "| 86.72 +- 0.61 | +2.61 |" in md
    assert "Formulas: the original code's formulas" in md and "Protocol: NOT the paper's protocol" in md
    assert files["lambda.png"][:8] == b"\x89PNG\r\n\x1a\n" and files["lambda.pdf"][:5] == b"%PDF-"
    assert not os.path.exists(os.path.join(out, trainer.STATE_NAME))
    for key, record in records["records"].items():      # every run's curves: one row per evaluation
        rows = curves(os.path.join(out, "runs", key))
        assert [[r["iteration"], r["test_accuracy"]] for r in rows] == record["history"]
    cells = sorted(os.listdir(os.path.join(out, "curves")))
    assert cells == ["cosine-lambda-0.3.png", "distance-lambda-0.3.png", "none-lambda-0.0.png",
                     "tracenorm-lambda-0.3.png"]


@pytest.mark.parametrize("kill", ["in training", "after a record"])
def test_reproduce_killed_anywhere_ends_as_an_uninterrupted_run(root, data, uninterrupted, kill, tmp_path,
                                                                 monkeypatch):
    out = str(tmp_path / "killed")
    if kill == "after a record":        # the record is written, the files made from it are not
        calls, write = [], reproduce.write_outputs

        def dies_on_third_call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise Killed()
            return write(*args, **kwargs)
        monkeypatch.setattr(reproduce, "write_outputs", dies_on_third_call)
        with pytest.raises(Killed):
            repro(root, out, data=data)
        monkeypatch.setattr(reproduce, "write_outputs", write)
        assert len(json.load(open(os.path.join(out, "records.json")))["records"]) == 2
    else:       # before the first save of the group's state: the group starts again, all its runs
        with pytest.raises(Killed):
            repro(root, out, data=data, hook=kill_in_group(2, Events.ITERATION_COMPLETED(once=3)))
        assert not os.path.isfile(os.path.join(out, trainer.STATE_NAME))
    repro(root, out, data=data)
    assert contents(out) == uninterrupted[2]


def test_reproduce_killed_by_a_signal_ends_as_an_uninterrupted_run(root, data, uninterrupted, tmp_path):
    """A real SIGKILL of the command once it has saved a training state, then the same command again."""
    out = str(tmp_path / "sigkill")
    cmd = [sys.executable, "-m", "Omniglot.reproduce", "--data_root", root, "--results_dir", out, "--save_every",
           "0"] + REPRO
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    state, deadline = os.path.join(out, trainer.STATE_NAME), time.time() + 120
    while not os.path.isfile(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stale = shutil.copy(state, str(tmp_path / "stale.pt"))
    lines = []
    args = reproduce.parse_args(["--data_root", root, "--results_dir", out, "--save_every", "0"] + REPRO)
    reproduce.reproduce(args, data=data, log=lines.append)
    assert any(line.startswith("Resumed ") for line in lines)
    rounds = [line for line in lines if line.startswith("Iter ")]
    assert rounds and all(re.fullmatch(r"Iter 0000\d/4: runs \d+ finished, \d running, \d+ waiting; best test "
                                       r"accuracy \(%\) none \d+\.\d\d( \| \w+ 0\.3 \d+\.\d\d)*; "
                                       r"(at most \d+:\d\d:\d\d left|time left unknown yet)", line) for line in rounds), rounds
    assert contents(out) == uninterrupted[2]
    # a training state left by a kill after the last record of its group: removed, nothing changes
    shutil.copy(stale, state)
    reproduce.reproduce(args, data=data, **QUIET)
    assert not os.path.exists(state) and contents(out) == uninterrupted[2]


def test_reproduce_continues_with_other_runs_and_refuses_other_settings(root, data, uninterrupted, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(uninterrupted[0], out)
    with pytest.raises(UserError, match=r"other settings \(lr: 0\.001 there, 0\.002 now\).*another --results_dir"):
        repro(root, out, "--lr", "2e-3", data=data)
    # fewer runs asked for: nothing trains, the outputs show those runs, the other records stay
    result = repro(root, out, "--regularizers", "distance", "--repeats", "1", "--runs_at_once", "1", data=data)
    assert list(result["table"]) == ["distance"] and [len(v) for v in result["table"]["distance"].values()] == [1]
    assert len(result["records"]) == 8
    assert open(os.path.join(out, "Results-TAAN-Omniglot-distance.txt")).read().count("Experiment") == 1
    # the paper's formulas: the layers get the paper's names, and every output says so
    paper = str(tmp_path / "paper")
    result = repro(root, paper, "--regularizers", "cosine", "tracenorm", "--lambdas", "0.2", "--repeats", "1",
                   "--paper_formulas", data=data)
    assert {r["layer_regularize"] for r in result["records"].values()} == {"cosine", "tracenorm"}
    for name in ("Results-TAAN-Omniglot-cosine.txt", "table.md"):
        assert "the paper's formulas" in open(os.path.join(paper, name)).read()


def test_reproduce_keeps_only_the_runs_at_once_it_was_given(root, data, tmp_path):
    """Without --runs_at_once / --stacking a sweep uses the device's defaults and records none,
    so that continued on another device it takes that device's; given ones are kept."""
    out = str(tmp_path / "defaults")
    argv = ["--data_root", root, "--results_dir", out] + REPRO[:REPRO.index("--runs_at_once")] + ["--repeats", "1"]
    args = reproduce.parse_args(argv + ["--regularizers", "none"])
    reproduce.reproduce(args, data=data, **QUIET)
    saved = json.load(open(os.path.join(out, "records.json")))
    assert (saved["runs_at_once"], saved["stacking"], len(saved["records"])) == (None, None, 1)
    reproduce.reproduce(reproduce.parse_args(argv + ["--regularizers", "distance", "--stacking", "stacked"]),
                        data=data, **QUIET)
    saved = json.load(open(os.path.join(out, "records.json")))
    assert (saved["runs_at_once"], saved["stacking"], len(saved["records"])) == (None, "stacked", 2)


def test_presets_and_what_the_outputs_say():
    quick = reproduce.parse_args(["--preset", "quick"])
    assert (quick.alphabets, quick.repeats, quick.lambdas, quick.regularizers) == (
        10, 2, [0.1, 0.2, 0.3, 0.4], ["none", "tracenorm", "distance", "cosine"])
    assert quick.results_dir.endswith(os.path.join("results", "omniglot_reproduce_quick"))
    formulas, protocol = reproduce.describe(quick, 10)
    assert protocol.startswith("NOT the paper's protocol (preset quick): repeats 2 (paper: 5), alphabets 10 "
                               "(paper: 50), lr 0.001 (paper: 1e-05)")
    paper = reproduce.parse_args([])
    assert (paper.repeats, paper.num_iter, paper.test_interval, paper.early_stop, paper.lr, paper.basis,
            paper.batch) == (5, 15000, 100, 100, 1e-5, 32, 5)
    assert reproduce.describe(paper, 50)[1] == "the paper's protocol"
    assert len(reproduce.run_specs(paper)) == 65
    assert reproduce.describe(paper, 50)[0].startswith("the original code's formulas")
    # the console command (its one-line user error is tested with every entry point in test_package.py)
    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert scripts["taan-omniglot-reproduce"] == "Omniglot.reproduce:cli"
