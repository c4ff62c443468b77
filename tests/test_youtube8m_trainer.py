"""Youtube8M/Trainer.py and Visualizer.py on tiny synthetic data (CPU)."""
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Events

from Training import CheckpointError, UserError, load_checkpoint, map_at_k
from Training.runlog import read_metrics
from Youtube8M import Trainer, Visualizer
from conftest import Killed, flip_byte, kill_at
from test_runlog import read_events
from Youtube8M.data import TASKS
from Youtube8M.models import build_model
from Youtube8M.torch_loader import MultiTask_Dataloader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--hidden_feature', '8', '--batch_size', '16', '--basis', '4', '--device', 'cpu', '--lr', '0.01']


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(youtube8m_data):
    return youtube8m_data


@pytest.fixture(scope='module')
def taan_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('taan'))
    result = Trainer.main(['--model', 'TAAN', '--regularize', 'distance', '--max_epoch', '2', '--saveto', out,
                           '--data_path', data] + TINY)
    return out, result


def evaluate_saved(path, data, name, hidden=8, split='test', **kw):
    """mAP@10 of a saved best model on a whole split, computed directly."""
    loaders, num_classes = MultiTask_Dataloader(split, 64, shuffle=False, data_path=data)
    model = build_model(name, 1152, hidden, [int(c) for c in num_classes], **kw)
    load_checkpoint(path, {'model': model})
    model.eval()
    per_task = []
    with torch.no_grad():
        for t, loader in enumerate(loaders):
            batches = list(loader)
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            xs = [x if s == t else torch.zeros(0, 1152) for s in range(len(loaders))]
            per_task.append(map_at_k(torch.sigmoid(model(xs)[t]), y, 10))
    return per_task


def read_results(folder, name):
    task = np.loadtxt(os.path.join(folder, f'{name}-task_mAP%K.txt'))
    mean = float(np.loadtxt(os.path.join(folder, f'{name}-average_mAP%K.txt')))
    return task, mean



def test_trainer_end_to_end(taan_run, data):
    out, result = taan_run
    files = sorted(os.listdir(out))
    assert [f for f in files if not f.startswith('events.out.tfevents.')] == [
        '.lock', 'TAAN-average_mAP%K.txt', 'TAAN-config.json', 'TAAN-task_mAP%K.csv', 'TAAN-task_mAP%K.txt',
        'TAAN-training_state.pt', 'TAAN.pth', 'learning_curves.png', 'metrics.csv']
    task, mean = read_results(out, 'TAAN')
    with open(os.path.join(out, 'TAAN-task_mAP%K.csv'), newline='') as f:
        named = list(csv.reader(f))
    assert named[0] == ['task', 'mAP@10'] and [r[0] for r in named[1:]] == result['tasks']
    assert [float(r[1]) for r in named[1:]] == pytest.approx(task, rel=1e-15)
    assert task.shape == (16,) and np.all((task > 0) & (task <= 1))
    assert mean == pytest.approx(task.mean())
    assert result['mAP'] == pytest.approx(mean)
    # the written numbers are those of the saved best model on the whole test split
    expected = evaluate_saved(os.path.join(out, 'TAAN.pth'), data, 'TAAN', basis=4, regularize='distance')
    assert task == pytest.approx(expected, rel=1e-9)


def test_run_folder_holds_the_validation_curves(taan_run, data):
    out, result = taan_run
    rows = read_metrics(os.path.join(out, 'metrics.csv'))
    assert [(r['epoch'], r['iteration']) for r in rows] == [(1, 7), (2, 14)]
    for row in rows:        # the mean over tasks is the mean of the per-task columns
        per_task = [row[f'valid_task_mAP@10/{name}'] for name in result['tasks']]
        assert row['valid_mAP@10'] == pytest.approx(np.mean(per_task), rel=1e-12)
        assert row['train_loss'] > 0
    best = max(rows, key=lambda r: r['valid_mAP@10'])       # the kept model is the best row's
    saved = evaluate_saved(os.path.join(out, 'TAAN.pth'), data, 'TAAN', split='valid', basis=4, regularize='distance')
    assert [best[f'valid_task_mAP@10/{name}'] for name in result['tasks']] == pytest.approx(saved, rel=1e-9)
    events = read_events(out)
    assert {step: v for (tag, step), v in events.items() if tag == 'valid/mAP_10'} == pytest.approx(
        {int(r['iteration']): r['valid_mAP@10'] for r in rows}, rel=1e-6)    # TensorBoard's tag, float32
    assert os.path.isfile(os.path.join(out, 'learning_curves.png'))        # drawn: tests/test_runlog.py


