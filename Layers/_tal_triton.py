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
set before Python starts), which is how the tests check it without a GPU. Without the
``triton`` package this module only reports ``available() == False``.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # no Triton: the PyTorch path runs instead
    triton = None

MAX_BASIS = 1023         # above, the [block, bins] comparison gets too large: PyTorch path
FORWARD_BLOCK = 1024     # elements per forward program
CHUNK = 4096             # elements of a row per backward program
DTYPES = (torch.float32, torch.float64)


def available():
    return triton is not None


def interpreting():
    """Triton's interpreter runs the kernels on CPU tensors (set before Python starts)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(a, num_basis):
    """Whether these kernels can take `a` (and a basis of `num_basis` points)."""
    on_device = a.is_cuda or (interpreting() and a.device.type == "cpu")
    return triton is not None and on_device and a.dtype in DTYPES and num_basis <= MAX_BASIS


if triton is not None:
    @triton.jit
    def _bucket(s_ptr, M, a):
        """k = #{m : s_m <= a} for sorted s, by a branch-free binary search (NaN: 0)."""
        pos = tl.zeros(a.shape, dtype=tl.int32)
        n = M
        while n > 1:
            half = n // 2
            pos += tl.where(tl.load(s_ptr + pos + (half - 1)) <= a, half, 0)
            n -= half
        return pos + tl.where(tl.load(s_ptr + pos) <= a, 1, 0)

    @triton.jit
    def _forward_kernel(a_ptr, task_ptr, s_ptr, A_ptr, S_ptr, out_ptr, k_ptr, N, M, pieces,
                        KEEP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0) // pieces
        cols = (tl.program_id(0) % pieces) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        offs = row.to(tl.int64) * N + cols
        a = tl.load(a_ptr + offs, mask=mask, other=0.0)
        k = _bucket(s_ptr, M, a)
        table = tl.load(task_ptr + row) * (M + 1) + k
        zero = tl.zeros_like(a)
        out = (tl.where(a > zero, a, zero) + tl.load(S_ptr + table, mask=mask, other=0.0)
               - a * tl.load(A_ptr + table, mask=mask, other=0.0))
        tl.store(out_ptr + offs, out, mask=mask)
        if KEEP:
            tl.store(k_ptr + offs, k.to(tl.uint8), mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, a_ptr, k_ptr, task_ptr, s_ptr, A_ptr, grad_ptr, sums_ptr,
                         N, M, T, pieces, chunk,
                         KEEP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
        row = tl.program_id(0) // pieces
        start = (tl.program_id(0) % pieces) * chunk
        end = tl.minimum(start + chunk, N)
        t = tl.load(task_ptr + row)
        bins = tl.arange(0, BINS)                  # buckets 0 .. M - 1; bucket M summed apart
        sum_g = tl.zeros([BINS], dtype=tl.float64)
        sum_ga = tl.zeros([BINS], dtype=tl.float64)
        top_g = tl.zeros([BLOCK], dtype=tl.float64)
        top_ga = tl.zeros([BLOCK], dtype=tl.float64)
        for lo in range(start, end, BLOCK):
            cols = lo + tl.arange(0, BLOCK)
            mask = cols < end
            offs = row.to(tl.int64) * N + cols
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)        # 0 outside: adds nothing
            a = tl.load(a_ptr + offs, mask=mask, other=0.0)
            if KEEP:
                k = tl.load(k_ptr + offs, mask=mask, other=0).to(tl.int32)
            else:
                k = _bucket(s_ptr, M, a)
            if NEED_GRAD:
                zero = tl.zeros_like(a)
                step = tl.where(a > zero, zero + 1, zero)
                slope = step - tl.load(A_ptr + t * (M + 1) + k, mask=mask, other=0.0)
                tl.store(grad_ptr + offs, g * slope, mask=mask)
            ga = g * a
            hit = k[:, None] == bins[None, :]                          # [BLOCK, BINS]
            sum_g += tl.sum(tl.where(hit, g[:, None], 0.0), axis=0).to(tl.float64)
            sum_ga += tl.sum(tl.where(hit, ga[:, None], 0.0), axis=0).to(tl.float64)
            top_g += tl.where(k == M, g, 0.0).to(tl.float64)
            top_ga += tl.where(k == M, ga, 0.0).to(tl.float64)
        K = M + 1
        tl.atomic_add(sums_ptr + t * K + bins, sum_g, mask=bins < M)
        tl.atomic_add(sums_ptr + (T + t) * K + bins, sum_ga, mask=bins < M)
        tl.atomic_add(sums_ptr + t * K + M, tl.sum(top_g, axis=0))
        tl.atomic_add(sums_ptr + (T + t) * K + M, tl.sum(top_ga, axis=0))


def forward(a, row_task, s, A, S, keep_buckets):
    """out [R, N] and k [R, N] uint8 (empty when not kept), as the C++ kernel's forward."""
    R, N = a.shape
    M = s.numel()
    keep = keep_buckets and M <= 255
    out = torch.empty_like(a)
    k = torch.empty((R if keep else 0, N), dtype=torch.uint8, device=a.device)
    if a.numel():
        pieces = triton.cdiv(N, FORWARD_BLOCK)
        _forward_kernel[(R * pieces,)](a, row_task, s, A, S, out, k if keep else out, N, M, pieces,
                                       KEEP=keep, BLOCK=FORWARD_BLOCK, enable_fp_fusion=False)
    return out, k


def backward(g, a, k, row_task, s, A, need_grad_a):
    """grad_a [R, N] (empty if not wanted) and sums [2, T, M + 1] float64, as the C++ kernel's."""
    R, N = a.shape
    M, T = s.numel(), A.shape[0]
    grad_a = torch.empty_like(a) if need_grad_a else a.new_empty(0)
    sums = torch.zeros(2, T, M + 1, dtype=torch.float64, device=a.device)
    if a.numel():
        bins = max(16, triton.next_power_of_2(M))
        block = max(16, min(128, 8192 // bins))        # the [block, bins] comparison stays small
        pieces = triton.cdiv(N, CHUNK)
        _backward_kernel[(R * pieces,)](g, a, k if k.numel() else a, row_task, s, A,
                                        grad_a if need_grad_a else a, sums, N, M, T, pieces, CHUNK,
                                        KEEP=k.numel() > 0, NEED_GRAD=need_grad_a, BLOCK=block, BINS=bins,
                                        enable_fp_fusion=False)
    return grad_a, sums
