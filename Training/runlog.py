"""What a run folder shows of the training: metrics.csv, learning_curves.png and TensorBoard events.

    metrics.csv            one row per evaluation: epoch, iteration, the mean training loss since the
                           previous evaluation, every evaluation metric (a per-task metric as one column
                           per task, named `<split>_<metric>/<task>`), and the run's wall-clock seconds so
                           far (resumed runs go on counting from where the saved run stopped)
    learning_curves.png    the training loss and the score against the iteration, drawn when the run ends
    events.out.tfevents.*  the same scalars for TensorBoard (`tensorboard --logdir FOLDER`), written by
                           Ignite's TensorboardLogger with tensorboardX

The rows live in the run's training state (`state_dict`), so metrics.csv is written whole from them
after every evaluation (atomically) and a resumed run's file holds no row twice; a resumed run's
TensorBoard writer purges the events the killed run logged after its last saved state.
"""
import csv
import math
import os
import time

from .atomic import atomic_savefig, atomic_write_csv

METRICS_NAME = 'metrics.csv'
CURVES_NAME = 'learning_curves.png'


def metric_columns(split, metrics, names=None):
    """{column: float} of an evaluator's metrics: numbers as `<split>_<name>`, a list as one column per entry
    (`<split>_<name>/<names[i]>`, or the index without names); dicts (a metric's own grouping) are left out."""
    columns = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, (list, tuple)):
            labels = names if names is not None and len(names) == len(value) else range(len(value))
            columns.update({f'{split}_{name}/{label}': float(v) for label, v in zip(labels, value)})
        else:
            columns[f'{split}_{name}'] = float(value)
    return columns


def read_metrics(path):
    """The rows of a metrics.csv as a list of {column: float} (empty cells: nan)."""
    with open(path, newline='', encoding='utf-8') as f:
        return [{k: float(v) if v != '' else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def draw_curves(curves, score, path, title=''):
    """One figure of the training loss (left) and `score` (right) against the iteration, a line per
    (label, rows) in `curves`; written atomically as PNG."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    for label, rows in curves:
        steps = [r['iteration'] for r in rows]
        left.plot(steps, [r.get('train_loss', math.nan) for r in rows], marker='.', label=label)
        right.plot(steps, [r.get(score, math.nan) for r in rows], marker='.', label=label)
    left.set(xlabel='iteration', ylabel='training loss', title='training loss (mean since the last evaluation)')
    right.set(xlabel='iteration', ylabel=score, title=score)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if len(curves) > 1:
        right.legend(fontsize='small')
    if title:
        fig.suptitle(title, fontsize='medium')
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    return path


class RunLog:
    """The evaluations of one run, written to `folder` (None: kept, nothing written; `write=False`: the
    same on the processes of a distributed run that do not write). `score` is the column the curves show."""

    def __init__(self, folder, score, write=True, tensorboard=True):
        self.folder, self.score = folder, score
        self.write = bool(folder) and write
        self.tensorboard = tensorboard
        self.rows, self._writer = [], None
        self._started, self._offset = time.monotonic(), 0.0

    def state_dict(self):
        return {'rows': [dict(r) for r in self.rows]}

    def load_state_dict(self, state):
        self.rows = [dict(r) for r in state['rows']]
        self._started, self._offset = time.monotonic(), (self.rows[-1]['seconds'] if self.rows else 0.0)

    def add(self, epoch, iteration, train_loss, columns):
        """Record one evaluation (columns: see `metric_columns`) and write it out."""
        row = {'epoch': int(epoch), 'iteration': int(iteration),
               'train_loss': math.nan if train_loss is None else float(train_loss), **columns,
               'seconds': round(self._offset + time.monotonic() - self._started, 3)}
        self.rows.append(row)
        if not self.write:
            return row
        self.write_csv()
        if self.tensorboard:
            writer = self.writer()
            for name, value in row.items():
                if name not in ('epoch', 'iteration', 'seconds') and not math.isnan(value):
                    writer.add_scalar('train/loss' if name == 'train_loss' else name.replace('_', '/', 1), value,
                                      row['iteration'])
            writer.flush()
        return row

    def write_csv(self):
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        columns.append(columns.pop(columns.index('seconds')))
        cell = (lambda v: '' if v is None or (isinstance(v, float) and math.isnan(v)) else v)
        atomic_write_csv(os.path.join(self.folder, METRICS_NAME), columns,
                         [[cell(row.get(k)) for k in columns] for row in self.rows])

    def writer(self):
        """The TensorBoard writer, opened on first use. It purges the steps logged after the last saved
        row: after a resume, a killed run's evaluations that the training state does not hold; in a fresh
        run, every step an earlier run logged in the folder."""
        if self._writer is None:
            from ignite.handlers import TensorboardLogger
            os.makedirs(self.folder, exist_ok=True)
            purge = self.rows[-2]['iteration'] + 1 if len(self.rows) > 1 else 0     # a fresh run: all
            # the suffix keeps the files of runs started within one second apart, in order
            self._writer = TensorboardLogger(log_dir=self.folder, purge_step=purge, flush_secs=3600,
                                             filename_suffix=f'.{time.time_ns()}')
        return self._writer.writer

    def close(self):
        """Close the TensorBoard writer (a later `add` opens it again)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def draw(self):
        """Draw learning_curves.png of the rows so far (when there is one)."""
        if self.write and self.rows:
            draw_curves([('', self.rows)], self.score, os.path.join(self.folder, CURVES_NAME))