def test_an_early_stop_is_one_plain_line(data, capfd):
    """Ignite's EarlyStopping used to add its own timestamped INFO line to the log."""
    args = ['--model', 'Hard3', '--max_epoch', '4', '--early_stop', '1', '--data_path', data] + TINY
    result = Trainer.main(args + ['--lr', '1e-12'])         # nothing learnt: no higher score after epoch 1
    out, err = capfd.readouterr()
    assert result['epochs'] == 2 and 'Stopped early: 1 evaluations without a higher mAP@10.' in out
    assert 'INFO' not in out + err and not re.search(r'^\d{4}-\d\d-\d\d ', out + err, re.M), out + err


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    args = ['--model', 'TAAN', '--regularize', 'distance', '--max_epoch', '3', '--early_stop', '5',
            '--data_path', data] + TINY
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    Trainer.main(args + ['--saveto', full])

    with pytest.raises(Killed):
        Trainer.main(args + ['--saveto', part], setup_hook=kill_at(Events.EPOCH_COMPLETED(once=1)))
    saved = torch.load(os.path.join(part, 'TAAN-training_state.pt'))['trainer']
    assert saved['iteration'] == saved['epoch_length']        # saved after epoch 1
    resumed = Trainer.main(args + ['--saveto', part, '--resume', 'auto'])
    assert resumed['epochs'] == 3
    a = torch.load(os.path.join(full, 'TAAN-training_state.pt'))
    b = torch.load(os.path.join(part, 'TAAN-training_state.pt'))
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    assert read_results(full, 'TAAN')[1] == read_results(part, 'TAAN')[1]
    curves = [[{k: v for k, v in r.items() if k != 'seconds'}
               for r in read_metrics(os.path.join(folder, 'metrics.csv'))] for folder in (full, part)]
    assert len(curves[0]) == 3 and curves[0] == curves[1]       # one row per epoch, none twice
    assert read_events(full) == read_events(part)


def test_resume_from_a_state_saved_before_runs_kept_their_curves(data, tmp_path):
    args = ['--model', 'Hard3', '--early_stop', '5', '--data_path', data, '--saveto', str(tmp_path)] + TINY
    Trainer.main(args + ['--max_epoch', '1'])
    path = os.path.join(str(tmp_path), 'Hard3-training_state.pt')
    state = torch.load(path)
    assert [row['epoch'] for row in state.pop('runlog')['rows']] == [1]
    torch.save(state, path)                 # as an older version saved it: no rows
    assert Trainer.main(args + ['--max_epoch', '2', '--resume', 'auto'])['epochs'] == 2
    assert [row['epoch'] for row in read_metrics(os.path.join(str(tmp_path), 'metrics.csv'))] == [2]


def test_every_epoch_draws_its_own_batch_order(data):
    """Epoch e takes the loaders' order of (seed, epoch e): the first batch of task 0 in each
    epoch is the first batch of iter_epoch(e - 1)."""
    first = {}

    def record(trainer):
        @trainer.on(Events.ITERATION_STARTED)
        def keep(engine):
            first.setdefault(engine.state.epoch, engine.state.batch[0][0].clone())
    Trainer.main(['--model', 'Hard3', '--max_epoch', '3', '--early_stop', '5', '--data_path', data] + TINY,
                 setup_hook=record)
    loader = MultiTask_Dataloader('train', 16, data_path=data, seed=0)[0][0]
    assert len(first) == 3 and not torch.equal(first[1], first[2])
    for epoch, x in first.items():
        assert torch.equal(x, next(iter(loader.iter_epoch(epoch - 1, 0)))[0])


