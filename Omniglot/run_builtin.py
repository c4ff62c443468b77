"""The Omniglot main job on built-in SYNTHETIC data: a short lambda sweep, end to end.

    python -m Omniglot.run_builtin                   # a few minutes on two CPU cores
    python -m Omniglot.run_builtin --resume          # continue an interrupted job
    python -m Omniglot.run_builtin --alphabets 50 --drawers 20 --lambdas 0.1 0.2 0.3 0.4 \\
        --repeats 5 --num_iter 2000 --out results/omniglot_big --data_root data/omniglot_big

1. creates a small synthetic Omniglot-format set (Omniglot.synthetic) in --data_root
   unless one is there: by default 10 alphabets (not 50) with 14-55 characters each, drawn
   by 10 drawers (not 20), so that one training step is cheap;
2. runs the lambda sweep of the paper's figure (Omniglot.Evaluation_TAAN) for the four
   regularisers none / tracenorm / distance / cosine, with a short schedule (by default
   lambdas 0.1 and 0.3, 2 runs each, 100 iterations, test every 20, lr 1e-3 instead of the
   paper's 1e-5, since the paper's schedule takes hours per run);
3. reads the result files back and draws test accuracy against lambda
   (Omniglot.Figure_wrt_Lambda, PNG and PDF), and the task distance matrices of the
   first run without a regulariser and with the distance regulariser at the largest lambda
   (Omniglot.visualization_full);
4. prints mean +- std of the best test accuracy per regulariser and lambda.

Files (in --out, default results/omniglot_builtin/ under the project's home folder):
  Results-TAAN-Omniglot-<reg>.txt   the sweep's lines, in the original's format
  lambda.png, lambda.pdf            accuracy against lambda
  matrices/                         task distance matrices (PNG and PDF)
  models/<reg>/TAAN-Lambda-<lambda>-<run>/   best model, config, result, learning curves
  run_builtin.json                  the settings of the job

A new job starts fresh result files: the four Results-TAAN-Omniglot-<reg>.txt and the
models/ folder in --out are deleted first (nothing is appended to an old job's lines).
--resume instead continues the job in --out with the same settings: finished runs are
kept, an interrupted run continues from its last evaluation, and nothing is written twice.

These are synthetic images, not handwriting: the numbers check the pipeline and show how
to read the figure; they are not comparable with the paper's.
"""
import json
import os
import shutil
import time

from Omniglot import Evaluation_TAAN, Figure_wrt_Lambda, results, visualization_full
from Omniglot.synthetic import MARKER, ensure_builtin_data
from Omniglot.train import load_data
from Training import (ArgumentParser, UserError, atomic_write_json, count, default_path, entry_point,
                      format_mean_std, mean_std, real, resolve_device)
SETTINGS_NAME = "run_builtin.json"
DATA_KEYS = ("alphabets", "drawers", "min_chars", "max_chars", "data_seed")
SWEEP_KEYS = ("regularizers", "lambdas", "repeats", "num_iter", "test_interval", "early_stop", "lr",
              "basis", "batch", "split_seed", "seed")


