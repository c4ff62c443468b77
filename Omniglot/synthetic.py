"""Synthetic stand-in for the Omniglot data set, in the real data's folder layout.

    root/images_background/Synthetic_Alphabet_01/character01/0001_01.png
    root/images_evaluation/Synthetic_Alphabet_31/character05/0998_17.png
    root/SYNTHETIC.json                  (the settings it was generated with)

As in the real set, the alphabets are split 30/20 between images_background and
images_evaluation, every character of every alphabet is drawn once by each drawer, a file
is named `<global character number, 4 digits>_<drawer, 2 digits>.png`, and every image
is a 105x105 one-bit PNG with white background and black strokes.

How an image is made:
- each alphabet has a style (how many strokes, how curved, how thick);
- each character has a prototype: 1-4 strokes, each a cubic Bezier curve or a polyline,
  in unit coordinates [-1, 1]^2;
- each drawer renders the prototype with its own small affine jitter (rotation, shear,
  scale, shift), independent noise on every stroke point and a stroke thickness:
      p' = A p + s + e,   A = R(theta) Shear(k) diag(sx, sy),   e ~ N(0, sigma^2 I)
  then maps [-1, 1] onto the 105-pixel canvas and draws the polyline through p'.

Everything is seeded, and the default set (50 alphabets, 20 drawers, ~32k images) takes
seconds. These are synthetic images, not handwriting: use them to check the pipeline,
not to compare accuracies with the paper.

    python -m Omniglot.synthetic --root data/omniglot_synthetic [--alphabets 50] [--drawers 20]
"""
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from Omniglot.dataTools import IMAGE_SIZE, SPLIT_FOLDERS
from Training import ArgumentParser, UserError, atomic_write_json, count, entry_point

MARKER = "SYNTHETIC.json"
DEFAULTS = dict(alphabets=50, drawers=20, min_chars=14, max_chars=55, seed=0)


def _check_settings(alphabets, drawers, min_chars, max_chars, seed):
    if alphabets < 1:
        raise UserError(f"alphabets must be at least 1, got {alphabets}")
    if not 1 <= drawers <= 99:
        raise UserError(f"drawers must be in 1..99 (two-digit file names), got {drawers}")
    if not 1 <= min_chars <= max_chars <= 99:
        raise UserError("need 1 <= min_chars <= max_chars <= 99 (two-digit character folders), "
                        f"got min_chars={min_chars}, max_chars={max_chars}")
    if alphabets * max_chars > 9999:
        raise UserError(f"{alphabets} alphabets x {max_chars} characters exceeds the 4-digit "
                        "file numbering (9999 characters)")
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")


def _bezier(ctrl, n=16):
    """Points of the cubic Bezier curve with control points ctrl [4, 2]."""
    s = np.linspace(0.0, 1.0, n)[:, None]
    return ((1 - s) ** 3 * ctrl[0] + 3 * (1 - s) ** 2 * s * ctrl[1]
            + 3 * (1 - s) * s ** 2 * ctrl[2] + s ** 3 * ctrl[3])


def _polyline(rng, n_vertices, per_segment=6):
    """A random walk of n_vertices corners, each segment sampled at per_segment points."""
    pts = [rng.uniform(-0.6, 0.6, 2)]
    for _ in range(n_vertices - 1):
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.9)
        nxt = np.clip(pts[-1] + length * np.array([np.cos(angle), np.sin(angle)]), -0.8, 0.8)
        pts.append(nxt)
    segs = [a + np.linspace(0, 1, per_segment, endpoint=False)[:, None] * (b - a)
            for a, b in zip(pts[:-1], pts[1:])]
    return np.concatenate(segs + [pts[-1][None]], axis=0)


def alphabet_style(rng):
    """Per-alphabet drawing style shared by all its characters."""
    return dict(max_strokes=int(rng.integers(2, 5)), curvy=float(rng.uniform(0.1, 0.9)),
                width=int(rng.integers(2, 5)))


def character_prototype(rng, style):
    """List of strokes, each an array [P, 2] of points in [-1, 1]^2."""
    strokes = []
    for _ in range(int(rng.integers(1, style["max_strokes"] + 1))):
        if rng.random() < style["curvy"]:
            strokes.append(_bezier(rng.uniform(-0.8, 0.8, (4, 2))))
        else:
            strokes.append(_polyline(rng, int(rng.integers(2, 5))))
    return strokes


