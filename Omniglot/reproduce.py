"""Omniglot: the paper's whole accuracy-vs-lambda figure from one command.

    python -m Omniglot.reproduce --data_root data/omniglot                  # the paper's protocol
    python -m Omniglot.reproduce --data_root data/omniglot --preset quick   # its shape, ~20 min on 2 CPU cores

Runs the figure's protocol (README, "The paper's whole figure"): 'none' --repeats times (lambda 0), and each of
tracenorm, distance and cosine at every lambda (0.1 0.2 0.3 0.4) --repeats times (5);
repeat j uses seed --seed + j for every lambda, as `Evaluation_TAAN.py`. Every run is the
run of `train.py` (basis 32, lr 1e-5, 5 images per alphabet per iteration, test every 100
iterations, stop after 100 evaluations without gain or 15000 iterations). The runs train
--runs_at_once at a time (`Omniglot.sweep`; default: all at once in one batched network on
CUDA, as many as fit in memory; one at a time on the CPU, where batching measured slower;
--stacking says how runs at once are computed).

By default the regularisers use the original code's formulas (tracenorm_original,
cosine_original), because the reported numbers came from that code; --paper_formulas uses
the paper's. Every output says which formulas and which protocol made it.

--preset quick shrinks the protocol to show the figure's shape on 2 CPU cores in at most 20
minutes (see QUICK); its outputs say that they are not the paper's protocol. Any flag given
overrides the preset's value.

Files in --results_dir (default results/omniglot_reproduce, or ..._quick for the quick
preset, under the project's home folder):
  records.json                      the settings, and the record of every finished run: the
                                    single source of all the files below
  Results-TAAN-Omniglot-<reg>.txt   the original's format (a first '# ...' line says the formulas
                                    and protocol), lambdas in order, runs in order
  table.md, table.csv               mean +- sample std (%) per regulariser and lambda, the
                                    difference to none, and the reported numbers beside them
  lambda.png, lambda.pdf            accuracy against lambda, ours beside the reported numbers
  runs/<reg>/<lambda>/<j>/          every run's metrics.csv, learning_curves.png and TensorBoard
                                    events (see `Training.runlog`)
  curves/<reg>-lambda-<lambda>.png  the learning curves of all runs of a regulariser and lambda
  training_state.pt                 the runs in training (removed when they finish)

Resumable: killed at any moment, the same command continues where the last saved state
(every --save_every seconds) and the records leave off, and the files end byte-identical to
an uninterrupted run's (on the CPU; CUDA kernels may sum in another order). A sweep may be
continued with other --regularizers, --lambdas, --repeats (the outputs show the runs asked
for; records of others are kept), --runs_at_once, --stacking, --device or --save_every (the
last given --runs_at_once and --stacking are kept in records.json for the next start);
settings that change what a run computes are refused.
"""
import csv
import io
import math
import os
import time

from Layers.TAL_pytorch import C0_ORIGINAL, layer_regularizer
from Omniglot import Figure_wrt_Lambda, results
from Omniglot.Evaluation_TAAN import add_sweep_arguments
from Omniglot.dataTools import DEFAULT_DATA_ROOT
from Omniglot.stack import default_stacking
from Omniglot.sweep import (RUN_SETTINGS, Progress, RunSpec, default_runs_at_once, format_duration, load_saved_sweep,
                            train_runs)
from Omniglot.train import DTYPES, STATE_NAME, load_data
from Training import (ArgumentParser, add_bool_argument, atomic_write_json, atomic_write_text, count, default_path,
                      entry_point, format_mean_std, hold_folder, mean_std, real, resolve_device)
from Training.runlog import METRICS_NAME, draw_curves, read_metrics

