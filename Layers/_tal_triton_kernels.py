"""The Triton kernels of `Layers._tal_triton` (imported on first use: needs ``triton``)."""
import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["M"])   # M = 1 specialised crashes Triton 3.6's compiler
def forward(a_ptr, task_ptr, s_ptr, A_ptr, S_ptr, out_ptr, k_ptr, N, M, pieces,
            KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """out = relu(a) + S[t, k] - a A[t, k] for BLOCK elements of one row (task t); k kept if KEEP."""
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


@triton.jit(do_not_specialize=["M"])   # M = 1 specialised crashes Triton 3.6's compiler
def backward(g_ptr, a_ptr, k_ptr, task_ptr, s_ptr, A_ptr, grad_ptr, sums_ptr,
             N, M, T, pieces, chunk,
             KEEP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """grad_a = g (1[a > 0] - A[t, k]) for `chunk` elements of one row (task t), and their
    per-bucket sums of g and g a added to sums [2, T, M + 1] with one atomic per bucket."""
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
