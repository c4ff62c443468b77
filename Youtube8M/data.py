"""Convert Youtube-8M video-level TFRecords into one HDF5 file per (split, task).

No TensorFlow is needed: records are read with the `tfrecord` package.

Input (the public Youtube-8M video-level release):
  vocabulary.csv          columns Index, TrainVideoCount, KnowledgeGraphId, Name, WikiUrl,
                          Vertical1, Vertical2, Vertical3, WikiDescription
  train*.tfrecord         one tf.train.Example per video with features
  validate*.tfrecord        id (bytes), labels (int64 list, vocabulary indices),
                            mean_rgb (1024 floats), mean_audio (128 floats)

Tasks: the 16 Vertical1 categories in `TASKS`. The classes of task t are the vocabulary
entries whose Vertical1 is TASKS[t], renumbered 0..C_t-1 in vocabulary Index order. A video
belongs to task t iff it has at least one label of that vertical (so a video can be in
several tasks); labels of other verticals are ignored.

Splits: train = the train files. The validate files are sorted, shuffled with `seed` and cut
into two halves of files: the first half is `valid`, the second `test`.

Output in --out DIR:
  {split}_task_{t}.hdf5   datasets  features  float32 [N, 1152]  (mean_rgb then mean_audio)
                                    labels    uint8   [N, C_t]   (0/1)
                          attribute num_classes = C_t
  tasks.json              task names, class names per task, video counts per split and task

Records are streamed: each task keeps a small buffer that is appended to resizable HDF5
datasets, so memory does not grow with the split. Every file is written under a temporary
name and renamed when complete.

Usage:
  python -m Youtube8M.data --vocabulary vocabulary.csv \
      --train 'yt8m/train*.tfrecord' --valid 'yt8m/validate*.tfrecord' --out data/youtube8m
"""
import contextlib
import csv
import glob
import json
import os
import random

import h5py
import numpy as np
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_iterator
from tqdm import tqdm

from Training import ArgumentParser, UserError, atomic_path, atomic_write_json, default_path, entry_point

TASKS = [
    "Arts & Entertainment", "Games", "Autos & Vehicles", "Sports",
    "Food & Drink", "Computers & Electronics", "Business & Industrial", "Pets & Animals",
    "Hobbies & Leisure", "Beauty & Fitness", "Shopping", "Internet & Telecom",
    "Home & Garden", "Science", "Travel", "Law & Government",
]
RGB_SIZE, AUDIO_SIZE = 1024, 128
FEATURE_SIZE = RGB_SIZE + AUDIO_SIZE
SPLITS = ("train", "valid", "test")
VOCABULARY_COLUMNS = ("Index", "Name", "Vertical1")
DEFAULT_DATA_PATH = default_path("data", "youtube8m")


def task_file(data_dir, split, task):
    """Path of the HDF5 file of one (split, task)."""
    return os.path.join(data_dir, "%s_task_%d.hdf5" % (split, task))