def test_corrupt_training_state_is_reported(data, tmp_path):
    state = tmp_path / 'TAAN-training_state.pt'
    state.write_bytes(b'\x00' * 100)
    with pytest.raises(CheckpointError, match=r'TAAN-training_state\.pt is truncated or corrupt.*Delete it'):
        Trainer.main(['--model', 'TAAN', '--max_epoch', '1', '--saveto', str(tmp_path), '--resume', 'auto',
                      '--data_path', data] + TINY)


def test_damaged_checkpoints_are_refused_for_resume_and_checkname(taan_run, data, tmp_path):
    from test_training import flip_byte_in_tensor_data
    out, _ = taan_run
    for name in ('TAAN.pth', 'TAAN-training_state.pt', 'TAAN-config.json'):
        shutil.copy(os.path.join(out, name), tmp_path / name)
    flip_byte_in_tensor_data(tmp_path / 'TAAN-training_state.pt')
    flip_byte_in_tensor_data(tmp_path / 'TAAN.pth')
    args = ['--model', 'TAAN', '--regularize', 'distance', '--max_epoch', '2', '--data_path', data] + TINY
    with pytest.raises(CheckpointError, match=r'TAAN-training_state\.pt is damaged'):
        Trainer.main(args + ['--saveto', str(tmp_path), '--resume', 'auto'])
    with pytest.raises(CheckpointError, match=r'TAAN\.pth is damaged'):
        Trainer.main(args + ['--checkname', str(tmp_path), '--max_epoch', '0'])


def test_two_process_run(data, tmp_path):
    """torchrun with 2 CPU processes (gloo), started the original way (cd Youtube8M)."""
    out = str(tmp_path / 'dist')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'Trainer.py',
           '--model', 'Hard3', '--max_epoch', '1', '--saveto', out, '--data_path', data] + TINY
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=os.path.join(ROOT, 'Youtube8M'), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 processes (gloo)' in proc.stdout
    assert ' INFO' not in proc.stdout + proc.stderr       # plain lines only, no library timestamps
    task, mean = read_results(out, 'Hard3')
    # metrics all-reduced over the two shards equal a one-process evaluation of the saved model
    assert task == pytest.approx(evaluate_saved(os.path.join(out, 'Hard3.pth'), data, 'Hard3'), rel=1e-9)
    assert mean == pytest.approx(task.mean())


README_COMMANDS = r"""
--batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model STL --saveto results/STL
--batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model MRN --regularization_task True --regularization_feature False --regularization_input False\
--mrn_constant 1e-3 --saveto results/MRN
--batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model DMTRL --method TT --saveto results/DMTRL_TT
"""


def test_original_readme_command_lines_parse():
    # the shell joins lines ending in a backslash (MRN's 'False\' glues to the next line)
    stl, mrn, dmtrl = README_COMMANDS.replace('\\\n', '').strip().split('\n')
    a = Trainer.parse_args(shlex.split(stl))
    assert (a.batch_size, a.max_epoch, a.hidden_feature, a.lr, a.model, a.saveto) == \
        (256, 10, 1024, 1e-4, 'STL', 'results/STL')
    a = Trainer.parse_args(shlex.split(mrn))
    assert (a.model, a.regularization_task, a.regularization_feature, a.regularization_input, a.mrn_constant) == \
        ('MRN', True, False, False, 1e-3)
    a = Trainer.parse_args(shlex.split(dmtrl))
    assert (a.model, a.method, a.saveto) == ('DMTRL', 'TT', 'results/DMTRL_TT')
    a = Trainer.parse_args(['--model', 'MRN', '--regularization_task', '--regularization_input', '0'])
    assert (a.regularization_task, a.regularization_feature, a.regularization_input) == (True, False, False)
    a = Trainer.parse_args([])
    assert (a.model, a.regularize, a.basis, a.taan_constant, a.update_interval, a.early_stop, a.method) == \
        ('STL', None, 24, 1.0, 50, 3, 'Tucker')
    for bad in (['--model', 'ResNet'], ['--regularize', 'l2'], ['--method', 'CP'], ['--regularization_task', 'x']):
        with pytest.raises(SystemExit):
            Trainer.parse_args(bad)


