"""Loader throughput: one HDF5 read per sample (the original's way) against Youtube8M.torch_loader.

Builds a temporary task file of `--rows` videos (1152 float32 features, uint8 labels, the
converter's layout) and measures shuffled samples per second of
  (a) a torch DataLoader over a Dataset that reads one row per __getitem__ (on a subset:
      it is slow),
  (b) our TaskLoader with the arrays in memory (load time counted separately and included),
  (c) our TaskLoader streaming shuffled blocks from the file (for files larger than memory).
Each rate is the best of two passes (one epoch each). The file carries the converter's block
checksums, which (b) to (e) check as they read; (c) and (d) are also measured without that
check, side by side (alternating), for its cost.

Then, at scale: a task file of --stream_rows videos (default 1,000,000: 4.3 GiB, far above
the loader's max_memory_mb of 1 GiB) is written to a temporary folder (removed afterwards)
and read in a child process of its own per path, so that each peak resident set is its own:
  (d) streamed in shuffled blocks (what the trainer does with such a file): the time to open
      it (its values are checked once, a full read) and the shuffled samples/s of one epoch;
  (e) the same file held in memory, for comparison.

    python benchmarks/loader.py [--rows 50000] [--per_sample 3000] [--batch_size 256] [--stream_rows 1000000]
"""
import argparse
import multiprocessing
import os
import resource
import tempfile
import time

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from Youtube8M.data import FEATURE_SIZE
from Youtube8M.datafolder import CHECKSUM_ROWS, block_checksums
from Youtube8M.torch_loader import TaskLoader


class PerSampleDataset(Dataset):
    """One h5py read of features and labels per sample."""

    def __init__(self, path):
        f = h5py.File(path, "r")
        self.features, self.labels = f["features"], f["labels"]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i], np.asarray(self.labels[i], dtype=np.float32)


def write_task_file(path, rows, num_classes=10, seed=0):
    """The converter's layout, checksums included; random blocks of 8192 rows (one block
    reused for big files)."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((8192, FEATURE_SIZE), dtype=np.float32)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("features", (rows, FEATURE_SIZE), dtype=np.float32,
                             chunks=(128, FEATURE_SIZE))
        y = f.create_dataset("labels", (rows, num_classes), dtype=np.uint8,
                             chunks=(1024, num_classes))
        sums = f.create_dataset("checksums", (-(-rows // CHECKSUM_ROWS),), dtype=np.uint32)
        f.attrs["num_classes"] = num_classes
        f.attrs["checksum_rows"] = CHECKSUM_ROWS
        for a in range(0, rows, 8192):
            b = min(a + 8192, rows)
            xb = block[:b - a] if rows > 100000 else rng.standard_normal((b - a, FEATURE_SIZE), dtype=np.float32)
            yb = (rng.random((b - a, num_classes)) < 0.2).astype(np.uint8)
            x[a:b], y[a:b] = xb, yb
            sums[a // CHECKSUM_ROWS:-(-b // CHECKSUM_ROWS)] = block_checksums(xb, yb)


def unchecked(loader):
    """The loader with its checksum check turned off (for measuring what the check costs)."""
    loader.checksums.values = None
    return loader


def one_epoch_in_child(path, batch_size, in_memory, check, queue):
    """Child process: open the file with TaskLoader, read one shuffled epoch (checking the
    checksums or not); report the open time, samples/s and the process's peak resident set."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    loader = TaskLoader(path, batch_size, shuffle=True, in_memory=in_memory)
    opened = time.perf_counter() - start
    loader = loader if check else unchecked(loader)
    loader.set_epoch(1)
    n, rate = samples_per_second(loader, passes=1)
    queue.put((opened, n, rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def measure_in_child(path, batch_size, in_memory, check=True):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=one_epoch_in_child, args=(path, batch_size, in_memory, check, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def samples_per_second(batches, passes=2):
    """Samples and the best samples/s of `passes` passes (the first one warms the caches)."""
    best = 0.0
    for _ in range(passes):
        start, n = time.perf_counter(), 0
        for x, y in batches:
            n += len(x)
        best = max(best, n / (time.perf_counter() - start))
    return n, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--per_sample", type=int, default=3000, help="samples read the slow way")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--stream_rows", type=int, default=1000000, help="rows of the large file (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train_task_0.hdf5")
        write_task_file(path, args.rows)
        print("task file: %d rows x %d float32 (%.0f MB), batch size %d"
              % (args.rows, FEATURE_SIZE, os.path.getsize(path) / 2 ** 20, args.batch_size))

        subset = Subset(PerSampleDataset(path), np.arange(min(args.per_sample, args.rows)))
        slow = DataLoader(subset, batch_size=args.batch_size, shuffle=True)
        n, slow_rate = samples_per_second(slow)
        print("(a) one h5py read per sample, shuffled:      %9.0f samples/s  (%d samples)"
              % (slow_rate, n))

        start = time.perf_counter()
        ours = TaskLoader(path, args.batch_size, shuffle=True, in_memory=True)
        load_s = time.perf_counter() - start
        ours.set_epoch(1)
        n, mem_rate = samples_per_second(ours)
        print("(b) ours, in memory, shuffled:               %9.0f samples/s  (%d samples; "
              "loading took %.2f s, %.0f samples/s with loading)"
              % (mem_rate, n, load_s, n / (load_s + n / mem_rate)))

        stream = TaskLoader(path, args.batch_size, shuffle=True, in_memory=False)
        stream.set_epoch(1)
        plain = unchecked(TaskLoader(path, args.batch_size, shuffle=True, in_memory=False))
        plain.set_epoch(1)
        n, plain_rate = samples_per_second(plain)
        n, stream_rate = samples_per_second(stream)
        print("(c) ours, streamed shuffled blocks:          %9.0f samples/s  (%d samples; without the checksum "
              "check %.0f samples/s: the check costs %.1f%%)"
              % (stream_rate, n, plain_rate, 100 * (plain_rate / stream_rate - 1)))
        print("ratio (b)/(a) = %.0fx, (c)/(a) = %.0fx"
              % (mem_rate / slow_rate, stream_rate / slow_rate))
    if args.stream_rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "train_task_0.hdf5")
            start = time.perf_counter()
            write_task_file(path, args.stream_rows)
            print("\nlarge task file: %d rows (%.2f GiB), written in %.0f s"
                  % (args.stream_rows, os.path.getsize(path) / 2 ** 30, time.perf_counter() - start))
            runs = {}          # (d) and (d') twice each, alternating, best of two: the same page cache
            for label, in_memory, check in 2 * (("(d) streamed, shuffled blocks", False, True),
                                                ("(d') the same, checksums not checked", False, False)) + (
                                                ("(e) held in memory", True, True),):
                result = measure_in_child(path, args.batch_size, in_memory, check)
                runs[label] = max(runs.get(label, result), result, key=lambda r: r[2])
            for label, (opened, n, rate, peak) in runs.items():
                print("%-38s opened in %5.1f s, %9.0f samples/s (%d samples), peak RSS %.2f GiB"
                      % (label, opened, rate, n, peak / 2 ** 30))
            checked, plain = (runs[label][2] for label in list(runs)[:2])
            print("the checksum check costs the streamed epoch %.1f%%" % (100 * (plain / checked - 1)))


if __name__ == "__main__":
    main()
