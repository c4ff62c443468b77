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

// Optional batch norm folded in: with per-channel scale and shift ([C] each, C dividing N,
// channel c the c-th of C equal pieces of every row), the activation's input is
//     a = z * scale[c] + shift[c]
// computed here from z, so that a is never stored: the caller keeps z instead. Empty
// scale and shift: a = z.
template <typename scalar_t>
struct ChannelAffine {
  const scalar_t* scale = nullptr;
  const scalar_t* shift = nullptr;
  int64_t C = 1, P = 0;   // channels per row, elements per channel

  ChannelAffine(const torch::Tensor& sc, const torch::Tensor& sh, int64_t N) : P(N) {
    if (sc.numel()) {
      C = sc.numel();
      P = N / C;
      scale = sc.data_ptr<scalar_t>();
      shift = sh.data_ptr<scalar_t>();
    }
  }
  // The activation's input for n elements of channel c: z itself, or the affine map into buf.
  const scalar_t* input(const scalar_t* z, int64_t c, int64_t n, scalar_t* buf) const {
    if (!scale) return z;
    const scalar_t sc = scale[c], sh = shift[c];
    for (int64_t j = 0; j < n; ++j) buf[j] = z[j] * sc + sh;
    return buf;
  }
};

void check_affine(const torch::Tensor& z, const torch::Tensor& scale, const torch::Tensor& shift) {
  if (!scale.numel()) return;
  TORCH_CHECK(scale.dim() == 1 && shift.sizes() == scale.sizes() && scale.is_contiguous() && shift.is_contiguous() &&
              scale.scalar_type() == z.scalar_type() && shift.scalar_type() == z.scalar_type() &&
              z.size(1) % scale.size(0) == 0, "scale and shift must be contiguous [C] tensors of z's dtype, "
              "C dividing the row length");
}

}  // namespace

// z [R, N], row_task [R] (int64), s [M] sorted, A and S [T, M + 1], scale and shift [C] or empty
// -> (out [R, N] = f(a), a = z or z * scale + shift per channel;
//     k [R, N] uint8 when keep_buckets and M <= 255, else an empty tensor: the backward pass
//     then finds the buckets again)
std::vector<torch::Tensor> tal_forward(torch::Tensor z, torch::Tensor row_task, torch::Tensor s,
                                       torch::Tensor A, torch::Tensor S, bool keep_buckets,
                                       torch::Tensor scale, torch::Tensor shift) {
  check_inputs(z, row_task, s, A);
  check_affine(z, scale, shift);
  TORCH_CHECK(S.sizes() == A.sizes() && S.is_contiguous() && S.scalar_type() == z.scalar_type(),
              "S must be shaped and typed like A");
  const int64_t R = z.size(0), N = z.size(1), M = s.size(0);
  auto out = torch::empty_like(z);
  const bool keep = keep_buckets && M <= 255;
  auto k = torch::empty({keep ? R : 0, N}, z.options().dtype(torch::kUInt8));
  const int64_t* rt = row_task.data_ptr<int64_t>();
  uint8_t* kp = keep ? k.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tal_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    const scalar_t* Sp = S.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const BucketFinder<scalar_t> finder(s.data_ptr<scalar_t>(), M);
    const ChannelAffine<scalar_t> affine(scale, shift, N);
    const int64_t C = affine.C, P = affine.P;
    // pieces of rows are channels: piece q is row q / C, channel q % C
    at::parallel_for(0, R * N, 16384, [&](int64_t lo, int64_t hi) {
      int32_t pos[kBlock];
      scalar_t buf[kBlock];
      for_rows(lo, hi, P, [&](int64_t q, int64_t b, int64_t e) {
        const int64_t r = q / C;
        const scalar_t* At = Ap + rt[r] * (M + 1);
        const scalar_t* St = Sp + rt[r] * (M + 1);
        const int64_t base = q * P;
        for (int64_t i = b; i < e; i += kBlock) {
          const int64_t n = std::min(kBlock, e - i);
          const scalar_t* x = affine.input(zp + base + i, q % C, n, buf);
          finder.find(x, n, pos);
          activation(x, pos, At, St, op + base + i, kp ? kp + base + i : nullptr, n);
        }
      });
    });
  });
  return {out, k};
}

