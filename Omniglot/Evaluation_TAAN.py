"""The Omniglot lambda sweep of the paper's figure: TAAN with one regulariser.

    python -m Omniglot.Evaluation_TAAN --regularize distance
    cd Omniglot && python Evaluation_TAAN.py --VMTL Euclidean --gpu 0      # the original's flags

For every lambda (default 0.1 0.2 0.3 0.4) the TAAN network of `Omniglot/TAAN.py` is
trained --repeats times (default 5; basis 32, lr 1e-5, 5 images per alphabet per
iteration, test every 100 iterations, stop after 100 evaluations without gain or 15000
iterations; see `Omniglot/train.py`) and the best test accuracy of each run is appended to
RESULTS_DIR/Results-TAAN-Omniglot-<reg>.txt (default results/omniglot under the project's
home folder, see README) in the original's format:

    ---------------Lambda = 0.100000.---------------
    Experiment 1, ACC: 0.8554.

'none' (no regulariser) is run once, under lambda = 0, as in the original's file. Repeat j
(counting from 0) uses seed --seed + j for every lambda, so the lambdas are compared on the
same initialisations and batches. With --save_models DIR every run keeps its best model,
training state and result in DIR/<reg>/TAAN-Lambda-<lambda>-<j+1>/ (for
`visualization_full.py`), and --resume continues an interrupted sweep there: finished runs
are skipped (their lines are in the results file already), an interrupted run continues
from its last evaluation, and the lambda's header is not written twice. Without --resume
a sweep is new: its lines are appended after whatever the results file holds (as the
original did), and the run folders' markers of an earlier sweep are cleared first.
"""
import os
from types import SimpleNamespace

import numpy as np

from Omniglot import results
from Omniglot.train import STATE_NAME, add_training_arguments, check_args, load_data, train
from Training import ArgumentParser, atomic_write_json, default_path, entry_point, resolve_device

DEFAULT_LAMBDAS = (0.1, 0.2, 0.3, 0.4)
RECORDED = "recorded.json"   # in a run folder: its line is in the results file


