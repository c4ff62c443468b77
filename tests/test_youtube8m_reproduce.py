"""Youtube8M.reproduce: every row of the table, resumable, on tiny synthetic data."""
import csv
import json
import os

import numpy as np
import pytest

from Training import UserError, count_parameters
from Training.runlog import read_metrics
from Youtube8M import reproduce
from Youtube8M.models import build_model

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Tiny built-in data with more than one batch of the builtin preset (128) in its largest task."""
    from Youtube8M.synthetic import ensure_builtin_data
    return ensure_builtin_data(str(tmp_path_factory.mktemp('yt8m')), seed=0, num_train=1000, num_valid=400,
                               train_files=2, valid_files=2)


def test_rows_follow_the_original_commands():
    rows = dict(reproduce.ROWS)
    assert len(rows) == 13 and reproduce.PRESETS['paper'] == ['--batch_size', '256', '--max_epoch', '10',
                                                               '--hidden_feature', '1024', '--lr', '0.0001']
    assert rows['TAAN + cosine'] == ['--model', 'TAAN', '--basis', '64', '--regularize', 'cosine',
                                     '--taan_constant', '0.1']
    assert rows['MRN'][rows['MRN'].index('--regularization_feature') + 1] == 'False'


def test_a_row_trains_in_a_child_process_and_its_failure_is_one_message(data, tmp_path, capfd):
    out = str(tmp_path / 'child')
    result = reproduce.main(['--data_path', data, '--out', out, '--rows', 'Hard3', '--max_epoch', '1',
                             '--device', 'cpu'])
    record = result['rows']['Hard3'][0]
    assert record['memory'] == 'peak resident set of the process' and 2 ** 26 < record['peak_memory_bytes'] < 2 ** 32
    assert 'Epoch 001: train loss' in capfd.readouterr().out      # the child's log
    with pytest.raises(UserError, match='failed .exit status 2.*run the same command again'):
        reproduce.train_row(['--model', 'Hard3', '--data_path', str(tmp_path / 'nowhere'), '--saveto', str(tmp_path)],
                            str(tmp_path / 'r.json'))
    err = capfd.readouterr().err
    assert 'Traceback' not in err and err.count('error: data folder') == 1


def test_table_from_records_and_resume(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, 'train_row', reproduce._train_in_child)     # the same work, in this process
    out = str(tmp_path / 'table')
    argv = ['--data_path', data, '--out', out, '--rows', 'Hard3', 'TAAN + cosine', '--seeds', '2', '--max_epoch',
            '1', '--original_variant', '--device', 'cpu']
    first = reproduce.main(argv)
    records = first['rows']
    md = open(os.path.join(out, 'table.md')).read()
    assert 'SYNTHETIC built-in data' in md and "the original code's formulas" in md and 'preset builtin' in md
    for label, recs in records.items():
        assert len(recs) == 2 and recs[0]['seconds_per_step'] > 0 and recs[0]['peak_memory_bytes'] > 2 ** 20
        maps = [r['mAP'] for r in recs]
        assert f'| {label} | {np.mean(maps):.4f} +- {np.std(maps, ddof=1):.4f} |' in md
        assert all(abs(r['mAP'] - np.mean(r['task_mAP'])) < 1e-12 for r in recs)
    assert records['TAAN + cosine'][0]['argv'][-1] == '--original_variant'
    assert '--original_variant' not in records['Hard3'][0]['argv']
    # the parameter count is the model's
    hard3 = build_model('Hard3', 1152, 128, json.load(open(os.path.join(data, 'tasks.json')))['num_classes'])
    assert records['Hard3'][0]['parameters'] == count_parameters(hard3)
    rows = list(csv.reader(open(os.path.join(out, 'table.csv'))))
    assert rows[0][:3] == ['row', 'seed 0 mAP@10', 'seed 1 mAP@10'] and len(rows[0]) == 8 + 16
    assert [r[0] for r in rows[1:]] == ['Hard3', 'TAAN + cosine']
    assert float(rows[2][1]) == pytest.approx(records['TAAN + cosine'][0]['mAP'], abs=1e-6)
    assert sorted(os.listdir(os.path.join(out, 'curves'))) == ['Hard3.png', 'TAAN_cosine.png']
    for seed in (0, 1):     # each run folder holds its validation curve: the 1 epoch's row
        (row,) = read_metrics(os.path.join(out, 'runs', 'Hard3', f'seed{seed}', 'metrics.csv'))
        assert (row['epoch'], row['train_loss'] > 0, 0 < row['valid_mAP@10'] <= 1) == (1, True, True)
    # re-run: finished runs are kept; a run without its record continues from its training state
    os.remove(os.path.join(out, 'runs', 'TAAN_cosine', 'seed1', 'record.json'))
    capsys.readouterr()
    again = reproduce.main(argv)
    said = capsys.readouterr().out
    assert said.count('done before') == 3 and '=== TAAN + cosine, seed 1 ===' in said
    assert 'Resumed from' in said
    assert again['rows']['TAAN + cosine'][1]['mAP'] == records['TAAN + cosine'][1]['mAP']
    rows_again = list(csv.reader(open(os.path.join(out, 'table.csv'))))
    assert [r[:5] + r[8:] for r in rows_again] == [r[:5] + r[8:] for r in rows]     # every mAP@10 the same
    # other settings in the same folder are refused, not mixed in
    with pytest.raises(UserError, match='records a run with other settings'):
        reproduce.main(argv[:-3] + ['--device', 'cpu'])


def test_each_preset_has_its_own_default_folder(data, tmp_path, monkeypatch):
    """README's two commands used to write one folder: the second overwrote table.md and refused later rows."""
    monkeypatch.setattr(reproduce, 'OUT', str(tmp_path))
    monkeypatch.setattr(reproduce, 'reproduce', lambda args, folder, formulas: args.out)
    assert reproduce.main(['--data_path', data]) == os.path.join(str(tmp_path), 'builtin')    # synthetic data
    assert reproduce.main(['--data_path', data, '--preset', 'paper']) == os.path.join(str(tmp_path), 'paper')
    assert reproduce.main(['--data_path', data, '--out', str(tmp_path / 'mine')]) == str(tmp_path / 'mine')
