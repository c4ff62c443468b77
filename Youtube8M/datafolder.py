"""The Youtube-8M data folder: its layout, what it holds, and the checks that keep a damaged
or mixed folder from being used.

Layout (the converter writes it; your own data can use it too, with any number of tasks T
and any feature width D):

    {split}_task_{t}.hdf5   for split in train, valid, test and t = 0..T-1, each with
                              features     float32 [N, D]
                              labels       0/1     [N, C_t]   (any integer or float type)
                              attribute    num_classes = C_t
    tasks.json              optional: {"tasks": [T names], "classes": [[C_t names] per task]}

The converter adds a manifest to tasks.json -- a conversion id that every one of its HDF5
files carries as the attribute `conversion`, and each file's rows and size -- and writes
tasks.json last, into a staging folder that replaces the old folder as a whole. A folder
with a manifest is verified against it before use, so a folder mixing files of two
conversions, or a file replaced or resized since, is refused. A folder without one (your own files) is
checked once per file when it is loaded: finite features, labels 0 or 1.

Every file the converter writes also holds its own checksums: the dataset `checksums`
(uint32, one per block of `checksum_rows` = 512 rows: the CRC-32C of the block's features
bytes followed by its labels bytes). The loader checks each block as it reads it, so a
byte damaged on disk or in a copy is refused in one line that names the file and its rows.
(HDF5's own Fletcher-32 filter would do the same at about half the loader's speed; CRC-32C
is computed by the CPU's instruction at about 25 GB/s.) Files without `checksums` -- your
own, or a conversion made before files carried them -- are read unchecked.
"""
import json
import os
import re
from dataclasses import dataclass

import crc32c
import h5py
import numpy as np

from Training import UserError

SPLITS = ("train", "valid", "test")
LAYOUT = ("a data folder holds {split}_task_{t}.hdf5 for the splits train, valid and test and the tasks "
          "t = 0..T-1, each with the datasets features (float32 [N, D]) and labels (0/1 [N, C_t]) and the "
          "attribute num_classes = C_t; tasks.json with the task names is optional")
CHECK_ROWS = 65536          # rows per read when a file's values are checked
CHECKSUM_ROWS = 512         # rows per checksum of a converted task file; divides CHECK_ROWS


TASK_FILE = re.compile(r"^(train|valid|test)_task_(\d+)\.hdf5$")     # the name task_file gives


def task_file(data_dir, split, task):
    """Path of the HDF5 file of one (split, task)."""
    return os.path.join(data_dir, "%s_task_%d.hdf5" % (split, task))


def how_to_create(data_path):
    return ("create it with `python -m Youtube8M.synthetic --out %s` (built-in synthetic data) or "
            "`python -m Youtube8M.data --vocabulary vocabulary.csv --train 'train*.tfrecord' "
            "--valid 'validate*.tfrecord' --out %s` (real Youtube-8M data), or put your own data "
            "there (%s)" % (data_path, data_path, LAYOUT))


@dataclass
class DataFolder:
    """What a data folder holds: T = len(tasks) tasks, D features, C_t classes of task t."""
    path: str
    tasks: list
    num_classes: list
    num_features: int
    class_names: list = None
    synthetic: bool = False
    verified: bool = False      # made by the converter and checked against its manifest


def _open(path):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError("%s is not a readable HDF5 file (%s); %s" % (path, e, LAYOUT)) from None


