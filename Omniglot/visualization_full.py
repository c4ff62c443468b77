"""Task-relation matrices of saved Omniglot TAAN models, one panel per layer.

    python -m Omniglot.visualization_full --models runs/omniglot_models --out results/omniglot_matrices

Finds every run folder under --models that holds config.json and model_params.pt (as
written by `train.py --saveto` or `Evaluation_TAAN.py --save_models`), rebuilds the TAAN
network and draws, for each of its five TAL layers (conv1..conv4, dense1), the T x T matrix

    distance: D[i, j] = E[(f_i(z) - f_j(z))^2]                       z ~ N(0, 1)
    cosine:   C[i, j] = E[f_i f_j] / sqrt(E[f_i^2] E[f_j^2])

of the alphabets' activation functions f_t (closed forms of `Layers.TAL_pytorch`), with the
alphabet names on the axes. Writes OUT/<reg>-<run folder>-<matrix>.png and .pdf.
"""
import json
import os

from matplotlib.figure import Figure
import torch

from Layers.TAL_pytorch import C0_ORIGINAL
from Omniglot.TAAN import TAAN
from Omniglot.train import BEST_NAME, CONFIG_NAME
from Training import ArgumentParser, UserError, atomic_savefig, entry_point, load_checkpoint

MATRICES = ("distance", "cosine")


def find_runs(folder):
    """Sorted run folders under `folder` (itself included) with a config and a best model."""
    if not os.path.isdir(folder):
        raise UserError(f"model folder {folder} does not exist; train with "
                        "`python -m Omniglot.train --saveto DIR` or run "
                        "`python -m Omniglot.Evaluation_TAAN --save_models DIR` first")
    runs = [d for d, _, files in os.walk(folder) if CONFIG_NAME in files and BEST_NAME in files]
    return sorted(runs)


def load_model(run_dir):
    """(TAAN model in eval mode, config dict) of one run folder; None for other networks."""
    with open(os.path.join(run_dir, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("model", "taan") != "taan":
        return None, config
    model = TAAN(config["num_classes"], basis=config["basis"], regularize=config.get("layer_regularize"),
                 c0=config.get("c0", C0_ORIGINAL))
    load_checkpoint(os.path.join(run_dir, BEST_NAME), {"model": model})
    return model.eval(), config


@torch.no_grad()
def layer_matrices(model, matrix="distance"):
    """[(layer name, T x T numpy matrix)] for every TAL layer of `model`."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
    return [(name, (layer.task_distance() if matrix == "distance" else layer.task_cosine()).double().numpy())
            for name, layer in model.tal_layers()]


def plot_matrices(mats, names, title, out_prefix):
    """2 x 3 panels (one per layer) with the alphabet names as labels; writes .png and .pdf."""
    T = len(names)
    side = max(4.0, 0.16 * T + 2.0)
    fig = Figure(figsize=(3 * side, 2 * side))
    axes = fig.subplots(2, 3)
    font = max(3.0, min(9.0, 300.0 / max(T, 1)))
    for ax in axes.flat[len(mats):]:
        ax.axis("off")
    for ax, (layer, m) in zip(axes.flat, mats):
        im = ax.imshow(m, cmap="viridis")
        ax.set_title(layer)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(names, rotation=90, fontsize=font)
        ax.set_yticklabels(names, fontsize=font)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    paths = [f"{out_prefix}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        atomic_savefig(fig, path, dpi=120)
    return paths


def main(argv=None):
    p = ArgumentParser(description="Draw the per-layer task distance (or cosine) matrices of "
                                "saved Omniglot TAAN models.")
    p.add_argument("--models", required=True, help="folder searched for run folders (config.json + model_params.pt)")
    p.add_argument("--out", required=True, help="folder for the images")
    p.add_argument("--matrix", choices=MATRICES + ("both",), default="distance",
                   help="which task matrix to draw (default distance, as the original)")
    args = p.parse_args(argv)
    runs = find_runs(args.models)
    if not runs:
        raise UserError(f"no run folder with {CONFIG_NAME} and {BEST_NAME} under {args.models}")
    kinds = MATRICES if args.matrix == "both" else (args.matrix,)
    written = []
    for run in runs:
        model, config = load_model(run)
        if model is None:
            print(f"skip {run}: a {config.get('model')} network has no task activations")
            continue
        reg = config.get("regularize", "none")
        for kind in kinds:
            title = (f"{kind} between alphabets: {reg}, lambda {config.get('lam', 0):g} "
                     f"({os.path.basename(os.path.normpath(run))})")
            prefix = os.path.join(args.out, f"{reg}-{os.path.basename(os.path.normpath(run))}-{kind}")
            for path in plot_matrices(layer_matrices(model, kind), config["tasks"], title, prefix):
                print(f"wrote {path}")
                written.append(path)
    return written


cli = entry_point(main)

if __name__ == "__main__":
    cli()
