"""Draw the TAAN layer architecture figure.

    python Documents/make_figures.py                 # writes Documents/architecture.png and .pdf
    python Documents/make_figures.py --out-dir DIR   # writes DIR/architecture.png and .pdf

The figure shows one Task Adaptive Layer (TAL):

    a      = W x + b                                          (shared by all tasks)
    f_t(a) = relu(a) + sum_m alpha[t, m] * relu(b_m - a)      (task t, elementwise)

The basis points b_m and the coefficients alpha are drawn at random with a fixed
seed, so the plotted curves are real evaluations of the formula, not sketches.
"""
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from Training import ArgumentParser, UserError, atomic_savefig, entry_point

SEED = 0
TASKS = 3  # T
BASIS = 5  # M
TASK_COLORS = ["tab:blue", "tab:orange", "tab:green"]
A_RANGE = (-2.0, 2.0)


def relu(z):
    return np.maximum(z, 0.0)


def example_parameters(seed=SEED, tasks=TASKS, basis=BASIS):
    """Random basis points b_m (sorted) and coefficients alpha [T, M], fixed seed.

    The layer itself starts from alpha ~ 0.01 N(0,1) and b ~ U(-0.5, 0.5); the
    figure uses larger values so that the differences between tasks are visible.
    """
    rng = np.random.default_rng(seed)
    b = np.sort(rng.uniform(-1.5, 1.5, size=basis))
    alpha = rng.normal(0.0, 0.6, size=(tasks, basis))
    return b, alpha


def task_activation(a, b, alpha_t):
    """f_t(a) = relu(a) + sum_m alpha_t[m] relu(b_m - a), for a 1-D array a."""
    return relu(a) + relu(b[None, :] - a[:, None]) @ alpha_t


def _box(fig, x, y, w, h, text, color, fontsize=12):
    patch = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.008", transform=fig.transFigure,
                           facecolor=color, edgecolor="0.25", linewidth=1.2)
    fig.patches.append(patch)
    fig.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(fig, start, end, color="0.3", style="-|>", rad=0.0):
    arrow = FancyArrowPatch(start, end, transform=fig.transFigure, arrowstyle=style,
                            mutation_scale=14, color=color, linewidth=1.4,
                            connectionstyle=f"arc3,rad={rad}")
    fig.patches.append(arrow)


def _small_curve(ax, a, y, color, title=None):
    ax.plot(a, y, color=color, linewidth=2)
    ax.axhline(0, color="0.8", linewidth=0.8, zorder=0)
    ax.axvline(0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, pad=3)


