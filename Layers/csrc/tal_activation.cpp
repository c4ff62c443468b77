// Fused CPU kernel of the TAL activation
//
//     f_t(a) = relu(a) + sum_m alpha[t, m] relu(s_m - a)
//
// With the basis sorted (s_0 <= ... <= s_{M-1}) and k(a) = #{m : s_m <= a}, only the
// terms m >= k are active, so with suffix tables A[t, k] = sum_{m >= k} alpha[t, m]
// and S[t, k] = sum_{m >= k} alpha[t, m] s_m (prepared in Python):
//
//     f_t(a) = relu(a) + S[t, k(a)] - a * A[t, k(a)].
//
// The backward pass needs, per task and bucket, the sums of g and of g * a; Python turns
// them into the gradients of alpha and of the basis with two cumulative sums.
// The pure-PyTorch path in _tal_kernel.py computes the same formulas.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 64;

// k(a) = #{m : s[m] <= a} for a block of n elements, by a branch-free binary search
// whose step sizes depend only on M, so the loop over the block vectorises.
template <typename scalar_t>
inline void buckets(const scalar_t* __restrict__ s, int64_t M, const scalar_t* __restrict__ a, int64_t n,
                    int32_t* __restrict__ pos) {
  for (int64_t e = 0; e < n; ++e) pos[e] = 0;
  int64_t len = M;
  while (len > 1) {
    const int32_t half = static_cast<int32_t>(len / 2);
    for (int64_t e = 0; e < n; ++e) pos[e] += (s[pos[e] + half - 1] <= a[e]) ? half : 0;
    len -= half;
  }
  if (len == 1)
    for (int64_t e = 0; e < n; ++e) pos[e] += (s[pos[e]] <= a[e]) ? 1 : 0;
}

// out = relu(a) + S[k] - a * A[k], and k kept for the backward pass.
template <typename scalar_t>
inline void activation(const scalar_t* __restrict__ a, const int32_t* __restrict__ pos,
                       const scalar_t* __restrict__ At, const scalar_t* __restrict__ St,
                       scalar_t* __restrict__ out, uint8_t* __restrict__ k, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = a[j];
    const scalar_t relu = v > scalar_t(0) ? v : scalar_t(0);
    out[j] = relu + St[pos[j]] - v * At[pos[j]];
  }
  if (k)
    for (int64_t j = 0; j < n; ++j) k[j] = static_cast<uint8_t>(pos[j]);
}

// out = g * (1[a > 0] - A[k]): the derivative of the activation times the incoming gradient.
template <typename scalar_t>
inline void slope_times_grad(const scalar_t* __restrict__ g, const scalar_t* __restrict__ a,
                             const int32_t* __restrict__ k, const scalar_t* __restrict__ At,
                             scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t mask = a[i] > scalar_t(0) ? scalar_t(1) : scalar_t(0);
    out[i] = g[i] * (mask - At[k[i]]);
  }
}

// Calls fn(row, begin, end) for the pieces of rows covered by flat range [lo, hi).
template <typename F>
inline void for_rows(int64_t lo, int64_t hi, int64_t N, const F& fn) {
  while (lo < hi) {
    const int64_t r = lo / N;
    const int64_t end = std::min(hi, (r + 1) * N);
    fn(r, lo - r * N, end - r * N);
    lo = end;
  }
}

}  // namespace

// a [R, N], row_task [R] (int64), s [M] sorted, A and S [T, M + 1]
// -> (out [R, N], k [R, N] uint8 when M <= 255, else an empty tensor: the backward pass then
//     finds the buckets again, which costs less than keeping them)
std::vector<torch::Tensor> tal_forward(torch::Tensor a, torch::Tensor row_task, torch::Tensor s,
                                       torch::Tensor A, torch::Tensor S, bool keep_buckets) {
  const int64_t R = a.size(0), N = a.size(1), M = s.size(0);
  auto out = torch::empty_like(a);
  const bool keep = keep_buckets && M <= 255;
  auto k = torch::empty({keep ? R : 0, N}, a.options().dtype(torch::kUInt8));
  const int64_t* rt = row_task.data_ptr<int64_t>();
  uint8_t* kp = keep ? k.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tal_forward", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* Sp = S.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R * N, 16384, [&](int64_t lo, int64_t hi) {
      int32_t pos[kBlock];
      for_rows(lo, hi, N, [&](int64_t r, int64_t b, int64_t e) {
        const scalar_t* At = Ap + rt[r] * (M + 1);
        const scalar_t* St = Sp + rt[r] * (M + 1);
        const int64_t base = r * N;
        for (int64_t i = b; i < e; i += kBlock) {
          const int64_t n = std::min(kBlock, e - i);
          const scalar_t* x = ap + base + i;
          buckets(sp, M, x, n, pos);
          activation(x, pos, At, St, op + base + i, kp ? kp + base + i : nullptr, n);
        }
      });
    });
  });
  return {out, k};
}

// g, a [R, N], k [R, N] uint8 or empty, row_task [R], s [M] sorted, A [T, M + 1]
// -> (grad_a [R, N] (empty if not wanted), sums [2, T, M + 1] float64: sum g, sum g * a per bucket)
std::vector<torch::Tensor> tal_backward(torch::Tensor g, torch::Tensor a, torch::Tensor k,
                                        torch::Tensor row_task, torch::Tensor s, torch::Tensor A,
                                        bool need_grad_a) {
  const int64_t R = a.size(0), N = a.size(1), M = s.size(0);
  const int64_t T = A.size(0), K = A.size(1);
  const int64_t total = R * N;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 65536));
  auto partial = torch::zeros({P, 2, T * K}, a.options().dtype(torch::kFloat64));
  auto grad_a = need_grad_a ? torch::empty_like(a) : torch::empty({0}, a.options());
  const int64_t* rt = row_task.data_ptr<int64_t>();
  const uint8_t* kp = k.numel() ? k.data_ptr<uint8_t>() : nullptr;
  double* bins = partial.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tal_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* gap = need_grad_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    // A fixed split into P chunks makes the sums independent of thread scheduling.
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double* sum_g = bins + p * 2 * T * K;
        double* sum_ga = sum_g + T * K;
        for_rows(total * p / P, total * (p + 1) / P, N, [&](int64_t r, int64_t b, int64_t e) {
          const int64_t off = rt[r] * K;
          const scalar_t* At = Ap + off;
          const int64_t base = r * N;
          int32_t pos[kBlock];
          for (int64_t i = base + b; i < base + e; i += kBlock) {
            const int64_t n = std::min(kBlock, base + e - i);
            if (kp)
              for (int64_t j = 0; j < n; ++j) pos[j] = kp[i + j];
            else
              buckets(sp, M, ap + i, n, pos);
            for (int64_t j = 0; j < n; ++j) {
              sum_g[off + pos[j]] += gp[i + j];
              sum_ga[off + pos[j]] += static_cast<double>(gp[i + j]) * ap[i + j];
            }
            if (gap)  // a separate loop: it vectorises, the scatter above does not
              slope_times_grad(gp + i, ap + i, pos, At, gap + i, n);
          }
        });
      }
    });
  });
  return {grad_a, partial.sum(0).view({2, T, K})};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &tal_forward, "TAL activation forward (CPU)");
  m.def("backward", &tal_backward, "TAL activation backward sums (CPU)");
}