RECORDS_NAME, TABLE_NAME, FIGURE_NAME, RUNS_DIR, CURVES_DIR = "records.json", "table", "lambda", "runs", "curves"
PAPER_ALPHABETS = 50
# The paper's protocol (README, "Training and the lambda sweep"); 'alphabets' None = all alphabets of the data.
PAPER = {"regularizers": list(results.REGULARIZERS), "lambdas": [0.1, 0.2, 0.3, 0.4], "repeats": 5,
         "alphabets": None, "basis": 32, "lr": 1e-5, "batch": 5, "num_iter": 15000, "test_interval": 100,
         "early_stop": 100}
# Shows the figure's shape in at most 20 minutes on 2 CPU cores: the first 10 alphabets (not 50),
# 2 runs per cell (not 5), at most 150 iterations (not 15000) at lr 1e-3 (the paper's 1e-5
# learns almost nothing in 150), a test every 25 iterations (not 100) and early stopping after
# 3 tests without gain (not 100). Everything else is the paper's: 26 runs, 5 images per
# alphabet per step, basis 32, all four regularisers at lambda 0.1 0.2 0.3 0.4.
QUICK = dict(PAPER, repeats=2, alphabets=10, lr=1e-3, num_iter=150, test_interval=25, early_stop=3)
PRESETS = {"paper": PAPER, "quick": QUICK}


