"""The Omniglot lambda sweep of the paper's figure: TAAN with one regulariser.

    python -m Omniglot.Evaluation_TAAN --regularize distance
    cd Omniglot && python Evaluation_TAAN.py --VMTL Euclidean --gpu 0      # the original's flags

For every lambda (default 0.1 0.2 0.3 0.4) the TAAN network of `Omniglot/TAAN.py` is
trained --repeats times (default 5; basis 32, lr 1e-5, 5 images per alphabet per
iteration, test every 100 iterations, stop after 100 evaluations without gain or 15000
iterations; see `Omniglot/train.py`) and the best test accuracy of each run is written to
RESULTS_DIR/Results-TAAN-Omniglot-<reg>.txt (default results/omniglot under the project's
home folder, see README "Installing, commands and folders") in the original's format:

    ---------------Lambda = 0.100000.---------------
    Experiment 1, ACC: 0.8554.

'none' (no regulariser) is run once, under lambda = 0, as in the original's file. Repeat j
(counting from 0) uses seed --seed + j for every lambda, so the lambdas are compared on the
same initialisations and batches. The runs are trained --runs_at_once at a time
(`Omniglot.sweep`; default: all at once in one batched network on CUDA, one at a time on the
CPU), each as `train.py` would train it alone.

A sweep adds its block after whatever the results file held when it started (as the
original did). The file is written whole from the sweep's records (the runs finished so
far), never line by line, so no line is written twice. With --save_models DIR the sweep
keeps its records in DIR/<reg>/sweep.json and its training state in
DIR/<reg>/training_state.pt, and every run its best model, config and result in
DIR/<reg>/TAAN-Lambda-<lambda>-<j+1>/ (for `visualization_full.py`), with its metrics.csv,
learning_curves.png and TensorBoard events (`Training.runlog`); --resume then
continues an interrupted sweep: finished runs are kept, the runs in training continue from
the last saved state, and the file ends as an uninterrupted sweep would leave it.
"""
import os
from types import SimpleNamespace

from Layers.TAL_pytorch import layer_regularizer
from Omniglot import results
from Omniglot.stack import STACKINGS
from Omniglot.sweep import RUN_SETTINGS, Progress, RunSpec, default_runs_at_once, load_saved_sweep, train_runs
from Omniglot.TAAN import build_model
from Omniglot.train import (BEST_NAME, CONFIG_NAME, RESULT_NAME, STATE_NAME, add_training_arguments, check_args,
                            load_data)
from Training import (ArgumentParser, UserError, atomic_torch_save, atomic_write_json, atomic_write_text, count,
                      count_parameters, default_path, entry_point, format_mean_std, mean_std, real, resolve_device)

DEFAULT_LAMBDAS = (0.1, 0.2, 0.3, 0.4)
SWEEP_NAME = "sweep.json"    # with --save_models: the sweep's records, in DIR/<reg>/


def add_sweep_arguments(p):
    """How many runs train at once and how, and how often their state is saved (also Omniglot.reproduce's)."""
    p.add_argument("--runs_at_once", type=count(1), default=None,
                   help="runs trained at once (default: all on CUDA, as many as fit; 1 on the CPU)")
    p.add_argument("--stacking", choices=STACKINGS, default=None,
                   help="how the runs at once are computed: stacked (one batched network; the CUDA default), "
                        "separate (their own networks one after another, each bit for bit as train.py; the CPU "
                        "default); union is stacked")
    p.add_argument("--save_every", type=real(low=0), default=300.0,
                   help="seconds between saves of the training state, for resuming (default 300; "
                        "0: after every evaluation)")


