"""Built-in SYNTHETIC Youtube-8M-like data with a planted multi-task structure.

The generator writes a small vocabulary.csv and video-level TFRecords in exactly the
schema of the real release (id, labels, mean_rgb [1024], mean_audio [128]; files
train*.tfrecord and validate*.tfrecord), then runs them through the same converter as
real data (`Youtube8M.data.convert`), so the HDF5 files and tasks.json have the real layout.

Generative model (all draws from one seeded numpy generator):
  * 16 tasks = the 16 verticals of `Youtube8M.data.TASKS`, with C_t classes drawn in
    [3, 12]. The vocabulary also holds a few entries of a vertical outside the 16 tasks
    (never used as labels) and is listed in shuffled order, so the converter's
    renumbering is exercised.
  * Shared latent factors: every video has a latent code z ~ N(0, I_d) (d = `latent_dim`),
    and its features are x = z P + `feature_noise` * N(0, I) with ONE random projection
    P [d, 1152] (entries N(0, 1/d)) shared by all tasks. Every class c of task t has a
    unit direction m_{t,c} in the latent space; its evidence is s = m_{t,c} . z ~ N(0, 1).
  * Planted groups (`GROUPS`): tasks {0-3}, {4-7}, {8-11}, {12-15}. Group g links the
    evidence to the labels through its own function
        link_g(s) = (1 - e_g) s + e_g |s|,    e_g = `EVENNESS`[g] = 0, 0.45, 0.75, 1,
    from odd (a class is likely when s is large) to even (a class is likely when |s| is
    large, whatever its sign). A shared first layer then sees the same pre-activation
    directions for all tasks, but the best activation of those pre-activations differs by
    group (close to the identity/ReLU for e = 0, to |a| for e = 1): the groups differ in
    the activation function they need, which is what TAAN learns per task.
  * A video picks a primary task with probability proportional to a per-task weight (so
    the tasks have different sizes) and, with probability `second_task_prob`, a second
    task (from the same group with probability 0.75). It gets 1 + Poisson(2) labels
    (about 3, at least one per chosen task) spread over its tasks. Inside task t its k
    classes are the k largest keys log p_{t,c} + `link_strength` * link_g(s_{t,c}) + Gumbel
    noise (p_t: a skewed class distribution), i.e. drawn without replacement with
    probabilities ~ p_{t,c} exp(link_strength * link_g(s_{t,c})).

The planted groups are stored in tasks.json under "synthetic_groups" (with the generator
settings under "synthetic_config"), so the visualiser and tests can compare them with a
trained TAAN's task-distance matrices.

Usage:
  python -m Youtube8M.synthetic --out data/youtube8m [--seed 0] [--num_train 20000] [--num_valid 6000]
"""
import csv
import os
import shutil

import numpy as np
from tfrecord.writer import TFRecordWriter
from tqdm import tqdm

from Training import ArgumentParser, atomic_path, count, entry_point, real
from Youtube8M.data import AUDIO_SIZE, DEFAULT_DATA_PATH, FEATURE_SIZE, RGB_SIZE, TASKS, convert
from Youtube8M.datafolder import read_tasks_json, task_file

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
OFF_TASK_VERTICAL = "Reference"
EVENNESS = (0.0, 0.45, 0.75, 1.0)      # e_g of the link function of group g
DEFAULTS = dict(num_train=20000, num_valid=6000, train_files=4, valid_files=4, latent_dim=16,
                link_strength=12.0, feature_noise=0.5, second_task_prob=0.35)