def build_parser():
    p = ArgumentParser(description="Short Omniglot lambda sweep on built-in synthetic data "
                                "(all four regularisers), with the figure and a summary table.")
    p.add_argument("--data_root", default=default_path("data", "omniglot_builtin"),
                   help="data folder; the synthetic set is created there when it holds no images "
                        "(default %(default)s)")
    p.add_argument("--out", default=default_path("results", "omniglot_builtin"),
                   help="results folder (default %(default)s)")
    g = p.add_argument_group("synthetic data (used when it is created)")
    g.add_argument("--alphabets", type=count(1), default=10, help="alphabets = tasks (default 10; real set 50)")
    g.add_argument("--drawers", type=count(1), default=10, help="images per character (default 10; real set 20)")
    g.add_argument("--min_chars", type=count(1), default=14, help="fewest characters per alphabet (default 14)")
    g.add_argument("--max_chars", type=count(1), default=55, help="most characters per alphabet (default 55)")
    g.add_argument("--data_seed", type=count(0), default=0, help="seed of the synthetic images (default 0)")
    g = p.add_argument_group("sweep")
    g.add_argument("--regularizers", nargs="+", type=str.lower, default=list(results.REGULARIZERS),
                   choices=results.REGULARIZERS, help="default: all four")
    g.add_argument("--lambdas", type=real(above=0), nargs="+", default=[0.1, 0.3],
                   help="regularisation weights (default 0.1 0.3; the paper 0.1 0.2 0.3 0.4)")
    g.add_argument("--repeats", type=count(1), default=2, help="runs per lambda (default 2; the paper 5)")
    g.add_argument("--num_iter", type=count(1), default=100, help="iterations per run (default 100; the paper 15000)")
    g.add_argument("--test_interval", type=count(1), default=20, help="default 20 (the paper 100)")
    g.add_argument("--early_stop", type=count(1), default=5, help="default 5 (the paper 100)")
    g.add_argument("--lr", type=real(above=0), default=1e-3, help="base learning rate (default 1e-3; the paper 1e-5)")
    g.add_argument("--basis", type=count(1), default=32, help="default 32 (as the paper)")
    g.add_argument("--batch", type=count(1), default=5, help="images per alphabet per step (default 5, as the paper)")
    g.add_argument("--split_seed", type=count(0), default=0)
    g.add_argument("--seed", type=count(0), default=0, help="seed of run 1; run j uses seed + j - 1")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue the job in --out (same settings) instead of starting fresh result files")
    p.add_argument("--verbose", action="store_true", help="print every test evaluation of every run")
    return p


def job_settings(args):
    return {k: getattr(args, k) for k in DATA_KEYS + SWEEP_KEYS}


def prepare_out(args):
    """Fresh job: delete the old result files and run folders. --resume: check the settings."""
    path = os.path.join(args.out, SETTINGS_NAME)
    settings = job_settings(args)
    if args.resume:
        if not os.path.isfile(path):
            raise UserError(f"--resume: no earlier job in {args.out} ({SETTINGS_NAME} is missing); "
                            "run without --resume to start one")
        with open(path) as f:
            old = json.load(f)
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise UserError(f"--resume: the job in {args.out} was run with other settings "
                            f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in changed.items())}); "
                            "give the same flags, or run without --resume to start afresh")
        return
    removed = [results.results_path(args.out, reg) for reg in results.REGULARIZERS]
    removed = [f for f in removed if os.path.isfile(f)]
    for f in removed:
        os.remove(f)
    if os.path.isdir(os.path.join(args.out, "models")):
        shutil.rmtree(os.path.join(args.out, "models"))
        removed.append(os.path.join(args.out, "models"))
    if removed:
        print(f"New job: removed the previous job's files in {args.out} "
              f"({', '.join(os.path.basename(f) for f in removed)}); use --resume to continue a job instead")
    atomic_write_json(path, settings)


def sweep_argv(args, reg):
    argv = ["--regularize", reg, "--data_root", args.data_root, "--results_dir", args.out,
            "--save_models", os.path.join(args.out, "models"),
            *(["--lambdas", *args.lambdas] if reg != "none" else []), "--repeats", args.repeats, "--num_iter", args.num_iter, "--test_interval", args.test_interval,
            "--early_stop", args.early_stop, "--lr", args.lr, "--basis", args.basis, "--batch", args.batch,
            "--split_seed", args.split_seed, "--seed", args.seed, "--device", args.device,
            "--progress", "false"]
    if args.resume:
        argv.append("--resume")
    return [str(a) for a in argv]