def build_parser():
    p = ArgumentParser(description="Omniglot: TAAN test accuracy for several regularisation weights.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--regularize", type=str.lower, choices=results.REGULARIZERS, help="the regulariser")
    g.add_argument("--VMTL", choices=sorted(results.ORIGINAL_NAMES),
                   help="the original's name of the regulariser (NoVMTL = none, LowRank = tracenorm, "
                        "Euclidean = distance, Cosine = cosine)")
    p.add_argument("--lambdas", type=real(low=0), nargs="+", default=None,
                   help="regularisation weights (default 0.1 0.2 0.3 0.4; 'none' always uses 0)")
    p.add_argument("--repeats", type=count(1), default=5, help="runs per lambda (default 5)")
    p.add_argument("--results_dir", default=default_path("results", "omniglot"),
                   help="folder of the Results-TAAN-Omniglot-<reg>.txt files (default %(default)s)")
    p.add_argument("--save_models", default="", metavar="DIR",
                   help="keep the sweep's records and state, and every run's best model, under DIR/<reg>/")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep from its records and state in --save_models")
    p.add_argument("--gpu", default=None, help="GPU id (original flag): cuda:GPU when CUDA is available")
    add_sweep_arguments(p)
    add_training_arguments(p, outputs=False)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.VMTL:
        args.regularize = results.ORIGINAL_NAMES[args.VMTL]
    check_args(parser, args)
    if args.resume and not args.save_models:
        parser.error("--resume needs --save_models DIR (the sweep's records to continue from)")
    return args


def sweep_lambdas(args):
    if args.regularize == "none":
        if args.lambdas is not None and any(lam != 0 for lam in args.lambdas):
            print(f"Note: --lambdas {args.lambdas} ignored: 'none' has no regulariser and runs under lambda 0.")
        return [0.0]
    return list(dict.fromkeys(DEFAULT_LAMBDAS if args.lambdas is None else args.lambdas))


def sweep_specs(args):
    """The runs of the sweep, lambda by lambda: repeat j with seed --seed + j."""
    layer = layer_regularizer(args.regularize, args.original_variant)
    return [RunSpec(args.regularize, lam, j, args.seed + j, layer)
            for lam in sweep_lambdas(args) for j in range(args.repeats)]


def run_folder(save_models, reg, lam, j):
    return os.path.join(save_models, reg, f"TAAN-Lambda-{lam:.2f}-{j + 1}")


def run_settings(args, lam, j, saveto):
    """The train.py settings of repeat j at lambda lam."""
    settings = {k: v for k, v in vars(args).items()
                if k not in ("VMTL", "lambdas", "repeats", "results_dir", "save_models", "resume", "gpu",
                             "runs_at_once", "stacking", "save_every")}
    settings.update(model="taan", lam=lam, seed=args.seed + j, saveto=saveto, resume="")
    return SimpleNamespace(**settings)


def sweep_settings(args):
    """What every run of the sweep shares; a resumed sweep must have the same."""
    return dict({name: getattr(args, name) for name in RUN_SETTINGS}, data_root=os.path.abspath(args.data_root),
                split_seed=args.split_seed, alphabets=args.alphabets, original_variant=args.original_variant)


def render(prefix, specs, records):
    """The results file: what it held before the sweep, then the sweep's lambdas in order,
    each with the lines of its recorded runs."""
    return prefix + results.render_results(results.blocks_of(specs, records, dict.fromkeys(s.lam for s in specs)))


def summary_lines(reg, accs_by_lambda):
    lines = []
    for lam, accs in sorted(accs_by_lambda.items()):
        line = f"  {reg:9s} lambda {lam:.2f}: {format_mean_std(*mean_std(accs, 100))} % over {len(accs)} run(s)"
        reported = results.REPORTED.get(reg, {}).get(round(lam, 6))
        if reported:
            line += f"   (original reports {format_mean_std(*mean_std(reported, 100))} %)"
        lines.append(line)
    return lines


def open_sweep(args, path, sweep_file, settings):
    """The sweep's {'prefix', 'settings', 'records'}: continued from sweep_file with --resume,
    else new (the results file's present content is the prefix)."""
    if args.resume and sweep_file and os.path.isfile(sweep_file):
        return load_saved_sweep(sweep_file, settings, "delete it, or start afresh without --resume",
                                f"{sweep_file} was written by a sweep with other settings ({{}}): resume with the "
                                "same settings, or start afresh without --resume")
    prefix = ""
    if os.path.isfile(path):
        try:
            results.parse_results(path)         # a sweep appends to a results file, never to garbage
        except UserError as e:
            raise UserError(f"{e}; the sweep appends to this file: fix it, or move it away") from None
        with open(path, encoding="utf-8") as f:
            prefix = f.read()
    return {"prefix": prefix + ("\n" if prefix and not prefix.endswith("\n") else ""), "settings": settings,
            "records": {}}