class SyntheticVideos:
    """The seeded generative model; `sample(n)` draws n videos (label lists and features)."""

    def __init__(self, seed=0, latent_dim=16, link_strength=12.0, feature_noise=0.5,
                 second_task_prob=0.35, **file_settings):
        rng = self.rng = np.random.default_rng(seed)
        T, d = len(TASKS), latent_dim
        self.group_of = np.zeros(T, dtype=np.int64)
        for g, tasks in enumerate(GROUPS):
            self.group_of[tasks] = g
        self.num_classes = rng.integers(3, 13, size=T)
        self.task_weight = rng.uniform(0.4, 2.0, size=T)
        self.class_prob = [rng.dirichlet(np.full(c, 2.0)) for c in self.num_classes]
        self.directions = []                                                   # [C_t, d] unit rows
        for c in self.num_classes:
            m = rng.standard_normal((c, d))
            self.directions.append(m / np.linalg.norm(m, axis=1, keepdims=True))
        self.proj = (rng.standard_normal((d, FEATURE_SIZE)) / np.sqrt(d)).astype(np.float32)
        self.evenness = np.asarray(EVENNESS)[self.group_of]                    # e_g of every task
        self.latent_dim, self.link_strength, self.feature_noise = d, link_strength, feature_noise
        self.second_task_prob = second_task_prob

    def link(self, t, s):
        """link_g(s) = (1 - e_g) s + e_g |s| for task t (g its group)."""
        e = self.evenness[t]
        return (1.0 - e) * s + e * np.abs(s)

    def _tasks(self, n):
        """Primary task of every video, and the second task (-1: none)."""
        rng, T, w = self.rng, len(TASKS), self.task_weight
        primary = rng.choice(T, size=n, p=w / w.sum())
        second = np.full(n, -1)
        has_second = rng.random(n) < self.second_task_prob
        want_same = rng.random(n) < 0.75
        for t in range(T):
            for same in (True, False):
                rows = np.flatnonzero(has_second & (primary == t) & (want_same == same))
                allowed = (self.group_of == self.group_of[t]) == same
                allowed[t] = False
                p = w * allowed
                second[rows] = rng.choice(T, size=len(rows), p=p / p.sum())
        return primary, second

    def _label_counts(self, primary, second):
        """About 3 labels per video (1 + Poisson(2)), at least one per chosen task."""
        rng, C = self.rng, self.num_classes
        two = second >= 0
        cap1, cap2 = C[primary], np.where(two, C[second], 0)
        k = np.clip(1 + rng.poisson(2.0, len(primary)), 1 + two, cap1 + cap2)
        n1 = np.where(two, 1 + rng.binomial(k - 2 * two, 0.5), k)
        n1 = np.clip(n1, k - cap2, cap1)
        return n1, k - n1

    def sample(self, n, return_latent=False):
        """Draw n videos: list of [(task, class), ...] per video and features float32 [n, 1152]
        (and the latent codes z [n, d] with return_latent)."""
        rng, d = self.rng, self.latent_dim
        primary, second = self._tasks(n)
        n1, n2 = self._label_counts(primary, second)
        video = np.concatenate([np.arange(n), np.flatnonzero(second >= 0)])
        task = np.concatenate([primary, second[second >= 0]])
        count = np.concatenate([n1, n2[second >= 0]])
        labels = [[] for _ in range(n)]
        z = rng.standard_normal((n, d))
        for t in range(len(TASKS)):
            rows = np.flatnonzero(task == t)
            s = z[video[rows]] @ self.directions[t].T                        # evidence [r, C_t]
            # classes without replacement by the Gumbel-top-k trick: the count[i] largest
            # keys log p + strength * link(s) + Gumbel; chosen[j, c] = 1 when c is among them
            keys = (np.log(self.class_prob[t]) + self.link_strength * self.link(t, s)
                    + rng.gumbel(size=s.shape))
            rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
            chosen = rank < count[rows][:, None]
            for j, c in zip(*np.nonzero(chosen)):
                labels[video[rows[j]]].append((t, int(c)))
        x = z.astype(np.float32) @ self.proj
        x += self.feature_noise * rng.standard_normal((n, FEATURE_SIZE), dtype=np.float32)
        return (labels, x, z) if return_latent else (labels, x)


def _vocabulary_layout(rng, num_classes, num_off_task=4):
    """Shuffled vocabulary: returns rows (vertical, class or -1) and index_of[t][c]."""
    entries = [(t, c) for t in range(len(TASKS)) for c in range(num_classes[t])]
    entries += [(-1, -1)] * num_off_task
    entries = [entries[i] for i in rng.permutation(len(entries))]
    # class c of task t is the c-th entry of task t in Index order (the converter's numbering)
    index_of = [[] for _ in TASKS]
    for i, (t, _) in enumerate(entries):
        if t >= 0:
            index_of[t].append(i)
    return [t for t, _ in entries], index_of


def write_vocabulary(path, entry_task, train_counts):
    local = {t: 0 for t in range(len(TASKS))}
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl",
                     "Vertical1", "Vertical2", "Vertical3", "WikiDescription"])
        for i, t in enumerate(entry_task):
            if t >= 0:
                name, vertical = "Synthetic %s %d" % (TASKS[t], local[t]), TASKS[t]
                local[t] += 1
            else:
                name, vertical = "Synthetic off-task %d" % i, OFF_TASK_VERTICAL
            w.writerow([i, int(train_counts[i]), "/m/synthetic%d" % i, name, "", vertical, "", "",
                        "Synthetic class, no real video category."])


