"""Task relations learned by a trained TAAN: heat maps and spectral clusters of the tasks.

    python -m Youtube8M.Visualizer --checkpoint results/TAAN/TAAN.pth --clusters 3
    cd Youtube8M && python Visualizer.py --hidden_feature 1024 --basis 64 --path results/TAAN   # the original's

For every TAL layer of the model, with f_t the activation function of task t:

    distance  D[i, j] = E_z[(f_i(z) - f_j(z))^2],           z ~ N(0, 1)
    cosine    C[i, j] = E_z[f_i f_j] / sqrt(E_z[f_i^2] E_z[f_j^2])

are drawn as T x T heat maps labelled with the task names (the names the model was trained
with, or those of --data_path), written as PNG and PDF. The tasks
are then grouped by spectral clustering on the affinity A = exp(-D / median(D)) (median of
the off-diagonal entries), one clustering per layer, printed and written to a text file.

Files in --out (default: the checkpoint's folder):
  {model}-task_distance.png/.pdf, {model}-task_cosine.png/.pdf, {model}-task_clusters.txt

The checkpoint is the best-model file written by Trainer.py ({saveto}/TAAN.pth, or
--path DIR for DIR/TAAN.pth as in the original); the settings to rebuild the model are read
from {saveto}/TAAN-config.json next to it. A checkpoint without that file is rebuilt from
--hidden_feature and --basis (the original's flags, defaults 1024 and 64) and the tasks of
--data_path; with the file, those flags must agree with it.
"""
import json
import os

import numpy as np
from matplotlib.figure import Figure
from sklearn.cluster import SpectralClustering

from Layers.TAL_pytorch import task_cosine_matrix, task_distance_matrix
from Training import (ArgumentParser, UserError, atomic_savefig, atomic_write_text, count, entry_point, load_checkpoint,
                      real)
from Youtube8M.data import DEFAULT_DATA_PATH
from Youtube8M.datafolder import read_data_folder
from Youtube8M.models import build_model

ORIGINAL_DEFAULTS = {'hidden_feature': 1024, 'basis': 64}     # the original visualiser's


def load_taan(checkpoint, data_path=None, hidden_feature=None, basis=None):
    """(model, config) from a best-model file of Trainer.py and its {model}-config.json;
    without the config, from hidden_feature / basis and the tasks of data_path."""
    if not os.path.isfile(checkpoint):
        raise UserError(f'checkpoint {checkpoint} does not exist (Trainer.py --model TAAN --saveto DIR '
                        'writes DIR/TAAN.pth)')
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    config_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f'{stem}-config.json')
    given = {'hidden_feature': hidden_feature, 'basis': basis}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if config.get('model') != 'TAAN':
            raise UserError(f'{checkpoint} is a {config.get("model")} model: the visualiser needs a TAAN checkpoint')
        differ = [f'--{k} {v} (the model has {config[k]})' for k, v in given.items() if v is not None and v != config[k]]
        if differ:
            raise UserError(f'{", ".join(differ)}: {config_path} describes the model; leave those flags out')
    elif data_path is None and hidden_feature is None and basis is None:
        raise UserError(f'{config_path} not found: it is written by Youtube8M/Trainer.py next to the best '
                        'model and holds the settings needed to rebuild it (for a checkpoint without it, give '
                        '--hidden_feature and --basis, and --data_path for its tasks)')
    else:       # a checkpoint without our config (e.g. the original's): the flags and the data
        folder = read_data_folder(data_path or DEFAULT_DATA_PATH, ('train',))
        config = {k: ORIGINAL_DEFAULTS[k] if v is None else v for k, v in given.items()}
        config.update(model='TAAN', in_features=folder.num_features, num_classes=folder.num_classes,
                      tasks=folder.tasks)
    model = build_model('TAAN', config['in_features'], config['hidden_feature'], config['num_classes'],
                        basis=config['basis'])
    load_checkpoint(checkpoint, {'model': model})
    return model.eval(), config


def task_labels(config, data_path=None):
    """Task names: those of --data_path when given, else those the model was trained with."""
    names = read_data_folder(data_path, ('train',)).tasks if data_path else config.get('tasks')
    T = len(config['num_classes'])
    if not isinstance(names, list) or len(names) != T:
        raise UserError(f'the model has {T} tasks, but {data_path or "its config"} names '
                        f'{len(names) if isinstance(names, list) else "no"} tasks')
    return names


def layer_matrices(model):
    """[(distance [T, T], cosine [T, T]) per TAL layer] as NumPy arrays."""
    out = []
    for layer in model.reg_layers():
        out.append((task_distance_matrix(layer).detach().cpu().numpy(),
                    task_cosine_matrix(layer).detach().cpu().numpy()))
    return out


