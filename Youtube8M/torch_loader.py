"""Batched, seeded, shardable loaders over the per-task HDF5 files of Youtube8M/data.py.

    loaders, num_classes = MultiTask_Dataloader('train', batch_size=256, seed=0)
    steps = TrainSteps(loaders)                  # one batch of every task per training step
    for epoch in range(max_epoch):
        steps.set_epoch(epoch)                   # like DistributedSampler.set_epoch
        for xs, ys in steps:                     # xs[t] features [b, D], ys[t] labels [b, C_t]
            ...
    for x, y in loaders[t]: ...                  # one pass over task t (evaluation)

Reading. A task's arrays are loaded into memory when they take at most `max_memory_mb`
(always the case for the built-in synthetic data and for valid/test); a batch is then one
numpy gather. Larger files are streamed: the rows are cut into blocks of `block_rows`
contiguous rows, the blocks are shuffled, `chunk_blocks` blocks at a time are read with
contiguous HDF5 slices and their rows are shuffled together. There is never one HDF5 read
per sample.

Order. The sample order of an epoch is a permutation drawn from
np.random.default_rng([seed, task, epoch, cycle]) (cycle counts the restarts of the loaders inside
one TrainSteps epoch), so it is the same for the same seed and epoch -- a resumed run
sees the same batches -- and differs across epochs. shuffle=False gives file order.

Sharding. All ranks draw the same order. Global batch i covers the positions
[i*B*W, (i+1)*B*W) of the order (B = batch_size, W = world_size) and rank r takes the r-th
B of them, so ranks are disjoint, cover the data, and all have the same number of batches.
With drop_last=False the last, partial global batch is split as evenly as possible (a rank's
last batch may be smaller, and empty if fewer than W samples are left).

Data: DEFAULT_DATA_PATH is data/youtube8m under the project's home folder (the checkout, or
$TAAN_HOME; see Training.runtime.project_home), where `python -m Youtube8M.synthetic` writes
by default.
"""
import queue
import threading

import h5py
import numpy as np
import torch

from Training import UserError
from Youtube8M.data import DEFAULT_DATA_PATH
from Youtube8M.datafolder import (SPLITS, Checksums, check_file_values, check_values, file_shape, read_data_folder,
                                  task_file)


class _Failure:
    def __init__(self, error):
        self.error = error


def _prefetch(batches, depth):
    """Run the generator `batches` in a background thread, `depth` batches ahead."""
    q, stop, done = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:
            put(_Failure(e))
        finally:
            batches.close()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


