// Fused CPU kernel of the TAL activation
//
//     f_t(a) = relu(a) + sum_m alpha[t, m] relu(s_m - a)
//
// Grouped bases: basis is [G, M] and alpha [T, M] with T = G * Tg; task t uses the basis
// of group t / Tg (a TAL layer has G = 1; R runs stacked have G = R, Tg tasks each).
// With a group's basis sorted (s_0 <= ... <= s_{M-1}) and k(a) = #{m : s_m <= a}, only
// the terms m >= k are active, so with suffix tables A[t, k] = sum_{m >= k} alpha[t, m]
// and S[t, k] = sum_{m >= k} alpha[t, m] s_m (in the sorted order of t's group):
//
//     f_t(a) = relu(a) + S[t, k(a)] - a * A[t, k(a)].
//
// The kernel builds the sorted bases and the tables itself (its prologue: O(G M log M + T M)),
// so a call is one function. Its backward pass sums g and g * a per task and bucket and
// turns the sums into the gradients of alpha and of the basis with cumulative sums:
//
//     dL/dalpha[t, m] = s_m cg[t, m] - cga[t, m],   dL/ds_m = sum_{t in the group} alpha[t, m] cg[t, m]
//
// with cg, cga the sums over the buckets k <= m. Every sum is taken in float64 in a fixed
// order, so the results do not depend on thread scheduling. The pure-PyTorch path in
// _tal_kernel.py computes the same formulas with the same roundings.
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
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
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

// The sorted bases and the suffix tables of alpha [T, M] and basis [G, M] (T = G * Tg).
// Each group's basis is sorted stably with NaN last (the order of torch.sort(stable=True)),
// and the suffix sums are accumulated in float64 from the top and rounded once per entry
// (as torch's CPU cumsum does), so the PyTorch path builds the same tables bit for bit.
template <typename scalar_t>
struct Tables {
  int64_t G, T, M, Tg;
  std::vector<scalar_t> s;            // [G, M] sorted
  std::vector<int64_t> perm;          // [G, M]: s[g, j] = basis[g, perm[g, j]]
  std::vector<scalar_t> A, S;         // [T, M + 1]
  std::vector<BucketFinder<scalar_t>> finders;   // [G]

  Tables(const torch::Tensor& alpha, const torch::Tensor& basis, bool need_S)
      : G(basis.size(0)), T(alpha.size(0)), M(basis.size(1)), Tg(alpha.size(0) / basis.size(0)),
        s(G * M), perm(G * M), A(T * (M + 1)), S(need_S ? T * (M + 1) : 0) {
    const scalar_t* b = basis.data_ptr<scalar_t>();
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    finders.reserve(G);
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* bg = b + g * M;
      int64_t* pg = perm.data() + g * M;
      std::iota(pg, pg + M, int64_t(0));
      std::stable_sort(pg, pg + M, [bg](int64_t i, int64_t j) {
        return !std::isnan(bg[i]) && (std::isnan(bg[j]) || bg[i] < bg[j]);
      });
      for (int64_t j = 0; j < M; ++j) s[g * M + j] = bg[pg[j]];
      finders.emplace_back(s.data() + g * M, M);
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t g = t / Tg;
      const scalar_t* sg = s.data() + g * M;
      const int64_t* pg = perm.data() + g * M;
      scalar_t* At = A.data() + t * (M + 1);
      double acc_a = 0, acc_s = 0;
      At[M] = scalar_t(0);
      if (need_S) S[t * (M + 1) + M] = scalar_t(0);
      for (int64_t j = M - 1; j >= 0; --j) {
        const scalar_t w = al[t * M + pg[j]];
        acc_a += static_cast<double>(w);
        At[j] = static_cast<scalar_t>(acc_a);
        if (need_S) {
          acc_s += static_cast<double>(static_cast<scalar_t>(w * sg[j]));
          S[t * (M + 1) + j] = static_cast<scalar_t>(acc_s);
        }
      }
    }
  }
  int64_t group(int64_t task) const { return task / Tg; }
};

void check_inputs(const torch::Tensor& a, const torch::Tensor& row_task, const torch::Tensor& alpha,
                  const torch::Tensor& basis) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be a contiguous [R, N] tensor");
  TORCH_CHECK(row_task.dim() == 1 && row_task.size(0) == a.size(0) && row_task.is_contiguous() &&
              row_task.scalar_type() == torch::kLong, "row_task must be a contiguous int64 [R] tensor");
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) >= 1 && basis.size(1) >= 1 && basis.is_contiguous() &&
              basis.scalar_type() == a.scalar_type(), "basis must be a contiguous [G, M] tensor of a's dtype");
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(1) == basis.size(1) && alpha.size(0) % basis.size(0) == 0 &&
              alpha.is_contiguous() && alpha.scalar_type() == a.scalar_type(),
              "alpha must be a contiguous [T, M] tensor of a's dtype, T a multiple of the G groups of basis");
  const int64_t* rt = row_task.data_ptr<int64_t>();
  const int64_t T = alpha.size(0);
  for (int64_t r = 0; r < row_task.size(0); ++r)
    TORCH_CHECK_INDEX(rt[r] >= 0 && rt[r] < T, "task id out of range: got ", rt[r], ", but alpha has ", T, " tasks");
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
    if (sc.defined() && sc.numel()) {
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

// An undefined or empty scale: no batch norm.
bool has_affine(const torch::Tensor& scale) { return scale.defined() && scale.numel() > 0; }

void check_affine(const torch::Tensor& z, const torch::Tensor& scale, const torch::Tensor& shift) {
  if (!has_affine(scale)) return;
  TORCH_CHECK(scale.dim() == 1 && shift.sizes() == scale.sizes() && scale.is_contiguous() && shift.is_contiguous() &&
              scale.scalar_type() == z.scalar_type() && shift.scalar_type() == z.scalar_type() &&
              z.size(1) % scale.size(0) == 0, "scale and shift must be contiguous [C] tensors of z's dtype, "
              "C dividing the row length");
}

}  // namespace

