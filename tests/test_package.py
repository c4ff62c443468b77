"""The installed package, the original command lines, and what users see on errors and in logs."""
import importlib
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from Omniglot import synthetic as omniglot_synthetic
from Training import UserError, entry_point
from Youtube8M import Trainer
from Youtube8M.synthetic import ensure_builtin_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("Layers", "Training", "Youtube8M", "Omniglot")
TINY_Y8M = ['--hidden_feature', '8', '--batch_size', '16', '--basis', '4', '--device', 'cpu', '--lr', '0.01']
TINY_OMNIGLOT = ['--lambdas', '0.1', '--repeats', '1', '--num_iter', '2', '--test_interval', '1', '--basis', '4',
                 '--batch', '2', '--lr', '1e-3']


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    """A project home (TAAN_HOME) with tiny Youtube-8M and Omniglot data at the default places."""
    home = tmp_path_factory.mktemp('home')
    ensure_builtin_data(str(home / 'data' / 'youtube8m'), seed=0, num_train=800, num_valid=400, train_files=2,
                        valid_files=2)
    omniglot_synthetic.generate(str(home / 'data' / 'omniglot'), alphabets=2, drawers=4, min_chars=2, max_chars=3)
    return home


def run(cmd, cwd, home, timeout=300):
    env = dict(os.environ, TAAN_HOME=str(home), OMP_NUM_THREADS='1')
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ installing

def test_requirements_agree_with_pyproject():
    project = tomllib.load(open(os.path.join(ROOT, 'pyproject.toml'), 'rb'))['project']

    def listed(name):
        lines = open(os.path.join(ROOT, name)).read().splitlines()
        return sorted(line.split('#')[0].strip() for line in lines if line.split('#')[0].strip())

    assert listed('requirements.txt') == sorted(project['dependencies'])
    assert listed('requirements-dev.txt') == sorted(project['optional-dependencies']['dev'])
    assert 'torch==2.13.0' in project['dependencies']


