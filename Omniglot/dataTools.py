"""Omniglot data: seeded train/test lists, an HDF5 image cache and a fast batch sampler.

Expected under root (the two official zip files, unzipped; or the synthetic set of
`Omniglot/synthetic.py`):

    root/images_background/<Alphabet>/characterNN/<id>_<drawer>.png     (105x105)
    root/images_evaluation/<Alphabet>/characterNN/<id>_<drawer>.png

Every alphabet is one task and its characters are its classes: `characterNN` is label
NN - 1. Files written into root, in the formats of the original code:

    <Alphabet>_train.txt, <Alphabet>_test.txt   "<image path> <label>" per line; the path
                                                is relative to root
    train_list.txt, test_list.txt               one per-alphabet list file per line, in
                                                task order (relative to root)
    class_annotation.txt                        "<Alphabet> <number of characters>" per
                                                line, in task order
    omniglot_cache.hdf5                         the decoded images (see `build_cache`)

Split: each image goes to train with probability 0.9, else to test, drawn in order from
`random.Random(seed)`. Task order: the alphabets of both folders sorted by name (the
original took the unordered os.listdir order of one merged folder). Images, characters
and files are visited in sorted order, so the same seed gives the same lists everywhere.

Preprocessing follows the original: PIL opens the PNG and converts it to one-bit mode
('1'), giving values {0, 1} with background 1 and strokes 0; no inversion, no resizing,
no normalisation. The cache stores exactly these values as uint8, and the sampler turns
them into float tensors [B, 1, 105, 105].

    python -m Omniglot.dataTools --root data/omniglot [--seed 0]
"""
import hashlib
import os
import random
import re
import time

import h5py
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from Training import ArgumentParser, UserError, atomic_path, atomic_write_text, count, default_path, entry_point, real

IMAGE_SIZE = 105                     # Omniglot images are 105 x 105 pixels, used at full size
DEFAULT_DATA_ROOT = default_path("data", "omniglot")
SPLIT_FOLDERS = ("images_background", "images_evaluation")
SPLITS = ("train", "test")
CACHE_NAME = "omniglot_cache.hdf5"
CACHE_VERSION = 2                    # 2: Fletcher-32 checksums; keyed by the images' sizes and times


def _how_to_get_data(root):
    return (f"Put the Omniglot data in {root}: unzip images_background.zip and "
            "images_evaluation.zip from https://github.com/brendenlake/omniglot (folder "
            f"python/) there, or create the synthetic stand-in with "
            f"`python -m Omniglot.synthetic --root {root}`.")


def _how_to_prepare(root):
    return f"Run `python -m Omniglot.dataTools --root {root}` to write the lists and the cache."


def _visible_entries(folder):
    return sorted(e for e in os.listdir(folder) if not e.startswith("."))