def draw_architecture(seed=SEED):
    """Return the matplotlib Figure of the TAAN layer."""
    b, alpha = example_parameters(seed)
    a = np.linspace(*A_RANGE, 401)
    fig = Figure(figsize=(16, 7.5))
    fig.text(0.5, 0.95, "Task Adaptive Layer (TAAN): one shared affine map, one activation per task",
             ha="center", va="center", fontsize=16, weight="bold")

    # Layout in figure coordinates: basis row on top, alpha grid below it (one column per basis).
    grid_x0, grid_x1 = 0.36, 0.66
    col_w = (grid_x1 - grid_x0) / BASIS
    row_y, row_h = 0.60, 0.14
    mid = row_y + row_h / 2

    # Left: input and the shared affine map.
    _box(fig, 0.015, mid - 0.05, 0.05, 0.10, "$x$", "#f2f2f2", fontsize=16)
    _box(fig, 0.095, mid - 0.08, 0.135, 0.16, "$a = W x + b$\n\nshared by all tasks", "#dce9f7")
    _arrow(fig, (0.072, mid), (0.088, mid))

    # Middle top: relu(a) and the shared basis functions relu(b_m - a).
    basis_ylim = (-0.15, A_RANGE[1] - b.min() + 0.1)
    ax_relu = fig.add_axes([0.27, row_y, col_w - 0.012, row_h])
    _small_curve(ax_relu, a, relu(a), "0.2", "relu$(a)$")
    ax_relu.set_ylim(*basis_ylim)
    fig.text(0.27 + (col_w - 0.012) / 2, row_y - 0.03, "weight 1", ha="center", fontsize=9, color="0.3")
    fig.text(grid_x0 - 0.012, row_y + row_h / 2, "+", ha="center", va="center", fontsize=20)
    for m in range(BASIS):
        ax = fig.add_axes([grid_x0 + m * col_w + 0.006, row_y, col_w - 0.012, row_h])
        _small_curve(ax, a, relu(b[m] - a), "0.35", f"relu$(b_{m + 1} - a)$")
        ax.set_ylim(*basis_ylim)
        ax.axvline(b[m], color="tab:red", linewidth=0.8, linestyle=":")
    fig.text((grid_x0 + grid_x1) / 2, row_y + row_h + 0.075,
             f"shared basis functions relu$(b_m - a)$, m = 1..M (M = {BASIS})\n"
             r"basis points $b_m$ (red dotted): learned, shared by all tasks",
             ha="center", va="center", fontsize=11, linespacing=1.6)
    _arrow(fig, (0.237, mid), (0.262, mid))

    # Middle bottom: the task-specific coefficients alpha [T, M], one column per basis function.
    grid_y0, grid_h = 0.20, 0.26
    ax_alpha = fig.add_axes([grid_x0, grid_y0, grid_x1 - grid_x0, grid_h])
    lim = np.abs(alpha).max()
    ax_alpha.imshow(alpha, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for t in range(TASKS):
        for m in range(BASIS):
            value = alpha[t, m]
            ax_alpha.text(m, t, f"{value:+.2f}", ha="center", va="center", fontsize=10,
                          color="white" if abs(value) > 0.6 * lim else "black")
    ax_alpha.set_xticks(range(BASIS), [f"$m={m + 1}$" for m in range(BASIS)], fontsize=9)
    ax_alpha.set_yticks(range(TASKS), [rf"$\alpha_{t + 1}$ (task {t + 1})" for t in range(TASKS)],
                        fontsize=10)
    for t, label in enumerate(ax_alpha.get_yticklabels()):
        label.set_color(TASK_COLORS[t])
    ax_alpha.tick_params(length=0)
    ax_alpha.set_title(r"task-specific coefficients $\alpha$  [T $\times$ M]", fontsize=11, pad=6)
    for m in range(BASIS):
        xm = grid_x0 + (m + 0.5) * col_w
        _arrow(fig, (xm, row_y - 0.012), (xm, grid_y0 + grid_h + 0.045), style="-", color="0.75")
    fig.text((grid_x0 + grid_x1) / 2, grid_y0 - 0.07,
             rf"example values: random $b_m$ and $\alpha$, seed {seed}",
             ha="center", va="center", fontsize=9, color="0.35")

    # Right: the resulting task activations f_t, one per row of alpha.
    curve_x, curve_w = 0.76, 0.13
    curve_h, gap = 0.19, 0.075
    tops = [0.86 - t * (curve_h + gap) for t in range(TASKS)]
    ymin = min(task_activation(a, b, alpha[t]).min() for t in range(TASKS))
    ymax = max(task_activation(a, b, alpha[t]).max() for t in range(TASKS))
    pad = 0.08 * (ymax - ymin)
    for t in range(TASKS):
        y0 = tops[t] - curve_h
        ax = fig.add_axes([curve_x, y0, curve_w, curve_h])
        ax.plot(a, relu(a), color="0.7", linewidth=1.2, linestyle="--", label="relu$(a)$")
        ax.plot(a, task_activation(a, b, alpha[t]), color=TASK_COLORS[t], linewidth=2.2,
                label=f"$f_{t + 1}(a)$")
        ax.set_ylim(ymin - pad, ymax + pad)
        ax.set_xlim(*A_RANGE)
        ax.axhline(0, color="0.85", linewidth=0.8, zorder=0)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"$f_{t + 1}(a)$", fontsize=11, color=TASK_COLORS[t], pad=3)
        if t == TASKS - 1:
            ax.set_xlabel("$a$", fontsize=10, labelpad=1)
        # alpha row t -> f_t
        row_center = grid_y0 + grid_h * (1 - (t + 0.5) / TASKS)
        _arrow(fig, (grid_x1 + 0.008, row_center), (curve_x - 0.035, y0 + curve_h / 2),
               color=TASK_COLORS[t])
        # f_t -> output of task t
        _arrow(fig, (curve_x + curve_w + 0.01, y0 + curve_h / 2), (curve_x + curve_w + 0.04, y0 + curve_h / 2),
               color=TASK_COLORS[t])
        fig.text(curve_x + curve_w + 0.045, y0 + curve_h / 2, f"$h_{t + 1}$\ntask {t + 1}",
                 ha="left", va="center", fontsize=11, color=TASK_COLORS[t])
        ax.legend(loc="lower right", fontsize=8, frameon=False)

    fig.text(0.5, 0.045,
             r"$f_t(a) = \mathrm{relu}(a) + \sum_{m=1}^{M} \alpha_{t,m}\,\mathrm{relu}(b_m - a)$"
             r"   (elementwise in $a$; only $\alpha$ is task-specific)",
             ha="center", va="center", fontsize=12)
    return fig


def main(argv=None):
    parser = ArgumentParser(description="Draw the TAAN layer architecture figure.")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent),
                        help="folder for architecture.png and architecture.pdf (default: Documents/)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the example alpha and basis")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} does not exist; create it first (mkdir -p {out_dir})")
    fig = draw_architecture(args.seed)
    paths = [out_dir / "architecture.png", out_dir / "architecture.pdf"]
    for path in paths:     # the PDF without a creation date: the same bytes on every run
        atomic_savefig(fig, path, dpi=150, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    for path in paths:
        print(f"wrote {path}")


cli = entry_point(main)

if __name__ == "__main__":
    cli()
