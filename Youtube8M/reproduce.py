"""The paper's Youtube-8M comparison table from one command.

    python -m Youtube8M.reproduce                                  # built-in data, builtin preset
    python -m Youtube8M.reproduce --data_path data/youtube8m --preset paper --seeds 3

trains every row of the paper's table -- STL, Hard3, MRN, SoftOrder, DMTRL (Tucker, TT,
LAF), CrossStitch, MMoE, TAAN, TAAN + tracenorm, TAAN + distance, TAAN + cosine -- with
`Youtube8M.Trainer`, once per seed, and writes one table.

Output in --out OUT (default results/youtube8m_reproduce/<preset> of the project home):
  OUT/table.md    mean test mAP@10 (mean +- sample std over the seeds), parameters,
                  seconds per training step, peak memory of the run
  OUT/table.csv   the same, with every seed's mAP@10 and every task's mean mAP@10
  OUT/curves/<row>.png   the validation curves of the row's seeds in one picture
  OUT/runs/<row>/seed<k>/   each run's folder (Youtube8M.Trainer's files, metrics.csv included)

Presets (the rows' own flags -- TAAN's basis 64 and constant 0.1, MRN's task covariance
only, DMTRL's method -- are those of the original README's commands in both):
  paper     the original README's commands: batch 256 per task, 10 epochs, hidden 1024,
            lr 1e-4 (hours per row on a CPU)
  builtin   the default on the built-in synthetic data: hidden 128, batch 128, lr 3e-3, at
            most 10 epochs, early stop 3, so that the table takes about a quarter of an hour
            on 2 CPU cores

Every row runs in a child process, so its peak memory is measured on its own: the peak
resident set of the process on the CPU (interpreter and data included), the peak of
torch.cuda.max_memory_allocated on CUDA. It is resumable: re-run the same command and the
finished runs are kept (OUT/runs/<row>/seed<k>/record.json), an interrupted run continues
from its last epoch, and the table is written again from the records. --original_variant
gives the TAAN rows the original code's tracenorm / cosine formulas; the table says which
formulas it used and whether the data is synthetic.
"""
import json
import multiprocessing
import os
import re
import time

import numpy as np

from Training import (ArgumentParser, UserError, add_bool_argument, atomic_write_json, atomic_write_text, count,
                      default_path, entry_point, format_mean_std, hold_folder, mean_std)
from Training.runlog import METRICS_NAME, draw_curves, read_metrics
from Youtube8M.Trainer import METRIC
from Youtube8M.data import DEFAULT_DATA_PATH
from Youtube8M.datafolder import read_data_folder

TAAN_PAPER = ['--model', 'TAAN', '--basis', '64']
ROWS = [
    ('STL', ['--model', 'STL']),
    ('Hard3', ['--model', 'Hard3']),
    ('MRN', ['--model', 'MRN', '--regularization_task', 'True', '--regularization_feature', 'False',
             '--regularization_input', 'False', '--mrn_constant', '1e-3']),
    ('SoftOrder', ['--model', 'SoftOrder']),
    ('DMTRL Tucker', ['--model', 'DMTRL', '--method', 'Tucker']),
    ('DMTRL TT', ['--model', 'DMTRL', '--method', 'TT']),
    ('DMTRL LAF', ['--model', 'DMTRL', '--method', 'LAF']),
    ('CrossStitch', ['--model', 'CrossStitch']),
    ('MMoE', ['--model', 'MMoE']),
    ('TAAN', TAAN_PAPER),
    ('TAAN + tracenorm', TAAN_PAPER + ['--regularize', 'tracenorm', '--taan_constant', '0.1']),
    ('TAAN + distance', TAAN_PAPER + ['--regularize', 'distance', '--taan_constant', '0.1']),
    ('TAAN + cosine', TAAN_PAPER + ['--regularize', 'cosine', '--taan_constant', '0.1']),
]
PRESETS = {
    'paper': ['--batch_size', '256', '--max_epoch', '10', '--hidden_feature', '1024', '--lr', '0.0001'],
    'builtin': ['--batch_size', '128', '--max_epoch', '10', '--hidden_feature', '128', '--lr', '0.003',
                '--early_stop', '3'],
}
OUT = default_path('results', 'youtube8m_reproduce')