class TaskLoader:
    """Batches (features float32 [b, D], labels float32 [b, C]) of one task file.

    len(loader) is the number of batches per epoch, the same on every rank. The file's
    values (finite features, 0/1 labels) are checked once, here, unless `checked` says the
    converter has checked them. A file with checksums (the converter's) has every block
    checked against them as it is read (`block_rows` is rounded up to whole checksum blocks).
    """

    def __init__(self, path, batch_size, shuffle=True, seed=0, rank=0, world_size=1,
                 drop_last=False, num_workers=0, task=0, in_memory=None, max_memory_mb=1024,
                 block_rows=512, chunk_blocks=64, num_features=None, num_classes=None, checked=False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1, got %d" % batch_size)
        if not 0 <= rank < world_size:
            raise ValueError("need 0 <= rank < world_size, got rank %d, world_size %d"
                             % (rank, world_size))
        self.path, self.task = path, task
        self.num_samples, self.num_features, self.num_classes = file_shape(path)
        for what, found, expected in (("features", self.num_features, num_features),
                                      ("classes", self.num_classes, num_classes)):
            if expected is not None and found != expected:
                raise UserError("%s has %d %s, the train file of the same task %d: every split of a task "
                                "must have the same features and classes" % (path, found, what, expected))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.epoch = num_workers, 0
        self.chunk_blocks = chunk_blocks
        global_batch = batch_size * world_size
        if drop_last:
            self.num_batches = self.num_samples // global_batch
        else:
            self.num_batches = -(-self.num_samples // global_batch)
        if self.num_batches == 0:
            raise UserError("%s has %d videos, fewer than one batch of batch_size x world_size = "
                            "%d with drop_last=True; use a smaller batch size"
                            % (path, self.num_samples, global_batch))
        nbytes = self.num_samples * (self.num_features * 4 + self.num_classes)
        self.in_memory = nbytes <= max_memory_mb * 2 ** 20 if in_memory is None else in_memory
        with h5py.File(path, "r") as f:
            self.checksums = Checksums(path, f)
            if self.in_memory:
                self.features, self.labels = f["features"][:], f["labels"][:]
        if self.checksums.values is not None:
            block_rows = -(-block_rows // self.checksums.rows) * self.checksums.rows
        self.block_rows = block_rows
        if self.in_memory:
            self.checksums.check(0, self.features, self.labels)
            if not checked:
                check_values(path, self.features, self.labels)
        elif not checked:
            check_file_values(path)

    def __len__(self):
        return self.num_batches

    def set_epoch(self, epoch):
        """Select the sample order of the next passes (deterministic given seed and epoch)."""
        self.epoch = epoch

    def __iter__(self):
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch, cycle=0):
        """Batches of one pass; (epoch, cycle) select the order."""
        batches = self._batches(epoch, cycle)
        return _prefetch(batches, self.num_workers) if self.num_workers > 0 else batches

    def _chunks(self, rng):
        """The epoch order as chunks: (row ranges read together, permutation of their rows)."""
        n = self.num_samples
        if self.in_memory:
            return [([(0, n)], rng.permutation(n) if self.shuffle else np.arange(n))]
        blocks = np.arange(0, n, self.block_rows)
        if self.shuffle:
            blocks = rng.permutation(blocks)
        chunks = []
        for i in range(0, len(blocks), self.chunk_blocks):
            starts = np.sort(blocks[i:i + self.chunk_blocks])
            ranges = [(int(s), int(min(s + self.block_rows, n))) for s in starts]
            rows = sum(b - a for a, b in ranges)
            chunks.append((ranges, rng.permutation(rows) if self.shuffle else np.arange(rows)))
        return chunks

    def _bounds(self, b):
        """Positions [lo, hi) of the epoch order that form this rank's batch b."""
        B, W, r = self.batch_size, self.world_size, self.rank
        full = self.num_samples // (B * W)
        if b < full:
            lo = b * B * W + r * B
            return lo, lo + B
        left, base = self.num_samples - full * B * W, full * B * W
        return base + (r * left) // W, base + ((r + 1) * left) // W

    def _read(self, datasets, ranges, buffers):
        """Rows of `ranges` (contiguous slices) into the reused buffers; in memory: all rows."""
        if datasets is None:
            return self.features, self.labels
        (features, labels), (x, y) = datasets, buffers
        at = 0
        for a, b in ranges:
            features.read_direct(x, np.s_[a:b], np.s_[at:at + b - a])
            labels.read_direct(y, np.s_[a:b], np.s_[at:at + b - a])
            self.checksums.check(a, x[at:at + b - a], y[at:at + b - a])
            at += b - a
        return x[:at], y[:at]

    def _batches(self, epoch, cycle):
        chunks = self._chunks(np.random.default_rng([self.seed, self.task, epoch, cycle]))
        starts = np.cumsum([0] + [len(perm) for _, perm in chunks])
        f, datasets, buffers = None, None, None
        if not self.in_memory:
            f = h5py.File(self.path, "r")
            datasets = f["features"], f["labels"]        # looked up once: a lookup costs as much as a block read
            rows = max(len(perm) for _, perm in chunks)
            buffers = (np.empty((rows, self.num_features), dtype=np.float32),
                       np.empty((rows, self.num_classes), dtype=datasets[1].dtype))
        loaded, x, y = -1, None, None
        try:
            for b in range(self.num_batches):
                lo, hi = self._bounds(b)
                xs, ys = [], []
                while lo < hi or not xs:
                    k = min(int(np.searchsorted(starts, lo, side="right")) - 1, len(chunks) - 1)
                    if k != loaded:
                        x, y = self._read(datasets, chunks[k][0], buffers)
                        loaded = k
                    end = min(hi, starts[k + 1])
                    idx = chunks[k][1][lo - starts[k]:end - starts[k]]
                    xs.append(x[idx])
                    ys.append(y[idx])
                    lo = end
                xb = xs[0] if len(xs) == 1 else np.concatenate(xs)
                yb = ys[0] if len(ys) == 1 else np.concatenate(ys)
                yield torch.from_numpy(xb), torch.from_numpy(yb.astype(np.float32))
        finally:
            if f is not None:
                f.close()


class TrainSteps:
    """The training batches of one epoch, as in the original: step s yields one batch of
    every task, ([x_t], [y_t]); all loaders restart together, reshuffled, every
    `cycle` = min_t(len_t) - 1 steps, and an epoch has max_t(len_t) - 1 steps. The order of
    a pass depends only on (seed, epoch, restart number), so a resumed run sees the same
    batches. Call set_epoch(epoch) (0-based) before each epoch, as for a DistributedSampler."""

    def __init__(self, loaders):
        lengths = [len(loader) for loader in loaders]
        self.loaders, self.epoch = loaders, 0
        self.cycle = max(min(lengths) - 1, 1)
        self.steps = max(max(lengths) - 1, 1)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.steps

    def __iter__(self):
        epoch, iters = self.epoch, []
        try:
            for step in range(self.steps):
                if step % self.cycle == 0:
                    for it in iters:
                        it.close()
                    iters = [loader.iter_epoch(epoch, step // self.cycle) for loader in self.loaders]
                batches = [next(it) for it in iters]
                yield [x for x, _ in batches], [y for _, y in batches]
        finally:
            for it in iters:
                it.close()


class EvalSteps:
    """All batches of every task of an evaluation split, one batch of every task per step,
    ([x_t], [y_t]), with empty batches for the tasks already exhausted."""

    def __init__(self, loaders):
        self.loaders = loaders
        self.steps = max(len(loader) for loader in loaders)

    def __len__(self):
        return self.steps

    def __iter__(self):
        iters = [iter(loader) for loader in self.loaders]
        for _ in range(self.steps):
            xs, ys = [], []
            for it, loader in zip(iters, self.loaders):
                x, y = next(it, (torch.zeros(0, loader.num_features), torch.zeros(0, loader.num_classes)))
                xs.append(x)
                ys.append(y)
            yield xs, ys


def MultiTask_Dataloader(mode, batch_size, shuffle=True, data_path=None, num_workers=0, seed=0,
                         rank=0, world_size=1, drop_last=False, max_memory_mb=1024, folder=None):
    """Per-task loaders of split `mode` ('train', 'valid' or 'test') and their class counts.

    Returns (loaders, num_classes): loaders[t] is a TaskLoader of task t (all T tasks of the
    data folder, see `Youtube8M.datafolder`) and num_classes[t] its class count. `folder`
    (a DataFolder) saves reading the folder again. num_workers > 0 prepares that many
    batches ahead in a background thread. Tasks larger than max_memory_mb are streamed.
    """
    if mode not in SPLITS:
        raise ValueError("mode must be one of %s, got %r" % (SPLITS, mode))
    data_path = DEFAULT_DATA_PATH if data_path is None else data_path
    folder = read_data_folder(data_path, ('train', mode)) if folder is None else folder
    loaders = [TaskLoader(task_file(data_path, mode, t), batch_size, shuffle=shuffle, seed=seed,
                          rank=rank, world_size=world_size, drop_last=drop_last,
                          num_workers=num_workers, task=t, max_memory_mb=max_memory_mb,
                          num_features=folder.num_features, num_classes=folder.num_classes[t],
                          checked=folder.verified)
               for t in range(len(folder.tasks))]
    return loaders, [loader.num_classes for loader in loaders]