def find_alphabets(root):
    """[(alphabet, folder)] of both image folders, sorted by alphabet name (= task order)."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist. " + _how_to_get_data(root))
    found = {}
    for split_folder in SPLIT_FOLDERS:
        folder = os.path.join(root, split_folder)
        if not os.path.isdir(folder):
            raise UserError(f"{folder} is missing. " + _how_to_get_data(root))
        for name in _visible_entries(folder):
            path = os.path.join(folder, name)
            if not os.path.isdir(path):
                continue
            if name in found:
                raise UserError(f"alphabet {name} is in both {found[name]} and {path}; "
                                "alphabet names must be unique")
            found[name] = path
    if not found:
        raise UserError(f"no alphabet folders in {root}/images_background or "
                        f"{root}/images_evaluation. " + _how_to_get_data(root))
    return sorted(found.items())


def list_images(alphabet_dir):
    """(number of characters, [(png path, label)]) of one alphabet, in sorted order.

    The label of `characterNN` is NN - 1 (its last two characters, as in the original).
    """
    chars = [c for c in _visible_entries(alphabet_dir)
             if os.path.isdir(os.path.join(alphabet_dir, c))]
    if not chars:
        raise UserError(f"alphabet folder {alphabet_dir} is empty (no characterNN folders); "
                        "re-extract the data or regenerate the synthetic set")
    items = []
    for c in chars:
        if not re.search(r"\d\d$", c):
            raise UserError(f"character folder {os.path.join(alphabet_dir, c)} does not end "
                            "in a two-digit number like character01")
        label = int(c[-2:]) - 1
        if not 0 <= label < len(chars):
            raise UserError(f"character folder {os.path.join(alphabet_dir, c)} gives label "
                            f"{label}, outside 0..{len(chars) - 1}: the folders of an alphabet "
                            "must be numbered character01..characterK")
        char_dir = os.path.join(alphabet_dir, c)
        files = [f for f in _visible_entries(char_dir) if f.lower().endswith(".png")]
        if not files:
            raise UserError(f"character folder {char_dir} holds no PNG images")
        items += [(os.path.join(char_dir, f), label) for f in files]
    return len(chars), items


def write_split_lists(root, seed=0, train_fraction=0.9):
    """Write the per-alphabet train/test lists, train_list.txt, test_list.txt and
    class_annotation.txt into root. Returns {alphabet: (classes, n_train, n_test)}."""
    if not 0.0 < train_fraction < 1.0:
        raise UserError(f"train_fraction must be in (0, 1), got {train_fraction}")
    rng = random.Random(seed)
    summary, lines = {}, {"train": [], "test": [], "class": []}
    for alphabet, folder in find_alphabets(root):
        n_classes, items = list_images(folder)
        parts = {"train": [], "test": []}
        for path, label in items:
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            split = "train" if rng.random() < train_fraction else "test"
            parts[split].append(f"{rel} {label}\n")
        for split in SPLITS:
            atomic_write_text(os.path.join(root, f"{alphabet}_{split}.txt"), "".join(parts[split]))
            lines[split].append(f"{alphabet}_{split}.txt\n")
        lines["class"].append(f"{alphabet} {n_classes}\n")
        summary[alphabet] = (n_classes, len(parts["train"]), len(parts["test"]))
    atomic_write_text(os.path.join(root, "train_list.txt"), "".join(lines["train"]))
    atomic_write_text(os.path.join(root, "test_list.txt"), "".join(lines["test"]))
    atomic_write_text(os.path.join(root, "class_annotation.txt"), "".join(lines["class"]))
    return summary


def _resolve(root, path):
    return path if os.path.isabs(path) else os.path.join(root, path)


def _read_lines(path, root):
    if not os.path.exists(path):
        raise UserError(f"{path} is missing. " + _how_to_prepare(root))
    with open(path) as f:
        return [(i + 1, line.rstrip("\n")) for i, line in enumerate(f) if line.strip()]


def read_class_annotation(root):
    """[(alphabet, number of classes)] in task order, from class_annotation.txt."""
    path = os.path.join(root, "class_annotation.txt")
    out = []
    for number, line in _read_lines(path, root):
        parts = line.rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path} line {number}: expected '<Alphabet> <classes>', got {line!r}")
        out.append((parts[0], int(parts[1])))
    return out


def read_split_lists(root, split):
    """[(alphabet, [(image path, label)])] in task order for split 'train' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    for number, entry in _read_lines(os.path.join(root, f"{split}_list.txt"), root):
        name = os.path.basename(entry)
        if not name.endswith(f"_{split}.txt"):
            raise UserError(f"{split}_list.txt line {number}: {entry!r} is not an "
                            f"'<Alphabet>_{split}.txt' file")
        list_path = _resolve(root, entry)
        items = []
        for line_no, line in _read_lines(list_path, root):
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{list_path} line {line_no}: expected '<path> <label>', "
                                f"got {line!r}")
            items.append((_resolve(root, parts[0]), int(parts[1])))
        out.append((name[:-len(f"_{split}.txt")], items))
    return out