// g, z [R, N], k [R, N] uint8 or empty, row_task [R], s [M] sorted, A [T, M + 1],
// scale and shift [C] or empty (as in tal_forward)
// -> (grad_a [R, N] (empty if not wanted), sums [2, T, M + 1] float64: sum g, sum g * a per
//     bucket; with scale: channel [2, C] float64: sum grad_a, sum grad_a * z per channel)
std::vector<torch::Tensor> tal_backward(torch::Tensor g, torch::Tensor z, torch::Tensor k,
                                        torch::Tensor row_task, torch::Tensor s, torch::Tensor A,
                                        bool need_grad_a, torch::Tensor scale, torch::Tensor shift) {
  check_inputs(z, row_task, s, A);
  check_affine(z, scale, shift);
  TORCH_CHECK(g.sizes() == z.sizes() && g.is_contiguous() && g.scalar_type() == z.scalar_type(),
              "g must be shaped and typed like z");
  TORCH_CHECK(k.numel() == 0 || (k.sizes() == z.sizes() && k.is_contiguous() && k.scalar_type() == torch::kUInt8),
              "k must be empty or a contiguous uint8 tensor shaped like z");
  const bool channels = scale.numel() > 0;
  TORCH_CHECK(need_grad_a || !channels, "with scale and shift, grad_a is needed");
  const int64_t R = z.size(0), N = z.size(1), M = s.size(0);
  const int64_t T = A.size(0), K = A.size(1);
  const int64_t total = R * N;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 65536));
  const int64_t table = T * K * 2;   // one copy of the (sum g, sum g * a) pairs
  const int64_t C = channels ? scale.numel() : 0;
  auto partial = torch::zeros({P, kCopies, T, K, 2}, z.options().dtype(torch::kFloat64));
  auto per_channel = torch::zeros({P, 2, C}, z.options().dtype(torch::kFloat64));
  auto grad_a = need_grad_a ? torch::empty_like(z) : torch::empty({0}, z.options());
  const int64_t* rt = row_task.data_ptr<int64_t>();
  const uint8_t* kp = k.numel() ? k.data_ptr<uint8_t>() : nullptr;
  double* bins = partial.data_ptr<double>();
  double* chan = per_channel.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tal_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* Ap = A.data_ptr<scalar_t>();
    scalar_t* gap = need_grad_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    const BucketFinder<scalar_t> finder(s.data_ptr<scalar_t>(), M);
    const ChannelAffine<scalar_t> affine(scale, shift, N);
    const int64_t CP = affine.C, Pc = affine.P;
    // A fixed split into P chunks makes the sums independent of thread scheduling.
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double* chunk = bins + p * kCopies * table;
        double* chunk_chan = chan + p * 2 * C;
        for_rows(total * p / P, total * (p + 1) / P, Pc, [&](int64_t q, int64_t b, int64_t e) {
          const int64_t off = rt[q / CP] * K;
          const scalar_t* At = Ap + off;
          const int64_t base = q * Pc;
          int32_t pos[kBlock];
          scalar_t buf[kBlock];
          double sum_ga = 0, sum_gaz = 0;
          for (int64_t i = base + b; i < base + e; i += kBlock) {
            const int64_t n = std::min(kBlock, base + e - i);
            const scalar_t* x = affine.input(zp + i, q % CP, n, buf);
            if (kp)
              for (int64_t j = 0; j < n; ++j) pos[j] = kp[i + j];
            else
              finder.find(x, n, pos);
            bucket_sums(gp + i, x, pos, chunk + 2 * off, table, n);
            if (gap)
              slope_times_grad(gp + i, x, pos, At, gap + i, n);
            if (channels)
              for (int64_t j = 0; j < n; ++j) {
                sum_ga += static_cast<double>(gap[i + j]);
                sum_gaz += static_cast<double>(gap[i + j]) * static_cast<double>(zp[i + j]);
              }
          }
          if (channels) {
            chunk_chan[q % CP] += sum_ga;
            chunk_chan[C + q % CP] += sum_gaz;
          }
        });
      }
    });
  });
  auto sums = partial.sum(std::vector<int64_t>{0, 1}).permute({2, 0, 1}).contiguous();   // [2, T, K]
  return {grad_a, sums, per_channel.sum(0)};
}