# Every command line of the original Youtube8M/README.md, as written there.
ORIGINAL_README = r"""
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model STL --saveto results/STL
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model Hard3 --saveto results/Hard3
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model SoftOrder --saveto results/SoftOrder
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model CrossStitch --saveto results/CrossStitch
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model MMoE --saveto results/MMoE
python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
--model MRN --regularization_task True --regularization_feature False --regularization_input False\
--mrn_constant 1e-3 --saveto results/MRN
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model DMTRL --method Tucker --saveto results/DMTRL_Tucker
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model DMTRL --method TT --saveto results/DMTRL_TT
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model DMTRL --method LAF --saveto results/DMTRL_LAF
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model TAAN --basis 64 --saveto results/TAAN
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model TAAN --basis 64 --regularize tracenorm --taan_constant 0.1 --saveto results/TAAN_TN
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model TAAN --basis 64 --regularize cosine --taan_constant 0.1 --saveto results/TAAN_TN
    python  Trainer.py --batch_size 256 --max_epoch 10 --hidden_feature 1024 --lr 0.0001 \
    --model TAAN --basis 64 --regularize distance --taan_constant 0.1 --saveto results/TAAN_TN
    python  Visualizer.py --hidden_feature 1024 --basis 64 --path results/TAAN
"""
ORIGINAL_COMMANDS = [shlex.split(line)[1:] for line in ORIGINAL_README.replace('\\\n', '').strip().splitlines()]
# tiny sizes for one epoch on tiny data: appended, so they override the command's own
SHRINK = {'Trainer.py': ['--hidden_feature', '8', '--batch_size', '32', '--max_epoch', '1', '--basis', '4',
                         '--device', 'cpu'],
          'Visualizer.py': ['--hidden_feature', '8', '--basis', '4']}


def test_every_original_command_line_runs(data, tmp_path, monkeypatch, capsys):
    """Each command of the original README, as written plus the tiny sizes, from a folder
    of its own (the saveto folders are relative to it, as in the original)."""
    monkeypatch.chdir(tmp_path)
    assert len(ORIGINAL_COMMANDS) == 14
    for script, *argv in ORIGINAL_COMMANDS:
        if script == 'Trainer.py':
            result = Trainer.main(argv + SHRINK[script] + ['--data_path', data])
            saveto = argv[argv.index('--saveto') + 1]
            assert result['paths']['average'] == os.path.join(saveto, f'{result["paths"]["best"][len(saveto) + 1:-4]}'
                                                               '-average_mAP%K.txt')
            assert 0 < float(np.loadtxt(tmp_path / result['paths']['average'])) <= 1
        else:
            assert capsys.readouterr().out.count('DMTRL (') == 3      # says what takes minutes at full size
            written = Visualizer.main(argv + SHRINK[script])['files']
            assert sorted(os.path.relpath(f, tmp_path) for f in written) == sorted(
                f'results/TAAN/TAAN-{name}' for name in ('task_distance.png', 'task_distance.pdf', 'task_cosine.png',
                                                         'task_cosine.pdf', 'task_clusters.txt'))


def test_names_are_case_insensitive_and_original_variant_reaches_the_layers(data):
    a = Trainer.parse_args(['--model', 'taan', '--regularize', 'Cosine', '--method', 'tt', '--original_variant',
                            '--data_path', data, '--hidden_feature', '8', '--batch_size', '16'])
    assert (a.model, a.regularize, a.method, a.original_variant) == ('TAAN', 'cosine', 'TT', True)
    experiment = Trainer.Youtube8M(a)
    dataflow = experiment.get_dataflow(torch.device('cpu'))
    plain = Trainer.parse_args(['--model', 'TAAN', '--regularize', 'COSINE', '--data_path', data, '--hidden_feature', '8',
                                '--batch_size', '16'])
    for args, expected in ((a, 'cosine_original'), (plain, 'cosine')):
        model, _ = Trainer.Youtube8M(args).initialize(dataflow, torch.device('cpu'))
        assert {layer.regularize for layer in model.reg_layers()} == {expected}