def file_shape(path):
    """(rows N, features D, classes C) of one task file, with its layout checked."""
    if not os.path.isfile(path):
        raise UserError("task file %s is missing; %s" % (path, LAYOUT))
    with _open(path) as f:
        missing = [k for k in ("features", "labels") if k not in f]
        if missing or "num_classes" not in f.attrs:
            raise UserError("%s lacks %s; %s" % (path, ", ".join(missing) or "the attribute num_classes", LAYOUT))
        x, y, c = f["features"], f["labels"], int(f.attrs["num_classes"])
        for name, d, kinds in (("features", x, "fiu"), ("labels", y, "biuf")):
            if d.dtype.kind not in kinds:
                raise UserError("the %s of %s are stored as %s, not numbers; %s" % (name, path, d.dtype, LAYOUT))
        if x.ndim != 2 or x.shape[1] < 1:
            raise UserError("features of %s have shape %s, expected [N, D]; %s" % (path, x.shape, LAYOUT))
        if y.shape != (x.shape[0], c):
            raise UserError("labels of %s have shape %s, expected [N=%d, num_classes=%d]; %s"
                            % (path, y.shape, x.shape[0], c, LAYOUT))
        if x.shape[0] == 0:
            raise UserError("%s holds no videos; every task needs videos in every split" % path)
        return x.shape[0], x.shape[1], c


def check_values(path, features, labels, start=0):
    """UserError unless the features are finite and the labels 0 or 1 (rows from `start`)."""
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise UserError("%s: the features of row %d hold NaN or Inf; fix or drop that video (every feature "
                        "must be a finite number)" % (path, start + int(np.argmax(bad))))
    bad = ((labels != 0) & (labels != 1)).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError("%s: the labels of row %d hold %s; labels must be 0 or 1"
                        % (path, start + row, labels[row][(labels[row] != 0) & (labels[row] != 1)][0]))


def check_file_values(path):
    """check_values (and the checksums, see `Checksums`) over a whole file, read CHECK_ROWS rows at a time."""
    with _open(path) as f:
        checksums = Checksums(path, f)
        n = f["features"].shape[0]
        for a in range(0, n, CHECK_ROWS):
            features, labels = f["features"][a:a + CHECK_ROWS], f["labels"][a:a + CHECK_ROWS]
            checksums.check(a, features, labels)
            check_values(path, features, labels, a)


def block_checksums(features, labels, rows=CHECKSUM_ROWS):
    """uint32 [ceil(N / rows)]: the CRC-32C of each block of `rows` rows, over the bytes of
    its features and then of its labels (as stored: C order, the file's dtypes)."""
    return np.array([crc32c.crc32c(np.ascontiguousarray(labels[a:a + rows]),
                                   crc32c.crc32c(np.ascontiguousarray(features[a:a + rows])))
                     for a in range(0, len(features), rows)], dtype=np.uint32)