def summary_table(table):
    """Lines of mean +- std (%, n - 1) of every regulariser and lambda in {reg: {lam: [acc]}}."""
    lines = [f"{'regulariser':12s} {'lambda':>6s}  {'test accuracy (%)':>18s}  runs"]
    for reg in results.REGULARIZERS:
        for lam, accs in sorted(table.get(reg, {}).items()):
            if accs:
                lines.append(f"{reg:12s} {lam:6.2f}  {format_mean_std(*mean_std(accs, 100)):>18s}  {len(accs):4d}")
    return lines


def draw_matrices(args, out_dir):
    """Task distance matrices of run 1 without a regulariser and of run 1 with the distance
    regulariser at the largest lambda (when those were run). Returns the files written."""
    picks = []
    if "none" in args.regularizers:
        picks.append(("none", 0.0))
    if "distance" in args.regularizers:
        picks.append(("distance", max(args.lambdas)))
    written = []
    for reg, lam in picks:
        run = Evaluation_TAAN.run_folder(os.path.join(args.out, "models"), reg, lam, 0)
        model, config = visualization_full.load_model(run)
        title = f"SYNTHETIC data: task distances, regulariser {reg}, lambda {lam:g} (run 1)"
        prefix = os.path.join(out_dir, f"{reg}-lambda-{lam:g}-distance")
        written += visualization_full.plot_matrices(visualization_full.layer_matrices(model, "distance"),
                                                    config["tasks"], title, prefix)
    return written


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.regularizers = list(dict.fromkeys(args.regularizers))
    start = time.time()
    device = resolve_device(args.device)
    prepare_out(args)      # a fresh job clears --out; --resume checks that the settings are the job's

    ensure_builtin_data(args.data_root, alphabets=args.alphabets, drawers=args.drawers,
                        min_chars=args.min_chars, max_chars=args.max_chars, seed=args.data_seed)
    synthetic = os.path.isfile(os.path.join(args.data_root, MARKER))
    kind = "SYNTHETIC" if synthetic else "NOT GENERATED HERE (used as found)"
    data = load_data(args.data_root, device, args.split_seed)
    train_data, test_data = data
    print(f"Data ({kind}): {args.data_root}: {train_data.num_tasks} alphabets, "
          f"{sum(train_data.num_classes)} characters, {len(train_data)} train / {len(test_data)} test images"
          + (f" (a small synthetic set: {args.alphabets} alphabets, {args.drawers} drawers; the real "
             "Omniglot has 50 alphabets, 20 drawers)" if synthetic else ""))

    log = print if args.verbose else (lambda *a, **k: None)
    for reg in args.regularizers:
        print(f"\n=== regulariser {reg} ===")
        sweep_args = Evaluation_TAAN.parse_args(sweep_argv(args, reg))
        Evaluation_TAAN.run_sweep(sweep_args, data=data, device=device, log=log)

    table = {reg: t for reg, t in results.load_results_dir(args.out).items() if reg in args.regularizers}
    figure = Figure_wrt_Lambda.plot([(f"{kind} data ({train_data.num_tasks} alphabets, "
                                      f"{args.num_iter} iterations per run)", table)],
                                    os.path.join(args.out, "lambda"))
    matrices = draw_matrices(args, os.path.join(args.out, "matrices"))

    print(f"\nBest test accuracy per regulariser and lambda -- {kind} data, {train_data.num_tasks} alphabets, "
          f"{args.num_iter} iterations per run, mean +- std over runs (not comparable with the paper):")
    print("\n".join(summary_table(table)))
    print(f"\nFiles in {args.out}:")
    for reg in args.regularizers:
        print(f"  {os.path.basename(results.results_path(args.out, reg))}")
    print("  " + ", ".join(os.path.relpath(f, args.out) for f in figure + matrices))
    print("  models/<regulariser>/TAAN-Lambda-<lambda>-<run>/ (best models, see visualization_full.py; learning "
          "curves: metrics.csv, learning_curves.png, TensorBoard events)")
    print(f"Done in {time.time() - start:.0f} s.")
    return {"table": table, "figure": figure, "matrices": matrices}


cli = entry_point(main)

if __name__ == "__main__":
    cli()
