"""Omniglot data pipeline: synthetic set, split lists, HDF5 cache, sampler, result files, figure."""
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from Omniglot import Figure_wrt_Lambda, dataTools, results, synthetic
from Omniglot.dataTools import OmniglotData
from Training import UserError, atomic_write_text, format_mean_std, mean_std

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(alphabets=3, drawers=10, min_chars=4, max_chars=7, seed=0)


def _decode(path):
    return np.asarray(Image.open(path).convert("1"), dtype=np.uint8)


def _all_pngs(root):
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                for f in files if f.endswith(".png")]
    return sorted(out)


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("omniglot"))
    synthetic.generate(root, **SMALL)
    dataTools.main(["--root", root, "--seed", "0"])
    return root


def _make_tree(root, layout, size=105):
    """layout: {(folder, alphabet): {character folder: number of images}}; writes PNGs."""
    for (folder, alphabet), chars in layout.items():
        os.makedirs(os.path.join(root, folder, alphabet), exist_ok=True)
        for c, n in chars.items():
            d = os.path.join(root, folder, alphabet, c)
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                img = Image.new("1", (size, size), 1)
                img.putpixel((k, 3), 0)
                img.save(os.path.join(d, f"0001_{k + 1:02d}.png"))
    for folder in dataTools.SPLIT_FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)


# ----------------------------------------------------------------------------- synthetic set

def test_synthetic_layout_naming_and_images(data_root):
    bg = sorted(os.listdir(os.path.join(data_root, "images_background")))
    ev = sorted(os.listdir(os.path.join(data_root, "images_evaluation")))
    assert bg == ["Synthetic_Alphabet_01", "Synthetic_Alphabet_02"]  # round(3 * 30 / 50) = 2
    assert ev == ["Synthetic_Alphabet_03"]
    info = json.load(open(os.path.join(data_root, synthetic.MARKER)))
    pngs = _all_pngs(data_root)
    assert len(pngs) == info["images"] == info["characters"] * SMALL["drawers"]
    numbers = set()
    for rel in pngs:
        m = re.fullmatch(r"images_(background|evaluation)/Synthetic_Alphabet_\d\d/"
                         r"character(\d\d)/(\d{4})_(\d\d)\.png", rel)
        assert m, rel
        assert 1 <= int(m.group(4)) <= SMALL["drawers"]
        numbers.add(int(m.group(3)))
    assert numbers == set(range(1, info["characters"] + 1))  # global character numbering
    first = os.path.join(data_root, "images_background/Synthetic_Alphabet_01/character01")
    imgs = [Image.open(os.path.join(first, f)) for f in sorted(os.listdir(first))]
    assert all(im.mode == "1" and im.size == (105, 105) for im in imgs)
    arrs = [np.asarray(im, dtype=np.uint8) for im in imgs]
    ink = [1.0 - a.mean() for a in arrs]
    assert all(0.005 < v < 0.5 for v in ink)  # strokes drawn, background white
    assert len({a.tobytes() for a in arrs}) == len(arrs)  # every drawer draws differently


def test_synthetic_is_seeded(tmp_path):
    kw = dict(alphabets=2, drawers=2, min_chars=2, max_chars=3)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.generate(str(tmp_path / name), seed=seed, **kw)
    a, b, c = (_all_pngs(str(tmp_path / n)) for n in "abc")
    assert a == b
    same = all(np.array_equal(_decode(tmp_path / "a" / p), _decode(tmp_path / "b" / p)) for p in a)
    assert same
    common = [p for p in a if p in c]
    assert common and not all(np.array_equal(_decode(tmp_path / "a" / p),
                                                 _decode(tmp_path / "c" / p)) for p in common)