// z [R, N], row_task [R] (int64), alpha [T, M], basis [G, M], scale and shift [C] or empty
// -> (out [R, N] = f(a), a = z or z * scale + shift per channel;
//     k [R, N] uint8 when keep_buckets and M <= 255, else an empty [0, N] tensor: the
//     backward pass then finds the buckets again)
std::vector<torch::Tensor> tal_forward(torch::Tensor z, torch::Tensor row_task, torch::Tensor alpha,
                                       torch::Tensor basis, bool keep_buckets, torch::Tensor scale,
                                       torch::Tensor shift) {
  check_inputs(z, row_task, alpha, basis);
  check_affine(z, scale, shift);
  const int64_t R = z.size(0), N = z.size(1), M = basis.size(1);
  auto out = torch::empty_like(z);
  const bool keep = keep_buckets && M <= 255;
  auto k = torch::empty({keep ? R : 0, N}, z.options().dtype(torch::kUInt8));
  if (z.numel() == 0) return {out, k};
  const int64_t* rt = row_task.data_ptr<int64_t>();
  uint8_t* kp = keep ? k.data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tal_forward", [&] {
    const Tables<scalar_t> tables(alpha, basis, true);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const ChannelAffine<scalar_t> affine(scale, shift, N);
    const int64_t C = affine.C, P = affine.P;
    // pieces of rows are channels: piece q is row q / C, channel q % C
    at::parallel_for(0, R * N, 16384, [&](int64_t lo, int64_t hi) {
      int32_t pos[kBlock];
      scalar_t buf[kBlock];
      for_rows(lo, hi, P, [&](int64_t q, int64_t b, int64_t e) {
        const int64_t t = rt[q / C];
        const auto& finder = tables.finders[tables.group(t)];
        const scalar_t* At = tables.A.data() + t * (M + 1);
        const scalar_t* St = tables.S.data() + t * (M + 1);
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

// g, z [R, N], k [R, N] uint8 or empty, row_task [R], alpha [T, M], basis [G, M],
// scale and shift [C] or empty (as in tal_forward)
// -> (grad_a [R, N] (empty if not wanted), grad_alpha [T, M], grad_basis [G, M],
//     channel [2, C] float64: with scale, the sums of grad_a and of grad_a * z per channel)
std::vector<torch::Tensor> tal_backward(torch::Tensor g, torch::Tensor z, torch::Tensor k,
                                        torch::Tensor row_task, torch::Tensor alpha, torch::Tensor basis,
                                        bool need_grad_a, torch::Tensor scale, torch::Tensor shift) {
  check_inputs(z, row_task, alpha, basis);
  check_affine(z, scale, shift);
  TORCH_CHECK(g.sizes() == z.sizes() && g.is_contiguous() && g.scalar_type() == z.scalar_type(),
              "g must be shaped and typed like z");
  TORCH_CHECK(k.numel() == 0 || (k.sizes() == z.sizes() && k.is_contiguous() && k.scalar_type() == torch::kUInt8),
              "k must be empty or a contiguous uint8 tensor shaped like z");
  const bool channels = has_affine(scale);
  TORCH_CHECK(need_grad_a || !channels, "with scale and shift, grad_a is needed");
  const int64_t R = z.size(0), N = z.size(1), M = basis.size(1);
  const int64_t T = alpha.size(0), K = M + 1, G = basis.size(0);
  const int64_t total = R * N;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 65536));
  const int64_t table = T * K * 2;   // one copy of the (sum g, sum g * a) pairs
  const int64_t C = channels ? scale.numel() : 0;
  auto partial = torch::empty({P, kCopies, T, K, 2}, z.options().dtype(torch::kFloat64));
  std::fill_n(partial.data_ptr<double>(), partial.numel(), 0.0);
  auto per_channel = channels ? torch::zeros({P, 2, C}, z.options().dtype(torch::kFloat64)) : torch::Tensor();
  auto grad_a = need_grad_a ? torch::empty_like(z) : torch::empty({0}, z.options());
  auto grad_alpha = torch::empty_like(alpha);
  auto grad_basis = torch::empty_like(basis);
  const int64_t* rt = row_task.data_ptr<int64_t>();
  const uint8_t* kp = k.numel() ? k.data_ptr<uint8_t>() : nullptr;
  double* bins = partial.data_ptr<double>();
  double* chan = channels ? per_channel.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "tal_backward", [&] {
    const Tables<scalar_t> tables(alpha, basis, false);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* gap = need_grad_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    const ChannelAffine<scalar_t> affine(scale, shift, N);
    const int64_t CP = affine.C, Pc = affine.P;
    // A fixed split into P chunks makes the sums independent of thread scheduling.
    if (total > 0)
      at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          double* chunk = bins + p * kCopies * table;
          double* chunk_chan = chan + p * 2 * C;
          for_rows(total * p / P, total * (p + 1) / P, Pc, [&](int64_t q, int64_t b, int64_t e) {
            const int64_t t = rt[q / CP];
            const auto& finder = tables.finders[tables.group(t)];
            const scalar_t* At = tables.A.data() + t * K;
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
              bucket_sums(gp + i, x, pos, chunk + 2 * t * K, table, n);
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
    // The per-bucket sums in a fixed order (chunks, then copies), then their cumulative
    // sums over the buckets k <= m, and the gradients in the basis's own order.
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    scalar_t* gal = grad_alpha.data_ptr<scalar_t>();
    scalar_t* gb = grad_basis.data_ptr<scalar_t>();
    std::vector<double> basis_sum(G * M, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t grp = tables.group(t);
      const scalar_t* sg = tables.s.data() + grp * M;
      const int64_t* pg = tables.perm.data() + grp * M;
      double cg = 0, cga = 0;
      for (int64_t m = 0; m < M; ++m) {
        double sg_m = 0, sga_m = 0;
        for (int64_t p = 0; p < P * kCopies; ++p) {
          const double* cell = bins + p * table + 2 * (t * K + m);
          sg_m += cell[0];
          sga_m += cell[1];
        }
        cg += sg_m;
        cga += sga_m;
        gal[t * M + pg[m]] = static_cast<scalar_t>(static_cast<double>(sg[m]) * cg - cga);
        basis_sum[grp * M + m] += static_cast<double>(al[t * M + pg[m]]) * cg;
      }
    }
    for (int64_t grp = 0; grp < G; ++grp)
      for (int64_t m = 0; m < M; ++m)
        gb[grp * M + tables.perm[grp * M + m]] = static_cast<scalar_t>(basis_sum[grp * M + m]);
  });
  return {grad_a, grad_alpha, grad_basis, channels ? per_channel.sum(0) : torch::Tensor()};
}

// The activation as an autograd function of its own, so that an eager call on the CPU runs
// no Python in its backward pass: a [R, *], row r for task row_task[r] -> out shaped like a.
class TALActivation : public torch::autograd::Function<TALActivation> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a,
                               const torch::Tensor& alpha, const torch::Tensor& basis,
                               const torch::Tensor& row_task, bool keep_buckets) {
    const bool flat = a.dim() == 2 && a.is_contiguous();
    const auto rows = flat ? a : a.contiguous().view({a.size(0), c10::multiply_integers(a.sizes().slice(1))});
    auto result = tal_forward(rows, row_task.contiguous(), alpha.contiguous(), basis.contiguous(), keep_buckets,
                              torch::Tensor(), torch::Tensor());
    ctx->save_for_backward({rows, result[1], alpha, basis, row_task});
    return flat ? result[0] : result[0].view(a.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the TAL activation has no second derivative (backward with create_graph=True)");
    const auto saved = ctx->get_saved_variables();
    const auto& rows = saved[0];
    const bool need_a = ctx->needs_input_grad(0);
    const auto& grad = grads[0];
    const bool flat = grad.dim() == 2 && grad.is_contiguous();
    auto result = tal_backward(flat ? grad : grad.contiguous().view(rows.sizes()), rows, saved[1],
                               saved[4].contiguous(), saved[2].contiguous(), saved[3].contiguous(), need_a,
                               torch::Tensor(), torch::Tensor());
    return {need_a ? (flat ? result[0] : result[0].view(grad.sizes())) : torch::Tensor(),
            ctx->needs_input_grad(1) ? result[1] : torch::Tensor(),
            ctx->needs_input_grad(2) ? result[2] : torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

torch::Tensor tal_activation(const torch::Tensor& a, const torch::Tensor& alpha, const torch::Tensor& basis,
                             const torch::Tensor& row_task, bool keep_buckets) {
  return TALActivation::apply(a, alpha, basis, row_task, keep_buckets);
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
  m.def("activation", &tal_activation, "TAL activation with its backward pass (CPU): a [R, *] -> out like a");
  m.def("forward", &tal_forward, "TAL activation forward (CPU): tables, buckets, output; batch norm optionally folded in");
  m.def("backward", &tal_backward, "TAL activation backward (CPU): grad of a, alpha and basis; batch norm optionally folded in");
  m.def("channel_affine_", &channel_affine_, "x = x * c1 + z * c2 + c3 per channel, in place (CPU)");
  m.def("channel_stats", &channel_stats, "per-channel mean and biased variance, float64 (CPU)");
}
