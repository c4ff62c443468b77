"""Every command and Python snippet in README.md and Documents/*.md runs as documented.

The code blocks run first, in the order of the documents (a block may use what an earlier one
wrote: the trainer's folder for the visualiser), then every complete command quoted in the
text. Each runs in one scratch folder that stands for the checkout, on tiny data made here:
the flags in HOW are appended to the documented ones (the last value of a flag wins), so a
command that trains for hours here trains for a few steps, and no default path reaches the
real data or results folders. A documented command that HOW does not name fails the test:
say there how it runs, or why it is not run here.
"""
import glob
import importlib
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from Omniglot import synthetic as omniglot_synthetic
from Youtube8M import reproduce as youtube8m_reproduce
from Youtube8M.synthetic import ensure_builtin_data, generate_tfrecords

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "Documents", "*.md")))

CPU = ["--device", "cpu"]
Y8M = ["--data_path", "data/youtube8m", "--max_epoch", "1", "--hidden_feature", "8", "--batch_size", "32"] + CPU
STEPS = ["--basis", "4", "--batch", "1", "--eval_batch", "3", "--num_iter", "2", "--test_interval", "1",
         "--early_stop", "2", "--lr", "1e-3"] + CPU
OMNIGLOT = STEPS + ["--data_root", "data/omniglot"]
SWEEP = OMNIGLOT + ["--lambdas", "0.1", "--repeats", "1", "--results_dir", "results/omniglot"]
ORIGINAL_SWEEP = [a.replace("data/omniglot", "../data/omniglot").replace("results/omniglot", "../results/omniglot")
                  for a in SWEEP]
CELLS = ["--regularizers", "none", "distance", "--lambdas", "0.1", "--repeats", "1", "--alphabets", "2"]
FIGURE = OMNIGLOT + CELLS
INSTALL = "installs the project: .ci/run does exactly this in a fresh environment before the tests"
NAME = "names the command in the text; its full command lines are run from the code blocks"
GPU = "needs a CUDA device; without one it stops in one line (tests/test_package.py)"
BENCHMARK = "a timing benchmark (minutes of measurements, no result to check); see Documents/speed.md"

