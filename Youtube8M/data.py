"""Convert Youtube-8M video-level TFRecords into one HDF5 file per (split, task).

No TensorFlow is needed: records are read here (every record's length and data CRC-32C
checked) and parsed with the `tfrecord` package's protobuf classes.

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

Output in --out DIR (the layout of `Youtube8M.datafolder`):
  {split}_task_{t}.hdf5   datasets  features  float32 [N, 1152]  (mean_rgb then mean_audio)
                                    labels    uint8   [N, C_t]   (0/1)
                                    checksums uint32  [N / 512]  (CRC-32C of each 512 rows)
                          attributes num_classes = C_t, conversion = this conversion's id,
                                     checksum_rows = 512
  tasks.json              task names, class names per task, video counts per split and task,
                          and the manifest (conversion id, every file's rows and bytes)

Records are streamed: each task keeps a small buffer that is appended to resizable HDF5
datasets, so memory does not grow with the split. Nothing damaged gets through: a record
whose length or data fails its checksum, a file cut short, or a video with NaN or Inf
features stops the conversion with the file and the record number. The conversion is
written into a staging folder beside DIR, tasks.json last, and then replaces DIR as a
whole, so a killed conversion never leaves a mix of old and new files.

Usage:
  python -m Youtube8M.data --vocabulary vocabulary.csv \
      --train 'yt8m/train*.tfrecord' --valid 'yt8m/validate*.tfrecord' --out data/youtube8m
"""
import contextlib
import csv
import glob
import os
import random
import re
import shutil
import struct
import uuid

import h5py
import numpy as np
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter
from tqdm import tqdm

from Training import ArgumentParser, UserError, atomic_write_json, count, default_path, entry_point
from Training.atomic import process_alive
from Youtube8M.datafolder import CHECKSUM_ROWS, SPLITS, TASK_FILE, block_checksums, task_file

TASKS = [
    "Arts & Entertainment", "Games", "Autos & Vehicles", "Sports",
    "Food & Drink", "Computers & Electronics", "Business & Industrial", "Pets & Animals",
    "Hobbies & Leisure", "Beauty & Fitness", "Shopping", "Internet & Telecom",
    "Home & Garden", "Science", "Travel", "Law & Government",
]
RGB_SIZE, AUDIO_SIZE = 1024, 128
FEATURE_SIZE = RGB_SIZE + AUDIO_SIZE
VOCABULARY_COLUMNS = ("Index", "Name", "Vertical1")
DEFAULT_DATA_PATH = default_path("data", "youtube8m")


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
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError as e:
            raise UserError("vocabulary file %r is not UTF-8 text (%s); pass the vocabulary.csv of the Youtube-8M "
                            "release with --vocabulary" % (path, e)) from None
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


masked_crc = TFRecordWriter.masked_crc   # the 4 bytes of masked CRC-32C stored after a length and a payload


def read_tfrecord(path):
    """Yield the payload of every record of a TFRecord file, each checked against the
    CRC-32C of its length field and of its data; a damaged or cut-short record is a
    UserError naming the file and the record number."""
    def damaged(n, why):
        return UserError("%s: record %d %s; the file is damaged: download it again (nothing was converted)"
                         % (path, n, why))

    with open(path, "rb") as f:
        n = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise damaged(n, "is cut short inside its length field")
            length = struct.unpack("<Q", header[:8])[0]
            if masked_crc(header[:8]) != header[8:]:
                raise damaged(n, "has a length field that fails its checksum")
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                raise damaged(n, "is cut short (the file ends inside it)")
            if masked_crc(data) != footer:
                raise damaged(n, "fails its data checksum")
            yield data
            n += 1


def read_records(path):
    """Yield (video id, labels int64 [k], features float32 [1152]) for each record of a file."""
    for n, record in enumerate(read_tfrecord(path)):
        where = "record %d of %s" % (n, path)
        example = example_pb2.Example()
        try:
            example.ParseFromString(record)
        except Exception as e:      # protobuf's DecodeError
            raise UserError("%s is not a tf.train.Example (%s); video-level Youtube-8M records are needed"
                            % (where, e)) from None
        feature = example.features.feature
        if "labels" not in feature:
            raise UserError("%s has no feature 'labels'; video-level Youtube-8M records are "
                            "needed (id, labels, mean_rgb, mean_audio)" % where)
        kind = feature["labels"].WhichOneof("kind")
        if kind not in ("int64_list", None):
            raise UserError("%s: feature 'labels' is a %s, expected an int64_list of vocabulary indices; "
                            "video-level Youtube-8M records are needed" % (where, kind))
        x = np.empty(FEATURE_SIZE, dtype=np.float32)
        x[:RGB_SIZE] = _float_feature(feature, "mean_rgb", RGB_SIZE, where)
        x[RGB_SIZE:] = _float_feature(feature, "mean_audio", AUDIO_SIZE, where)
        video_id = feature["id"].bytes_list.value[0] if "id" in feature else b""
        if not np.isfinite(x).all():
            raise UserError("%s (video %r) has NaN or Inf features; the file is damaged: download it again"
                            % (where, video_id))
        labels = np.asarray(feature["labels"].int64_list.value, dtype=np.int64)
        yield video_id, labels, x