class Vocabulary:
    """The task structure read from vocabulary.csv.

    classes[t]  -- class names of task t in vocabulary Index order
    task_of[i]  -- task of vocabulary entry i (-1: a vertical that is not one of TASKS)
    local_of[i] -- class number of entry i inside its task
    """

    def __init__(self, path):
        if not os.path.isfile(path):
            raise UserError("vocabulary file %r not found: pass the vocabulary.csv of the Youtube-8M "
                            "release with --vocabulary" % path)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in VOCABULARY_COLUMNS if not rows or c not in rows[0]]
        if missing:
            raise UserError("vocabulary file %r has no column(s) %s (expected the Youtube-8M "
                            "vocabulary.csv header)" % (path, ", ".join(missing)))
        try:
            rows.sort(key=lambda r: int(r["Index"]))
        except ValueError as e:
            raise UserError("vocabulary file %r: Index must be an integer (%s)" % (path, e))
        size = int(rows[-1]["Index"]) + 1
        self.task_of = np.full(size, -1, dtype=np.int64)
        self.local_of = np.full(size, -1, dtype=np.int64)
        self.known = np.zeros(size, dtype=bool)
        self.classes = [[] for _ in TASKS]
        task_id = {name: t for t, name in enumerate(TASKS)}
        for r in rows:
            i = int(r["Index"])
            self.known[i] = True
            t = task_id.get(r["Vertical1"], -1)
            if t >= 0:
                self.task_of[i] = t
                self.local_of[i] = len(self.classes[t])
                self.classes[t].append(r["Name"])
        empty = [TASKS[t] for t in range(len(TASKS)) if not self.classes[t]]
        if empty:
            raise UserError("vocabulary file %r has no entry with Vertical1 = %s; every task "
                            "needs at least one class" % (path, ", ".join(map(repr, empty))))
        self.num_classes = [len(c) for c in self.classes]

    def tasks_of(self, labels, where):
        """Map vocabulary indices -> (task ids, local class ids) of the labels in TASKS."""
        bad = labels[(labels < 0) | (labels >= len(self.known))]
        bad = bad if len(bad) else labels[~self.known[labels]]
        if len(bad):
            raise UserError("%s: label %d is not in the vocabulary; use the vocabulary.csv "
                            "of the same Youtube-8M release" % (where, bad[0]))
        tasks = self.task_of[labels]
        keep = tasks >= 0
        return tasks[keep], self.local_of[labels][keep]


def list_files(pattern, what):
    files = sorted(glob.glob(pattern))
    if not files:
        raise UserError("no %s TFRecord files match %r; pass the video-level %s*.tfrecord "
                        "files of Youtube-8M (quote the glob)" % (what, pattern, what))
    return files


def split_validate_files(files, seed):
    """Shuffle the validate files (seeded) and cut them into halves: (valid, test)."""
    files = sorted(files)
    if len(files) < 2:
        raise UserError("need at least 2 validate files to split them into valid and test "
                        "halves, got %d" % len(files))
    random.Random(seed).shuffle(files)
    half = len(files) // 2
    return files[:half], files[half:]


def _float_feature(feature, key, size, where):
    if key not in feature:
        raise UserError("%s has no feature %r; video-level Youtube-8M records are needed "
                        "(id, labels, mean_rgb, mean_audio)" % (where, key))
    values = feature[key].float_list.value
    if len(values) != size:
        raise UserError("%s: feature %r has %d values, expected %d (video-level features: "
                        "mean_rgb 1024 + mean_audio 128; frame-level records are not supported)"
                        % (where, key, len(values), size))
    return values


def read_records(path):
    """Yield (video id, labels int64 [k], features float32 [1152]) for each record of a file."""
    for n, record in enumerate(tfrecord_iterator(path)):
        where = "record %d of %s" % (n, path)
        example = example_pb2.Example()
        example.ParseFromString(record)
        feature = example.features.feature
        if "labels" not in feature:
            raise UserError("%s has no feature 'labels'; video-level Youtube-8M records are "
                            "needed (id, labels, mean_rgb, mean_audio)" % where)
        x = np.empty(FEATURE_SIZE, dtype=np.float32)
        x[:RGB_SIZE] = _float_feature(feature, "mean_rgb", RGB_SIZE, where)
        x[RGB_SIZE:] = _float_feature(feature, "mean_audio", AUDIO_SIZE, where)
        labels = np.asarray(feature["labels"].int64_list.value, dtype=np.int64)
        video_id = feature["id"].bytes_list.value[0] if "id" in feature else b""
        yield video_id, labels, x


