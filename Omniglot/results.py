"""Result files of the Omniglot lambda sweep, in the format of the original code.

`Results-TAAN-Omniglot-<reg>.txt` holds, for every lambda tried, a header line and then
one line per repeated run with its best test accuracy (a fraction):

    ---------------Lambda = 0.100000.---------------
    Experiment 1, ACC: 0.8554.
    Experiment 2, ACC: 0.8582.

A sweep appends to the file, so a re-run adds its lines after what is there; the parser
gathers all accuracies found under the same lambda. The sweeps write the file whole from
their records (`render_results`), never line by line, so a killed sweep never writes a
line twice. Lines starting with '#' are comments (`Omniglot.reproduce` says there which
formulas and protocol made the numbers); the parser skips them. The original named its files after
NoVMTL / LowRank / Euclidean / Cosine; `load_results_dir` reads those names too and maps
them to none / tracenorm / distance / cosine.
"""
import glob
import os
import re

from Layers.TAL_pytorch import PAPER_REGULARIZERS
from Training import UserError

REGULARIZERS = ("none",) + PAPER_REGULARIZERS
ORIGINAL_NAMES = {"NoVMTL": "none", "LowRank": "tracenorm", "Euclidean": "distance",
                  "Cosine": "cosine"}
PREFIX = "Results-TAAN-Omniglot-"

# Test accuracies the original reports (5 runs each; its Figure_wrt_Lambda.m), as fractions.
# 'none' is the network without a regulariser, drawn at lambda = 0.
REPORTED = {
    "none": {0.0: [0.8368, 0.8560, 0.8417, 0.8358, 0.8353]},
    "distance": {0.1: [0.8554, 0.8582, 0.8616, 0.8669, 0.8548],
                 0.2: [0.8591, 0.8563, 0.8504, 0.8479, 0.8626],
                 0.3: [0.8719, 0.8682, 0.8691, 0.8703, 0.8567],
                 0.4: [0.8663, 0.8697, 0.8535, 0.8703, 0.8585]},
    "tracenorm": {0.1: [0.7951, 0.8078, 0.8240, 0.8072, 0.7593],
                  0.2: [0.7587, 0.7637, 0.7565, 0.7516, 0.7702],
                  0.3: [0.7447, 0.7677, 0.7553, 0.7799, 0.7618],
                  0.4: [0.7596, 0.7643, 0.7575, 0.7522, 0.7593]},
    "cosine": {0.1: [0.8374, 0.8315, 0.7982, 0.8417, 0.8333],
               0.2: [0.8066, 0.7724, 0.8100, 0.8246, 0.8259],
               0.3: [0.7621, 0.8225, 0.8340, 0.8069, 0.8072],
               0.4: [0.8725, 0.7845, 0.8327, 0.8053, 0.8560]},
}

_HEADER = re.compile(r"^-*\s*Lambda\s*=\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\.?\s*-*\s*$")
_EXPERIMENT = re.compile(r"^Experiment\s+(\d+)\s*,\s*ACC:\s*(\d*\.?\d+(?:[eE][-+]?\d+)?)\.?\s*$")


def _check_reg(reg):
    if reg not in REGULARIZERS and reg not in ORIGINAL_NAMES:
        raise ValueError(f"regulariser must be one of {REGULARIZERS}, got {reg!r}")


def results_path(results_dir, reg):
    """Path of the result file of one regulariser."""
    _check_reg(reg)
    return os.path.join(results_dir, f"{PREFIX}{reg}.txt")


def format_header(lam):
    return "---------------Lambda = {:f}.---------------\n".format(lam)


def format_experiment(index, acc):
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {acc}")
    return "Experiment {:d}, ACC: {:.4f}.\n".format(index, acc)


def render_results(blocks, comments=()):
    """The text of a result file: '# comment' lines, then for every (lambda, [(experiment
    index, accuracy)]) in `blocks` its header and its lines."""
    text = "".join(f"# {line}\n" for line in comments)
    for lam, experiments in blocks:
        text += format_header(lam) + "".join(format_experiment(index, acc) for index, acc in experiments)
    return text


def blocks_of(specs, records, lambdas):
    """render_results' blocks of the recorded runs of `specs` (sweep RunSpecs; `records` maps
    a run's key to its record): lambda by lambda in the order of `lambdas`, each with
    (repeat + 1, best accuracy) of its recorded runs; lambdas without one are left out."""
    blocks = []
    for lam in lambdas:
        lines = [(spec.repeat + 1, records[spec.key]["best_acc"]) for spec in specs
                 if spec.lam == lam and spec.key in records]
        if lines:
            blocks.append((lam, lines))
    return blocks


def parse_results(path):
    """{lambda: [accuracy, ...]} of one result file (accuracies as fractions, file order)."""
    if not os.path.exists(path):
        raise UserError(f"result file {path} does not exist")
    out, lam = {}, None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a text file ({e})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        header, experiment = _HEADER.match(line), _EXPERIMENT.match(line)
        if header:
            lam = round(float(header.group(1)), 6)
            out.setdefault(lam, [])
        elif experiment:
            if lam is None:
                raise UserError(f"{path} line {number}: an Experiment line before any "
                                "'Lambda = ...' header")
            out[lam].append(float(experiment.group(2)))
        else:
            raise UserError(f"{path} line {number}: expected a '---Lambda = x.---' header "
                            f"or 'Experiment n, ACC: a.', got {line[:60]!r}")
    return out


def load_results_dir(results_dir):
    """{regulariser: {lambda: [accuracy, ...]}} of every result file in a folder.

    Files named after the original's regularisers (NoVMTL, LowRank, Euclidean, Cosine) are
    read as none, tracenorm, distance, cosine; other names are skipped.
    """
    if not os.path.isdir(results_dir):
        raise UserError(f"results folder {results_dir} does not exist: run the Omniglot lambda sweep "
                        "(python -m Omniglot.Evaluation_TAAN) first, or pass --results_dir")
    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, PREFIX + "*.txt"))):
        name = os.path.basename(path)[len(PREFIX):-len(".txt")]
        reg = ORIGINAL_NAMES.get(name, name)
        if reg not in REGULARIZERS:
            continue
        for lam, accs in parse_results(path).items():
            out.setdefault(reg, {}).setdefault(lam, []).extend(accs)
    return out