def test_ensure_builtin_data(tmp_path):
    root = str(tmp_path / "syn")
    kw = dict(alphabets=2, drawers=2, min_chars=2, max_chars=2, seed=3)
    synthetic.ensure_builtin_data(root, **kw)
    before = _all_pngs(root)
    assert len(before) == 2 * 2 * 2
    stamp = os.path.getmtime(os.path.join(root, before[0]))
    synthetic.ensure_builtin_data(root, **kw)  # present: nothing regenerated
    assert _all_pngs(root) == before and os.path.getmtime(os.path.join(root, before[0])) == stamp
    with pytest.raises(ValueError, match="generated with"):
        synthetic.ensure_builtin_data(root, **dict(kw, drawers=3))
    with pytest.raises(UserError, match="already exists"):
        synthetic.generate(root, **kw)
    assert not [e for e in os.listdir(root) if e.startswith(".synthetic-")]  # temp folder gone


def test_synthetic_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="max_chars"):
        synthetic.generate(str(tmp_path), alphabets=2, min_chars=5, max_chars=3)
    with pytest.raises(ValueError, match="drawers"):
        synthetic.generate(str(tmp_path), alphabets=2, drawers=100)


# ----------------------------------------------------------------------------- split lists

def test_list_formats_labels_and_split_rule(data_root):
    alphabets = sorted(os.listdir(os.path.join(data_root, "images_background"))
                       + os.listdir(os.path.join(data_root, "images_evaluation")))
    assert _read(os.path.join(data_root, "train_list.txt")) == "".join(
        f"{a}_train.txt\n" for a in alphabets)
    assert _read(os.path.join(data_root, "test_list.txt")) == "".join(
        f"{a}_test.txt\n" for a in alphabets)
    n_chars = {a: len(os.listdir(folder)) for a, folder in dataTools.find_alphabets(data_root)}
    assert _read(os.path.join(data_root, "class_annotation.txt")) == "".join(
        f"{a} {n_chars[a]}\n" for a in alphabets)
    # naive reference of the split rule: one random.Random(0).random() per image, sorted order
    rng = random.Random(0)
    expected = {"train": [], "test": []}
    for a in alphabets:
        folder = "images_background" if a != "Synthetic_Alphabet_03" else "images_evaluation"
        for rel in [p for p in _all_pngs(data_root) if p.startswith(f"{folder}/{a}/")]:
            label = int(rel.split("/")[2][-2:]) - 1
            expected["train" if rng.random() < 0.9 else "test"].append(f"{rel} {label}")
    got = {s: [] for s in ("train", "test")}
    for split in got:
        for a in alphabets:
            for line in _read(os.path.join(data_root, f"{a}_{split}.txt")).splitlines():
                path, label = line.split(" ")
                m = re.fullmatch(r"images_\w+/" + a + r"/character(\d\d)/\d{4}_\d\d\.png", path)
                assert m and int(label) == int(m.group(1)) - 1  # characterNN -> NN - 1
                got[split].append(line)
    assert got == expected
    assert sorted(got["train"] + got["test"]) == sorted(
        f"{p} {int(p.split('/')[2][-2:]) - 1}" for p in _all_pngs(data_root))
    frac = len(got["train"]) / (len(got["train"]) + len(got["test"]))
    assert 0.8 < frac < 0.97 and got["test"]


def test_split_is_reproducible_and_seed_dependent(data_root, tmp_path):
    names = ["train_list.txt", "class_annotation.txt"] + [
        f"Synthetic_Alphabet_0{i}_{s}.txt" for i in (1, 2, 3) for s in ("train", "test")]
    first = {n: _read(os.path.join(data_root, n)) for n in names}
    dataTools.write_split_lists(data_root, seed=0)
    assert {n: _read(os.path.join(data_root, n)) for n in names} == first
    summary = dataTools.write_split_lists(data_root, seed=1)
    other = {n: _read(os.path.join(data_root, n)) for n in names}
    assert other != first
    assert other["class_annotation.txt"] == first["class_annotation.txt"]
    assert sum(s[1] + s[2] for s in summary.values()) == len(_all_pngs(data_root))
    dataTools.write_split_lists(data_root, seed=0)  # restore for the other tests
    assert not [f for f in os.listdir(data_root) if f.endswith(".tmp")]