def test_installed_copy_imports_from_another_folder(tmp_path):
    """pip install (no dependencies) into a folder of its own: the layers import from
    elsewhere, with the kernel source shipped, and compute what the checkout computes."""
    src, target = tmp_path / 'src', tmp_path / 'site'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', '.venv*', 'data', 'results', 'runs', 'build',
                                                             '*.egg-info', '__pycache__', '.pytest_cache'))
    proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                           '--target', str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in PACKAGES:
        assert (target / name / '__init__.py').is_file()
    assert (target / 'Layers' / 'csrc' / 'tal_activation.cpp').is_file()
    assert (target / 'bin' / 'taan-youtube8m').is_file() and (target / 'bin' / 'taan-omniglot-sweep').is_file()
    code = ("import torch, Layers\n"
            "from Layers.TAL_pytorch import TAL_Linear\n"
            "from Layers._tal_kernel import tal_activation_naive\n"
            "print(Layers.__file__)\n"
            "torch.manual_seed(0)\n"
            "layer = TAL_Linear(5, 7, 4, 3).double()\n"
            "x, ids = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])\n"
            "a = torch.nn.functional.linear(x, layer.weight, layer.bias)\n"
            "ref = tal_activation_naive(a, layer.alpha[ids][:, None, :], layer.basis)\n"
            "print(float((layer(x, ids, per_row=True) - ref).abs().max()))\n")
    out = tmp_path / 'elsewhere'
    out.mkdir()
    proc = subprocess.run([sys.executable, '-c', code], cwd=out, env=dict(os.environ, PYTHONPATH=str(target)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, error = proc.stdout.split()
    assert where.startswith(str(target)) and float(error) < 1e-12


# ------------------------------------------------------------------------------ original command lines

def test_original_omniglot_command_from_its_folder_and_from_the_root(home):
    """`cd Omniglot && python Evaluation_TAAN.py --regularize cosine --gpu 0` (the original
    README's command, with tiny sizes) finds data/omniglot of the project home, and the
    same command from the root writes to the same results file."""
    results = home / 'results' / 'omniglot' / 'Results-TAAN-Omniglot-cosine.txt'
    first = run([sys.executable, 'Evaluation_TAAN.py', '--regularize', 'cosine', '--gpu', '0'] + TINY_OMNIGLOT,
                os.path.join(ROOT, 'Omniglot'), home)
    assert first.returncode == 0, first.stderr[-2000:]
    assert results.read_text().count('Experiment 1, ACC:') == 1
    second = run([sys.executable, '-m', 'Omniglot.Evaluation_TAAN', '--regularize', 'cosine', '--gpu', '0']
                 + TINY_OMNIGLOT, ROOT, home)
    assert second.returncode == 0, second.stderr[-2000:]
    assert results.read_text().count('Experiment 1, ACC:') == 2      # appended, as the original
    assert (home / 'data' / 'omniglot' / 'omniglot_cache.hdf5').is_file()


def test_original_youtube8m_command_from_its_folder(home, tmp_path):
    out = tmp_path / 'STL'
    proc = run([sys.executable, 'Trainer.py', '--batch_size', '16', '--max_epoch', '1', '--hidden_feature', '8',
                '--lr', '0.0001', '--model', 'STL', '--saveto', str(out)], os.path.join(ROOT, 'Youtube8M'), home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / 'STL-average_mAP%K.txt').is_file()
    assert str(home / 'data' / 'youtube8m') in (out / 'STL-config.json').read_text()


# ------------------------------------------------------------------------------ user errors

def missing(tmp_path):
    return str(tmp_path / 'missing')


ENTRY_POINTS = [
    ('Youtube8M.Trainer', lambda p: ['--data_path', missing(p)], 'data folder .*missing does not exist'),
    ('Youtube8M.Visualizer', lambda p: ['--checkpoint', missing(p)], 'checkpoint .*missing does not exist'),
    ('Youtube8M.data', lambda p: ['--vocabulary', missing(p), '--train', 'x', '--valid', 'y', '--out', str(p)],
     'vocabulary file .*missing.* not found'),
    ('Youtube8M.synthetic', lambda p: ['--out', str(p), '--num_train', 'many'], "--num_train: expected an integer, got 'many'"),
    ('Youtube8M.run_builtin', lambda p: ['--models', 'ResNet'], "--models: invalid choice: 'ResNet'"),
    ('Youtube8M.reproduce', lambda p: ['--data_path', missing(p)], 'data folder .*missing does not exist'),
    ('Omniglot.train', lambda p: ['--data_root', missing(p)], 'data folder .*missing does not exist'),
    ('Omniglot.Evaluation_TAAN', lambda p: ['--regularize', 'cosine', '--data_root', missing(p)],
     'data folder .*missing does not exist'),
    ('Omniglot.Figure_wrt_Lambda', lambda p: ['--results_dir', missing(p)], 'results folder .*missing does not exist'),
    ('Omniglot.visualization_full', lambda p: ['--models', missing(p), '--out', str(p)],
     'model folder .*missing does not exist'),
    ('Omniglot.dataTools', lambda p: ['--root', missing(p)], 'data folder .*missing does not exist'),
    ('Omniglot.synthetic', lambda p: ['--root', str(p), '--drawers', '100'], 'drawers must be in 1..99'),
    ('Omniglot.run_builtin', lambda p: ['--resume', '--out', str(p)], '--resume: no earlier job'),
    ('Omniglot.reproduce', lambda p: ['--data_root', missing(p), '--results_dir', str(p / 'out')],
     'data folder .*missing does not exist'),
    ('Documents.make_figures', lambda p: ['--out-dir', missing(p)], 'output folder .*missing does not exist'),
]


@pytest.mark.parametrize('module,argv,message', ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_entry_point_user_error_is_one_line(module, argv, message, tmp_path, monkeypatch, capsys):
    cli = importlib.import_module(module).cli
    monkeypatch.setattr(sys, 'argv', [module, *argv(tmp_path)])
    monkeypatch.delenv('TAAN_DEBUG', raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    assert __import__('re').search(message, err), err


# Numeric flags: NaN, infinities and values out of range are refused at parse time, naming the flag.
NUMERIC_PROBES = [
    ('Youtube8M.Trainer', ['--taan_constant', 'nan'], '--taan_constant: must be a finite number'),
    ('Youtube8M.Trainer', ['--taan_constant', 'inf'], '--taan_constant: must be a finite number'),
    ('Youtube8M.Trainer', ['--lr', '-1'], '--lr: must be > 0, got -1'),
    ('Youtube8M.Trainer', ['--lr', 'nan'], '--lr: must be a finite number'),
    ('Youtube8M.Trainer', ['--mrn_constant', '-0.5'], '--mrn_constant: must be >= 0, got -0.5'),
    ('Youtube8M.Trainer', ['--batch_size', '0'], '--batch_size: must be >= 1, got 0'),
    ('Youtube8M.reproduce', ['--seeds', '0'], '--seeds: must be >= 1, got 0'),
    ('Youtube8M.run_builtin', ['--lr', 'inf'], '--lr: must be a finite number'),
    ('Youtube8M.synthetic', ['--second_task_prob', '1.5'], '--second_task_prob: must be <= 1, got 1.5'),
    ('Omniglot.train', ['--lam', 'nan'], '--lam: must be a finite number'),
    ('Omniglot.train', ['--c0', 'nan'], '--c0: must be a finite number'),
    ('Omniglot.train', ['--seed', '-3'], '--seed: must be >= 0, got -3'),
    ('Omniglot.Evaluation_TAAN', ['--regularize', 'cosine', '--lambdas', '0.1', 'nan'],
     '--lambdas: must be a finite number'),
    ('Omniglot.Evaluation_TAAN', ['--regularize', 'cosine', '--save_every', '-5'], '--save_every: must be >= 0, got -5'),
    ('Omniglot.run_builtin', ['--lambdas', 'nan'], '--lambdas: must be a finite number'),
    ('Omniglot.reproduce', ['--lr', '0'], '--lr: must be > 0, got 0'),
    ('Omniglot.dataTools', ['--train_fraction', '1'], '--train_fraction: must be < 1, got 1'),
]


@pytest.mark.parametrize('module,argv,message', NUMERIC_PROBES,
                         ids=[f'{m} {" ".join(a)}' for m, a, _ in NUMERIC_PROBES])
def test_a_bad_number_is_one_line_naming_the_flag(module, argv, message, monkeypatch, capsys):
    cli = importlib.import_module(module).cli
    monkeypatch.setattr(sys, 'argv', [module, *argv])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err


def test_debug_shows_the_traceback_and_programming_errors_keep_theirs(tmp_path, monkeypatch):
    cli = importlib.import_module('Omniglot.dataTools').cli
    monkeypatch.setattr(sys, 'argv', ['dataTools', '--root', missing(tmp_path), '--debug'])
    with pytest.raises(UserError, match='does not exist'):
        cli()

    def broken(argv=None):
        raise KeyError('a bug')
    monkeypatch.setattr(sys, 'argv', ['broken'])
    with pytest.raises(KeyError):
        entry_point(broken)()


def test_one_subprocess_error_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'Omniglot.train', '--data_root', missing(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith('error: data folder')


# ------------------------------------------------------------------------------ logs, resume, leftovers

def test_log_is_plain_lines_with_the_epoch_loss(home, tmp_path, capsys):
    """Not on a terminal: no progress bar, one line per epoch with its mean training loss."""
    data = str(home / 'data' / 'youtube8m')
    Trainer.main(['--model', 'Hard3', '--max_epoch', '2', '--data_path', data, '--saveto', str(tmp_path)] + TINY_Y8M)
    out, err = capsys.readouterr()
    assert '\r' not in out + err
    epochs = [line for line in out.splitlines() if line.startswith('Epoch ')]
    assert len(epochs) == 2
    assert __import__('re').fullmatch(r'Epoch 001: train loss \d+\.\d{4}, valid mAP@10 0\.\d{4} \(best 0\.\d{4}, '
                                      r'0 without gain\)', epochs[0])
    Trainer.main(['--model', 'Hard3', '--max_epoch', '1', '--data_path', data, '--progress', 'true'] + TINY_Y8M)
    assert '\r' in capsys.readouterr().err                          # asked for: bars even into a file


def test_resume_refuses_other_settings_and_clears_dead_writers_temporaries(home, tmp_path):
    data = str(home / 'data' / 'youtube8m')
    args = ['--model', 'Hard3', '--max_epoch', '1', '--data_path', data, '--saveto', str(tmp_path)] + TINY_Y8M
    Trainer.main(args)
    with pytest.raises(UserError, match=r"other settings \(lr: 0\.01 there, 0\.02 now\)"):
        Trainer.main(args + ['--resume', 'auto', '--lr', '0.02'])
    dead = tmp_path / '.Hard3.pth.4194305.tmp'          # above Linux's largest pid: its writer is gone
    alive = tmp_path / f'.Hard3.pth.{os.getpid()}.tmp'
    dead.write_bytes(b'half a checkpoint')
    alive.write_bytes(b'being written')
    result = Trainer.main(args + ['--resume', 'auto', '--max_epoch', '2'])      # may train longer
    assert result['epochs'] == 2
    assert not dead.exists() and alive.exists()
    saved = torch.load(tmp_path / 'Hard3-training_state.pt')['trainer']
    assert saved['iteration'] == 2 * saved['epoch_length']


def test_an_error_inside_a_run_is_reported_once(tmp_path):
    """A user error raised inside Ignite's engine reaches stderr as the one error line, without
    Ignite's own "Current run is terminating due to exception" lines before it (a fresh
    process, as a user runs it: under pytest, logging goes elsewhere)."""
    from Omniglot import synthetic
    root = str(tmp_path / 'data')
    synthetic.generate(root, alphabets=3, drawers=4, min_chars=2, max_chars=3)
    done = subprocess.run([sys.executable, '-m', 'Omniglot.train', '--data_root', root, '--batch', '100000',
                           '--num_iter', '2', '--device', 'cpu', '--progress', 'false'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count('\n') == 1 and done.stderr.startswith('error: batch_size must be in 1..'), done.stderr


GPU_BENCHMARKS = [['cuda_profile.py'], ['layers.py', '--device', 'cuda'], ['omniglot_step.py', '--device', 'cuda'],
                  ['youtube8m_step.py', '--device', 'cuda'], ['omniglot_sweep.py', '--devices', 'cpu', 'cuda']]


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the machines without a CUDA device')
def test_gpu_benchmarks_stop_in_one_line_without_a_gpu():
    """`omniglot_sweep.py --devices cuda` used to end in a traceback here (after measuring the CPU)."""
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'benchmarks', script), *flags], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for script, *flags in GPU_BENCHMARKS]
    for (script, *_), run in zip(GPU_BENCHMARKS, runs):
        out, err = run.communicate(timeout=120)
        assert run.returncode == 1 and out == '' and err == f'{script}: no CUDA device here (torch ' \
            f'{torch.__version__}); run it on a machine with a GPU, or ask for cpu\n', (script, out, err)