def build_parser():
    p = ArgumentParser(description="Omniglot: the paper's accuracy-vs-lambda figure (all regularisers, all "
                                   "lambdas, repeated runs) from one command; resumable.")
    p.add_argument("--data_root", default=DEFAULT_DATA_ROOT,
                   help="folder with images_background/ and images_evaluation/ (default %(default)s)")
    p.add_argument("--results_dir", default=None,
                   help="output folder (default results/omniglot_reproduce, or results/omniglot_reproduce_quick "
                        "with --preset quick, under the project home)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                   help="paper: the paper's protocol (default); quick: the figure's shape in at most 20 min on 2 CPU "
                        "cores (8 min measured)")
    g = p.add_argument_group("protocol (default: the preset's)")
    g.add_argument("--regularizers", nargs="+", type=str.lower, choices=results.REGULARIZERS, default=None,
                   help="default: all four")
    g.add_argument("--lambdas", type=real(above=0), nargs="+", default=None, help="paper: 0.1 0.2 0.3 0.4")
    g.add_argument("--repeats", type=count(1), default=None, help="runs per regulariser and lambda (paper: 5)")
    g.add_argument("--alphabets", type=count(1), default=None, help="use only the first N alphabets (paper: all 50)")
    g.add_argument("--num_iter", type=count(1), default=None, help="most iterations per run (paper: 15000)")
    g.add_argument("--test_interval", type=count(1), default=None, help="iterations between tests (paper: 100)")
    g.add_argument("--early_stop", type=count(1), default=None,
                   help="tests without gain before a run stops (paper: 100)")
    g.add_argument("--lr", type=real(above=0), default=None,
                   help="base learning rate, heads 50x (paper: 1e-5)")
    g.add_argument("--basis", type=count(1), default=None, help="basis functions per TAL layer (paper: 32)")
    g.add_argument("--batch", type=count(1), default=None, help="training images per alphabet per iteration (paper: 5)")
    g.add_argument("--paper_formulas", action="store_true",
                   help="the paper's tracenorm (nuclear norm) and cosine formulas instead of the original code's, "
                        "with which the reported numbers were made")
    g.add_argument("--c0", type=real(above=0), default=C0_ORIGINAL, help="constant of the closed forms (original: 0.4)")
    g.add_argument("--seed", type=count(0), default=0, help="seed of repeat 1; repeat j uses seed + j - 1 (default 0)")
    g.add_argument("--split_seed", type=count(0), default=0, help="seed of the 90/10 train/test split (default 0)")
    p.add_argument("--eval_batch", type=count(1), default=10,
                   help="test images per alphabet in one evaluation step (memory only; default 10)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="default float32")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    add_bool_argument(p, "--compile", help="compile the training step of the runs (torch.compile; on CUDA with CUDA "
                      "graphs): results equal to float rounding, so recorded runs are kept either way")
    add_sweep_arguments(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.regularizers = [r for r in results.REGULARIZERS if r in args.regularizers]
    args.lambdas = sorted(set(args.lambdas))
    if args.results_dir is None:
        args.results_dir = default_path("results", "omniglot_reproduce" + ("_quick" if args.preset == "quick" else ""))
    return args


def run_specs(args):
    """Every run, regulariser by regulariser (none, tracenorm, distance, cosine), lambda by
    lambda: repeat j with seed --seed + j; 'none' once, at lambda 0."""
    specs = []
    for reg in args.regularizers:
        layer = layer_regularizer(reg, original_variant=not args.paper_formulas)
        for lam in [0.0] if reg == "none" else args.lambdas:
            specs += [RunSpec(reg, lam, j, args.seed + j, layer) for j in range(args.repeats)]
    return specs


def run_settings(args):
    """What every run computes with; records made with other settings cannot be mixed in."""
    return dict({name: getattr(args, name) for name in RUN_SETTINGS}, data_root=os.path.abspath(args.data_root),
                alphabets=args.alphabets, split_seed=args.split_seed, seed=args.seed,
                paper_formulas=args.paper_formulas)


def describe(args, num_alphabets):
    """(formulas, protocol): one line each, for every output."""
    if args.paper_formulas:
        formulas = "the paper's formulas (tracenorm: nuclear norm of alpha; cosine: exact u, full gradient)"
    else:
        formulas = ("the original code's formulas (tracenorm_original: sum of the row norms of alpha; "
                    "cosine_original), with which the reported numbers were made")
    formulas += f", c0 = {args.c0:g}"
    wanted = dict(PAPER, alphabets=PAPER_ALPHABETS)
    have = {name: getattr(args, name) for name in PAPER}
    have["alphabets"] = num_alphabets
    differ = [f"{name} {_show(have[name])} (paper: {_show(wanted[name])})" for name in PAPER
              if have[name] != wanted[name]]
    if args.dtype != "float32":
        differ.append(f"dtype {args.dtype} (paper: float32)")
    if not differ:
        return formulas, "the paper's protocol"
    preset = " (preset quick)" if args.preset == "quick" else ""
    return formulas, f"NOT the paper's protocol{preset}: " + ", ".join(differ)


def _show(value):
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) \
        else (f"{value:g}" if isinstance(value, float) else str(value))


# ---------------------------------------------------------------------------- outputs
def table_of(specs, records):
    """{regulariser: {lambda: [best accuracy of each recorded run, repeat order]}}."""
    table = {}
    for spec in specs:
        if spec.key in records:
            table.setdefault(spec.regularizer, {}).setdefault(spec.lam, []).append(records[spec.key]["best_acc"])
    return table


def table_rows(table):
    """(regulariser, lambda, runs, mean, std, mean - none, reported mean, reported std,
    reported - reported none) per cell, in %; None where there is nothing."""
    none = table.get("none", {}).get(0.0)
    base = mean_std(none, 100)[0] if none else None
    reported_base = mean_std(results.REPORTED["none"][0.0], 100)[0]
    rows = []
    for reg in results.REGULARIZERS:
        for lam, accs in sorted(table.get(reg, {}).items()):
            mean, std = mean_std(accs, 100)
            reported = results.REPORTED.get(reg, {}).get(round(lam, 6))
            r_mean, r_std = mean_std(reported, 100) if reported else (None, None)
            rows.append((reg, lam, len(accs), mean, std, None if base is None or reg == "none" else mean - base,
                         r_mean, r_std, None if r_mean is None or reg == "none" else r_mean - reported_base))
    return rows


def _num(value, fmt):
    return "" if value is None or math.isnan(value) else format(value, fmt)


def render_table(rows, formulas, protocol, data_line):
    """table.md and table.csv (texts)."""
    md = ["# Omniglot: TAAN best test accuracy (%), mean +- sample std over the runs", "",
          f"- Formulas: {formulas}.", f"- Protocol: {protocol}.", f"- Data: {data_line}.",
          "- Reported: the numbers the original reports (5 runs each; README, Results).", "",
          "| regulariser | lambda | runs | ours | ours - none | reported | reported - none |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for reg, lam, n, mean, std, diff, r_mean, r_std, r_diff in rows:
        reported = "" if r_mean is None else format_mean_std(r_mean, r_std)
        md.append(f"| {reg} | {lam:g} | {n} | {format_mean_std(mean, std)} | {_num(diff, '+.2f')} | {reported} | "
                  f"{_num(r_diff, '+.2f')} |")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["regularizer", "lambda", "runs", "mean", "std", "mean_minus_none", "reported_mean",
                     "reported_std", "reported_minus_none", "formulas", "protocol"])
    short_formulas = "paper" if formulas.startswith("the paper") else "original"
    short_protocol = "paper" if protocol == "the paper's protocol" else "not the paper's"
    for reg, lam, n, mean, std, diff, r_mean, r_std, r_diff in rows:
        writer.writerow([reg, f"{lam:g}", n, f"{mean:.4f}", _num(std, ".4f"), _num(diff, ".4f"), _num(r_mean, ".4f"),
                         _num(r_std, ".4f"), _num(r_diff, ".4f"), short_formulas, short_protocol])
    return "\n".join(md) + "\n", out.getvalue()


def write_outputs(args, specs, records, notes, figure=False):
    """The results files and the table (and the figure) from the records. Returns the paths."""
    formulas, protocol, data_line = notes
    comment = [f"Omniglot.reproduce: {formulas}; {protocol}"]
    paths = []
    for reg in args.regularizers:
        runs = [spec for spec in specs if spec.regularizer == reg]
        blocks = results.blocks_of(runs, records, sorted({spec.lam for spec in runs}))
        paths.append(results.results_path(args.results_dir, reg))
        atomic_write_text(paths[-1], results.render_results(blocks, comment))
    table = table_of(specs, records)
    md, csv_text = render_table(table_rows(table), formulas, protocol, data_line)
    for ext, text in (("md", md), ("csv", csv_text)):
        paths.append(os.path.join(args.results_dir, f"{TABLE_NAME}.{ext}"))
        atomic_write_text(paths[-1], text)
    if figure and table:
        short = "paper's formulas" if args.paper_formulas else "original formulas"
        kind = "paper's protocol" if protocol == "the paper's protocol" else (
            "QUICK preset, not the paper's protocol" if args.preset == "quick" else "NOT the paper's protocol")
        paths += Figure_wrt_Lambda.plot([(f"Ours: {short}, {kind}", table),
                                         ("Reported by the original (5 runs each)", results.REPORTED)],
                                        os.path.join(args.results_dir, FIGURE_NAME))
    if figure:
        paths += draw_run_curves(args.results_dir, specs)
    return paths, md


def run_folder(results_dir, spec):
    """Where a run writes its metrics.csv, curves and TensorBoard events: runs/<reg>/<lambda>/<j>/."""
    return os.path.join(results_dir, RUNS_DIR, *spec.key.split("/"))


def draw_run_curves(results_dir, specs):
    """curves/<reg>-lambda-<lambda>.png: the curves of the runs of each cell that wrote a metrics.csv."""
    cells, paths = {}, []
    for spec in specs:
        path = os.path.join(run_folder(results_dir, spec), METRICS_NAME)
        if os.path.isfile(path):
            cells.setdefault((spec.regularizer, spec.lam), []).append(
                (f"run {spec.repeat + 1} (seed {spec.seed})", read_metrics(path)))
    for (reg, lam), curves in cells.items():
        paths.append(draw_curves(curves, "test_accuracy", os.path.join(results_dir, CURVES_DIR,
                                                                       f"{reg}-lambda-{lam}.png"),
                                 f"Omniglot, regulariser {reg}, lambda {lam}: {len(curves)} run(s)"))
    return paths


# ---------------------------------------------------------------------------- the sweep
def open_records(args, settings):
    """The records file's {'settings', 'runs_at_once', 'stacking', 'records'}, checked against `settings`."""
    path = os.path.join(args.results_dir, RECORDS_NAME)
    if not os.path.isfile(path):
        return {"settings": settings, "runs_at_once": None, "stacking": None, "records": {}}
    return load_saved_sweep(
        path, settings, "delete it (the runs start again) or choose another --results_dir",
        f"{args.results_dir} holds runs made with other settings ({{}}): give the same flags to continue them, "
        "or another --results_dir (or delete that folder) to start afresh")


def reproduce(args, data=None, device=None, log=print, setup_hook=None):
    """The whole sweep with parsed `args`; returns {'table', 'paths', 'records'}. `data`:
    (train, test) OmniglotData to reuse; `setup_hook(trainer)`: handlers for tests."""
    start = time.monotonic()
    device = device or resolve_device(args.device)
    specs = run_specs(args)
    store = open_records(args, run_settings(args))      # refuse other settings before any work
    records = store["records"]
    train_data, test_data = data or load_data(args.data_root, device, args.split_seed, args.alphabets)
    given = {k: getattr(args, k) or store.get(k) for k in ("runs_at_once", "stacking")}   # kept for the next start
    store.update(given)
    stacking = given["stacking"] or default_stacking(device)              # else this device's defaults
    at_once = given["runs_at_once"] or default_runs_at_once(device, len(specs), args.batch * train_data.num_tasks,
                                                            stacking)
    formulas, protocol = describe(args, train_data.num_tasks)
    data_line = (f"{train_data.num_tasks} alphabets of {os.path.abspath(args.data_root)} (split seed "
                 f"{args.split_seed}), {len(train_data)} train / {len(test_data)} test images")
    notes = (formulas, protocol, data_line)
    records_path = os.path.join(args.results_dir, RECORDS_NAME)

    def save_records():         # in a fixed order, so that the same records give the same file
        atomic_write_json(records_path, dict(store, records=dict(sorted(records.items()))))

    save_records()
    done = sum(spec.key in records for spec in specs)
    log(f"Omniglot reproduce: {len(specs)} runs ({done} already recorded) of {' '.join(args.regularizers)}, "
        f"lambdas {_show(args.lambdas)}, {args.repeats} repeats; {data_line}; device {device}, {at_once} run(s) at "
        f"once ({stacking}); {formulas}; {protocol}. Results -> {args.results_dir}")
    write_outputs(args, specs, records, notes)

    def on_record(spec, record, state):
        records[spec.key] = record
        save_records()          # first the record, then the files made from it
        write_outputs(args, specs, records, notes)
        log(f"Run {spec.key} (seed {spec.seed}) finished: best test accuracy {record['best_acc']:.4f} after "
            f"{record['iterations']} iterations" + (" (stopped early)" if record["stopped_early"] else ""))

    train_runs(specs, args, (train_data, test_data), device, at_once, records, on_record,
               os.path.join(args.results_dir, STATE_NAME), args.save_every,
               on_round=Progress(specs, records, args.num_iter, at_once, log), stacking=stacking,
               setup_hook=setup_hook, log=log, run_folder=lambda spec: run_folder(args.results_dir, spec))
    paths, md = write_outputs(args, specs, records, notes, figure=True)
    log("\n" + md)
    log(f"Files: {', '.join(os.path.relpath(p, args.results_dir) for p in paths)} and {RECORDS_NAME} in "
        f"{args.results_dir}")
    log(f"Done in {format_duration(time.monotonic() - start)}.")
    return {"table": table_of(specs, records), "paths": paths, "records": records}


def main(argv=None):
    args = parse_args(argv)
    with hold_folder(args.results_dir, "--results_dir"):
        return reproduce(args)


cli = entry_point(main)

if __name__ == "__main__":
    cli()
