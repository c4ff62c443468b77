"""The main job: TAAN on the built-in synthetic Youtube-8M-like data, end to end.

    python -m Youtube8M.run_builtin                 # TAAN with the distance regulariser
    python -m Youtube8M.run_builtin --compare       # Hard3, STL and TAAN, with a mAP@10 table
    python -m Youtube8M.run_builtin --models MRN TAAN --max_epoch 8

1. creates the synthetic data (Youtube8M.synthetic) in --data_path unless it is there;
2. trains every model of --models with Youtube8M.Trainer (small sizes so that it takes
   a few minutes on two CPU cores), keeping the best model on the valid split;
3. evaluates it on the test split and writes the per-task and mean mAP@10;
4. for TAAN, draws the task distance and cosine heat maps of each layer and prints the
   spectral clusters of the tasks (Youtube8M.Visualizer);
5. prints the mean test mAP@10 of every model and where the files are.

Every trainer flag can be changed here (see --help); the results of model M go to
--out/M (default results/builtin/M under the project's home folder, see README
"Installing, commands and folders").
"""
import json
import os

from sklearn.metrics import adjusted_rand_score

from Layers.DMTRL_pytorch import METHODS
from Layers.TAL_pytorch import PAPER_REGULARIZERS
from Training import ArgumentParser, add_bool_argument, count, default_path, entry_point, real
from Training.runlog import CURVES_NAME, METRICS_NAME
from Youtube8M import Trainer, Visualizer
from Youtube8M.data import DEFAULT_DATA_PATH
from Youtube8M.models import MODELS
from Youtube8M.synthetic import ensure_builtin_data

COMPARE = ['Hard3', 'STL', 'TAAN']


def build_parser():
    p = ArgumentParser(description='Train and test on the built-in synthetic data, then draw the task '
                                'relations of TAAN.')
    p.add_argument('--models', nargs='+', default=['TAAN'], choices=MODELS, help='models to run (default TAAN)')
    p.add_argument('--compare', action='store_true', help=f'run {", ".join(COMPARE)} and print a mAP@10 table')
    p.add_argument('--data_path', default=DEFAULT_DATA_PATH, help='data folder; the synthetic data is created '
                   'there when no data is present (default %(default)s)')
    p.add_argument('--out', default=default_path('results', 'builtin'),
                   help='results folder, one subfolder per model (default %(default)s)')
    p.add_argument('--max_epoch', default=10, type=count(0))
    p.add_argument('--early_stop', default=3, type=count(1))
    p.add_argument('--batch_size', default=128, type=count(1))
    p.add_argument('--hidden_feature', default=128, type=count(1))
    p.add_argument('--lr', default=3e-3, type=real(above=0))
    p.add_argument('--basis', default=8, type=count(1))
    p.add_argument('--regularize', default='distance', choices=PAPER_REGULARIZERS)
    p.add_argument('--taan_constant', default=0.1, type=real(low=0))
    p.add_argument('--mrn_constant', default=1e-3, type=real(low=0))
    p.add_argument('--method', default='Tucker', choices=METHODS)
    p.add_argument('--clusters', default=4, type=count(1), help='task groups per layer in the clustering (default 4)')
    p.add_argument('--seed', default=0, type=count(0))
    p.add_argument('--device', default='auto')
    p.add_argument('--resume', action='store_true', help="continue each model's training from its saved state")
    add_bool_argument(p, '--progress', default=None, help='show progress bars (auto: only on a terminal)')
    return p


def trainer_argv(args, model):
    argv = ['--model', model, '--saveto', os.path.join(args.out, model), '--data_path', args.data_path,
            '--max_epoch', args.max_epoch, '--early_stop', args.early_stop, '--batch_size', args.batch_size,
            '--hidden_feature', args.hidden_feature, '--lr', args.lr, '--seed', args.seed, '--device', args.device]
    if model == 'TAAN':
        argv += ['--basis', args.basis, '--regularize', args.regularize, '--taan_constant', args.taan_constant]
    if model == 'MRN':
        argv += ['--mrn_constant', args.mrn_constant, '--regularization_task', 'true']
    if model == 'DMTRL':
        argv += ['--method', args.method]
    if args.resume:
        argv += ['--resume', 'auto']
    if args.progress is not None:
        argv += ['--progress', args.progress]
    return [str(a) for a in argv]


def planted_groups(data_path):
    """The groups of tasks planted in the synthetic data (None for other data)."""
    path = os.path.join(data_path, 'tasks.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    groups = info.get('synthetic_groups')
    return [[info['tasks'][t] for t in g] for g in groups] if groups else None


def group_agreement(planted, found):
    """Adjusted Rand index between two groupings of the same task names."""
    names = [n for g in planted for n in g]
    a = {n: i for i, g in enumerate(planted) for n in g}
    b = {n: i for i, g in enumerate(found) for n in g}
    return adjusted_rand_score([a[n] for n in names], [b[n] for n in names])


def main(argv=None):
    args = build_parser().parse_args(argv)
    models = COMPARE if args.compare else list(dict.fromkeys(args.models))
    print(f'Data: {args.data_path}')
    ensure_builtin_data(args.data_path, seed=args.seed)

    results = {}
    for model in models:
        print(f'\n=== {model} ===')
        results[model] = Trainer.main(trainer_argv(args, model))

    figures = None
    if 'TAAN' in results:
        print('\n=== TAAN task relations (spectral clusters of the task distance) ===')
        best = results['TAAN']['paths']['best']
        figures = Visualizer.visualize(best, args.data_path, os.path.dirname(best), args.clusters)
        groups = planted_groups(args.data_path)
        if groups:
            print('Groups planted in the synthetic data:')
            for g, members in enumerate(groups):
                print(f'  group {g + 1}: ' + ', '.join(members))
            agreement = [group_agreement(groups, layer) for layer in figures['groups']]
            print('Agreement of the clusters with the planted groups (adjusted Rand index, 1 = same, '
                  '~0 = chance): ' + ', '.join(f'layer {l + 1} {a:.2f}' for l, a in enumerate(agreement)))

    print('\nmodel         mean test mAP@10')
    for model, r in results.items():
        print(f'{model:<13} {r["mAP"]:.4f}')
    print('\nFiles:')
    for model, r in results.items():
        print(f'  {model}: {os.path.dirname(r["paths"]["best"])}  (best model {os.path.basename(r["paths"]["best"])}, '
              f'results {os.path.basename(r["paths"]["task"])}, {os.path.basename(r["paths"]["task_csv"])}, '
              f'{os.path.basename(r["paths"]["average"])}; curves {METRICS_NAME}, {CURVES_NAME} and TensorBoard '
              'events)')
    if figures:
        print('  heat maps and clusters: ' + ', '.join(os.path.basename(f) for f in figures['files']))
    return {'results': results, 'figures': figures}


cli = entry_point(main)

if __name__ == '__main__':
    cli()