class TaskWriter:
    """Appends (features, labels) rows of one task to a resizable HDF5 file, in buffered
    chunks, with their block checksums (`Youtube8M.datafolder.Checksums`); a context
    manager that writes the last rows and closes the file on success."""

    def __init__(self, path, num_classes, conversion, buffer_rows=8 * CHECKSUM_ROWS):
        assert buffer_rows % CHECKSUM_ROWS == 0, "a flush must end on a checksum block"
        self.file = h5py.File(path, "w")
        self.file.attrs["conversion"] = conversion
        self.features = self.file.create_dataset(
            "features", (0, FEATURE_SIZE), maxshape=(None, FEATURE_SIZE), dtype=np.float32,
            chunks=(128, FEATURE_SIZE))
        self.labels = self.file.create_dataset(
            "labels", (0, num_classes), maxshape=(None, num_classes), dtype=np.uint8,
            chunks=(1024, num_classes))
        self.checksums = self.file.create_dataset("checksums", (0,), maxshape=(None,), dtype=np.uint32,
                                                  chunks=(1024,))
        self.file.attrs["num_classes"] = num_classes
        self.file.attrs["checksum_rows"] = CHECKSUM_ROWS
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
            sums = block_checksums(self.x[:self.filled], self.y[:self.filled])
            first = self.count // CHECKSUM_ROWS
            self.checksums.resize(first + len(sums), axis=0)
            self.checksums[first:] = sums
            self.count, self.filled = end, 0

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            self.flush()
        self.file.close()


def convert_split(files, split, vocabulary, out_dir, conversion):
    """Stream the records of `files` into the 16 task files of `split` in out_dir.
    Returns (videos per task, videos)."""
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(TaskWriter(task_file(out_dir, split, t), vocabulary.num_classes[t], conversion))
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


def check_output_folder(out_dir):
    """UserError if out_dir holds anything but a conversion (and raw/, kept as it is)."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise UserError("--out %s is a file, not a folder" % out_dir)
        return
    foreign = sorted(e for e in os.listdir(out_dir)
                     if not (TASK_FILE.match(e) or e in ("tasks.json", "raw") or e.startswith(".")))
    if foreign:
        raise UserError("--out %s holds files that a conversion did not write (%s): a conversion replaces "
                        "the whole folder, so convert into an empty folder or one a conversion wrote"
                        % (out_dir, ", ".join(foreign[:5])))


def replace_folder(staging, out_dir):
    """Put the finished staging folder in place of out_dir (its raw/ moves along)."""
    if os.path.isdir(os.path.join(out_dir, "raw")):
        os.replace(os.path.join(out_dir, "raw"), os.path.join(staging, "raw"))
    old = "%s.old-%d" % (out_dir, os.getpid())
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def remove_dead_staging(out_dir):
    """Clear what killed conversions left beside out_dir: their staging folders, the raw
    TFRecords of killed synthetic-data runs, and their old folders -- put back as out_dir if
    the kill fell between the two renames of the swap."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    pattern = re.compile(r"^%s\.(staging|old|raw)-(\d+)$" % re.escape(name))
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and not process_alive(int(match.group(2))):
            if match.group(1) == "old" and not os.path.exists(out_dir):
                os.replace(os.path.join(parent, entry), out_dir)
            else:
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def convert(vocabulary, train, valid, out_dir, seed=0, extra_info=None):
    """Convert the TFRecords matching the globs `train` / `valid` into `out_dir`, which is
    replaced as a whole when the conversion is complete.

    Returns the dictionary written to out_dir/tasks.json (plus `extra_info`).
    """
    vocab = Vocabulary(vocabulary)
    train_files = list_files(train, "train")
    valid_files, test_files = split_validate_files(list_files(valid, "validate"), seed)
    out_dir = os.path.abspath(out_dir)
    check_output_folder(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_dead_staging(out_dir)
    staging = "%s.staging-%d" % (out_dir, os.getpid())
    conversion = uuid.uuid4().hex
    info = {"tasks": TASKS, "classes": vocab.classes, "num_classes": vocab.num_classes,
            "feature_size": FEATURE_SIZE, "seed": seed, "counts": {}, "videos": {}, "files": {}}
    try:
        os.makedirs(staging)
        for split, files in zip(SPLITS, (train_files, valid_files, test_files)):
            counts, videos = convert_split(files, split, vocab, staging, conversion)
            empty = [TASKS[t] for t in range(len(TASKS)) if counts[t] == 0]
            if empty:
                raise UserError("the %s split (%s) has no video of %s %s: every task needs videos in every "
                                "split; give more files (nothing was converted)"
                                % (split, ", ".join(os.path.basename(f) for f in files[:3])
                                   + (", ..." if len(files) > 3 else ""),
                                   "task" if len(empty) == 1 else "tasks", ", ".join(map(repr, empty[:3]))
                                   + (" and %d more" % (len(empty) - 3) if len(empty) > 3 else "")))
            info["counts"][split] = counts
            info["videos"][split] = videos
            info["files"][split] = [os.path.basename(f) for f in files]
        info.update(extra_info or {})
        info["manifest"] = {"conversion": conversion, "checksum_rows": CHECKSUM_ROWS, "files": {
            os.path.basename(task_file(staging, split, t)): {
                "rows": info["counts"][split][t], "bytes": os.path.getsize(task_file(staging, split, t))}
            for split in SPLITS for t in range(len(TASKS))}}
        atomic_write_json(os.path.join(staging, "tasks.json"), info)       # last: the folder is complete
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabulary", required=True, help="path of vocabulary.csv")
    parser.add_argument("--train", required=True, help="glob of the train TFRecords (quoted)")
    parser.add_argument("--valid", required=True, help="glob of the validate TFRecords (quoted)")
    parser.add_argument("--out", default=DEFAULT_DATA_PATH, help="output folder of the HDF5 files (default %(default)s)")
    parser.add_argument("--seed", type=count(0), default=0, help="seed of the valid/test file split")
    args = parser.parse_args(argv)
    info = convert(args.vocabulary, args.train, args.valid, args.out, args.seed)
    for split in SPLITS:
        print("%s: %d videos; per task %s" % (split, info["videos"][split], info["counts"][split]))
    return info


cli = entry_point(main)

if __name__ == "__main__":
    cli()
