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
//
// Finding k(a): a uniform grid of G cells over [s_0, s_{M-1}],
//
//     cell(v) = clamp(floor((v - s_0) * G / (s_{M-1} - s_0)), 0, G - 1)     (NaN -> 0),
//
// is a non-decreasing function of v in floating point too (a subtraction and a product by
// a positive constant round monotonically). So with c = cell(a) and c_m = cell(s_m):
// c_m < c implies s_m < a, and c_m > c implies s_m > a; only the basis points of a's own
// cell need a comparison. With base[c] = #{m : c_m < c} and L the most points in a cell,
//
//     k(a) = base[c] + #{j < L : s_{base[c] + j} <= a}        (s padded with NaN),
//
// exact whatever the rounding, since the table is built with the same cell() function.
// Points of later cells in that window are > a and count 0. For random bases L is 2-3,
// so a lookup costs a few loads instead of log2(M) dependent ones.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;       // elements handled together, so the simple loops vectorise
constexpr int64_t kMaxLinear = 8;    // up to this many points per cell: compare with all of them
constexpr int64_t kCopies = 2;       // copies of the bucket sums, so that neighbouring elements
                                     // in the same bucket do not wait for each other's stores

template <typename scalar_t>
class BucketFinder {
 public:
  BucketFinder(const scalar_t* s, int64_t M) {
    G_ = std::min<int64_t>(4 * M, 1 << 14);
    lo_ = s[0];
    const scalar_t span = s[M - 1] - s[0];
    scale_ = span > scalar_t(0) ? scalar_t(G_) / span : scalar_t(0);   // NaN or 0 span: one cell
    last_ = scalar_t(G_ - 1);
    std::vector<int32_t> count(G_, 0);
    for (int64_t m = 0; m < M; ++m) ++count[cell(s[m])];
    L_ = *std::max_element(count.begin(), count.end());
    base_.resize(G_);
    int32_t below = 0;
    for (int64_t c = 0; c < G_; ++c) {
      base_[c] = below;
      below += count[c];
    }
    padded_.assign(s, s + M);
    padded_.resize(M + L_, std::numeric_limits<scalar_t>::quiet_NaN());   // NaN <= a is false, even for a = inf
    if (L_ <= kMaxLinear) {
      window_.resize(G_ * L_);
      for (int64_t c = 0; c < G_; ++c)
        for (int64_t j = 0; j < L_; ++j) window_[c * L_ + j] = padded_[base_[c] + j];
    }
  }

  inline int32_t cell(scalar_t v) const {
    scalar_t x = (v - lo_) * scale_;
    x = x > scalar_t(0) ? x : scalar_t(0);
    x = x < last_ ? x : last_;
    return static_cast<int32_t>(x);
  }

  // pos[e] = k(a[e]) = #{m : s_m <= a[e]} for a block of n <= kBlock elements.
  void find(const scalar_t* __restrict__ a, int64_t n, int32_t* __restrict__ pos) const {
    int32_t c[kBlock];
    for (int64_t e = 0; e < n; ++e) c[e] = cell(a[e]);
    for (int64_t e = 0; e < n; ++e) pos[e] = base_[c[e]];
    if (L_ <= kMaxLinear) {
      const scalar_t* w = window_.data();
      for (int64_t j = 0; j < L_; ++j)
        for (int64_t e = 0; e < n; ++e) pos[e] += (w[c[e] * L_ + j] <= a[e]) ? 1 : 0;
      return;
    }
    // a crowded cell (e.g. repeated basis points): branch-free binary search in the window
    const scalar_t* p = padded_.data();
    int64_t len = L_;
    while (len > 1) {
      const int32_t half = static_cast<int32_t>(len / 2);
      for (int64_t e = 0; e < n; ++e) pos[e] += (p[pos[e] + half - 1] <= a[e]) ? half : 0;
      len -= half;
    }
    for (int64_t e = 0; e < n; ++e) pos[e] += (p[pos[e]] <= a[e]) ? 1 : 0;
  }

 private:
  int64_t G_, L_;
  scalar_t lo_, scale_, last_;
  std::vector<int32_t> base_;        // [G]
  std::vector<scalar_t> padded_;     // [M + L]: s, then NaN
  std::vector<scalar_t> window_;     // [G, L]: padded[base[c] + j]
};

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

