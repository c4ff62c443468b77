"""Every command of the project, run through its console entry point (`cli`) with tiny sizes,
in the order a user chains them: data, training, figures, sweeps, tables. Each must exit 0
and write what it promises. (`python -m Youtube8M.synthetic` once crashed on every call
while each function it calls was tested: this is the test that catches that.)"""
import glob
import importlib
import os
import re
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures('one_thread')

TINY_YT = ['--hidden_feature', '8', '--batch_size', '16', '--basis', '4', '--device', 'cpu', '--max_epoch', '1']
TINY_OG = ['--num_iter', '2', '--test_interval', '1', '--batch', '2', '--basis', '4']
OG_DATA = ['--alphabets', '3', '--drawers', '4', '--min_chars', '2', '--max_chars', '3']


def commands(tmp):
    """(module, argv, paths that must exist afterwards), in order; later commands use the
    outputs of earlier ones."""
    y, y2, o, r = (os.path.join(tmp, name) for name in ('yt8m', 'yt8m_converted', 'omniglot', 'runs'))
    raw = os.path.join(y, 'raw')
    return [
        ('Youtube8M.synthetic', ['--out', y, '--num_train', '1000', '--num_valid', '400', '--train_files', '2',
                                 '--valid_files', '2', '--keep_raw'], [f'{y}/tasks.json', f'{raw}/vocabulary.csv']),
        ('Youtube8M.data', ['--vocabulary', f'{raw}/vocabulary.csv', '--train', f'{raw}/train*.tfrecord',
                            '--valid', f'{raw}/validate*.tfrecord', '--out', y2], [f'{y2}/train_task_15.hdf5']),
        ('Youtube8M.Trainer', ['--model', 'TAAN', '--data_path', y2, '--saveto', f'{r}/taan'] + TINY_YT,
         [f'{r}/taan/TAAN.pth', f'{r}/taan/TAAN-task_mAP%K.txt']),
        ('Youtube8M.Visualizer', ['--checkpoint', f'{r}/taan/TAAN.pth', '--out', f'{r}/taan_figures'],
         [f'{r}/taan_figures/*.png']),
        ('Youtube8M.run_builtin', ['--models', 'Hard3', '--data_path', y, '--out', f'{r}/builtin'] + TINY_YT,
         [f'{r}/builtin/Hard3/Hard3.pth']),
        ('Youtube8M.reproduce', ['--data_path', y, '--preset', 'builtin', '--rows', 'Hard3', '--max_epoch', '1',
                                 '--out', f'{r}/table', '--device', 'cpu'], [f'{r}/table/table.md']),
        ('Omniglot.synthetic', ['--root', o] + OG_DATA, [f'{o}/images_background']),
        ('Omniglot.dataTools', ['--root', o], [f'{o}/omniglot_cache.hdf5', f'{o}/train_list.txt']),
        ('Omniglot.train', ['--model', 'taan', '--data_root', o, '--saveto', f'{r}/og', '--device', 'cpu'] + TINY_OG,
         [f'{r}/og/model_params.pt']),
        ('Omniglot.Evaluation_TAAN', ['--regularize', 'distance', '--lambdas', '0.1', '--repeats', '1',
                                      '--data_root', o, '--results_dir', f'{r}/og_results',
                                      '--save_models', f'{r}/og_models', '--device', 'cpu'] + TINY_OG,
         [f'{r}/og_results/Results-TAAN-Omniglot-distance.txt']),
        ('Omniglot.Figure_wrt_Lambda', ['--results_dir', f'{r}/og_results', '--out', f'{r}/og_figure'],
         [f'{r}/og_figure*']),
        ('Omniglot.visualization_full', ['--models', f'{r}/og_models', '--out', f'{r}/og_matrices'],
         [f'{r}/og_matrices/*']),
        ('Omniglot.run_builtin', ['--data_root', os.path.join(tmp, 'omniglot_builtin'), '--out', f'{r}/og_builtin',
                                  '--regularizers', 'distance', '--lambdas', '0.1', '--repeats', '1', '--device',
                                  'cpu'] + OG_DATA + TINY_OG, [f'{r}/og_builtin/*']),
        ('Omniglot.reproduce', ['--data_root', o, '--results_dir', f'{r}/og_reproduce', '--regularizers', 'distance',
                                '--lambdas', '0.1', '--repeats', '1', '--device', 'cpu'] + TINY_OG,
         [f'{r}/og_reproduce/records.json']),
        ('Documents.make_figures', ['--out-dir', f'{r}/documents'], [f'{r}/documents/*.png']),
    ]


def entry_point_modules():
    """Every module of the project that defines a command (`cli = entry_point(main)`)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, '*', '*.py'))):
        if re.search(r'^cli = entry_point\(main\)$', open(path, encoding='utf-8').read(), re.M):
            found.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.'))
    return found


def test_every_command_is_in_the_chain(tmp_path):
    assert sorted(m for m, _, _ in commands(str(tmp_path))) == sorted(entry_point_modules())


def test_every_command_runs_with_tiny_sizes(tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / 'runs' / 'documents')     # make_figures writes into a folder that exists
    for module, argv, outputs in commands(str(tmp_path)):
        monkeypatch.setattr(sys, 'argv', [module, *argv])
        try:
            importlib.import_module(module).cli()
        except SystemExit as e:
            pytest.fail(f'python -m {module} {" ".join(argv)} exited {e.code}: {capsys.readouterr().err[-2000:]}')
        for pattern in outputs:
            assert glob.glob(pattern), f'python -m {module} wrote no {pattern}'
