"""Omniglot test accuracy against the regularisation weight lambda, per regulariser.

Reads every Results-TAAN-Omniglot-<reg>.txt in a folder and draws mean +- standard
deviation (over the repeated runs, n - 1 in the denominator) of the test accuracy in % at
each lambda. As in the original figure, every regulariser's curve starts at lambda = 0
from the runs without a regulariser ('none'), which is also drawn as its own point and
as a dashed horizontal reference line. With --reported a panel with the numbers the
original reports is drawn beside it, in the same style.

    python -m Omniglot.Figure_wrt_Lambda --reported        # results/omniglot/lambda.png and .pdf
    python -m Omniglot.Figure_wrt_Lambda --results_dir results/omniglot --out results/lambda
    python -m Omniglot.Figure_wrt_Lambda --results_dir none --reported --out /tmp/omniglot_reported
writes OUT.png and OUT.pdf (OUT: a path without extension).
"""
import os

import numpy as np
from matplotlib.figure import Figure

from Omniglot.results import REPORTED, load_results_dir
from Training import ArgumentParser, UserError, atomic_savefig, default_path, entry_point, mean_std

RESULTS_DIR = default_path("results", "omniglot")

# (regulariser, legend label, colour), drawn in this order.
CURVES = [("cosine", r"$\mathcal{L}_{Cos}$", "tab:blue"),
          ("distance", r"$\mathcal{L}_{2N}$", "tab:orange"),
          ("tracenorm", r"$\mathcal{L}_{TN}$", "tab:green")]
NONE_LABEL, NONE_COLOUR = r"No $\mathcal{L}_{MTL}$", "tab:red"



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
        m, s = zip(*(mean_std(accs, 100) for _, accs in points))    # one run: no error bar
        ax.errorbar(x, m, yerr=s, fmt="-*", lw=2.5, ms=9, capsize=6, color=colour, label=label)
    if base:
        m, s = mean_std(base, 100)
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
    """panels: [(title, {reg: {lambda: [acc]}})]; writes out_prefix.png and .pdf atomically.
    The same panels give the same bytes (the PDF carries no creation date)."""
    fig = Figure(figsize=(6.0 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        draw_panel(ax, results, title)
    fig.tight_layout()
    paths = [f"{out_prefix}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        atomic_savefig(fig, path, dpi=150, metadata={"CreationDate": None} if path.endswith(".pdf") else None)
    return paths


def main(argv=None):
    p = ArgumentParser(description="Plot Omniglot test accuracy against lambda.")
    p.add_argument("--results_dir", default=RESULTS_DIR,
                   help="folder with Results-TAAN-Omniglot-<reg>.txt files ('none': draw only the reported "
                        "numbers; default %(default)s)")
    p.add_argument("--out", default=None, help="output path without extension, .png/.pdf added "
                   "(default RESULTS_DIR/lambda)")
    p.add_argument("--reported", action="store_true",
                   help="also draw the accuracies the original reports")
    args = p.parse_args(argv)
    use_results = args.results_dir.lower() != "none"
    if not use_results and not args.reported:
        p.error("--results_dir none draws nothing without --reported")
    out = args.out or os.path.join(RESULTS_DIR if not use_results else args.results_dir, "lambda")
    panels = []
    if use_results:
        results = load_results_dir(args.results_dir)
        if not any(accs for table in results.values() for accs in table.values()):
            raise UserError(f"no accuracies in Results-TAAN-Omniglot-<reg>.txt files in "
                            f"{args.results_dir}; run the Omniglot lambda sweep first, "
                            "or draw only the original's numbers with --results_dir none --reported")
        panels.append((f"This run ({args.results_dir})", results))
    if args.reported:
        panels.append(("Reported by the original (5 runs each)", REPORTED))
    for path in plot(panels, out):
        print(f"wrote {path}")


cli = entry_point(main)

if __name__ == "__main__":
    cli()
