"""Youtube-8M data: TFRecord -> HDF5 converter, built-in synthetic data, batched loaders."""
import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from tfrecord.writer import TFRecordWriter

from Youtube8M.data import FEATURE_SIZE, TASKS, TaskWriter, convert, split_validate_files, task_file
from Youtube8M.synthetic import GROUPS, SyntheticVideos, ensure_builtin_data, make_synthetic_data
from Youtube8M.datafolder import CHECKSUM_ROWS, check_file_values, read_data_folder
from Youtube8M.torch_loader import MultiTask_Dataloader, TaskLoader, TrainSteps
from Training import UserError
from conftest import flip_byte

T = len(TASKS)


# ---------------------------------------------------------------- helpers
def write_vocabulary(path):
    """Entry i has vertical TASKS[i % 17] (i % 17 == 16: 'News', outside the tasks).

    Task t thus has classes 0 -> entry t and 1 -> entry t + 17.
    """
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl",
                    "Vertical1", "Vertical2", "Vertical3", "WikiDescription"])
        rows = [[i, 0, "/m/%d" % i, "name%d" % i, "", TASKS[i % 17] if i % 17 < 16 else "News",
                 "", "", "a, quoted \"description\""] for i in range(34)]
        for row in reversed(rows):                       # file order != Index order
            w.writerow(row)


def task_of(entry):
    return entry % 17 if entry % 17 < 16 else -1


def write_videos(path, videos, rgb_size=1024):
    w = TFRecordWriter(path)
    for vid, labels, x in videos:
        w.write({"id": (vid, "byte"), "labels": (labels, "int"),
                 "mean_rgb": (x[:rgb_size].tolist(), "float"),
                 "mean_audio": (x[1024:].tolist(), "float")})
    w.close()


def random_videos(rng, n, prefix):
    videos = []
    for i in range(n):
        labels = sorted(rng.choice(34, size=rng.integers(1, 5), replace=False).tolist())
        videos.append(((prefix + "%03d" % i).encode(), labels,
                       rng.standard_normal(FEATURE_SIZE).astype(np.float32)))
    videos.append(((prefix + "off").encode(), [16, 33], np.ones(FEATURE_SIZE, np.float32)))
    return videos


