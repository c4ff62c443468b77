"""Fused GPU kernels of the TAL activation, in Triton: the same formulas as the C++ kernel.

With the basis sorted (s_0 <= ... <= s_{M-1}), k(a) = #{m : s_m <= a} and the suffix
tables A[t, k] = sum_{m >= k} alpha[t, m], S[t, k] = sum_{m >= k} alpha[t, m] s_m
(see `Layers._tal_kernel`):

    forward:   out = relu(a) + S[t, k] - a A[t, k]                (k kept as uint8 if M <= 255)
    backward:  grad_a = g (1[a > 0] - A[t, k]),
               sums[0, t, k] = sum of g, sums[1, t, k] = sum of g a over task t's bucket k.

Compiled without contracting a * b + c into fused multiply-adds, so the forward gives the
same bits as the C++ and PyTorch paths. A program handles one piece of one row (one task). Its bucket sums are accumulated in
registers: per block of elements, a [block, bins] comparison with the bucket ids 0..M-1
(bins = M rounded up to a power of two, at least 16), summed over the block, and the last bucket M
apart (float64 across blocks); only then does the program add its sums to the global
[2, T, M + 1] float64 table with one atomic per bucket. The float64 atomics make the
order of the additions, and so the last bits of the sums, vary from run to run.

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
CHUNK = 4096             # elements of a row per backward program
DTYPES = (torch.float32, torch.float64)


@functools.cache
def available():
    """Whether the triton package is installed (it is imported on first use only; asked once,
    not at every layer call)."""
    return importlib.util.find_spec("triton") is not None


def interpreting():
    """Triton's interpreter runs the kernels on CPU tensors (set before Python starts)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(a, num_basis):
    """Whether these kernels can take `a` (and a basis of `num_basis` points)."""
    on_device = a.is_cuda or (interpreting() and a.device.type == "cpu")
    return on_device and a.dtype in DTYPES and num_basis <= MAX_BASIS and available()


def forward(a, row_task, s, A, S, keep_buckets):
    """out [R, N] and k [R, N] uint8 (empty when not kept), as the C++ kernel's forward."""
    R, N = a.shape
    M = s.numel()
    keep = keep_buckets and M <= 255
    out = torch.empty_like(a)
    k = torch.empty((R if keep else 0, N), dtype=torch.uint8, device=a.device)
    if a.numel():
        from . import _tal_triton_kernels as kernels
        pieces = -(-N // FORWARD_BLOCK)
        kernels.forward[(R * pieces,)](a, row_task, s, A, S, out, k if keep else out, N, M, pieces,
                                       KEEP=keep, BLOCK=FORWARD_BLOCK, enable_fp_fusion=False)
    return out, k


def backward(g, a, k, row_task, s, A, need_grad_a):
    """grad_a [R, N] (empty if not wanted) and sums [2, T, M + 1] float64, as the C++ kernel's."""
    R, N = a.shape
    M, T = s.numel(), A.shape[0]
    grad_a = torch.empty_like(a) if need_grad_a else a.new_empty(0)
    sums = torch.zeros(2, T, M + 1, dtype=torch.float64, device=a.device)
    if a.numel():
        from . import _tal_triton_kernels as kernels
        bins = max(16, 1 << (M - 1).bit_length())      # M rounded up to a power of two
        block = max(16, min(128, 8192 // bins))        # the [block, bins] comparison stays small
        pieces = -(-N // CHUNK)
        kernels.backward[(R * pieces,)](g, a, k if k.numel() else a, row_task, s, A,
                                        grad_a if need_grad_a else a, sums, N, M, T, pieces, CHUNK,
                                        KEEP=k.numel() > 0, NEED_GRAD=need_grad_a, BLOCK=block, BINS=bins,
                                        enable_fp_fusion=False)
    return grad_a, sums