class Checksums:
    """The block checksums of one open task file (none: nothing to check), checked against
    rows as they are read."""

    def __init__(self, path, f):
        self.path = path
        self.rows = int(f.attrs.get("checksum_rows", CHECKSUM_ROWS))
        self.values = f["checksums"][:] if "checksums" in f else None

    def check(self, start, features, labels):
        """UserError unless the rows start..start + len(features) - 1 of the file, read into
        `features` and `labels`, match their checksums; `start` is a multiple of self.rows
        and the rows end at a multiple of it or at the end of the file."""
        if self.values is None:
            return
        first = start // self.rows
        bad = np.flatnonzero(block_checksums(features, labels, self.rows)
                             != self.values[first:first + -(-len(features) // self.rows)])
        if len(bad):
            a = start + int(bad[0]) * self.rows
            b = min(a + self.rows, start + len(features))
            raise UserError("%s is damaged: rows %d-%d do not match their checksum (a disk or copy error). Convert "
                            "the data again into %s (`python -m Youtube8M.synthetic --out %s` for the built-in "
                            "data)" % (self.path, a, b - 1, os.path.dirname(self.path) or ".",
                                       os.path.dirname(self.path) or "."))


def verify_manifest(path, info):
    """UserError unless the task files are those the manifest of tasks.json lists."""
    manifest = info["manifest"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(files, dict) and isinstance(manifest.get("conversion"), str) and all(
            isinstance(e, dict) and isinstance(e.get("rows"), int) and isinstance(e.get("bytes"), int)
            for e in files.values())):
        raise UserError("the manifest in %s is not one a conversion writes (an object with a conversion id and "
                        "each file's rows and bytes): convert the data again, or, for your own data, remove the "
                        "manifest from tasks.json" % os.path.join(path, "tasks.json"))
    conversion = manifest["conversion"]
    for split, t in ((split, t) for split in SPLITS for t in range(len(info["tasks"]))):
        name = os.path.basename(task_file(path, split, t))
        entry, file = manifest["files"].get(name), task_file(path, split, t)
        problem = None
        if entry is None:
            problem = "tasks.json does not list %s" % name
        elif not os.path.isfile(file):
            problem = "%s is missing" % name
        elif os.path.getsize(file) != entry["bytes"]:
            problem = "%s has %d bytes, the conversion wrote %d" % (name, os.path.getsize(file), entry["bytes"])
        else:
            with _open(file) as f:
                if f.attrs.get("conversion") != conversion:
                    problem = "%s comes from another conversion" % name
                elif f["features"].shape[0] != entry["rows"]:
                    problem = "%s has %d rows, the conversion wrote %d" % (name, f["features"].shape[0],
                                                                           entry["rows"])
                elif "checksum_rows" in manifest and ("checksums" not in f or f["checksums"].shape[0]
                                                      != -(-entry["rows"] // manifest["checksum_rows"])):
                    problem = "the checksums of %s are missing or cut short" % name
        if problem:
            raise UserError("data folder %s is mixed or stale: %s (tasks.json describes conversion %s). Convert "
                            "the data again into this folder: a conversion replaces the whole folder"
                            % (path, problem, conversion[:8]))


def read_tasks_json(path):
    file = os.path.join(path, "tasks.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError("%s is not readable JSON (%s); delete it (it is optional) or convert the data "
                        "again" % (file, e)) from None
    if not isinstance(info, dict):
        raise UserError("%s must hold a JSON object with a list \"tasks\" of task names" % file)
    return info


def read_data_folder(path, splits=SPLITS):
    """The DataFolder at `path`: T from the task files (numbered 0..T-1 in each of `splits`;
    tasks.json when present must agree), D and C_t from the train files, names from
    tasks.json (else "task t"). With a manifest, every task file is verified against it."""
    if not os.path.isdir(path):
        raise UserError("data folder %s does not exist; %s" % (path, how_to_create(path)))
    numbers = [int(m.group(2)) for m in map(TASK_FILE.match, os.listdir(path)) if m]
    T = max(numbers, default=-1) + 1        # the files must be numbered 0..T-1 in every split
    missing = [task_file(path, split, t) for split in splits for t in range(T)
               if not os.path.isfile(task_file(path, split, t))]
    if T == 0 or missing:
        what = "holds no train_task_0.hdf5" if T == 0 else "lacks %s%s" % (
            os.path.basename(missing[0]), " and %d other task files" % (len(missing) - 1) if len(missing) > 1 else "")
        raise UserError("data folder %s %s; %s" % (path, what, how_to_create(path)))
    info = read_tasks_json(path) or {}
    names = info.get("tasks")
    if names is not None and (not isinstance(names, list) or len(names) != T):
        raise UserError("%s lists %s tasks, but the folder holds train_task_0..%d.hdf5 (%d tasks): the folder "
                        "is incomplete or mixed; convert the data again, or fix tasks.json"
                        % (os.path.join(path, "tasks.json"), len(names) if isinstance(names, list) else "no",
                           T - 1, T))
    if "manifest" in info:
        verify_manifest(path, info)
    shapes = [file_shape(task_file(path, "train", t)) for t in range(T)]
    widths = sorted({d for _, d, _ in shapes})
    if len(widths) > 1:
        raise UserError("the train files of %s have different feature widths %s; every task file must have "
                        "the same width D" % (path, widths))
    classes = info.get("classes")
    return DataFolder(path, [str(n) for n in names] if names else ["task %d" % t for t in range(T)],
                      [c for _, _, c in shapes], widths[0],
                      classes if isinstance(classes, list) and len(classes) == T else None,
                      bool(info.get("synthetic")), "manifest" in info)
