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


@triton.jit(do_not_specialize=["M", "Tg"])   # M = 1 specialised crashes Triton 3.6's compiler
def forward(a_ptr, task_ptr, s_ptr, A_ptr, S_ptr, out_ptr, k_ptr, N, M, Tg, pieces,
            KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """out = relu(a) + S[t, k] - a A[t, k] for BLOCK elements of one row (task t, basis of
    group t // Tg); k kept if KEEP."""
    row = tl.program_id(0) // pieces
    cols = (tl.program_id(0) % pieces) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    t = tl.load(task_ptr + row)
    k = _bucket(s_ptr + (t // Tg) * M, M, a)
    table = t * (M + 1) + k
    zero = tl.zeros_like(a)
    out = (tl.where(a > zero, a, zero) + tl.load(S_ptr + table, mask=mask, other=0.0)
           - a * tl.load(A_ptr + table, mask=mask, other=0.0))
    tl.store(out_ptr + offs, out, mask=mask)
    if KEEP:
        tl.store(k_ptr + offs, k.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["M", "Tg"])   # M = 1 specialised crashes Triton 3.6's compiler
def backward_pieces(g_ptr, a_ptr, k_ptr, task_ptr, s_ptr, A_ptr, grad_ptr, partial_ptr,
                    N, M, Tg, pieces, chunk,
                    KEEP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """grad_a = g (1[a > 0] - A[t, k]) for `chunk` elements of one row (task t), and their
    per-bucket sums of g and g a written to this program's slot partial[pid] [2, M + 1]."""
    pid = tl.program_id(0)
    row = pid // pieces
    start = (pid % pieces) * chunk
    end = tl.minimum(start + chunk, N)
    t = tl.load(task_ptr + row)
    s_row = s_ptr + (t // Tg) * M
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
            k = _bucket(s_row, M, a)
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
    slot = partial_ptr + pid.to(tl.int64) * 2 * K
    tl.store(slot + bins, sum_g, mask=bins < M)
    tl.store(slot + K + bins, sum_ga, mask=bins < M)
    tl.store(slot + M, tl.sum(top_g, axis=0))
    tl.store(slot + K + M, tl.sum(top_ga, axis=0))


@triton.jit
def reduce_tasks(partial_ptr, order_ptr, start_ptr, sums_ptr, T, K, KB: tl.constexpr, RB: tl.constexpr):
    """sums[:, t] = the sum of the slots of task t's pieces (order[start[t]:start[t + 1]]),
    RB slots at a time, always in the same order."""
    t = tl.program_id(0)
    lo = tl.load(start_ptr + t)
    hi = tl.load(start_ptr + t + 1)
    cols = tl.arange(0, KB)
    in_row = cols < K
    acc_g = tl.zeros([KB], dtype=tl.float64)
    acc_ga = tl.zeros([KB], dtype=tl.float64)
    for i in range(lo, hi, RB):
        idx = i + tl.arange(0, RB)
        take = idx < hi
        piece = tl.load(order_ptr + idx, mask=take, other=0)
        slots = partial_ptr + piece.to(tl.int64)[:, None] * 2 * K + cols[None, :]
        both = take[:, None] & in_row[None, :]
        acc_g += tl.sum(tl.load(slots, mask=both, other=0.0), axis=0)
        acc_ga += tl.sum(tl.load(slots + K, mask=both, other=0.0), axis=0)
    tl.store(sums_ptr + t * K + cols, acc_g, mask=in_row)
    tl.store(sums_ptr + (T + t) * K + cols, acc_ga, mask=in_row)