def generate_tfrecords(raw_dir, seed=0, **config):
    """Write vocabulary.csv, train%04d.tfrecord and validate%04d.tfrecord into raw_dir.

    Returns a dict with the planted groups, class counts and the per-video labels
    ("video_labels": {split: list of lists of vocabulary indices}).
    """
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise TypeError("unknown synthetic data setting(s) %s; known: %s"
                        % (sorted(unknown), sorted(DEFAULTS)))
    cfg = dict(DEFAULTS, **config)
    os.makedirs(raw_dir, exist_ok=True)
    model = SyntheticVideos(seed, **cfg)
    entry_task, index_of = _vocabulary_layout(model.rng, model.num_classes)
    train_counts = np.zeros(len(entry_task), dtype=np.int64)
    video_labels = {}
    for split, prefix, n, n_files in (("train", "train", cfg["num_train"], cfg["train_files"]),
                                      ("validate", "validate", cfg["num_valid"], cfg["valid_files"])):
        writers = [TFRecordWriter(os.path.join(raw_dir, "%s%04d.tfrecord" % (prefix, i)))
                   for i in range(n_files)]
        video_labels[split] = []
        for start in tqdm(range(0, n, 4096), desc="synthetic %s videos" % split, unit="chunk",
                          leave=False, disable=None):
            labels, x = model.sample(min(4096, n - start))
            for v, (video, row) in enumerate(zip(labels, x), start):
                ids = sorted(index_of[t][c] for t, c in video)
                if split == "train":
                    train_counts[ids] += 1
                video_labels[split].append(ids)
                writers[v % n_files].write({
                    "id": (("syn%s%06d" % (split[0], v)).encode(), "byte"),
                    "labels": (ids, "int"),
                    "mean_rgb": (row[:RGB_SIZE].tolist(), "float"),
                    "mean_audio": (row[RGB_SIZE:RGB_SIZE + AUDIO_SIZE].tolist(), "float")})
        for w in writers:
            w.close()
    write_vocabulary(os.path.join(raw_dir, "vocabulary.csv"), entry_task, train_counts)
    return {"synthetic_groups": GROUPS, "num_classes": model.num_classes.tolist(),
            "synthetic_config": dict(cfg, seed=seed), "video_labels": video_labels}


def make_synthetic_data(out_dir, seed=0, keep_raw=False, **config):
    """Generate synthetic TFRecords and convert them into out_dir (HDF5 + tasks.json).

    The TFRecords are written into out_dir.raw-PID beside out_dir (kept as out_dir/raw with
    keep_raw; a killed run's is removed by the next conversion into out_dir). Returns
    tasks.json's dict.
    """
    out_dir = os.path.abspath(out_dir)
    raw_dir = "%s.raw-%d" % (out_dir, os.getpid())
    shutil.rmtree(raw_dir, ignore_errors=True)
    os.makedirs(raw_dir)
    try:
        gen = generate_tfrecords(raw_dir, seed, **config)
        extra = {"synthetic": True, "synthetic_groups": gen["synthetic_groups"],
                 "synthetic_config": gen["synthetic_config"]}
        info = convert(os.path.join(raw_dir, "vocabulary.csv"), os.path.join(raw_dir, "train*.tfrecord"),
                       os.path.join(raw_dir, "validate*.tfrecord"), out_dir, seed, extra)
        if keep_raw:
            shutil.rmtree(os.path.join(out_dir, "raw"), ignore_errors=True)
            os.replace(raw_dir, os.path.join(out_dir, "raw"))
        return info
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


def data_present(data_dir):
    """True when data_dir holds data (tasks.json or a first task file), synthetic or not."""
    return os.path.isfile(os.path.join(data_dir, "tasks.json")) or os.path.isfile(task_file(data_dir, "train", 0))


def ensure_builtin_data(data_dir=DEFAULT_DATA_PATH, seed=0, **config):
    """Create the built-in synthetic data in data_dir unless data is already there.

    Existing data (synthetic or real) is left untouched (the loader checks it), except
    built-in data written before task files carried checksums, which is made again. Returns
    data_dir. In distributed runs call it on one process and wait (barrier) before the
    others read.
    """
    if not data_present(data_dir) or _unchecked_builtin(data_dir):
        make_synthetic_data(data_dir, seed, **config)
    return data_dir


def _unchecked_builtin(data_dir):
    info = read_tasks_json(data_dir) or {}
    return bool(info.get("synthetic")) and "checksum_rows" not in info.get("manifest", {})


def main(argv=None):
    parser = ArgumentParser(description="Write the built-in synthetic Youtube-8M-like data.")
    parser.add_argument("--out", default=DEFAULT_DATA_PATH, help="output folder (default %(default)s)")
    parser.add_argument("--seed", type=count(0), default=0)
    for key in ("num_train", "num_valid", "train_files", "valid_files", "latent_dim"):
        parser.add_argument("--" + key, type=count(1), default=DEFAULTS[key])
    for key in ("link_strength", "feature_noise"):
        parser.add_argument("--" + key, type=real(low=0), default=DEFAULTS[key])
    parser.add_argument("--second_task_prob", type=real(low=0, high=1), default=DEFAULTS["second_task_prob"])
    parser.add_argument("--keep_raw", action="store_true", help="keep the TFRecords in OUT/raw")
    args = vars(parser.parse_args(argv))
    args.pop("debug")                     # the shared flag of every command line, not a data setting
    out, seed, keep_raw = args.pop("out"), args.pop("seed"), args.pop("keep_raw")
    info = make_synthetic_data(out, seed, keep_raw, **args)
    print("synthetic data in %s: train %d, valid %d, test %d videos; groups %s"
          % (out, info["videos"]["train"], info["videos"]["valid"], info["videos"]["test"],
             info["synthetic_groups"]))
    return info


cli = entry_point(main)

if __name__ == "__main__":
    cli()