// z [R, C * P] (channel c the c-th of C pieces of a row) -> (mean [C], biased variance [C])
// in float64, by two passes: the mean, then the mean squared deviation from it.
std::vector<torch::Tensor> channel_stats(torch::Tensor z, int64_t C) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && C > 0 && z.size(1) % C == 0,
              "z must be a contiguous [R, C * P] tensor");
  const int64_t R = z.size(0), P = z.size(1) / C;
  auto seg = torch::empty({R, C}, z.options().dtype(torch::kFloat64));   // one sum per (row, channel)
  double* sp = seg.data_ptr<double>();
  auto per_piece = [&](auto&& fn) {
    at::parallel_for(0, R * C, std::max<int64_t>(1, 65536 / std::max<int64_t>(P, 1)),
                     [&](int64_t lo, int64_t hi) {
                       for (int64_t q = lo; q < hi; ++q) sp[q] = fn(q);
                     });
  };
  torch::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "channel_stats", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    per_piece([&](int64_t q) {
      double sum = 0;
      for (int64_t j = 0; j < P; ++j) sum += static_cast<double>(zp[q * P + j]);
      return sum;
    });
    mean = seg.sum(0) / static_cast<double>(R * P);
    const double* mp = mean.data_ptr<double>();
    per_piece([&](int64_t q) {
      const double m = mp[q % C];
      double sum = 0;
      for (int64_t j = 0; j < P; ++j) {
        const double d = static_cast<double>(zp[q * P + j]) - m;
        sum += d * d;
      }
      return sum;
    });
    var = seg.sum(0) / static_cast<double>(R * P);
  });
  return {mean, var};
}

// x = x * c1[c] + z * c2[c] + c3[c] in place, x and z [R, C * P] (channel c the c-th of C
// pieces of a row): the last step of batch norm's backward pass.
void channel_affine_(torch::Tensor x, torch::Tensor z, torch::Tensor c1, torch::Tensor c2, torch::Tensor c3) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && z.sizes() == x.sizes() && z.is_contiguous() &&
              z.scalar_type() == x.scalar_type(), "x and z must be contiguous [R, N] tensors of one dtype");
  const int64_t C = c1.numel(), R = x.size(0), N = x.size(1);
  TORCH_CHECK(C > 0 && N % C == 0 && c2.numel() == C && c3.numel() == C, "c1, c2, c3 must have C values, C dividing N");
  const int64_t P = N / C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_affine_", [&] {
    auto a1 = c1.to(x.scalar_type()).contiguous(), a2 = c2.to(x.scalar_type()).contiguous(),
         a3 = c3.to(x.scalar_type()).contiguous();
    const scalar_t *p1 = a1.data_ptr<scalar_t>(), *p2 = a2.data_ptr<scalar_t>(), *p3 = a3.data_ptr<scalar_t>();
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, R * N, 16384, [&](int64_t lo, int64_t hi) {
      for_rows(lo, hi, P, [&](int64_t q, int64_t b, int64_t e) {
        const int64_t c = q % C;
        const scalar_t u = p1[c], v = p2[c], w = p3[c];
        scalar_t* __restrict__ xr = xp + q * P;
        const scalar_t* __restrict__ zr = zp + q * P;
        for (int64_t j = b; j < e; ++j) xr[j] = xr[j] * u + zr[j] * v + w;
      });
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &tal_forward, "TAL activation forward (CPU), batch norm optionally folded in");
  m.def("backward", &tal_backward, "TAL activation backward sums (CPU), batch norm optionally folded in");
  m.def("channel_affine_", &channel_affine_, "x = x * c1 + z * c2 + c3 per channel, in place (CPU)");
  m.def("channel_stats", &channel_stats, "per-channel mean and biased variance, float64 (CPU)");
}