def spectral_groups(distance, k, seed=0):
    """Cluster the tasks in k groups from a distance matrix: A = exp(-D / median(D)) on
    the off-diagonal entries, then sklearn's SpectralClustering on the affinity A.
    Returns the cluster label of every task."""
    D = np.maximum(np.asarray(distance, dtype=np.float64), 0.0)
    D = 0.5 * (D + D.T)
    off = D[~np.eye(len(D), dtype=bool)]
    scale = np.median(off) if off.size and np.median(off) > 0 else 1.0
    affinity = np.exp(-D / scale)
    sc = SpectralClustering(n_clusters=k, affinity='precomputed', assign_labels='discretize', random_state=seed)
    return sc.fit_predict(affinity)


def heatmaps(matrices, names, title):
    """One figure: a labelled T x T heat map per layer."""
    L, T = len(matrices), len(names)
    size = max(4.0, 0.35 * T + 2.5)
    fig = Figure(figsize=(size * L, size))
    axes = fig.subplots(1, L, squeeze=False)
    for l, (ax, m) in enumerate(zip(axes[0], matrices)):
        im = ax.imshow(m, cmap='viridis')
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticklabels([f'{t + 1}. {n}' for t, n in enumerate(names)], fontsize=7)
        ax.set_title(f'Layer {l + 1}')
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def visualize(checkpoint, data_path=None, out=None, clusters=3, seed=0, hidden_feature=None, basis=None):
    """Write the heat maps and the clusters of a TAAN checkpoint; returns
    {'files': [...], 'groups': [per layer: list of groups of task names]}."""
    model, config = load_taan(checkpoint, data_path, hidden_feature, basis)
    matrices = layer_matrices(model)
    T = matrices[0][0].shape[0]
    if not 1 <= clusters <= T:
        raise UserError(f'--clusters must be between 1 and the number of tasks ({T}), got {clusters}')
    names = task_labels(config, data_path)
    out = out or os.path.dirname(os.path.abspath(checkpoint))
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    files = []
    for kind, index, title in (('distance', 0, 'Task distance E[(f_i - f_j)^2]'),
                               ('cosine', 1, 'Task cosine similarity')):
        fig = heatmaps([m[index] for m in matrices], names, title)
        for ext in ('png', 'pdf'):
            path = os.path.join(out, f'{stem}-task_{kind}.{ext}')
            atomic_savefig(fig, path, dpi=150)
            files.append(path)

    groups, lines = [], []
    for l, (D, _) in enumerate(matrices):
        labels = spectral_groups(D, clusters, seed) if clusters > 1 else np.zeros(T, dtype=int)
        layer_groups = [[names[t] for t in range(T) if labels[t] == g] for g in sorted(set(labels.tolist()))]
        groups.append(layer_groups)
        lines.append(f'Layer {l + 1}:')
        lines += [f'  group {g + 1}: ' + ', '.join(members) for g, members in enumerate(layer_groups)]
    path = os.path.join(out, f'{stem}-task_clusters.txt')
    atomic_write_text(path, '\n'.join(lines) + '\n')
    files.append(path)
    print('\n'.join(lines))
    return {'files': files, 'groups': groups}


def main(argv=None):
    p = ArgumentParser(description='Heat maps and spectral clusters of the tasks of a trained TAAN.')
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument('--checkpoint', help='best-model file written by Trainer.py (DIR/TAAN.pth)')
    where.add_argument('--path', help="the original's flag: a folder with TAAN.pth; the figures are written there")
    p.add_argument('--data_path', default=None, help='data folder whose task names label the figures (default: '
                   'the names the model was trained with)')
    p.add_argument('--out', default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument('--clusters', default=3, type=count(1), help='number of task groups per layer (default 3)')
    p.add_argument('--hidden_feature', default=None, type=count(1), help="the original's flag: hidden width of a "
                   "checkpoint without its config file (default 1024; must agree with the config when there is one)")
    p.add_argument('--basis', default=None, type=count(1), help="the original's flag: basis functions of a checkpoint "
                   'without its config file (default 64)')
    p.add_argument('--taan_constant', default=None, type=real(low=0), help="the original's flag; it does not change "
                   'the figures and is ignored')
    p.add_argument('--gpu', default=None, help="the original's flag; ignored (the matrices take no time on the CPU)")
    args = p.parse_args(argv)
    checkpoint = args.checkpoint or os.path.join(args.path, 'TAAN.pth')
    result = visualize(checkpoint, args.data_path, args.out, args.clusters, hidden_feature=args.hidden_feature,
                       basis=args.basis)
    print('Figures written:\n  ' + '\n  '.join(result['files']))
    return result


cli = entry_point(main)

if __name__ == '__main__':
    cli()