def load_image(path, size=IMAGE_SIZE):
    """One image as the original reads it: PIL, one-bit mode, values {0, 1} as uint8 [H, W]."""
    try:
        with Image.open(path) as img:
            if img.size != (size, size):
                raise UserError(f"{path}: image is {img.size[0]}x{img.size[1]}, expected "
                                f"{size}x{size} (Omniglot images are used at full size)")
            return np.asarray(img.convert("1"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({e}): re-extract the data set") from None


def _sources_fingerprint(root):
    """sha1 of the lists (every alphabet's class count, and every image's path, relative to
    root, and label in both splits) and of the size and modification time of every listed
    image, so a cache built from other lists or from images edited since is noticed."""
    h = hashlib.sha1()
    for alphabet, n_classes in read_class_annotation(root):
        h.update(f"{alphabet} {n_classes}\n".encode())
    for split in SPLITS:
        for alphabet, items in read_split_lists(root, split):
            h.update(f"{split} {alphabet}\n".encode())
            for image, label in items:
                try:
                    stat = os.stat(image)
                    size_time = f"{stat.st_size} {stat.st_mtime_ns}"
                except OSError:
                    size_time = "missing"            # build_cache names it
                h.update(f"{os.path.relpath(image, root)} {label} {size_time}\n".encode())
    return h.hexdigest()


def cache_path(root):
    return os.path.join(root, CACHE_NAME)


def cache_is_current(root):
    """True when the cache exists and was built from the lists and images now in root."""
    path = cache_path(root)
    if not os.path.exists(path):
        return False
    try:
        f = h5py.File(path, "r")
    except OSError:         # damaged (e.g. a copy cut short): rebuilt from the images
        return False
    with f:
        if f.attrs.get("version") != CACHE_VERSION:
            return False
        return f.attrs.get("sources_sha1") == _sources_fingerprint(root)


def build_cache(root, size=IMAGE_SIZE):
    """Decode every listed image once into root/omniglot_cache.hdf5 (written atomically).

    Layout: /<split>/<alphabet>/images uint8 [N, size, size] (values {0, 1}),
            /<split>/<alphabet>/labels int64 [N]; attribute num_classes on the alphabet
            group; file attributes tasks (task order), sources_sha1, version, image_size.
    Every data set carries HDF5's Fletcher-32 checksums, checked by h5py on every read.
    """
    classes = read_class_annotation(root)
    tasks = [name for name, _ in classes]
    fingerprint = _sources_fingerprint(root)
    path = cache_path(root)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["version"] = CACHE_VERSION
        f.attrs["image_size"] = size
        f.attrs["sources_sha1"] = fingerprint
        f.attrs["tasks"] = "\n".join(tasks)
        for split in SPLITS:
            lists = read_split_lists(root, split)
            if [name for name, _ in lists] != tasks:
                raise UserError(f"{split}_list.txt and class_annotation.txt name different "
                                "alphabets or orders. " + _how_to_prepare(root))
            for (alphabet, items), (_, n_classes) in zip(lists, classes):
                images = np.zeros((len(items), size, size), dtype=np.uint8)
                labels = np.zeros(len(items), dtype=np.int64)
                for i, (img_path, label) in enumerate(items):
                    if not 0 <= label < n_classes:
                        raise UserError(f"{img_path}: label {label} outside 0..{n_classes - 1} "
                                        f"of alphabet {alphabet}. " + _how_to_prepare(root))
                    images[i] = load_image(img_path, size)
                    labels[i] = label
                g = f.create_group(f"{split}/{alphabet}")
                g.attrs["num_classes"] = n_classes
                if len(items):
                    chunks = (min(len(items), 64), size, size)
                    g.create_dataset("images", data=images, chunks=chunks, compression="lzf", fletcher32=True)
                    g.create_dataset("labels", data=labels, fletcher32=True)
                else:  # a tiny alphabet may have no test image
                    g.create_dataset("images", data=images)
                    g.create_dataset("labels", data=labels)
    return path


def prepare(root, seed=0, train_fraction=0.9, force=False):
    """Write the lists (if absent, or always with force) and (re)build a stale cache."""
    if force or not os.path.exists(os.path.join(root, "class_annotation.txt")):
        write_split_lists(root, seed=seed, train_fraction=train_fraction)
    if force or not cache_is_current(root):
        build_cache(root)
    return cache_path(root)


class TaskPasses:
    """Where every task's shuffled pass stands: the sampling state of one run.

    `order[t]` is the current random order of task t's images (global indices, or None
    before the first draw) and `cursor[t]` how many of them were drawn. Each run keeps its
    own, so several runs can draw from one `OmniglotData` without disturbing each other."""

    def __init__(self, num_tasks):
        self.order = [None] * num_tasks
        self.cursor = [0] * num_tasks

    def state_dict(self):
        empty = torch.zeros(0, dtype=torch.long)
        return {"order": [empty if o is None else o.cpu() for o in self.order],
                "cursor": torch.tensor(self.cursor, dtype=torch.long)}

    def load_state_dict(self, state):
        if len(state["order"]) != len(self.order):
            raise ValueError(f"the sampling state has {len(state['order'])} alphabets, the data "
                             f"{len(self.order)}")
        self.order = [o if o.numel() else None for o in state["order"]]
        self.cursor = [int(c) for c in state["cursor"]]


class OmniglotData:
    """All images of one split in memory (uint8, on `device`), with per-task batching.

        data = OmniglotData(root, "train", device)
        x, y, task_ids = data.sample_all(5, generator)  # 5 images of each task, one tensor
        for x, y in data.task_batches(t, 256): ...       # every image of task t, in order

    x is float [B, 1, 105, 105] in {0, 1}, y the class (long [B]) within its task,
    task_ids the task (long [B]). Sampling goes through each task's images in a random
    order and reshuffles when fewer than batch_size are left, like a shuffled per-task
    DataLoader that drops the last incomplete batch. `generator` is a CPU torch.Generator
    (or None for the global one); the batches are built on `device`. Where each task's
    pass stands is a `TaskPasses` object: the data's own by default, or one per run
    (`new_passes()`) when several runs draw from the same data.

    `alphabets=N` keeps only the first N alphabets (in task order) of the lists.
    """

    def __init__(self, root, split="train", device="cpu", build=True, alphabets=None):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        classes = read_class_annotation(root)
        if alphabets is not None:
            if not 1 <= alphabets <= len(classes):
                raise UserError(f"--alphabets must be in 1..{len(classes)} ({root} lists {len(classes)} "
                                f"alphabets), got {alphabets}")
            classes = classes[:alphabets]
        if not cache_is_current(root):
            if not build:
                raise UserError(f"{cache_path(root)} is missing or older than the lists or "
                                "images. " + _how_to_prepare(root))
            build_cache(root)
        self.root, self.split, self.device = root, split, torch.device(device)
        self.tasks = [name for name, _ in classes]
        self.num_classes = [n for _, n in classes]
        try:
            images, labels = self._read_cache()
        except OSError as e:           # a chunk fails its checksum (or cannot be decoded)
            if not build:
                raise UserError(f"{cache_path(root)} is damaged ({e}). " + _how_to_prepare(root)) from None
            print(f"{cache_path(root)} is damaged ({e}): building it again from the images", flush=True)
            build_cache(root)
            images, labels = self._read_cache()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.task_ids = torch.repeat_interleave(torch.arange(len(self.tasks)),
                                                torch.tensor(self.sizes)).to(self.device)
        self.passes = self.new_passes()

    def _read_cache(self):
        """(images uint8 [N, S, S], labels int64 [N]) of this split's tasks from the cache,
        every chunk checked against its checksum; sets sizes and image_size."""
        with h5py.File(cache_path(self.root), "r") as f:
            groups = [f[self.split][name] for name in self.tasks]
            self.sizes = [g["labels"].shape[0] for g in groups]
            self.image_size = int(f.attrs["image_size"])
            total = sum(self.sizes)
            images = np.empty((total, self.image_size, self.image_size), dtype=np.uint8)
            labels = np.empty(total, dtype=np.int64)
            start = 0
            for g, n in zip(groups, self.sizes):
                if n:
                    g["images"].read_direct(images, dest_sel=np.s_[start:start + n])
                    labels[start:start + n] = g["labels"][...]
                start += n
        return images, labels

    @property
    def num_tasks(self):
        return len(self.tasks)

    def __len__(self):
        return int(self.offsets[-1])

    def new_passes(self):
        """A fresh sampling state: the next draw of every task starts a new shuffled pass."""
        return TaskPasses(self.num_tasks)

    def _check_task(self, task):
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in 0..{self.num_tasks - 1}, got {task}")

    def _take(self, task, batch_size, generator, passes):
        """Next batch_size global indices of a task's shuffled pass (CPU long tensor)."""
        n = self.sizes[task]
        if not 1 <= batch_size <= n:
            raise UserError(f"batch_size must be in 1..{n} for task {task} ({self.tasks[task]} "
                            f"has {n} {self.split} images), got {batch_size}")
        passes = passes or self.passes
        if passes.order[task] is None or passes.cursor[task] + batch_size > n:
            passes.order[task] = torch.randperm(n, generator=generator) + int(self.offsets[task])
            passes.cursor[task] = 0
        start = passes.cursor[task]
        passes.cursor[task] = start + batch_size
        return passes.order[task][start:start + batch_size]

    def gather(self, idx):
        """(x float [..., 1, H, W], y long [...]) of the images with global indices idx (any shape)."""
        flat = idx.reshape(-1).to(self.device)  # index_select: much faster than images[idx] for uint8
        x = torch.index_select(self.images, 0, flat).view(*idx.shape, 1, self.image_size, self.image_size)
        return x.float(), torch.index_select(self.labels, 0, flat).view(idx.shape)

    def sample_batch(self, task, batch_size, generator=None, passes=None):
        """(x [b, 1, H, W] float, y [b] long) of one task."""
        self._check_task(task)
        return self.gather(self._take(task, batch_size, generator, passes))

    def draw_all(self, batch_size, generator=None, passes=None):
        """Global indices [T * batch_size] of the next batch_size images of every task, task
        after task (what `sample_all` gathers)."""
        return torch.cat([self._take(t, batch_size, generator, passes) for t in range(self.num_tasks)])

    def all_task_ids(self, batch_size):
        """The task ids [T * batch_size] of a `sample_all(batch_size)` batch."""
        return torch.arange(self.num_tasks, device=self.device).repeat_interleave(batch_size)

    def sample_all(self, batch_size, generator=None, passes=None):
        """batch_size images of every task, task after task: (x [T*b, 1, H, W], y, task_ids)."""
        x, y = self.gather(self.draw_all(batch_size, generator, passes))
        return x, y, self.all_task_ids(batch_size)

    def balanced_batches(self, per_task):
        """Yield (x, y, task_ids) over every image once: step j holds images
        [j * per_task, (j + 1) * per_task) of every task (fewer at the end of a task), so
        every step has about the same number of images of each task."""
        starts, stops = self.offsets[:-1].tolist(), self.offsets[1:].tolist()
        for j in range(self.balanced_steps(per_task)):
            idx = torch.cat([torch.arange(min(a + j * per_task, b), min(a + (j + 1) * per_task, b))
                             for a, b in zip(starts, stops)])
            x, y = self.gather(idx)
            yield x, y, torch.index_select(self.task_ids, 0, idx.to(self.device))

    def balanced_steps(self, per_task):
        """Number of steps of `balanced_batches(per_task)`."""
        return max((-(-n // per_task) for n in self.sizes), default=0)

    def task_batches(self, task, batch_size):
        """Yield (x, y) over every image of one task, in list order."""
        self._check_task(task)
        start, stop = int(self.offsets[task]), int(self.offsets[task + 1])
        for s in range(start, stop, batch_size):
            yield self.gather(torch.arange(s, min(s + batch_size, stop)))

    def batches(self, batch_size):
        """Yield (x, y, task_ids) over the whole split in task order (batches may span tasks)."""
        for s in range(0, len(self), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(self)))
            x, y = self.gather(idx)
            yield x, y, torch.index_select(self.task_ids, 0, idx.to(self.device))


def main(argv=None):
    p = ArgumentParser(description="Write the seeded Omniglot train/test lists and "
                       "the HDF5 image cache into the data folder.")
    p.add_argument("--root", default=DEFAULT_DATA_ROOT,
                   help="folder holding images_background/ and images_evaluation/ (default %(default)s)")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the 90/10 split")
    p.add_argument("--train_fraction", type=real(above=0, below=1), default=0.9)
    args = p.parse_args(argv)
    start = time.time()
    summary = write_split_lists(args.root, seed=args.seed, train_fraction=args.train_fraction)
    build_cache(args.root)
    n_train = sum(s[1] for s in summary.values())
    n_test = sum(s[2] for s in summary.values())
    n_classes = sum(s[0] for s in summary.values())
    print(f"{len(summary)} alphabets, {n_classes} characters: {n_train} train and {n_test} test "
          f"images (seed {args.seed}); lists and {CACHE_NAME} written to {args.root} "
          f"in {time.time() - start:.1f} s")


cli = entry_point(main)

if __name__ == "__main__":
    cli()