# documented command (without its comment) -> the flags appended here, or {"extra": flags, "cwd": the
# folder it runs in (default: the scratch checkout), "exit": its expected status (default 0)}, or the
# reason it is not run here
HOW = {
    # README: Quick start
    "python3 -m venv .venv": INSTALL,
    ". .venv/bin/activate": INSTALL,
    "pip install -e .[dev]": INSTALL,
    "pip install -e .": INSTALL,
    "pip install .": INSTALL,
    "pip install triton==3.7.1": "installs the optional triton package (about 170 MB)",
    "pip install tensorboard": "installs TensorBoard, the viewer of the event files (not a dependency)",
    "tensorboard --logdir results/builtin/TAAN": "starts TensorBoard's web server; the event files it reads are "
                                                 "checked in tests/test_runlog.py",
    "python -m Youtube8M.run_builtin": ["--out", "results/builtin", "--basis", "4"] + Y8M,
    "python -m pytest -q tests": "the test command itself: this test runs inside it",
    "bash .ci/run": "the CI entry point: the install above in a fresh environment, then the test command",
    "python -m Omniglot.run_builtin": ["--data_root", "data/omniglot_builtin", "--out", "results/omniglot_builtin",
                                       "--alphabets", "3", "--drawers", "4", "--min_chars", "2", "--max_chars", "3",
                                       "--lambdas", "0.1", "--repeats", "1", "--num_iter", "2", "--test_interval", "1",
                                       "--basis", "4"] + CPU,
    # README: Youtube-8M
    "python -m Youtube8M.data --vocabulary vocabulary.csv --train yt8m/train*.tfrecord "
    "--valid yt8m/validate*.tfrecord": ["--out", "data/converted"],
    "python -m Youtube8M.Trainer --model TAAN --regularize distance --taan_constant 1.0 --basis 24 "
    "--saveto results/TAAN": Y8M,
    "python -m Youtube8M.Visualizer --checkpoint results/TAAN/TAAN.pth": [],
    "python Visualizer.py --hidden_feature 1024 --basis 24 --path ../results/TAAN": ["--hidden_feature", "8"],
    "python -m Youtube8M.reproduce": ["--data_path", "data/youtube8m", "--rows", "TAAN", "--max_epoch", "1",
                                      "--out", "results/youtube8m_builtin"] + CPU,
    "python -m Youtube8M.reproduce --data_path data/youtube8m --preset paper --seeds 3":
        ["--seeds", "1", "--rows", "Hard3", "--max_epoch", "1", "--out", "results/youtube8m_paper"] + CPU,
    "torchrun --nproc_per_node 2 -m Youtube8M.Trainer --model TAAN --regularize distance --saveto results/TAAN":
        "two processes: tests/test_youtube8m_trainer.py::test_two_process_run starts the trainer with torchrun",
    "python -m Youtube8M.synthetic": ["--out", "data/youtube8m_synthetic", "--num_train", "400", "--num_valid", "400",
                                      "--train_files", "1", "--valid_files", "2"],
    "python -m Youtube8M.Trainer": Y8M,
    "python -m Youtube8M.Trainer --data_path mydata --model TAAN --saveto results/mine":
        ["--max_epoch", "1", "--hidden_feature", "8", "--batch_size", "64", "--basis", "4"] + CPU,
    "python Trainer.py": {"cwd": "Youtube8M", "extra": [a.replace("data/", "../data/") for a in Y8M]},
    "python -m Youtube8M.Visualizer": ["--checkpoint", "results/TAAN/TAAN.pth"],
    "python -m Youtube8M.data": NAME,
    # README: Omniglot
    "python -m Omniglot.dataTools --seed 0": ["--root", "data/omniglot"],
    "python -m Omniglot.synthetic --root data/omniglot_synthetic": ["--alphabets", "2", "--drawers", "4",
                                                                    "--min_chars", "2", "--max_chars", "3"],
    "python -m Omniglot.train --model taan --regularize distance --lam 0.3 --saveto runs/omniglot/d03": OMNIGLOT,
    "python -m Omniglot.Evaluation_TAAN --regularize distance --save_models runs/omniglot": SWEEP,
    "python Evaluation_TAAN.py --VMTL Euclidean --gpu 0": ORIGINAL_SWEEP,
    "python Evaluation_TAAN.py --regularize cosine --gpu 0": ORIGINAL_SWEEP,
    "python -m Omniglot.Figure_wrt_Lambda --reported": ["--results_dir", "results/omniglot",
                                                         "--out", "results/omniglot/lambda"],
    "python -m Omniglot.visualization_full --models runs/omniglot --out results/omniglot_matrices": [],
    "python -m Omniglot.reproduce --data_root data/omniglot": FIGURE + ["--results_dir", "results/figure"],
    "python -m Omniglot.reproduce --data_root data/omniglot --preset quick":
        FIGURE + ["--results_dir", "results/figure_quick"],
    "python -m Omniglot.reproduce --data_root data/omniglot_synthetic --preset quick":
        STEPS + CELLS + ["--results_dir", "results/figure_synthetic"],      # the data of the command above
    "python -m Omniglot.synthetic": NAME,
    "python -m Omniglot.dataTools": NAME,
    "python -m Omniglot.Evaluation_TAAN": NAME,
    "python -m Omniglot.reproduce": NAME,
    # Documents/README.md
    "python Documents/make_figures.py": ["--out-dir", "figures"],
    "python Documents/make_figures.py --out-dir /tmp": ["--out-dir", "figures"],
    "python Documents/make_figures.py --seed 3": ["--out-dir", "figures"],
    "python -m Documents.make_figures": ["--out-dir", "figures"],
    # Documents/speed.md and the GPU
    "bash benchmarks/cuda_check.sh": {"extra": [], "exit": 1} if not torch.cuda.is_available() else
        "the check of a GPU machine (about 6 minutes on an H200)",      # without a GPU: one line, status 1
    "python benchmarks/omniglot_sweep.py --devices cuda": GPU,
    "python benchmarks/cuda_profile.py": GPU,
    "python benchmarks/layers.py": BENCHMARK,
    "python benchmarks/youtube8m_step.py": BENCHMARK,
    "python benchmarks/loader.py": BENCHMARK,
    "python benchmarks/omniglot_step.py": BENCHMARK,
    "python benchmarks/omniglot_sweep.py --repeats 2 --warmup 1": BENCHMARK,
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INDENTED = re.compile(r"(?:^|\n\n)((?:    \S.*\n)+)")
INLINE = re.compile(r"`((?:python3? |bash |torchrun |pip |cd |tensorboard )[^`]*)`")
PLACEHOLDER = re.compile(r"\.\.\.|\[|<|\b(?:DIR|OUT|FOLDER|FILE)\b")     # `--saveto DIR`, `[--compare]`, `...`


def normal(command):
    return " ".join(shlex.split(command, comments=True))


def documented():
    """[(where, kind, text)]: the code blocks' shell lines and Python snippets in document order,
    then the complete commands quoted in the text."""
    blocks, inline = [], []
    for name in DOCUMENTS:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        line = (lambda at: f"{name}:{text.count(chr(10), 0, at) + 1}")
        for m in FENCE.finditer(text):
            if m.group(1) == "python":
                blocks.append((line(m.start()), "python", m.group(2)))
            else:
                blocks += [(line(m.start()), "shell", c) for c in m.group(2).replace("\\\n", " ").splitlines()]
        for m in INDENTED.finditer(FENCE.sub(lambda f: "\n" * f.group(0).count("\n"), text)):
            blocks += [(line(m.start(1)), "shell", c.strip()) for c in m.group(1).splitlines()
                       if c.strip().startswith(("python", "bash", "cd "))]
        for m in INLINE.finditer(text):
            command = " ".join(m.group(1).split())
            if not PLACEHOLDER.search(command):
                inline.append((line(m.start()), "shell", command))
    return [(where, kind, text) for where, kind, text in blocks + inline if kind == "python" or normal(text)]


def tree(*folders):
    """What the checkout's data and results folders hold: no documented command may write there."""
    state = set()
    for folder in folders:
        for where, _, files in os.walk(os.path.join(ROOT, folder)):
            state |= {(os.path.join(where, f), os.path.getmtime(os.path.join(where, f))) for f in files}
    return state


def run_command(command, extra, cwd, checkout):
    """Run one documented command (`python -m M`, `python file.py`, `bash file.sh`) in `cwd` of the
    scratch `checkout`, in this process where it is Python; returns its exit status."""
    argv = shlex.split(command, comments=True) + list(extra)
    old_argv, old_cwd = sys.argv, os.getcwd()
    os.chdir(cwd)
    try:
        if argv[0] == "bash":
            env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            done = subprocess.run(["bash", os.path.join(ROOT, argv[1])] + argv[2:], capture_output=True, text=True,
                                  env=env, timeout=120)
            assert done.stderr.count("\n") == 1 and not done.stdout, done.stdout + done.stderr
            return done.returncode
        assert argv[0] in ("python", "python3"), f"no way to run {argv[0]} here"
        try:
            if argv[1] == "-m":
                sys.argv = [argv[2]] + argv[3:]
                module = importlib.import_module(argv[2])
                if hasattr(module, "cli"):
                    module.cli()
                else:
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            else:
                script = os.path.join(ROOT, os.path.relpath(os.path.join(cwd, argv[1]), checkout))
                sys.argv = [script] + argv[2:]
                runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            return e.code or 0
        return 0
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder standing for the checkout, with tiny data where the documents expect data."""
    root = str(tmp_path)
    # more than one batch of the paper preset (256) in the largest task: its epoch has a step
    ensure_builtin_data(os.path.join(root, "data", "youtube8m"), seed=0, num_train=2400, num_valid=400,
                        train_files=2, valid_files=2)
    omniglot_synthetic.generate(os.path.join(root, "data", "omniglot"), alphabets=3, drawers=4, min_chars=2,
                                max_chars=3)
    generate_tfrecords(os.path.join(root, "yt8m"), seed=0, num_train=400, num_valid=400, train_files=1,
                       valid_files=2)
    shutil.move(os.path.join(root, "yt8m", "vocabulary.csv"), root)     # the download's layout
    for folder in ("mydata", "figures", "Youtube8M", "Omniglot"):       # the snippet says: mydata/ must exist
        os.makedirs(os.path.join(root, folder))
    # the table's rows in this process: a child process per row costs seconds of start-up
    monkeypatch.setattr(youtube8m_reproduce, "train_row", youtube8m_reproduce._train_in_child)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(root)         # where the Python snippets run
    return root


def test_every_documented_command_is_known_here():
    commands = {normal(part) for _, kind, text in documented() if kind == "shell"
                for part in re.split(r"\s&&\s", text) if not normal(part).startswith("cd ")}
    assert sorted(commands - set(HOW)) == [], "documented commands this test does not know: add them to HOW"
    assert sorted(set(HOW) - commands) == [], "HOW names commands that the documents no longer hold"


def test_every_documented_command_runs(scratch, capsys):
    before, done = tree("data", "results", "runs"), set()
    torch.manual_seed(0)
    for where, kind, text in documented():
        if kind == "python":
            exec(compile(text, where, "exec"), {"__name__": "__documented__"})
            continue
        cwd = scratch
        for part in re.split(r"\s&&\s", text):
            command = normal(part)
            if command.startswith("cd "):
                cwd = os.path.join(cwd, command[3:])
                continue
            how = HOW[command]
            if isinstance(how, str) or command in done:
                continue            # not run here (the reason is in HOW), or run already
            done.add(command)
            how = how if isinstance(how, dict) else {"extra": how}
            status = run_command(command, how["extra"], os.path.join(scratch, how.get("cwd", cwd)), scratch)
            assert status == how.get("exit", 0), \
                f"{where}: `{text}` exited with {status}:\n{capsys.readouterr().err[-3000:]}"
    assert tree("data", "results", "runs") == before, "a documented command wrote into the checkout"
    # what the chained commands left: the figures and files the documents promise
    for path in ("results/TAAN/TAAN-task_distance.png", "results/TAAN/learning_curves.png",
                 "results/mine/TAAN-task_mAP%K.csv", "data/converted/tasks.json", "figures/architecture.png",
                 "results/omniglot/lambda.png", "results/figure/table.md", "results/youtube8m_paper/table.md"):
        assert os.path.isfile(os.path.join(scratch, path)), path