class TaskWriter:
    """Appends (features, labels) rows of one task to a resizable HDF5 file, in buffered
    chunks; a context manager that writes the last rows and closes the file on success."""

    def __init__(self, path, num_classes, buffer_rows=4096):
        self.file = h5py.File(path, "w")
        self.features = self.file.create_dataset(
            "features", (0, FEATURE_SIZE), maxshape=(None, FEATURE_SIZE), dtype=np.float32,
            chunks=(128, FEATURE_SIZE))
        self.labels = self.file.create_dataset(
            "labels", (0, num_classes), maxshape=(None, num_classes), dtype=np.uint8,
            chunks=(1024, num_classes))
        self.file.attrs["num_classes"] = num_classes
        self.x = np.empty((buffer_rows, FEATURE_SIZE), dtype=np.float32)
        self.y = np.zeros((buffer_rows, num_classes), dtype=np.uint8)
        self.filled = 0
        self.count = 0

    def add(self, x, classes):
        self.x[self.filled] = x
        self.y[self.filled] = 0
        self.y[self.filled, classes] = 1
        self.filled += 1
        if self.filled == len(self.x):
            self.flush()

    def flush(self):
        if self.filled:
            end = self.count + self.filled
            self.features.resize(end, axis=0)
            self.labels.resize(end, axis=0)
            self.features[self.count:end] = self.x[:self.filled]
            self.labels[self.count:end] = self.y[:self.filled]
            self.count, self.filled = end, 0

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            self.flush()
        self.file.close()


def convert_split(files, split, vocabulary, out_dir):
    """Stream the records of `files` into the 16 task files of `split` (each written under
    a temporary name and renamed when complete). Returns (videos per task, videos)."""
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(TaskWriter(stack.enter_context(atomic_path(task_file(out_dir, split, t))),
                                                  vocabulary.num_classes[t]))
                   for t in range(len(TASKS))]
        videos = 0
        bar = tqdm(files, desc="%s files" % split, unit="file", disable=None)    # a bar on a terminal only
        for path in bar:
            for n, (video_id, labels, x) in enumerate(read_records(path)):
                tasks, classes = vocabulary.tasks_of(labels, "video %r (record %d of %s)"
                                                     % (video_id, n, path))
                for t in np.unique(tasks):
                    writers[t].add(x, classes[tasks == t])
                videos += 1
            bar.set_postfix(videos=videos)
        return [w.count + w.filled for w in writers], videos


def convert(vocabulary, train, valid, out_dir, seed=0, extra_info=None):
    """Convert the TFRecords matching the globs `train` / `valid` into `out_dir`.

    Returns the dictionary written to out_dir/tasks.json (plus `extra_info`).
    """
    vocab = Vocabulary(vocabulary)
    train_files = list_files(train, "train")
    valid_files, test_files = split_validate_files(list_files(valid, "validate"), seed)
    os.makedirs(out_dir, exist_ok=True)
    info = {"tasks": TASKS, "classes": vocab.classes, "num_classes": vocab.num_classes,
            "feature_size": FEATURE_SIZE, "seed": seed, "counts": {}, "videos": {}, "files": {}}
    for split, files in zip(SPLITS, (train_files, valid_files, test_files)):
        counts, videos = convert_split(files, split, vocab, out_dir)
        info["counts"][split] = counts
        info["videos"][split] = videos
        info["files"][split] = [os.path.basename(f) for f in files]
    info.update(extra_info or {})
    atomic_write_json(os.path.join(out_dir, "tasks.json"), info)
    return info


def read_task_names(data_dir, num_tasks):
    """The task names stored in data_dir/tasks.json, or None when there are none for
    `num_tasks` tasks (no file, or another number of tasks)."""
    path = os.path.join(data_dir, "tasks.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = json.load(f).get("tasks")
    if isinstance(names, list) and len(names) == num_tasks:
        return [str(n) for n in names]
    return None


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabulary", required=True, help="path of vocabulary.csv")
    parser.add_argument("--train", required=True, help="glob of the train TFRecords (quoted)")
    parser.add_argument("--valid", required=True, help="glob of the validate TFRecords (quoted)")
    parser.add_argument("--out", default=DEFAULT_DATA_PATH, help="output folder of the HDF5 files (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the valid/test file split")
    args = parser.parse_args(argv)
    info = convert(args.vocabulary, args.train, args.valid, args.out, args.seed)
    for split in SPLITS:
        print("%s: %d videos; per task %s" % (split, info["videos"][split], info["counts"][split]))
    return info


cli = entry_point(main)

if __name__ == "__main__":
    cli()