def test_task_order_is_sorted_over_both_folders(tmp_path):
    root = str(tmp_path)
    _make_tree(root, {("images_background", "Zeta"): {"character01": 2, "character02": 2},
                      ("images_evaluation", "Alpha"): {"character01": 1, "character02": 1,
                                                       "character03": 3}})
    summary = dataTools.write_split_lists(root, seed=0)
    assert list(summary) == ["Alpha", "Zeta"]
    assert _read(os.path.join(root, "class_annotation.txt")) == "Alpha 3\nZeta 2\n"
    lists = dataTools.read_split_lists(root, "train") + dataTools.read_split_lists(root, "test")
    labels = {os.path.relpath(p, root).replace(os.sep, "/"): y
              for _, items in lists for p, y in items}
    assert labels["images_evaluation/Alpha/character03/0001_03.png"] == 2
    assert labels["images_background/Zeta/character02/0001_01.png"] == 1


# ----------------------------------------------------------------------------- cache and sampler

def test_cache_round_trip_equals_direct_decode(data_root):
    assert dataTools.cache_is_current(data_root)
    with h5py.File(dataTools.cache_path(data_root), "r") as f:
        for split in ("train", "test"):
            for alphabet, items in dataTools.read_split_lists(data_root, split):
                g = f[split][alphabet]
                imgs, labels = g["images"][...], g["labels"][...]
                assert imgs.dtype == np.uint8 and imgs.shape == (len(items), 105, 105)
                direct = np.stack([_decode(p) for p, _ in items])
                assert np.array_equal(imgs, direct)
                assert labels.tolist() == [y for _, y in items]
                assert set(np.unique(imgs).tolist()) == {0, 1}


def test_cache_goes_stale_when_lists_change(data_root):
    dataTools.write_split_lists(data_root, seed=5)
    assert not dataTools.cache_is_current(data_root)
    with pytest.raises(UserError, match="older than the lists"):
        OmniglotData(data_root, "train", build=False)
    dataTools.prepare(data_root, seed=0, force=True)
    assert dataTools.cache_is_current(data_root)


def direct_images(root, split):
    return np.stack([_decode(p) for _, items in dataTools.read_split_lists(root, split) for p, _ in items])


def test_cache_goes_stale_when_an_image_is_edited(data_root, tmp_path):
    """The probe: a PNG edited after the cache was built used to go unnoticed."""
    root = str(tmp_path / "copy")
    shutil.copytree(data_root, root)
    image = dataTools.read_split_lists(root, "train")[1][1][2][0]
    before = direct_images(root, "train")
    edited = Image.new("1", (105, 105), 1)
    edited.putpixel((50, 50), 0)
    edited.save(image)
    os.utime(image, ns=(1, 1))               # whatever its time: a different one
    assert not dataTools.cache_is_current(root)
    with pytest.raises(UserError, match="older than the lists or images"):
        OmniglotData(root, "train", build=False)
    data = OmniglotData(root, "train")       # rebuilt
    after = direct_images(root, "train")
    assert (after != before).any() and np.array_equal(data.images.numpy(), after)


def test_a_damaged_cache_is_refused_or_built_again(data_root, tmp_path, capsys):
    """The probe: a byte flipped inside omniglot_cache.hdf5 used to give other images silently."""
    root = str(tmp_path / "copy")
    shutil.copytree(data_root, root)
    path = dataTools.cache_path(root)
    alphabet = dataTools.read_class_annotation(root)[0][0]
    with h5py.File(path, "r") as f:
        chunk = f["train"][alphabet]["images"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x20]))
    assert dataTools.cache_is_current(root)  # its attributes are intact: only the checksums tell
    with pytest.raises(UserError, match=rf"{re.escape(path)} is damaged \(.*\)\. Run `python -m Omniglot.dataTools"):
        OmniglotData(root, "train", build=False)
    data = OmniglotData(root, "train")
    assert f"{path} is damaged" in capsys.readouterr().out
    assert np.array_equal(data.images.numpy(), direct_images(root, "train"))