def expected_task_rows(videos, t):
    rows = [(x, [e for e in labels if task_of(e) == t]) for _, labels, x in videos]
    rows = [(x, ls) for x, ls in rows if ls]
    y = np.zeros((len(rows), 2), np.uint8)
    for i, (_, ls) in enumerate(rows):
        for e in ls:
            y[i, e // 17] = 1
    return np.array([x for x, _ in rows]).reshape(-1, FEATURE_SIZE), y


@pytest.fixture
def raw(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    write_vocabulary(str(raw / "vocabulary.csv"))
    files = {}
    for name, n in [("train0", 30), ("train1", 25), ("validate0", 10), ("validate1", 12),
                    ("validate2", 8), ("validate3", 11)]:
        files[name] = random_videos(rng, n, name)
        if name.startswith("validate"):      # a video of every task: each half of the files has them all
            files[name] += [((name + "task%d" % t).encode(), [t], rng.standard_normal(FEATURE_SIZE).astype(np.float32))
                            for t in range(T)]
        write_videos(str(raw / (name + ".tfrecord")), files[name])
    return raw, files


# ---------------------------------------------------------------- converter
def test_converter_round_trip(raw, tmp_path):
    raw, files = raw
    out = str(tmp_path / "out")
    info = convert(str(raw / "vocabulary.csv"), str(raw / "train*.tfrecord"),
                   str(raw / "validate*.tfrecord"), out, seed=3)
    valid, test = split_validate_files(sorted(str(raw / n) + ".tfrecord" for n in files
                                              if n.startswith("validate")), 3)
    order = {"train": ["train0", "train1"],
             "valid": [os.path.basename(f)[:-9] for f in valid],
             "test": [os.path.basename(f)[:-9] for f in test]}
    assert info["classes"][5] == ["name5", "name22"]
    assert info["num_classes"] == [2] * T
    for split, names in order.items():
        videos = [v for n in names for v in files[n]]
        assert info["videos"][split] == len(videos)
        for t in range(T):
            x, y = expected_task_rows(videos, t)
            with h5py.File(task_file(out, split, t), "r") as f:
                assert f["features"].dtype == np.float32 and f["labels"].dtype == np.uint8
                assert int(f.attrs["num_classes"]) == 2
                np.testing.assert_array_equal(f["features"][:], x)
                np.testing.assert_array_equal(f["labels"][:], y)
            assert info["counts"][split][t] == len(x)
    with open(os.path.join(out, "tasks.json")) as f:
        assert json.load(f)["tasks"] == TASKS
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_validate_split_halves_disjoint_covering_seeded():
    files = ["v%02d.tfrecord" % i for i in range(11)]
    valid, test = split_validate_files(files[::-1], seed=0)
    assert len(valid) == 5 and len(test) == 6
    assert not set(valid) & set(test) and sorted(valid + test) == files
    assert split_validate_files(files, seed=0) == (valid, test)        # input order irrelevant
    assert split_validate_files(files, seed=1) != (valid, test)
    with pytest.raises(ValueError, match="at least 2 validate files"):
        split_validate_files(files[:1], seed=0)


def test_converter_errors(raw, tmp_path):
    raw, files = raw
    voc, tr, va = str(raw / "vocabulary.csv"), str(raw / "train*.tfrecord"), str(raw / "validate*")
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="vocabulary file .*missing.csv.* not found"):
        convert(str(raw / "missing.csv"), tr, va, out)
    with pytest.raises(UserError, match="no train TFRecord files match .*nothing"):
        convert(voc, str(raw / "nothing*.tfrecord"), va, out)
    rng = np.random.default_rng(1)
    write_videos(str(raw / "train2.tfrecord"), random_videos(rng, 3, "bad"), rgb_size=1000)
    with pytest.raises(ValueError, match="record 0 of .*train2.tfrecord: feature 'mean_rgb' "
                                         "has 1000 values, expected 1024"):
        convert(voc, tr, va, out)
    assert [n for n in os.listdir(tmp_path) if n.startswith("out")] == []   # nothing partial is left


def test_converter_refuses_float_labels_and_an_empty_task(raw, tmp_path):
    """The probe: labels stored as floats used to be dropped, giving an empty data set."""
    raw, files = raw
    voc, out = str(raw / "vocabulary.csv"), str(tmp_path / "out")
    w = TFRecordWriter(str(raw / "train1.tfrecord"))
    for vid, labels, x in files["train1"]:
        w.write({"id": (vid, "byte"), "labels": ([float(e) for e in labels], "float"),
                 "mean_rgb": (x[:1024].tolist(), "float"), "mean_audio": (x[1024:].tolist(), "float")})
    w.close()
    with pytest.raises(UserError, match=r"record 0 of .*train1\.tfrecord: feature 'labels' is a float_list, "
                                        r"expected an int64_list"):
        convert(voc, str(raw / "train*.tfrecord"), str(raw / "validate*.tfrecord"), out)
    write_videos(str(raw / "train1.tfrecord"), files["train1"])
    for name in ("validate0", "validate1", "validate2", "validate3"):     # videos of 'Arts & Entertainment' only
        write_videos(str(raw / (name + ".tfrecord")), [(v, [0], x) for v, _, x in files[name]])
    with pytest.raises(UserError, match=r"the valid split \(validate\d\.tfrecord, validate\d\.tfrecord\) has no "
                                        r"video of tasks 'Games', 'Autos & Vehicles', 'Sports' and 12 more"):
        convert(voc, str(raw / "train*.tfrecord"), str(raw / "validate*.tfrecord"), out)
    assert not os.path.exists(out)


# ---------------------------------------------------------------- synthetic data
def test_synthetic_command_line_writes_a_data_folder(tmp_path, capsys):
    """`python -m Youtube8M.synthetic` as README documents it (its flags reached the generator
    together with the shared --debug flag and every call failed)."""
    from Youtube8M import synthetic
    out = str(tmp_path / "cli")
    info = synthetic.main(["--out", out, "--num_train", "300", "--num_valid", "100", "--train_files", "2",
                           "--valid_files", "2"])
    assert info["videos"]["train"] == 300 and info["videos"]["valid"] + info["videos"]["test"] == 100
    assert os.path.isfile(os.path.join(out, "tasks.json")) and f"synthetic data in {out}" in capsys.readouterr().out


def test_synthetic_sizes_groups_labels(tmp_path):
    out = str(tmp_path / "syn")
    info = make_synthetic_data(out, seed=0, num_train=2000, num_valid=400, train_files=2,
                               valid_files=2)
    assert info["synthetic"] and info["synthetic_groups"] == GROUPS
    assert info["videos"]["train"] == 2000
    assert info["videos"]["valid"] + info["videos"]["test"] == 400
    assert sorted(os.listdir(out)) == sorted(["tasks.json"] + [
        os.path.basename(task_file(out, s, t)) for s in ("train", "valid", "test") for t in range(T)])
    # the latent codes, recovered from the features with the generator's shared projection
    gen = SyntheticVideos(**info["synthetic_config"])
    unproject = np.linalg.pinv(gen.proj.astype(np.float64))
    labels, slope = 0, []
    for t in range(T):
        with h5py.File(task_file(out, "train", t), "r") as f:
            x, y = f["features"][:].astype(np.float64), f["labels"][:].astype(np.float64)
            assert int(f.attrs["num_classes"]) == info["num_classes"][t] == y.shape[1]
        assert 3 <= y.shape[1] <= 12 and len(y) == info["counts"]["train"][t] > 50
        assert y.sum(1).min() >= 1
        labels += y.sum()
        # evidence s = m_{t,c} . z of every class; slope of P(label | s) where s < 0:
        # > 0 for a mostly odd link (groups 0, 1), < 0 for a mostly even one (groups 2, 3)
        s = (x @ unproject) @ gen.directions[t].T
        slope.append(np.mean([np.polyfit(s[s[:, c] < 0, c], y[s[:, c] < 0, c], 1)[0]
                              for c in range(y.shape[1])]))
    assert 2.5 < labels / 2000 < 3.5                          # about 3 labels per video
    assert len(set(info["counts"]["train"])) > 8              # tasks of different sizes
    slope = np.array(slope).reshape(4, 4)                     # [group, task in group]
    assert slope[:2].min() > 0 > slope[2].max()               # planted groups show in the links
    assert slope[3].max() < slope[2].mean()                   # the most even group most negative


def test_ensure_builtin_data_only_when_absent(tmp_path):
    out = str(tmp_path / "d")
    assert ensure_builtin_data(out, num_train=300, num_valid=100) == out
    stamp = os.stat(task_file(out, "train", 0)).st_mtime_ns
    ensure_builtin_data(out, num_train=300, num_valid=100)
    assert os.stat(task_file(out, "train", 0)).st_mtime_ns == stamp
    loaders, num_classes = MultiTask_Dataloader("valid", 64, data_path=out)
    assert len(loaders) == T and all(3 <= c <= 12 for c in num_classes)
    info = json.load(open(os.path.join(out, "tasks.json")))     # built-in data of before the checksums
    del info["manifest"]["checksum_rows"]
    json.dump(info, open(os.path.join(out, "tasks.json"), "w"))
    ensure_builtin_data(out, num_train=300, num_valid=100)
    assert os.stat(task_file(out, "train", 0)).st_mtime_ns != stamp
    assert json.load(open(os.path.join(out, "tasks.json")))["manifest"]["checksum_rows"] == 512


# ---------------------------------------------------------------- loader
SIZES = [37 + 13 * t for t in range(T)]


def write_task_files(root, split="train", sizes=SIZES, width=FEATURE_SIZE, extra_classes=0):
    """Task t: row i has feature[0] = i and one-hot label i % C_t."""
    os.makedirs(root, exist_ok=True)
    for t, n in enumerate(sizes):
        c = 2 + t % 3
        x = np.zeros((n, width), np.float32)
        x[:, 0] = np.arange(n)
        y = np.zeros((n, c + extra_classes), np.uint8)
        y[np.arange(n), np.arange(n) % c] = 1
        with h5py.File(task_file(root, split, t), "w") as f:
            f["features"], f["labels"] = x, y
            f.attrs["num_classes"] = c
    return root


def row_ids(batches):
    ids = []
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        i = x[:, 0].long()
        assert torch.equal(y.argmax(1), i % y.shape[1])            # labels stay with their row
        ids.append(i)
    return torch.cat(ids).tolist() if ids else []


def test_loader_epoch_covers_each_sample_once_and_is_seeded(tmp_path):
    root = write_task_files(str(tmp_path))
    loaders, num_classes = MultiTask_Dataloader("train", 16, data_path=root, seed=5)
    assert num_classes == [2 + t % 3 for t in range(T)]
    again, _ = MultiTask_Dataloader("train", 16, data_path=root, seed=5)
    other, _ = MultiTask_Dataloader("train", 16, data_path=root, seed=6)
    for t, loader in enumerate(loaders):
        assert len(loader) == -(-SIZES[t] // 16)
        orders = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            again[t].set_epoch(epoch)
            ids = row_ids(loader)
            assert sorted(ids) == list(range(SIZES[t]))
            assert ids == row_ids(again[t])                          # same seed + epoch
            orders.append(ids)
        assert orders[0] != orders[1] and orders[0] != list(range(SIZES[t]))
        assert row_ids(other[t]) != orders[0]
    plain, _ = MultiTask_Dataloader("train", 16, shuffle=False, data_path=root)
    assert row_ids(plain[3]) == list(range(SIZES[3]))


def test_streamed_loader_and_prefetch_match_contract(tmp_path):
    root = write_task_files(str(tmp_path))
    path = task_file(root, "train", 7)
    n = SIZES[7]
    stream = TaskLoader(path, 10, seed=1, in_memory=False, block_rows=8, chunk_blocks=3)
    stream.set_epoch(2)
    ids = row_ids(stream)
    assert sorted(ids) == list(range(n)) and ids != list(range(n))
    assert ids == row_ids(TaskLoader(path, 10, seed=1, in_memory=False, block_rows=8,
                                     chunk_blocks=3).iter_epoch(2))
    memory = TaskLoader(path, 10, seed=1)
    threaded = TaskLoader(path, 10, seed=1, num_workers=2)
    assert row_ids(memory) == row_ids(threaded)
    for x, y in threaded:                       # leaving early stops the prefetch thread
        break


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shards_disjoint_and_covering(tmp_path, drop_last):
    root = write_task_files(str(tmp_path))
    n, B, W = SIZES[4], 8, 3                     # 89 rows: 3 full global batches of 24 + 17
    shards = [TaskLoader(task_file(root, "train", 4), B, seed=2, rank=r, world_size=W,
                         drop_last=drop_last) for r in range(W)]
    ids = [row_ids(s) for s in shards]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == (n // (B * W) if drop_last else -(-n // (B * W)))
    flat = sum(ids, [])
    assert len(flat) == len(set(flat))
    if drop_last:
        assert len(flat) == (n // (B * W)) * B * W and all(len(i) == len(ids[0]) for i in ids)
    else:
        assert sorted(flat) == list(range(n))
    whole = row_ids(TaskLoader(task_file(root, "train", 4), B * W, seed=2))
    assert sorted(flat) == sorted(whole[:len(flat)])            # a shard of the same order


def test_train_steps_restart_all_tasks_together(tmp_path):
    """TrainSteps (the trainer's epoch, as the original): max_t(len_t) - 1 steps; every
    cycle = min_t(len_t) - 1 steps all loaders restart together with the next order."""
    root = write_task_files(str(tmp_path))
    loaders, _ = MultiTask_Dataloader("train", 16, data_path=root, seed=0)
    lengths = [len(l) for l in loaders]
    steps = TrainSteps(loaders)
    assert (len(steps), steps.cycle) == (max(lengths) - 1, min(lengths) - 1) == (14, 2)
    steps.set_epoch(4)
    seen = [[] for _ in range(T)]
    for xs, ys in steps:
        assert len(xs) == len(ys) == T
        for t, (x, y) in enumerate(zip(xs, ys)):
            seen[t].append(row_ids([(x, y)]))
    assert all(len(s) == len(steps) for s in seen)
    for t, loader in enumerate(loaders):      # step s is batch s % 2 of restart s // 2
        passes = [row_ids(loader.iter_epoch(4, cycle=r)) for r in range(7)]
        assert seen[t] == [passes[s // 2][16 * (s % 2):16 * (s % 2 + 1)] for s in range(len(steps))]
    steps.set_epoch(5)
    assert row_ids([(next(iter(steps))[0][0], next(iter(steps))[1][0])]) != seen[0][0]


def test_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*Youtube8M\.synthetic --out.*Youtube8M\.data"):
        MultiTask_Dataloader("train", 8, data_path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="mode must be one of"):
        MultiTask_Dataloader("validate", 8, data_path=str(tmp_path))
    root = write_task_files(str(tmp_path / "a"))
    os.remove(task_file(root, "train", 9))
    with pytest.raises(UserError, match=r"lacks train_task_9.hdf5.*Youtube8M\.synthetic"):
        MultiTask_Dataloader("train", 8, data_path=root)
    root = write_task_files(str(tmp_path / "b"), width=1000)          # any width D works ...
    assert {l.num_features for l in MultiTask_Dataloader("train", 8, data_path=root)[0]} == {1000}
    write_task_files(root, sizes=SIZES[:1], width=999)                 # ... but one for all tasks
    with pytest.raises(UserError, match=r"train files of .*/b have different feature widths \[999, 1000\]"):
        MultiTask_Dataloader("train", 8, data_path=root)
    root = write_task_files(str(tmp_path / "c"), extra_classes=1)
    with pytest.raises(ValueError, match=r"labels of .*train_task_0.hdf5 have shape \(37, 3\), "
                                         r"expected \[N=37, num_classes=2\].*num_classes = C_t"):
        MultiTask_Dataloader("train", 8, data_path=root)
    root = write_task_files(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        MultiTask_Dataloader("train", 64, data_path=root, drop_last=True)


# ---------------------------------------------------------------- nothing damaged gets through
def convert_raw(raw, out):
    return convert(str(raw / "vocabulary.csv"), str(raw / "train*.tfrecord"), str(raw / "validate*.tfrecord"),
                   out, seed=3)


def record_offsets(path):
    """(start, length) of every record of a TFRecord file."""
    data, offsets, at = open(path, "rb").read(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 8], "little")
        offsets.append((at, length))
        at += 16 + length
    return offsets


@pytest.mark.parametrize("damage,message", [
    ("payload", r"train1\.tfrecord: record 3 fails its data checksum"),
    ("length", r"train1\.tfrecord: record 3 has a length field that fails its checksum"),
    ("truncated", r"train1\.tfrecord: record 25 is cut short \(the file ends inside it\)"),
])
def test_damaged_tfrecord_stops_the_conversion_and_keeps_the_old_folder(raw, tmp_path, damage, message):
    raw, files = raw
    out = str(tmp_path / "out")
    before = convert_raw(raw, out)
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    path = str(raw / "train1.tfrecord")
    data = bytearray(open(path, "rb").read())
    start, length = record_offsets(path)[3]
    if damage == "payload":          # one flipped bit inside a float of the features
        data[start + 12 + length - 40] ^= 0x10
    elif damage == "length":
        data[start] ^= 0x01
    else:
        data = data[:-7]
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match=message + ".*download it again"):
        convert_raw(raw, out)
    # the old conversion is untouched and nothing partial is left beside it
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == stamps
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"]
    assert read_data_folder(out).verified and before["manifest"]["conversion"] == \
        json.load(open(os.path.join(out, "tasks.json")))["manifest"]["conversion"]


def test_nan_features_in_a_record_are_named(raw, tmp_path):
    raw, files = raw
    videos = files["validate2"]
    videos[5][2][7] = np.nan
    write_videos(str(raw / "validate2.tfrecord"), videos)
    with pytest.raises(UserError, match=r"record 5 of .*validate2\.tfrecord \(video b'validate2005'\) has NaN"):
        convert_raw(raw, str(tmp_path / "out"))


def test_mixed_or_stale_folder_is_refused(raw, tmp_path):
    raw, files = raw
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    convert_raw(raw, a)
    convert_raw(raw, b)                  # the same videos, another conversion
    assert len(MultiTask_Dataloader("train", 4, data_path=a)[0]) == T
    shutil.copy(task_file(b, "valid", 3), task_file(a, "valid", 3))
    with pytest.raises(UserError, match=r"data folder .*/a is mixed or stale: valid_task_3\.hdf5 comes from "
                                        r"another conversion.*Convert the data again"):
        MultiTask_Dataloader("train", 4, data_path=a)
    with h5py.File(task_file(b, "test", 0), "a") as f:      # changed after the conversion
        f["features"][0, 0] += 1
    shutil.copy(os.path.join(a, "tasks.json"), os.path.join(b, "tasks.json"))
    with pytest.raises(UserError, match=r"/b is mixed or stale: train_task_0\.hdf5 comes from another conversion"):
        read_data_folder(b)
    # a conversion replaces the folder as a whole; files it did not write are refused
    convert_raw(raw, a)
    assert read_data_folder(a).verified
    open(os.path.join(a, "notes.txt"), "w").write("mine")
    with pytest.raises(UserError, match=r"--out .*/a holds files that a conversion did not write \(notes\.txt\)"):
        convert_raw(raw, a)


def test_own_data_any_tasks_and_width_with_bad_values_named(tmp_path):
    root = str(tmp_path / "own")
    for split in ("train", "valid", "test"):
        write_task_files(root, split, sizes=[20, 30, 25, 40, 33], width=300)
    folder = read_data_folder(root)
    assert (len(folder.tasks), folder.num_features, folder.num_classes) == (5, 300, [2, 3, 4, 2, 3])
    assert folder.tasks == [f"task {t}" for t in range(5)] and not folder.verified
    json.dump({"tasks": list("abcde")}, open(os.path.join(root, "tasks.json"), "w"))
    assert read_data_folder(root).tasks == list("abcde")
    with h5py.File(task_file(root, "valid", 2), "a") as f:
        f["features"][17, 5] = np.inf
    with pytest.raises(UserError, match=r"valid_task_2\.hdf5: the features of row 17 hold NaN or Inf"):
        MultiTask_Dataloader("valid", 8, data_path=root)
    with h5py.File(task_file(root, "test", 4), "a") as f:
        f["labels"][3, 1] = 2
    for in_memory in (True, False):            # checked once, in memory or streamed
        with pytest.raises(UserError, match=r"test_task_4\.hdf5: the labels of row 3 hold 2; labels must be 0 or 1"):
            TaskLoader(task_file(root, "test", 4), 8, in_memory=in_memory, block_rows=4, chunk_blocks=2)
    json.dump({"tasks": list("abc")}, open(os.path.join(root, "tasks.json"), "w"))
    with pytest.raises(UserError, match=r"tasks\.json lists 3 tasks, but the folder holds train_task_0\.\.4\.hdf5"):
        read_data_folder(root)


def test_conversion_killed_inside_the_swap_gets_the_old_folder_back(raw, tmp_path):
    raw, files = raw
    out = str(tmp_path / "out")
    first = convert_raw(raw, out)
    os.rename(out, out + ".old-4194305")              # killed between the swap's two renames
    os.makedirs(out + ".staging-4194305")             # ... and its staging folder
    os.makedirs(out + ".raw-4194305")                 # ... and a killed synthetic run's TFRecords
    data_folder_was = first["manifest"]["conversion"]
    from Youtube8M.data import remove_dead_staging
    remove_dead_staging(out)
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"]
    assert json.load(open(os.path.join(out, "tasks.json")))["manifest"]["conversion"] == data_folder_was
    assert read_data_folder(out).verified


# ---------------------------------------------------------------- checksums
def crc32c_reference(data, crc=0):
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit over a byte table."""
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_converted_files_carry_the_crc32c_of_every_512_rows(raw, tmp_path):
    raw, files = raw
    out = str(tmp_path / "out")
    assert convert_raw(raw, out)["manifest"]["checksum_rows"] == CHECKSUM_ROWS == 512
    for split, t in (("train", 0), ("test", 15)):
        with h5py.File(task_file(out, split, t), "r") as f:
            x, y = f["features"][:], f["labels"][:]
            assert f.attrs["checksum_rows"] == 512 and len(x) < 512
            assert list(f["checksums"][:]) == [crc32c_reference(y.tobytes(), crc32c_reference(x.tobytes()))]
    with h5py.File(task_file(out, "valid", 4), "a") as f:        # a conversion's file without its checksums
        del f["checksums"]
    info = json.load(open(os.path.join(out, "tasks.json")))
    info["manifest"]["files"]["valid_task_4.hdf5"]["bytes"] = os.path.getsize(task_file(out, "valid", 4))
    json.dump(info, open(os.path.join(out, "tasks.json"), "w"))      # (its size alone would give it away)
    with pytest.raises(UserError, match=r"mixed or stale: the checksums of valid_task_4\.hdf5 are missing"):
        read_data_folder(out)


def test_a_damaged_task_file_is_refused_in_every_read_path(tmp_path):
    """Many blocks, written in several flushes; one flipped bit is found whichever way the
    file is read, and the error names the file and the block's rows."""
    path = str(tmp_path / "train_task_0.hdf5")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1300, FEATURE_SIZE), dtype=np.float32)
    labels = [rng.choice(3, size=rng.integers(1, 3), replace=False) for _ in range(1300)]
    with TaskWriter(path, 3, "test", buffer_rows=1024) as w:
        for row, classes in zip(x, labels):
            w.add(row, classes)
    with h5py.File(path, "r") as f:
        assert f["checksums"].shape == (3,) and f["features"][1299].tolist() == x[1299].tolist()

    def read_all(**kw):
        loader = TaskLoader(path, 100, block_rows=300, chunk_blocks=2, **kw)  # blocks round up to 512 rows
        return sum(len(b) for b, _ in loader)

    for kw in ({"in_memory": True}, {"in_memory": False}, {"in_memory": False, "num_workers": 2}):
        assert read_all(**kw) == 1300
    check_file_values(path)
    flip_byte(path, "features", 700, 5)
    for kw in ({"in_memory": True}, {"in_memory": False}, {"in_memory": False, "num_workers": 2},
               {"in_memory": False, "checked": True}):
        with pytest.raises(UserError, match=r"train_task_0\.hdf5 is damaged: rows 512-1023 do not match their "
                                            r"checksum .*Convert the data again"):
            read_all(**kw)
    with pytest.raises(UserError, match=r"is damaged: rows 512-1023"):
        check_file_values(path)
    flip_byte(path, "features", 700, 5)          # undone
    flip_byte(path, "labels", 1299, 2)           # the last, short block
    with pytest.raises(UserError, match=r"train_task_0\.hdf5 is damaged: rows 1024-1299 do not match"):
        read_all(in_memory=False)


def test_malformed_folder_files_are_one_line(raw, tmp_path):
    """The probes: a manifest that is a list, features stored as strings and a vocabulary that is
    not UTF-8 used to end in tracebacks."""
    raw, files = raw
    out = str(tmp_path / "out")
    convert_raw(raw, out)
    info = json.load(open(os.path.join(out, "tasks.json")))
    json.dump(dict(info, manifest=[1, 2]), open(os.path.join(out, "tasks.json"), "w"))
    with pytest.raises(UserError, match=r"the manifest in .*tasks\.json is not one a conversion writes"):
        read_data_folder(out)
    del info["manifest"]                     # your own data: no manifest
    json.dump(info, open(os.path.join(out, "tasks.json"), "w"))
    with h5py.File(task_file(out, "valid", 2), "a") as f:
        x = f["features"][:]
        del f["features"]
        f["features"] = x.astype("S8")
    with pytest.raises(UserError, match=r"the features of .*valid_task_2\.hdf5 are stored as \|S8, not numbers"):
        MultiTask_Dataloader("valid", 4, data_path=out)
    open(raw / "vocabulary.csv", "wb").write(b"Index,Name,Vertical1\n0,caf\xe9,Games\n")
    with pytest.raises(UserError, match=r"vocabulary\.csv' is not UTF-8 text"):
        convert_raw(raw, str(tmp_path / "other"))