def build_parser():
    p = ArgumentParser(description="Omniglot: TAAN test accuracy for several regularisation weights.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--regularize", type=str.lower, choices=results.REGULARIZERS, help="the regulariser")
    g.add_argument("--VMTL", choices=sorted(results.ORIGINAL_NAMES),
                   help="the original's name of the regulariser (NoVMTL = none, LowRank = tracenorm, "
                        "Euclidean = distance, Cosine = cosine)")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help="regularisation weights (default 0.1 0.2 0.3 0.4; 'none' always uses 0)")
    p.add_argument("--repeats", type=int, default=5, help="runs per lambda (default 5)")
    p.add_argument("--results_dir", default=default_path("results", "omniglot"),
                   help="folder of the Results-TAAN-Omniglot-<reg>.txt files (default %(default)s)")
    p.add_argument("--save_models", default="", metavar="DIR",
                   help="keep every run's best model, training state and result under DIR/<reg>/")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep from the run folders in --save_models")
    p.add_argument("--gpu", default=None, help="GPU id (original flag): cuda:GPU when CUDA is available")
    add_training_arguments(p, outputs=False)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.VMTL:
        args.regularize = results.ORIGINAL_NAMES[args.VMTL]
    check_args(parser, args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.lambdas is not None and any(lam < 0 for lam in args.lambdas):
        parser.error(f"--lambdas must be >= 0, got {args.lambdas}")
    if args.resume and not args.save_models:
        parser.error("--resume needs --save_models DIR (the run folders to continue from)")
    return args


def sweep_lambdas(args):
    if args.regularize == "none":
        if args.lambdas is not None and any(lam != 0 for lam in args.lambdas):
            print(f"Note: --lambdas {args.lambdas} ignored: 'none' has no regulariser and runs under lambda 0.")
        return [0.0]
    return list(DEFAULT_LAMBDAS if args.lambdas is None else args.lambdas)


def run_folder(save_models, reg, lam, j):
    return os.path.join(save_models, reg, f"TAAN-Lambda-{lam:.2f}-{j + 1}")


def run_settings(args, lam, j, saveto):
    """The train.py settings of repeat j at lambda lam."""
    settings = {k: v for k, v in vars(args).items()
                if k not in ("VMTL", "lambdas", "repeats", "results_dir", "save_models", "resume", "gpu")}
    settings.update(model="taan", lam=lam, seed=args.seed + j, saveto=saveto,
                    resume="auto" if (args.resume and saveto) else "")
    return SimpleNamespace(**settings)


def summary_lines(reg, accs_by_lambda):
    lines = []
    for lam, accs in sorted(accs_by_lambda.items()):
        a = 100 * np.asarray(accs)
        std = a.std(ddof=1) if a.size > 1 else 0.0
        line = f"  {reg:9s} lambda {lam:.2f}: {a.mean():6.2f} +- {std:5.2f} % over {a.size} run(s)"
        reported = results.REPORTED.get(reg, {}).get(round(lam, 6))
        if reported:
            r = 100 * np.asarray(reported)
            line += f"   (original reports {r.mean():.2f} +- {r.std(ddof=1):.2f} %)"
        lines.append(line)
    return lines


def forget_runs(args):
    """A new (not resumed) sweep: remove the 'recorded' marker and the training state of its
    run folders, left by an earlier sweep, so that a later --resume never takes them for
    runs of this sweep. Best models and results stay until the new runs replace them."""
    for lam in sweep_lambdas(args):
        for j in range(args.repeats):
            for name in (RECORDED, STATE_NAME):
                path = os.path.join(run_folder(args.save_models, args.regularize, lam, j), name)
                if os.path.isfile(path):
                    os.remove(path)


def _last_line(path):
    """The last non-empty line of a text file ('' when it is absent or empty)."""
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return lines[-1] if lines else ""


def run_sweep(args, data=None, device=None, log=print):
    """The sweep of one regulariser with parsed `args` (see build_parser). `data` = (train,
    test) OmniglotData to reuse, else loaded from args.data_root; `log` receives the
    per-evaluation lines of every run. Returns {lambda: [best accuracy of each run made now]}."""
    device = device or resolve_device(args.device, args.gpu)
    reg = args.regularize
    path = results.results_path(args.results_dir, reg)
    data = data or load_data(args.data_root, device, args.split_seed)
    print(f"Omniglot sweep: regulariser {reg}, {data[0].num_tasks} alphabets, "
          f"{len(data[0])} train / {len(data[1])} test images, device {device}; results -> {path}")
    if args.save_models and not args.resume:
        forget_runs(args)
    new = {}
    for lam in sweep_lambdas(args):
        folders = [run_folder(args.save_models, reg, lam, j) if args.save_models else ""
                   for j in range(args.repeats)]
        recorded = [bool(f) and os.path.isfile(os.path.join(f, RECORDED)) for f in folders]
        if args.resume and all(recorded):
            print(f"lambda {lam}: all {args.repeats} runs already recorded in {path}")
            continue
        # a resumed sweep continues the block of this lambda: no second header when some run
        # is recorded, or when the sweep was interrupted right after writing the header
        if not (args.resume and (any(recorded) or _last_line(path) == results.format_header(lam).strip())):
            results.append_header(path, lam)
        for j, folder in enumerate(folders):
            if args.resume and recorded[j]:
                continue
            print(f"--- {reg}, lambda {lam}, run {j + 1}/{args.repeats} (seed {args.seed + j})")
            out = train(run_settings(args, lam, j, folder), data=data, device=device, log=log)
            results.append_experiment(path, j + 1, out["best_acc"])
            if folder:
                atomic_write_json(os.path.join(folder, RECORDED),
                                  {"results_file": os.path.abspath(path), "lambda": lam, "experiment": j + 1,
                                   "accuracy": out["best_acc"]})
            new.setdefault(lam, []).append(out["best_acc"])
            print(f"Experiment {j + 1}, ACC: {out['best_acc']:.4f} ({out['iterations']} iterations)")
    return new


def main(argv=None):
    args = parse_args(argv)
    new = run_sweep(args)
    if new:
        path = results.results_path(args.results_dir, args.regularize)
        print(f"Best test accuracy of the runs made now (appended to {path}):")
        print("\n".join(summary_lines(args.regularize, new)))
    return new


cli = entry_point(main)

if __name__ == "__main__":
    cli()