def test_visualizer(taan_run, tmp_path):
    out, _ = taan_run
    result = Visualizer.main(['--checkpoint', os.path.join(out, 'TAAN.pth'), '--out', str(tmp_path),
                              '--clusters', '4'])
    names = sorted(os.listdir(tmp_path))
    assert names == ['TAAN-task_clusters.txt', 'TAAN-task_cosine.pdf', 'TAAN-task_cosine.png',
                     'TAAN-task_distance.pdf', 'TAAN-task_distance.png']
    assert (tmp_path / 'TAAN-task_distance.png').read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'TAAN-task_distance.pdf').read_bytes()[:4] == b'%PDF'
    assert len(result['groups']) == 3
    for groups in result['groups']:       # every layer: a partition of the 16 tasks
        assert sorted(sum(groups, [])) == sorted(TASKS)


def test_spectral_groups_recover_blocks():
    blocks = np.repeat(np.arange(4), 4)
    rng = np.random.default_rng(0)
    D = np.where(blocks[:, None] == blocks[None, :], 0.1, 2.0) + 0.05 * rng.random((16, 16))
    D = D + D.T
    np.fill_diagonal(D, 0)
    labels = Visualizer.spectral_groups(D, 4)
    assert len(set(labels)) == 4
    for g in range(4):
        assert len(set(labels[blocks == g])) == 1


