"""Peak resident memory of a fresh child process: the CPU memory columns of the benchmarks.

There is no allocator counter on the CPU, so a benchmark runs what it measures in a child
process (`run_child`), which calls `reset_peak()` before the part measured and prints
`resident("VmHWM:")` minus its baseline as JSON. glibc is told to return every large block
at once, so that resident memory follows the live tensors.
"""
import json
import os
import subprocess
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def resident(key="VmRSS:"):
    """Bytes of /proc/self/status's VmRSS (now) or VmHWM (high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak():
    """Set the high-water mark VmHWM to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_child(argv, **env):
    """Run `python argv...` with MALLOC_ENV; return the JSON object of its last output line."""
    done = subprocess.run([sys.executable, *argv], env={**os.environ, **MALLOC_ENV, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