// sums[c][k] += (g, g * a) for the elements of one task, element j into copy j % kCopies;
// copies are kCopies * stride doubles apart, each a [.., 2] table of (sum g, sum g * a).
template <typename scalar_t>
inline void bucket_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ a,
                        const int32_t* __restrict__ pos, double* __restrict__ sums, int64_t stride,
                        int64_t n) {
  int64_t j = 0;
  for (; j + kCopies <= n; j += kCopies)
    for (int64_t c = 0; c < kCopies; ++c) {
      const double gd = static_cast<double>(g[j + c]);
      double* p = sums + c * stride + 2 * pos[j + c];
      p[0] += gd;
      p[1] += gd * static_cast<double>(a[j + c]);
    }
  for (; j < n; ++j) {
    const double gd = static_cast<double>(g[j]);
    double* p = sums + 2 * pos[j];
    p[0] += gd;
    p[1] += gd * static_cast<double>(a[j]);
  }
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

void check_inputs(const torch::Tensor& a, const torch::Tensor& row_task, const torch::Tensor& s,
                  const torch::Tensor& A) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be a contiguous [R, N] tensor");
  TORCH_CHECK(row_task.dim() == 1 && row_task.size(0) == a.size(0) && row_task.is_contiguous() &&
              row_task.scalar_type() == torch::kLong, "row_task must be a contiguous int64 [R] tensor");
  TORCH_CHECK(s.dim() == 1 && s.size(0) >= 1 && s.is_contiguous() && s.scalar_type() == a.scalar_type(),
              "s must be a contiguous [M] tensor (M >= 1) of a's dtype");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == s.size(0) + 1 && A.is_contiguous() &&
              A.scalar_type() == a.scalar_type(), "A must be a contiguous [T, M + 1] tensor of a's dtype");
}

}  // namespace

// a [R, N], row_task [R] (int64), s [M] sorted, A and S [T, M + 1]
// -> (out [R, N], k [R, N] uint8 when keep_buckets and M <= 255, else an empty tensor:
//     the backward pass then finds the buckets again)
std::vector<torch::Tensor> tal_forward(torch::Tensor a, torch::Tensor row_task, torch::Tensor s,
                                       torch::Tensor A, torch::Tensor S, bool keep_buckets) {
  check_inputs(a, row_task, s, A);
  TORCH_CHECK(S.sizes() == A.sizes() && S.is_contiguous() && S.scalar_type() == a.scalar_type(),
              "S must be shaped and typed like A");
  const int64_t R = a.size(0), N = a.size(1), M = s.size(0);
  auto out = torch::empty_like(a);
  const bool keep = keep_buckets && M <= 255;
  auto k = torch::empty({keep ? R : 0, N}, a.options().dtype(torch::kUInt8));
  const int64_t* rt = row_task.data_ptr<int64_t>();
  uint8_t* kp = keep ? k.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tal_forward", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* Sp = S.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const BucketFinder<scalar_t> finder(s.data_ptr<scalar_t>(), M);
    at::parallel_for(0, R * N, 16384, [&](int64_t lo, int64_t hi) {
      int32_t pos[kBlock];
      for_rows(lo, hi, N, [&](int64_t r, int64_t b, int64_t e) {
        const scalar_t* At = Ap + rt[r] * (M + 1);
        const scalar_t* St = Sp + rt[r] * (M + 1);
        const int64_t base = r * N;
        for (int64_t i = b; i < e; i += kBlock) {
          const int64_t n = std::min(kBlock, e - i);
          const scalar_t* x = ap + base + i;
          finder.find(x, n, pos);
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
  check_inputs(a, row_task, s, A);
  TORCH_CHECK(g.sizes() == a.sizes() && g.is_contiguous() && g.scalar_type() == a.scalar_type(),
              "g must be shaped and typed like a");
  TORCH_CHECK(k.numel() == 0 || (k.sizes() == a.sizes() && k.is_contiguous() && k.scalar_type() == torch::kUInt8),
              "k must be empty or a contiguous uint8 tensor shaped like a");
  const int64_t R = a.size(0), N = a.size(1), M = s.size(0);
  const int64_t T = A.size(0), K = A.size(1);
  const int64_t total = R * N;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 65536));
  const int64_t table = T * K * 2;   // one copy of the (sum g, sum g * a) pairs
  auto partial = torch::zeros({P, kCopies, T, K, 2}, a.options().dtype(torch::kFloat64));
  auto grad_a = need_grad_a ? torch::empty_like(a) : torch::empty({0}, a.options());
  const int64_t* rt = row_task.data_ptr<int64_t>();
  const uint8_t* kp = k.numel() ? k.data_ptr<uint8_t>() : nullptr;
  double* bins = partial.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "tal_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    scalar_t* gap = need_grad_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    const BucketFinder<scalar_t> finder(s.data_ptr<scalar_t>(), M);
    // A fixed split into P chunks makes the sums independent of thread scheduling.
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double* chunk = bins + p * kCopies * table;
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
              finder.find(ap + i, n, pos);
            bucket_sums(gp + i, ap + i, pos, chunk + 2 * off, table, n);
            if (gap)
              slope_times_grad(gp + i, ap + i, pos, At, gap + i, n);
          }
        });
      }
    });
  });
  auto sums = partial.sum({0, 1}).permute({2, 0, 1}).contiguous();   // [2, T, K]
  return {grad_a, sums};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &tal_forward, "TAL activation forward (CPU)");
  m.def("backward", &tal_backward, "TAL activation backward sums (CPU)");
}