def test_visualizer_needs_taan(taan_run, tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        Visualizer.visualize(str(tmp_path / 'TAAN.pth'))
    (tmp_path / 'TAAN.pth').write_bytes(b'x')
    with pytest.raises(UserError, match='TAAN-config.json'):
        Visualizer.visualize(str(tmp_path / 'TAAN.pth'))


def test_mrn_update_runs_every_update_interval(data, monkeypatch):
    from Youtube8M.models import MRN
    calls, seen = [], {}
    monkeypatch.setattr(MRN, 'update', lambda self: calls.append(seen['trainer'].state.iteration))

    def remember(trainer):
        seen['trainer'] = trainer

    Trainer.main(['--model', 'MRN', '--max_epoch', '1', '--update_interval', '3', '--regularization_task',
                  '--data_path', data] + TINY, setup_hook=remember)
    steps = seen['trainer'].state.iteration
    assert steps >= 6
    assert calls == list(range(3, steps + 1, 3))


def test_test_uses_the_best_weights_without_saveto(data, tmp_path, monkeypatch):
    """Without --saveto the best weights are kept in memory for the test: spoiling the
    weights after the last validation must not change the test result of the same run."""
    args = ['--model', 'Hard3', '--max_epoch', '2', '--data_path', data] + TINY

    saved = Trainer.main(args + ['--saveto', str(tmp_path)])
    in_memory = {}

    def hook(trainer):
        @trainer.on(Events.EPOCH_COMPLETED(once=2))
        def spoil(engine):      # runs after the validation handler of epoch 2
            with torch.no_grad():
                for p in in_memory['model'].parameters():
                    p.normal_()

    def build_and_remember(*a, **kw):
        in_memory['model'] = build_model(*a, **kw)
        return in_memory['model']

    monkeypatch.setattr(Trainer, 'build_model', build_and_remember)
    unsaved = Trainer.main(args, setup_hook=hook)
    assert unsaved['mAP'] == pytest.approx(saved['mAP'], rel=1e-12)
    assert unsaved['task_mAP'] == pytest.approx(saved['task_mAP'], rel=1e-12)


def test_checkname_loads_weights_before_training(data, tmp_path):
    first = Trainer.main(['--model', 'Hard3', '--max_epoch', '1', '--saveto', str(tmp_path), '--data_path', data]
                         + TINY)
    only_test = Trainer.main(['--model', 'Hard3', '--max_epoch', '0', '--checkname', str(tmp_path),
                              '--data_path', data] + TINY)
    assert only_test['mAP'] == pytest.approx(first['mAP'], rel=1e-12)
    expected = evaluate_saved(os.path.join(str(tmp_path), 'Hard3.pth'), data, 'Hard3')
    assert only_test['task_mAP'] == pytest.approx(expected, rel=1e-9)


def test_own_data_with_any_tasks_and_width_trains_every_model(tmp_path):
    """A folder of per-task files in README's layout, 5 tasks x 300 features, no tasks.json:
    --data_path alone is enough for every model and the visualiser."""
    import h5py
    rng = np.random.default_rng(0)
    root = tmp_path / 'own'
    root.mkdir()
    for split, n in (('train', 120), ('valid', 40), ('test', 40)):
        for t, c in enumerate([3, 5, 2, 4, 6]):
            y = (rng.random((n, c)) < 0.3).astype(np.float32)
            x = rng.standard_normal((n, 300)).astype(np.float32) + y @ rng.standard_normal((c, 300)).astype(np.float32)
            with h5py.File(root / f'{split}_task_{t}.hdf5', 'w') as f:
                f['features'], f['labels'] = x, y
                f.attrs['num_classes'] = c
    from Youtube8M.models import MODELS
    for model in MODELS:
        out = tmp_path / model
        result = Trainer.main(['--model', model, '--max_epoch', '1', '--data_path', str(root), '--saveto', str(out)]
                              + TINY)
        assert len(result['task_mAP']) == 5 and result['tasks'] == [f'task {t}' for t in range(5)]
        config = __import__('json').load(open(out / f'{model}-config.json'))
        assert (config['in_features'], config['num_classes']) == (300, [3, 5, 2, 4, 6])
    groups = Visualizer.main(['--checkpoint', str(tmp_path / 'TAAN' / 'TAAN.pth'), '--clusters', '2'])['groups']
    assert all(sorted(sum(g, [])) == [f'task {t}' for t in range(5)] for g in groups)


def test_a_checkpoint_of_another_width_is_one_short_line(taan_run, data, capsys, monkeypatch):
    """--checkname with a model of another width or basis: what differs in a few words (the
    whole state_dict key list used to be printed)."""
    out, _ = taan_run
    monkeypatch.setattr(sys, 'argv', ['Trainer', '--model', 'TAAN', '--max_epoch', '0', '--checkname', out,
                                      '--data_path', data] + TINY + ['--basis', '6'])     # the run had basis 4
    with pytest.raises(SystemExit) as exit_:
        Trainer.cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'does not fit this run (' in err, err
    assert '(6 of another shape, e.g. layers.0.alpha: [16, 4] saved, [16, 6] here)' in err and len(err) < 400, err


def test_a_run_folder_has_one_live_run(data, tmp_path):
    """A second run into a folder a live run holds is refused in one line naming that process;
    the lock of a killed run does not block (the system dropped it)."""
    folder = str(tmp_path / 'run')
    args = ['--model', 'Hard3', '--max_epoch', '1', '--saveto', folder, '--data_path', data] + TINY
    hold = (f'import time\nfrom Training.atomic import hold_folder\nwith hold_folder({folder!r}, "--saveto"):\n'
            '    print("held", flush=True)\n    time.sleep(60)')
    holder = subprocess.Popen([sys.executable, '-c', hold],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        message = rf'--saveto {re.escape(folder)} is in use by another run \(process {holder.pid}\)'
        with pytest.raises(UserError, match=message):
            Trainer.main(args)
    finally:
        holder.kill()
        holder.wait()
    assert Trainer.main(args)['epochs'] == 1


def test_a_flipped_byte_in_the_features_stops_training_in_one_line(data, tmp_path, capsys, monkeypatch):
    """The probe: one bit flipped inside the features of a converted train_task_0.hdf5 used to train
    silently (the manifest checks sizes and ids, not values)."""
    copy = str(tmp_path / 'data')
    shutil.copytree(data, copy)
    flip_byte(os.path.join(copy, 'train_task_0.hdf5'), 'features', 3, 100)
    monkeypatch.setattr(sys, 'argv', ['Trainer.py', '--model', 'Hard3', '--max_epoch', '1', '--data_path', copy] + TINY)
    with pytest.raises(SystemExit) as exit:
        Trainer.cli()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count('\n') == 1, err
    assert re.search(r'train_task_0\.hdf5 is damaged: rows 0-\d+ do not match their checksum', err), err


def test_a_batch_larger_than_every_task_is_one_line(data):
    """The probe: --batch_size 1000000000 was accepted (one full-data step per epoch, where the
    original's epoch has none)."""
    big = list(TINY)
    big[big.index('--batch_size') + 1] = '1000000000'
    with pytest.raises(UserError, match=r'^--batch_size 1000000000 holds the whole training set of every task \(the '
                                        r'largest has \d+ videos\).*use a batch size below \d+$'):
        Trainer.main(['--model', 'Hard3', '--max_epoch', '1', '--data_path', data] + big)