def test_sampler_shapes_labels_and_task_ids(data_root):
    data = OmniglotData(data_root, "train")
    T = data.num_tasks
    assert data.tasks == [f"Synthetic_Alphabet_0{i}" for i in (1, 2, 3)]
    lists = dataTools.read_split_lists(data_root, "train")
    assert data.sizes == [len(items) for _, items in lists]
    x, y, t = data.sample_all(3, torch.Generator().manual_seed(0))
    assert x.shape == (3 * T, 1, 105, 105) and x.dtype == torch.float32
    assert y.dtype == torch.long and t.tolist() == [i for i in range(T) for _ in range(3)]
    for row in range(3 * T):  # every row is a real (image, label) pair of its task
        items = lists[t[row]][1]
        matches = [lab for p, lab in items
                   if np.array_equal(_decode(p), x[row, 0].numpy().astype(np.uint8))]
        assert int(y[row]) in matches
        assert 0 <= int(y[row]) < data.num_classes[t[row]]
    # one pass of batch 1 visits every image of the task exactly once
    n = data.sizes[1]
    fresh = OmniglotData(data_root, "train")
    g = torch.Generator().manual_seed(7)
    seen = torch.cat([fresh.sample_batch(1, 1, g)[0] for _ in range(n)])
    full = torch.cat([xb for xb, _ in fresh.task_batches(1, 4)])
    key = lambda batch: sorted(b.numpy().tobytes() for b in batch)  # noqa: E731
    assert key(seen) == key(full)
    # same generator seed, same batches
    a = OmniglotData(data_root, "train").sample_all(2, torch.Generator().manual_seed(3))
    b = OmniglotData(data_root, "train").sample_all(2, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_full_split_iteration_matches_lists(data_root):
    data = OmniglotData(data_root, "test")
    lists = dataTools.read_split_lists(data_root, "test")
    for task, (_, items) in enumerate(lists):
        xs, ys = zip(*data.task_batches(task, 2))
        x, y = torch.cat(xs), torch.cat(ys)
        assert y.tolist() == [lab for _, lab in items]
        direct = np.stack([_decode(p) for p, _ in items])
        assert np.array_equal(x[:, 0].numpy().astype(np.uint8), direct)
    xs, ys, ts = zip(*data.batches(5))
    assert torch.cat(ts).tolist() == [t for t, (_, items) in enumerate(lists) for _ in items]
    assert torch.cat(ys).tolist() == [lab for _, items in lists for _, lab in items]
    assert sum(len(v) for v in ys) == len(data)


def test_sampler_bad_arguments(data_root):
    data = OmniglotData(data_root, "test")
    with pytest.raises(ValueError, match="batch_size must be in 1.."):
        data.sample_batch(0, data.sizes[0] + 1)
    with pytest.raises(ValueError, match="task must be in"):
        data.sample_batch(data.num_tasks, 1)
    with pytest.raises(ValueError, match="split must be"):
        OmniglotData(data_root, "valid")


def test_first_alphabets_only_and_samplers_of_their_own(data_root):
    full, two = OmniglotData(data_root, "train"), OmniglotData(data_root, "train", alphabets=2)
    assert two.tasks == full.tasks[:2] and two.num_classes == full.num_classes[:2] and two.sizes == full.sizes[:2]
    assert torch.equal(two.images, full.images[:len(two)]) and torch.equal(two.labels, full.labels[:len(two)])
    with pytest.raises(UserError, match=r"--alphabets must be in 1\.\.3"):
        OmniglotData(data_root, "train", alphabets=4)
    # two runs drawing from one data set in turns get the batches each gets alone
    passes, generators = [full.new_passes(), full.new_passes()], [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert 30 <= min(full.sizes) and max(full.sizes) < 90      # batch 30: a new pass at least every 2 draws
    for _ in range(4):
        both = [full.sample_all(30, g, p)[0] for g, p in zip(generators, passes)]
    solo = []
    for seed in (1, 2):
        data, g = OmniglotData(data_root, "train"), torch.Generator().manual_seed(seed)
        for _ in range(4):
            x = data.sample_all(30, g)[0]
        solo.append(x)
    assert all(torch.equal(a, b) for a, b in zip(both, solo)) and not torch.equal(solo[0], solo[1])


def test_alphabet_without_test_images(tmp_path):
    root = str(tmp_path)
    _make_tree(root, {("images_background", "A"): {"character01": 1},
                      ("images_evaluation", "B"): {"character01": 1}})
    summary = dataTools.write_split_lists(root, seed=0)  # random.Random(0).random() = 0.84
    assert summary == {"A": (1, 1, 0), "B": (1, 1, 0)}
    data = OmniglotData(root, "test")
    assert data.sizes == [0, 0] and list(data.batches(4)) == [] and len(data) == 0
    with pytest.raises(ValueError, match="has 0 test images"):
        data.sample_all(1)


# ----------------------------------------------------------------------------- bad inputs

def test_missing_data_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        dataTools.write_split_lists(str(tmp_path / "nowhere"))
    assert "python -m Omniglot.synthetic --root" in str(e.value) and "images_background.zip" in str(e.value)
    os.makedirs(tmp_path / "half" / "images_background")
    with pytest.raises(UserError, match="images_evaluation is missing"):
        dataTools.write_split_lists(str(tmp_path / "half"))


def test_missing_lists_say_which_command(tmp_path):
    with pytest.raises(UserError, match=r"Omniglot\.dataTools --root"):
        OmniglotData(str(tmp_path), "train")


def test_wrong_image_size_names_the_file(tmp_path):
    root = str(tmp_path)
    _make_tree(root, {("images_background", "A"): {"character01": 3}})
    _make_tree(root, {("images_evaluation", "B"): {"character01": 2}}, size=28)
    dataTools.write_split_lists(root)
    message = r"B/character01/0001_0\d\.png: image is 28x28, expected 105x105"
    with pytest.raises(ValueError, match=message):
        dataTools.build_cache(root)
    assert not os.path.exists(dataTools.cache_path(root))


def test_empty_alphabet_and_bad_character_folders(tmp_path):
    root = str(tmp_path / "a")
    _make_tree(root, {("images_background", "A"): {"character01": 1}})
    os.makedirs(os.path.join(root, "images_evaluation", "Empty"))
    with pytest.raises(ValueError, match=r"Empty is empty"):
        dataTools.write_split_lists(root)
    root = str(tmp_path / "b")
    _make_tree(root, {("images_background", "A"): {"character01": 1, "character05": 1}})
    with pytest.raises(ValueError, match="numbered character01..characterK"):
        dataTools.write_split_lists(root)
    root = str(tmp_path / "c")
    _make_tree(root, {("images_background", "A"): {"character01": 0}})
    with pytest.raises(ValueError, match="holds no PNG images"):
        dataTools.write_split_lists(root)
    root = str(tmp_path / "d")
    os.makedirs(os.path.join(root, "images_background"))
    os.makedirs(os.path.join(root, "images_evaluation"))
    with pytest.raises(ValueError, match="no alphabet folders"):
        dataTools.write_split_lists(root)


# ----------------------------------------------------------------------------- result files

def test_results_writer_parser_round_trip(tmp_path):
    path = results.results_path(str(tmp_path), "distance")
    assert os.path.basename(path) == "Results-TAAN-Omniglot-distance.txt"
    atomic_write_text(path, results.render_results(   # a re-run's block of a lambda after what is there
        [(0.1, [(1, 0.85541), (2, 0.8582)]), (0.2, [(1, 0.7)]), (0.1, [(1, 0.9)])]))
    assert _read(path) == ("---------------Lambda = 0.100000.---------------\n"
                           "Experiment 1, ACC: 0.8554.\nExperiment 2, ACC: 0.8582.\n"
                           "---------------Lambda = 0.200000.---------------\n"
                           "Experiment 1, ACC: 0.7000.\n"
                           "---------------Lambda = 0.100000.---------------\n"
                           "Experiment 1, ACC: 0.9000.\n")
    assert results.parse_results(path) == {0.1: [0.8554, 0.8582, 0.9], 0.2: [0.7]}
    with pytest.raises(ValueError, match="fraction"):
        results.format_experiment(3, 85.5)
    with pytest.raises(ValueError, match="regulariser must be one of"):
        results.results_path(str(tmp_path), "lowrank")


def test_parse_file_in_original_format_and_names(tmp_path):
    text = ("---------------Lambda = 0.000000.---------------\n"
            "Experiment 1, ACC: 0.8368.\nExperiment 2, ACC: 0.8560.\n")
    (tmp_path / "Results-TAAN-Omniglot-NoVMTL.txt").write_text(text)
    (tmp_path / "Results-TAAN-Omniglot-Euclidean.txt").write_text(
        "---------------Lambda = 0.300000.---------------\nExperiment 1, ACC: 0.8719.\n")
    (tmp_path / "Results-TAAN-Omniglot-cosine.txt").write_text(
        "---------------Lambda = 0.400000.---------------\n\nExperiment 1, ACC: 0.8725.\n")
    assert results.load_results_dir(str(tmp_path)) == {
        "none": {0.0: [0.8368, 0.856]}, "distance": {0.3: [0.8719]}, "cosine": {0.4: [0.8725]}}
    bad = tmp_path / "bad.txt"
    bad.write_text("Experiment 1, ACC: 0.5.\n")
    with pytest.raises(ValueError, match="before any"):
        results.parse_results(str(bad))
    bad.write_text("---------------Lambda = 0.1.---------------\nacc 0.5\n")
    with pytest.raises(ValueError, match="line 2"):
        results.parse_results(str(bad))


def test_reported_numbers_match_the_spec():
    r = results.REPORTED
    assert set(r) == set(results.REGULARIZERS)
    assert list(r["none"]) == [0.0]
    assert all(sorted(r[k]) == [0.1, 0.2, 0.3, 0.4] for k in ("distance", "tracenorm", "cosine"))
    assert all(len(v) == 5 for table in r.values() for v in table.values())
    # hand sums of the paper's percentages
    assert sum(r["none"][0.0]) * 100 == pytest.approx(420.56)
    assert sum(r["distance"][0.3]) * 100 == pytest.approx(433.62)
    assert sum(r["tracenorm"][0.2]) * 100 == pytest.approx(380.07)
    assert sum(r["cosine"][0.4]) * 100 == pytest.approx(415.10)


# ----------------------------------------------------------------------------- figure

def test_one_mean_std_for_every_table():
    m, s = mean_std([0.8, 0.9], 100)
    assert m == pytest.approx(85.0) and s == pytest.approx(7.0710678)  # sample std, n - 1: 10 / sqrt(2)
    assert format_mean_std(m, s) == "85.00 +- 7.07"
    m, s = mean_std([0.5], 100)     # one run: no spread, not a spread of 0
    assert m == 50.0 and math.isnan(s) and format_mean_std(m, s) == "50.00"


def test_figure_script_writes_png_and_pdf(tmp_path):
    res = tmp_path / "res"
    for reg, lams in (("none", [0.0]), ("distance", [0.1, 0.2]), ("tracenorm", [0.1])):
        blocks = [(lam, [(j + 1, acc + lam / 10) for j, acc in enumerate((0.8, 0.82))]) for lam in lams]
        atomic_write_text(results.results_path(str(res), reg), results.render_results(blocks))
    out = str(tmp_path / "fig" / "lambda")
    cmd = [sys.executable, os.path.join(ROOT, "Omniglot", "Figure_wrt_Lambda.py"),
           "--results_dir", str(res), "--out", out, "--reported"]
    subprocess.run(cmd, check=True, cwd=str(tmp_path), capture_output=True)
    png, pdf = open(out + ".png", "rb").read(), open(out + ".pdf", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert pdf[:5] == b"%PDF-" and len(pdf) > 5000
    with pytest.raises(UserError, match="no accuracies"):
        os.makedirs(tmp_path / "empty")
        Figure_wrt_Lambda.main(["--results_dir", str(tmp_path / "empty"), "--out", out])