def run_sweep(args, data=None, device=None, log=print, setup_hook=None):
    """The sweep of one regulariser with parsed `args` (see build_parser). `data` = (train,
    test) OmniglotData to reuse, else loaded from args.data_root; `log` receives one line per
    evaluation round; `setup_hook(trainer)` may add handlers to each group's engine (tests).
    Returns {lambda: [best accuracy of each run finished now]}."""
    device = device or resolve_device(args.device, args.gpu)
    reg = args.regularize
    path = results.results_path(args.results_dir, reg)
    data = data or load_data(args.data_root, device, args.split_seed, args.alphabets)
    specs = sweep_specs(args)
    folder = os.path.join(args.save_models, reg) if args.save_models else None
    sweep_file = os.path.join(folder, SWEEP_NAME) if folder else None
    state_path = os.path.join(folder, STATE_NAME) if folder else None
    sweep = open_sweep(args, path, sweep_file, sweep_settings(args))
    records = sweep["records"]
    if folder and not args.resume:
        if os.path.isfile(state_path):
            os.remove(state_path)          # an earlier sweep's runs in training
        atomic_write_json(sweep_file, sweep)
    before = set(records)
    train_data, test_data = data
    at_once = args.runs_at_once or default_runs_at_once(device, len(specs), args.batch * train_data.num_tasks,
                                                        args.stacking)
    print(f"Omniglot sweep: regulariser {reg}, {train_data.num_tasks} alphabets, {len(train_data)} train / "
          f"{len(test_data)} test images, device {device}, {at_once} run(s) at once; results -> {path}")
    if records:
        atomic_write_text(path, render(sweep["prefix"], specs, records))
        print(f"{len(records)} of {len(specs)} runs already recorded in {path}")
    parameters = count_parameters(build_model("taan", train_data.num_classes, basis=args.basis))
    if folder:
        for spec in specs:      # train.py's config file: what visualization_full.py rebuilds a run from
            config = {k: v for k, v in vars(run_settings(args, spec.lam, spec.repeat, "")).items()
                      if k not in ("saveto", "resume", "progress", "debug")}
            config.update(data_root=os.path.abspath(args.data_root), layer_regularize=spec.layer_regularize,
                          num_classes=train_data.num_classes, tasks=train_data.tasks)
            atomic_write_json(os.path.join(run_folder(args.save_models, reg, spec.lam, spec.repeat), CONFIG_NAME),
                              config)

    def on_best(spec, state):
        if folder:
            atomic_torch_save(state(), os.path.join(run_folder(args.save_models, reg, spec.lam, spec.repeat),
                                                    BEST_NAME))

    def on_record(spec, record, state):
        records[spec.key] = record
        if sweep_file:
            atomic_write_json(sweep_file, sweep)
        atomic_write_text(path, render(sweep["prefix"], specs, records))
        if folder:
            result = {k: record[k] for k in ("best_acc", "iterations", "evaluations", "stopped_early", "history")}
            atomic_write_json(os.path.join(run_folder(args.save_models, reg, spec.lam, spec.repeat), RESULT_NAME),
                              dict(result, parameters=parameters))
        print(f"{reg}, lambda {spec.lam}, run {spec.repeat + 1}/{args.repeats} (seed {spec.seed}): Experiment "
              f"{spec.repeat + 1}, ACC: {record['best_acc']:.4f} ({record['iterations']} iterations)")

    train_runs(specs, args, data, device, at_once, records, on_record, state_path, args.save_every,
               on_round=Progress(specs, records, args.num_iter, at_once, log), on_best=on_best,
               stacking=args.stacking, setup_hook=setup_hook, log=print,
               run_folder=(lambda spec: run_folder(args.save_models, reg, spec.lam, spec.repeat)) if folder else None)
    new = {}
    for spec in specs:
        if spec.key not in before:
            new.setdefault(spec.lam, []).append(records[spec.key]["best_acc"])
    return new


def main(argv=None):
    args = parse_args(argv)
    new = run_sweep(args)
    if new:
        path = results.results_path(args.results_dir, args.regularize)
        print(f"Best test accuracy of the runs made now (in {path}):")
        print("\n".join(summary_lines(args.regularize, new)))
    return new


cli = entry_point(main)

if __name__ == "__main__":
    cli()
