"""Omniglot test accuracy against the regularisation weight lambda, per regulariser.

Reads every Results-TAAN-Omniglot-<reg>.txt in a folder and draws mean +- standard
deviation (over the repeated runs, n - 1 in the denominator) of the test accuracy in % at
each lambda. As in the original figure, every regulariser's curve starts at lambda = 0
from the runs without a regulariser ('none'), which is also drawn as its own point and
as a dashed horizontal reference line. With --reported a panel with the numbers the
original reports is drawn beside it, in the same style.

    python Omniglot/Figure_wrt_Lambda.py --results_dir results/omniglot --out results/lambda
    python Omniglot/Figure_wrt_Lambda.py --out /tmp/omniglot_reported --reported
writes PATH_PREFIX.png and PATH_PREFIX.pdf.
"""
import os
import sys

import argparse

from matplotlib.figure import Figure
import numpy as np

from Omniglot.results import REPORTED, load_results_dir

# (regulariser, legend label, colour), drawn in this order.
CURVES = [("cosine", r"$\mathcal{L}_{Cos}$", "tab:blue"),
          ("distance", r"$\mathcal{L}_{2N}$", "tab:orange"),
          ("tracenorm", r"$\mathcal{L}_{TN}$", "tab:green")]
NONE_LABEL, NONE_COLOUR = r"No $\mathcal{L}_{MTL}$", "tab:red"


def mean_std(accs):
    """Mean and sample standard deviation (ddof=1; 0 for one run) of accuracies, in %."""
    a = 100.0 * np.asarray(accs, dtype=float)
    return a.mean(), (a.std(ddof=1) if a.size > 1 else 0.0)


def _baseline(results):
    """Accuracies without a regulariser: those at lambda 0 of 'none', else all of 'none'."""
    none = {lam: accs for lam, accs in results.get("none", {}).items() if accs}
    if 0.0 in none:
        return none[0.0]
    return [a for accs in none.values() for a in accs]


def draw_panel(ax, results, title):
    """Draw one {reg: {lambda: [acc]}} table onto ax; returns the lambdas drawn."""
    base = _baseline(results)
    curves = []
    for reg, label, colour in CURVES:
        points = sorted((lam, accs) for lam, accs in results.get(reg, {}).items()
                        if accs and lam != 0.0)
        if base:
            points = [(0.0, base)] + points
        if points:
            curves.append((points, label, colour))
    lams = sorted(({0.0} if base else set()) | {lam for c in curves for lam, _ in c[0]})
    # shift the curves a little sideways so that their error bars do not hide each other
    step = 0.04 * (min(np.diff(lams)) if len(lams) > 1 else 0.1)
    for i, (points, label, colour) in enumerate(curves):
        x = [lam + (i - (len(curves) - 1) / 2) * step for lam, _ in points]
        m, s = zip(*(mean_std(accs) for _, accs in points))
        ax.errorbar(x, m, yerr=s, fmt="-*", lw=2.5, ms=9, capsize=6, color=colour, label=label)
    if base:
        m, s = mean_std(base)
        ax.axhline(m, color=NONE_COLOUR, lw=1, ls="--", alpha=0.6)
        ax.errorbar([0.0], [m], yerr=[s], fmt="*", ms=11, lw=2.5, capsize=6,
                    color=NONE_COLOUR, label=NONE_LABEL)
    ax.set_xticks(lams)
    ax.set_xlabel(r"$\lambda$")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return lams


def plot(panels, out_prefix):
    """panels: [(title, {reg: {lambda: [acc]}})]; writes out_prefix.png and .pdf atomically."""
    fig = Figure(figsize=(6.0 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        draw_panel(ax, results, title)
    fig.tight_layout()
    folder = os.path.dirname(out_prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = f"{out_prefix}.{ext}"
        fig.savefig(path + ".tmp", format=ext, dpi=150)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot Omniglot test accuracy against lambda.")
    p.add_argument("--results_dir", help="folder with Results-TAAN-Omniglot-<reg>.txt files")
    p.add_argument("--out", required=True, help="output path without extension (.png/.pdf added)")
    p.add_argument("--reported", action="store_true",
                   help="also draw the accuracies the original reports")
    args = p.parse_args(argv)
    if not args.results_dir and not args.reported:
        p.error("give --results_dir, --reported, or both")
    panels = []
    if args.results_dir:
        results = load_results_dir(args.results_dir)
        if not any(accs for table in results.values() for accs in table.values()):
            raise FileNotFoundError(f"no accuracies in Results-TAAN-Omniglot-<reg>.txt files in "
                                    f"{args.results_dir}; run the Omniglot lambda sweep first, "
                                    "or draw only the original's numbers with --reported")
        panels.append((f"This run ({args.results_dir})", results))
    if args.reported:
        panels.append(("Reported by the original (5 runs each)", REPORTED))
    for path in plot(panels, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