def render(strokes, rng, base_width, size=IMAGE_SIZE):
    """One drawer's rendering of a prototype: a one-bit PIL image (strokes 0, background 1)."""
    theta, shear = rng.normal(0.0, 0.12), rng.normal(0.0, 0.1)
    sx, sy = rng.uniform(0.85, 1.1, 2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    A = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    shift = rng.normal(0.0, 0.05, 2)
    width = max(2, base_width + int(rng.integers(-1, 2)))
    half = (size - 1) / 2.0
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        p = stroke @ A.T + shift + rng.normal(0.0, 0.012, stroke.shape)
        pix = half + 0.85 * half * p
        draw.line([tuple(q) for q in pix.tolist()], fill=0, width=width, joint="curve")
    return img


def alphabet_names(alphabets):
    return [f"Synthetic_Alphabet_{a + 1:02d}" for a in range(alphabets)]


def background_count(alphabets):
    """How many alphabets go to images_background: 30 of 50 as in the real set."""
    if alphabets == 1:
        return 1
    return min(max(int(round(alphabets * 30 / 50)), 1), alphabets - 1)


def generate(root, alphabets=50, drawers=20, min_chars=14, max_chars=55, seed=0):
    """Write the synthetic set under root; refuses to overwrite existing image folders.

    Returns a dict of the settings plus the number of characters and images written.
    """
    _check_settings(alphabets, drawers, min_chars, max_chars, seed)
    os.makedirs(root, exist_ok=True)
    for folder in SPLIT_FOLDERS:
        if os.path.exists(os.path.join(root, folder)):
            raise UserError(f"{os.path.join(root, folder)} already exists; delete it or "
                            "choose another --root to generate a new synthetic set")
    settings = dict(alphabets=alphabets, drawers=drawers, min_chars=min_chars,
                    max_chars=max_chars, seed=seed)
    n_chars = np.random.default_rng([seed]).integers(min_chars, max_chars + 1, size=alphabets)
    n_background = background_count(alphabets)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=root)
    try:
        for folder in SPLIT_FOLDERS:
            os.makedirs(os.path.join(tmp, folder))
        number = 0  # global character number, as in the real file names
        for a, name in enumerate(alphabet_names(alphabets)):
            folder = SPLIT_FOLDERS[0] if a < n_background else SPLIT_FOLDERS[1]
            style = alphabet_style(np.random.default_rng([seed, a + 1]))
            for c in range(int(n_chars[a])):
                number += 1
                rng = np.random.default_rng([seed, a + 1, c + 1])
                proto = character_prototype(rng, style)
                char_dir = os.path.join(tmp, folder, name, f"character{c + 1:02d}")
                os.makedirs(char_dir)
                for d in range(drawers):
                    img = render(proto, rng, style["width"])
                    img.save(os.path.join(char_dir, f"{number:04d}_{d + 1:02d}.png"),
                             compress_level=1)
        for folder in SPLIT_FOLDERS:
            os.replace(os.path.join(tmp, folder), os.path.join(root, folder))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = dict(settings, characters=int(n_chars.sum()), images=int(n_chars.sum()) * drawers,
                background_alphabets=n_background)
    atomic_write_json(os.path.join(root, MARKER), info)
    return info


def ensure_builtin_data(root, alphabets=50, drawers=20, min_chars=14, max_chars=55, seed=0):
    """Generate the synthetic set under root unless image folders are already there.

    Folders without a SYNTHETIC.json (e.g. the real Omniglot) are used as they are; a
    synthetic set made with other settings is an error rather than silently reused.
    Returns root.
    """
    settings = dict(alphabets=alphabets, drawers=drawers, min_chars=min_chars,
                    max_chars=max_chars, seed=seed)
    present = [f for f in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, f))]
    if not present:
        generate(root, **settings)
        return root
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            made = json.load(f)
        old = {k: made.get(k) for k in settings}
        if old != settings:
            raise UserError(f"{root} holds a synthetic set generated with {old}, not {settings}; "
                            "use another root folder or delete this one")
    return root


def main(argv=None):
    p = ArgumentParser(description="Generate the synthetic Omniglot-format data set.")
    p.add_argument("--root", required=True, help="folder to create images_background/ and "
                   "images_evaluation/ in")
    p.add_argument("--alphabets", type=count(1), default=DEFAULTS["alphabets"])
    p.add_argument("--drawers", type=count(1), default=DEFAULTS["drawers"],
                   help="images per character")
    p.add_argument("--min_chars", type=count(1), default=DEFAULTS["min_chars"],
                   help="fewest characters per alphabet")
    p.add_argument("--max_chars", type=count(1), default=DEFAULTS["max_chars"],
                   help="most characters per alphabet")
    p.add_argument("--seed", type=count(0), default=DEFAULTS["seed"])
    args = p.parse_args(argv)
    start = time.time()
    info = generate(args.root, alphabets=args.alphabets, drawers=args.drawers,
                    min_chars=args.min_chars, max_chars=args.max_chars, seed=args.seed)
    print(f"synthetic Omniglot: {info['alphabets']} alphabets ({info['background_alphabets']} in "
          f"images_background), {info['characters']} characters, {info['images']} images "
          f"written to {args.root} in {time.time() - start:.1f} s")
    print(f"next: python -m Omniglot.train --data_root {args.root} (it writes the split lists and the image "
          "cache first)")


cli = entry_point(main)

if __name__ == "__main__":
    cli()