def slug(label):
    return re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')


def run_argv(args, label, flags, seed, folder):
    argv = PRESETS[args.preset] + flags + ['--data_path', os.path.abspath(args.data_path), '--seed', str(seed),
                                           '--device', args.device, '--saveto', folder]
    if args.max_epoch is not None:
        argv += ['--max_epoch', str(args.max_epoch)]
    if args.original_variant and label.startswith('TAAN +'):
        argv.append('--original_variant')
    return argv


def _train_in_child(argv, record_path, extra):
    """Child process: train one row (with the flags `extra`, which do not change its result and
    are not recorded), then record its result and its peak memory."""
    import resource

    import torch

    from Youtube8M import Trainer
    result = {}
    entry_point(lambda: result.update(Trainer.main(argv + ['--resume', 'auto', '--progress', 'false'] + extra)))()
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        peak = torch.cuda.max_memory_allocated()
        memory = 'CUDA max_memory_allocated'
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: kilobytes
        memory = 'peak resident set of the process'
    atomic_write_json(record_path, {'argv': argv, 'mAP': result['mAP'], 'task_mAP': result['task_mAP'],
                                    'tasks': result['tasks'], 'parameters': result['parameters'],
                                    'seconds_per_step': result['seconds_per_step'], 'peak_memory_bytes': peak,
                                    'memory': memory, 'epochs': result['epochs']})


def train_row(argv, record_path, extra=()):
    """Train in a child process (its own peak memory); UserError if it fails."""
    child = multiprocessing.get_context('spawn').Process(target=_train_in_child, args=(argv, record_path, list(extra)))
    child.start()
    child.join()
    if child.exitcode != 0 or not os.path.isfile(record_path):
        raise UserError(f'the run {" ".join(argv)} failed (exit status {child.exitcode}; its message is above). '
                        'Fix the cause and run the same command again: finished rows are kept')


