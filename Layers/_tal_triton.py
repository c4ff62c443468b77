"""Fused GPU kernels of the TAL activation, in Triton: the same formulas as the C++ kernel.

With each group's basis sorted (s_0 <= ... <= s_{M-1}), k(a) = #{m : s_m <= a} and the
suffix tables A[t, k] = sum_{m >= k} alpha[t, m], S[t, k] = sum_{m >= k} alpha[t, m] s_m
(see `Layers._tal_kernel`; task t uses the basis of group t // Tg):

    forward:   out = relu(a) + S[t, k] - a A[t, k]                (k kept as uint8 if M <= 255)
    backward:  grad_a = g (1[a > 0] - A[t, k]),
               sums[0, t, k] = sum of g, sums[1, t, k] = sum of g a over task t's bucket k.

Compiled without contracting a * b + c into fused multiply-adds, so the forward gives the
same bits as the PyTorch path on the same tables.

The backward is deterministic: no atomics. Stage one: a program takes one piece of one row
(one task), accumulates its bucket sums in registers -- per block of elements a
[block, bins] comparison with the bucket ids 0..M-1 (bins = M rounded up to a power of two,
at least 16), summed over the block, and the last bucket M apart, in float64 across blocks
-- and writes them to its own slot of a [pieces, 2, M + 1] float64 buffer. Stage two: one
program per task sums the slots of its pieces, taken in the order of the rows, in tiles
of a fixed size. So the GPU gradients are the same bits run after run.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``
set before Python starts), which is how the tests check it without a GPU. The kernels
themselves are in `Layers._tal_triton_kernels`, imported on first use; without the
``triton`` package this module only reports ``available() == False``.
"""
import functools
import importlib.util
import os

import torch

MAX_BASIS = 1023         # above, the [block, bins] comparison gets too large: PyTorch path
FORWARD_BLOCK = 1024     # elements per forward program
MIN_CHUNK = 1024         # fewest elements of a row per backward program
TARGET_PROGRAMS = 4096   # rows are cut into pieces until about this many backward programs
DTYPES = (torch.float32, torch.float64)


@functools.cache
def available():
    """Whether the triton package is installed (it is imported on first use only; asked once,
    not at every layer call)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreting():
    """Triton's interpreter runs the kernels on CPU tensors (set before Python starts)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(a, num_basis):
    """Whether these kernels can take `a` (and a basis of `num_basis` points)."""
    on_device = a.is_cuda or (a.device.type == "cpu" and interpreting())
    return on_device and a.dtype in DTYPES and num_basis <= MAX_BASIS and available()


def forward(a, row_task, s, A, S, Tg, keep_buckets):
    """out [R, N] and k [R, N] uint8 ([0, N] when not kept), as the C++ kernel's forward;
    s [G, M] sorted, A and S [T, M + 1], task t in group t // Tg."""
    R, N = a.shape
    M = s.shape[1]
    keep = keep_buckets and M <= 255
    out = torch.empty_like(a)
    k = torch.empty((R if keep else 0, N), dtype=torch.uint8, device=a.device)
    if a.numel():
        from . import _tal_triton_kernels as kernels
        pieces = -(-N // FORWARD_BLOCK)
        kernels.forward[(R * pieces,)](a, row_task, s, A, S, out, k if keep else out, N, M, Tg, pieces,
                                       KEEP=keep, BLOCK=FORWARD_BLOCK, enable_fp_fusion=False)
    return out, k


def pieces_per_row(R, N):
    """How many programs share a row in the backward pass (enough programs for a GPU, at least
    MIN_CHUNK elements each)."""
    return max(1, min(-(-TARGET_PROGRAMS // max(R, 1)), -(-N // MIN_CHUNK)))


def backward(g, a, k, row_task, s, A, Tg, need_grad_a):
    """grad_a [R, N] (empty if not wanted) and sums [2, T, M + 1] float64, as the C++ kernel's."""
    R, N = a.shape
    M, T = s.shape[1], A.shape[0]
    K = M + 1
    grad_a = torch.empty_like(a) if need_grad_a else a.new_empty(0)
    sums = torch.zeros(2, T, K, dtype=torch.float64, device=a.device)
    if not a.numel():
        return grad_a, sums
    from . import _tal_triton_kernels as kernels
    bins = max(16, 1 << (M - 1).bit_length())      # M rounded up to a power of two
    block = max(16, min(128, 8192 // bins))        # the [block, bins] comparison stays small
    pieces = pieces_per_row(R, N)
    chunk = -(-N // pieces)
    partial = torch.empty(R * pieces, 2, K, dtype=torch.float64, device=a.device)
    kernels.backward_pieces[(R * pieces,)](g, a, k if k.numel() else a, row_task, s, A,
                                           grad_a if need_grad_a else a, partial, N, M, Tg, pieces, chunk,
                                           KEEP=k.numel() > 0, NEED_GRAD=need_grad_a, BLOCK=block, BINS=bins,
                                           enable_fp_fusion=False)
    # the pieces of each task in row order: a stable sort of their tasks, and where each task starts
    piece_task = row_task.repeat_interleave(pieces) if pieces > 1 else row_task
    sorted_task, order = torch.sort(piece_task, stable=True)
    starts = torch.searchsorted(sorted_task, torch.arange(T + 1, device=a.device, dtype=sorted_task.dtype))
    width = 1 << (K - 1).bit_length()
    kernels.reduce_tasks[(T,)](partial, order, starts, sums, T, K, KB=width, RB=max(1, 4096 // width))
    return grad_a, sums