def read_record(path, argv):
    """The record of a finished run with these settings, or None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get('argv') != argv:
        raise UserError(f'{path} records a run with other settings ({" ".join(record.get("argv", []))}); use '
                        'another --out, or delete that folder to train the row again')
    return record


def write_table(args, rows, folder, formulas, elapsed):
    """OUT/table.md and OUT/table.csv from the records of every row."""
    data = 'SYNTHETIC built-in data' if folder.synthetic else 'data'
    epochs = '' if args.max_epoch is None else f' (at most {args.max_epoch} epochs)'
    title = (f'Youtube-8M, {data} ({args.data_path}), preset {args.preset}{epochs}, {args.seeds} seed(s), '
             f'TAAN regularisers with {formulas} formulas; mean test mAP@10 over the {len(folder.tasks)} tasks')
    lines = [f'**{title}**', '',
             '| row | test mAP@10 | parameters | s / step | peak memory (MB) |', '| --- | --- | --- | --- | --- |']
    csv = ['row,' + ','.join(f'seed {s} mAP@10' for s in range(args.seeds)) + ',mean mAP@10,std mAP@10,'
           'parameters,seconds per step,peak memory MB,' + ','.join(f'"{t}"' for t in folder.tasks)]
    for label, records in rows:
        maps = [r['mAP'] for r in records]
        mean, std = mean_std(maps)
        per_task = np.mean([r['task_mAP'] for r in records], axis=0)
        steps = [r['seconds_per_step'] for r in records if r['seconds_per_step']]
        step = np.mean(steps) if steps else float('nan')
        peak = max(r['peak_memory_bytes'] for r in records) / 2 ** 20
        lines.append(f'| {label} | {format_mean_std(mean, std, ".4f")} | {records[0]["parameters"]:,} | {step:.3f} | '
                     f'{peak:,.0f} |')
        spread = '' if np.isnan(std) else f'{std:.6f}'       # one seed: no spread
        csv.append(f'"{label}",' + ','.join(f'{m:.6f}' for m in maps) + f',{mean:.6f},{spread},'
                   f'{records[0]["parameters"]},{step:.6f},{peak:.1f},' + ','.join(f'{v:.6f}' for v in per_task))
    lines += ['', f'Peak memory: the {rows[0][1][0]["memory"]}. Trained in {elapsed / 60:.1f} minutes in this '
              'session (finished rows of earlier sessions not counted).']
    atomic_write_text(os.path.join(args.out, 'table.md'), '\n'.join(lines) + '\n')
    atomic_write_text(os.path.join(args.out, 'table.csv'), '\n'.join(csv) + '\n')
    return lines


def build_parser():
    p = ArgumentParser(description="Train every row of the paper's Youtube-8M table and write the table.")
    p.add_argument('--data_path', default=DEFAULT_DATA_PATH, help='data folder (default %(default)s; the built-in '
                   'synthetic data is created there when it is empty)')
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='sizes: paper (the original commands) or builtin (minutes on a CPU); default builtin on '
                        'the built-in synthetic data, paper otherwise')
    p.add_argument('--seeds', type=count(1), default=1, help='runs per row, with seeds 0..N-1 (default 1)')
    p.add_argument('--max_epoch', type=count(0), default=None, help="at most this many epochs per run (default: the "
                   "preset's, 10)")
    p.add_argument('--rows', nargs='+', default=None, metavar='ROW', choices=[label for label, _ in ROWS],
                   help='train only these rows (default all): ' + ', '.join(f'"{label}"' for label, _ in ROWS))
    p.add_argument('--original_variant', action='store_true',
                   help="TAAN rows: the original code's tracenorm / cosine formulas")
    p.add_argument('--out', default=None, help=f'output folder (default {OUT}/<preset>: each preset its own)')
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda or cuda:N')
    add_bool_argument(p, '--compile', help="compile every row's training step (Trainer.py --compile); the "
                      'results agree with an eager run to float rounding, so finished rows are kept either way')
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.path.abspath(args.data_path) == os.path.abspath(DEFAULT_DATA_PATH):
        from Youtube8M.synthetic import ensure_builtin_data
        ensure_builtin_data(args.data_path)
    folder = read_data_folder(args.data_path)
    args.preset = args.preset or ('builtin' if folder.synthetic else 'paper')
    args.out = args.out or os.path.join(OUT, args.preset)
    formulas = "the original code's" if args.original_variant else "the paper's"
    print(f'Youtube-8M table: {len(folder.tasks)} tasks{" (SYNTHETIC)" if folder.synthetic else ""} in '
          f'{args.data_path}, preset {args.preset}, {args.seeds} seed(s), TAAN with {formulas} formulas; '
          f'results in {args.out}', flush=True)
    with hold_folder(args.out, '--out'):
        return reproduce(args, folder, formulas)


def reproduce(args, folder, formulas):
    """Train (or read the records of) every row and write the table; see `main`."""
    start, rows = time.time(), []
    for label, flags in ROWS:
        if args.rows and label not in args.rows:
            continue
        records, curves = [], []
        for seed in range(args.seeds):
            run_folder = os.path.join(args.out, 'runs', slug(label), f'seed{seed}')
            argv_ = run_argv(args, label, flags, seed, run_folder)
            record_path = os.path.join(run_folder, 'record.json')
            record = read_record(record_path, argv_)
            if record is None:
                print(f'\n=== {label}, seed {seed} ===', flush=True)
                train_row(argv_, record_path, ['--compile', 'true'] if args.compile else [])
                record = read_record(record_path, argv_)
            else:
                print(f'{label}, seed {seed}: done before (mAP@10 {record["mAP"]:.4f})')
            records.append(record)
            if os.path.isfile(os.path.join(run_folder, METRICS_NAME)):
                curves.append((f'seed {seed}', read_metrics(os.path.join(run_folder, METRICS_NAME))))
        rows.append((label, records))
        if curves:
            draw_curves(curves, f'valid_{METRIC}', os.path.join(args.out, 'curves', f'{slug(label)}.png'),
                        f'Youtube-8M, {label}: {len(curves)} seed(s)')
    lines = write_table(args, rows, folder, formulas, time.time() - start)
    print('\n' + '\n'.join(lines))
    print(f'\nWritten: {os.path.join(args.out, "table.md")}, {os.path.join(args.out, "table.csv")}')
    return {'rows': {label: records for label, records in rows}, 'table': lines}


cli = entry_point(main)

if __name__ == '__main__':
    cli()
