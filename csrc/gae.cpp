// gae: masked generalized advantage estimation on CPU as a reverse scan, SIMD across rows.
//
// The recurrence runs backward along each row (A_t = delta_t + gamma*lam*A_next), so one row cannot be
// vectorized along time, but 8 rows can run side by side in the 8 float lanes of an AVX2 register. Rows
// are row-major (B, T) in memory, so each block of 8 rows is walked backward in tiles of 8 rows x 16 steps:
// a tile is loaded with two 32-byte reads per row (one whole 64-byte line), transposed 8x8 in registers
// (each register then holds one time step of the 8 rows), scanned, transposed back and stored. Each input
// byte is read once and each output byte written once; nothing is staged in memory. Partial tiles (B not
// a multiple of 8, T not of 16) go through a scratch tile whose extra lanes and steps are masked.
//
// Masking is the convention of rlaif_fast/ops/advantages.py: a masked token is skipped (its lane's carries
// pass through unchanged, by a bitwise select) and its outputs are 0; whatever a masked input holds (inf,
// nan) never reaches an output. The arithmetic is the reference loop's, in the storage dtype and in the
// same order, with no fused multiply-add: fp32 results equal the loop's bit for bit (tested), and fp64 the
// same. Machines without AVX2 and float64 inputs take the plain scalar loop, which does the same
// arithmetic.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "batching.h"
#include "checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RLAIF_HAVE_AVX2_PATH 1
#endif

namespace rlaif {

namespace {

struct Args {
  const void* rewards;
  const void* values;
  const uint8_t* mask;
  void* adv;
  void* ret;
  int64_t B, T;
  double gamma, c;  // c = gamma * lam, computed in double like Python does, then rounded to the dtype
  bool simd;        // false: the scalar loop even where AVX2 runs (tests compare the two)
};

// Rows [b0, b1) one at a time: the reference loop, step for step.
template <typename S>
void scan_rows_scalar(const Args& a, int64_t b0, int64_t b1) {
  const S* r = static_cast<const S*>(a.rewards);
  const S* v = static_cast<const S*>(a.values);
  S* adv = static_cast<S*>(a.adv);
  S* ret = static_cast<S*>(a.ret);
  const S gamma = static_cast<S>(a.gamma), c = static_cast<S>(a.c);
  const int64_t T = a.T;
  for (int64_t b = b0; b < b1; ++b) {
    S next_v = 0, next_a = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = b * T + t;
      if (a.mask[i] == 0) {
        adv[i] = 0;
        ret[i] = 0;
        continue;
      }
      const S delta = (r[i] + gamma * next_v) - v[i];
      const S at = delta + c * next_a;
      adv[i] = at;
      ret[i] = at + v[i];
      next_a = at;
      next_v = v[i];
    }
  }
}

#ifdef RLAIF_HAVE_AVX2_PATH

#define RLAIF_AVX2 __attribute__((target("avx2")))


// In place: x[i] holds row i of an 8x8 tile on entry and column i on return.
RLAIF_AVX2 inline void transpose8(__m256* x) {
  const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
  const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
  const __m256 t4 = _mm256_unpacklo_ps(x[4], x[5]), t5 = _mm256_unpackhi_ps(x[4], x[5]);
  const __m256 t6 = _mm256_unpacklo_ps(x[6], x[7]), t7 = _mm256_unpackhi_ps(x[6], x[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  x[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  x[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  x[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  x[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  x[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  x[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  x[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  x[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The scan over one 8x8 tile, transposed (X[j]: time step j of the 8 rows): on entry R, V, M hold the
// rewards, values and valid masks (all ones where valid); on return R and V hold the advantages and returns.
// nv, na: the 8 lanes' carries (value and advantage of the next valid token).
RLAIF_AVX2 inline void scan8(__m256* R, __m256* V, const __m256* M, __m256 gamma, __m256 c, __m256& nv,
                             __m256& na) {
  for (int j = 7; j >= 0; --j) {
    const __m256 vj = _mm256_and_ps(M[j], V[j]), rj = _mm256_and_ps(M[j], R[j]);
    const __m256 delta = _mm256_sub_ps(_mm256_add_ps(rj, _mm256_mul_ps(gamma, nv)), vj);
    const __m256 at = _mm256_add_ps(delta, _mm256_mul_ps(c, na));
    R[j] = _mm256_and_ps(M[j], at);
    V[j] = _mm256_and_ps(M[j], _mm256_add_ps(at, vj));
    na = _mm256_blendv_ps(na, at, M[j]);
    nv = _mm256_blendv_ps(nv, vj, M[j]);
  }
}

RLAIF_AVX2 inline __m256 valid8(const uint8_t* m) {
  uint64_t bytes;
  std::memcpy(&bytes, m, 8);
  const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));  // all ones where valid
}

// 8 rows x 16 steps: row i of each operand starts at base + i * stride. A tile spans whole 64-byte lines of
// an fp32 row, and each row's lines are read (and written) in one go: with a power-of-two row stride all 8
// rows of all operands fall in one L1 set, so a line left half-read is evicted before its second half is
// used (8-wide tiles: 0.32 ms at B=256, T=1024 against 0.17 ms at T=1000 on an AMD EPYC).
RLAIF_AVX2 inline void scan_tile(const float* r, const float* v, const uint8_t* m, float* adv, float* ret,
                                 int64_t stride, __m256 gamma, __m256 c, __m256& nv, __m256& na) {
  __m256 Rl[8], Rh[8], Vl[8], Vh[8], Ml[8], Mh[8];
  for (int i = 0; i < 8; ++i) {
    Rl[i] = _mm256_loadu_ps(r + i * stride);
    Rh[i] = _mm256_loadu_ps(r + i * stride + 8);
    Vl[i] = _mm256_loadu_ps(v + i * stride);
    Vh[i] = _mm256_loadu_ps(v + i * stride + 8);
    Ml[i] = valid8(m + i * stride);
    Mh[i] = valid8(m + i * stride + 8);
  }
  transpose8(Rh);
  transpose8(Vh);
  transpose8(Mh);
  scan8(Rh, Vh, Mh, gamma, c, nv, na);
  transpose8(Rl);
  transpose8(Vl);
  transpose8(Ml);
  scan8(Rl, Vl, Ml, gamma, c, nv, na);
  transpose8(Rh);
  transpose8(Vh);
  transpose8(Rl);
  transpose8(Vl);
  for (int i = 0; i < 8; ++i) {
    _mm256_storeu_ps(adv + i * stride, Rl[i]);
    _mm256_storeu_ps(adv + i * stride + 8, Rh[i]);
    _mm256_storeu_ps(ret + i * stride, Vl[i]);
    _mm256_storeu_ps(ret + i * stride + 8, Vh[i]);
  }
}

// Rows [b0, b0 + nl), nl <= 8. Tiles end at T, T - 16, ...: the partial tile, if any, is at t = 0.
RLAIF_AVX2 void scan_block_avx2(const Args& a, int64_t b0, int64_t nl) {
  constexpr int64_t W = 16;
  const float* r = static_cast<const float*>(a.rewards) + b0 * a.T;
  const float* v = static_cast<const float*>(a.values) + b0 * a.T;
  const uint8_t* m = a.mask + b0 * a.T;
  float* adv = static_cast<float*>(a.adv) + b0 * a.T;
  float* ret = static_cast<float*>(a.ret) + b0 * a.T;
  const int64_t T = a.T;
  const __m256 gamma = _mm256_set1_ps(static_cast<float>(a.gamma)), c = _mm256_set1_ps(static_cast<float>(a.c));
  __m256 nv = _mm256_setzero_ps(), na = _mm256_setzero_ps();
  for (int64_t end = T; end > 0; end -= W) {
    const int64_t t0 = end - W;
    if (nl == 8 && t0 >= 0) {
      scan_tile(r + t0, v + t0, m + t0, adv + t0, ret + t0, T, gamma, c, nv, na);
      continue;
    }
    // partial tile: real steps at the right of an 8 x 16 scratch tile, masked padding elsewhere
    alignas(32) float sr[8 * W] = {0}, sv[8 * W] = {0}, sa[8 * W], sg[8 * W];
    alignas(32) uint8_t sm[8 * W] = {0};
    const int64_t lo = std::max<int64_t>(t0, 0), k = end - lo, pad = W - k;
    for (int64_t i = 0; i < nl; ++i) {
      std::memcpy(sr + i * W + pad, r + i * T + lo, sizeof(float) * k);
      std::memcpy(sv + i * W + pad, v + i * T + lo, sizeof(float) * k);
      std::memcpy(sm + i * W + pad, m + i * T + lo, k);
    }
    scan_tile(sr, sv, sm, sa, sg, W, gamma, c, nv, na);
    for (int64_t i = 0; i < nl; ++i) {
      std::memcpy(adv + i * T + lo, sa + i * W + pad, sizeof(float) * k);
      std::memcpy(ret + i * T + lo, sg + i * W + pad, sizeof(float) * k);
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

#endif  // RLAIF_HAVE_AVX2_PATH

template <typename S>
void scan_rows(const Args& a, int64_t b0, int64_t b1) {
#ifdef RLAIF_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>) {
    if (a.simd && has_avx2()) {
      for (int64_t b = b0; b < b1; b += 8) scan_block_avx2(a, b, std::min<int64_t>(8, b1 - b));
      return;
    }
  }
#endif
  scan_rows_scalar<S>(a, b0, b1);
}

template <typename S>
void run(const Args& a, int64_t num_threads) {
  constexpr int64_t kRows = 8;  // threads split on whole blocks of 8 rows
  const int64_t blocks = (a.B + kRows - 1) / kRows;
  // a thread per ~1M elements at most: below that, starting a thread costs more than it saves
  const int64_t by_size = std::max<int64_t>(1, (a.B * a.T) / (int64_t{1} << 20));
  const int64_t n = std::max<int64_t>(1, std::min({num_threads, blocks, by_size}));
  if (n == 1) {
    scan_rows<S>(a, 0, a.B);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (blocks + n - 1) / n;
  for (int64_t i = 1; i < n; ++i) {
    const int64_t lo = std::min(a.B, i * per * kRows), hi = std::min(a.B, (i + 1) * per * kRows);
    if (lo < hi) pool.emplace_back([&a, lo, hi] { scan_rows<S>(a, lo, hi); });
  }
  scan_rows<S>(a, 0, std::min(a.B, per * kRows));
  for (auto& th : pool) th.join();
}

// A 2-D C-contiguous array of the expected dtype and shape, or a TypeError/ValueError naming it.
py::buffer_info checked(py::handle obj, const char* name, const py::dtype& dtype, int64_t B, int64_t T,
                        bool writable) {
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(dtype)) {
    type_error(std::string(name) + " has dtype " + py::str(arr.dtype()).cast<std::string>() + "; expected " +
               py::str(dtype).cast<std::string>());
  }
  if (arr.ndim() != 2 || arr.shape(0) != B || arr.shape(1) != T) {
    value_error(std::string(name) + " must have shape (" + std::to_string(B) + ", " + std::to_string(T) + ")");
  }
  if (!(arr.flags() & py::array::c_style)) value_error(std::string(name) + " must be C-contiguous");
  if (writable && !arr.writeable()) value_error(std::string(name) + " must be writable");
  return arr.request(writable);
}

}  // namespace

void gae(py::handle rewards, py::handle values, py::handle mask, py::handle adv, py::handle ret, double gamma,
         double lam, int64_t num_threads, bool simd) {
  if (!py::isinstance<py::array>(rewards)) type_error("rewards must be a NumPy array");
  auto r_arr = py::reinterpret_borrow<py::array>(rewards);
  if (r_arr.ndim() != 2) value_error("rewards must be 2-D (B, T), got " + std::to_string(r_arr.ndim()) + "-D");
  const int64_t B = r_arr.shape(0), T = r_arr.shape(1);
  const py::dtype dt = r_arr.dtype();
  const bool is_f32 = dt.is(py::dtype::of<float>());
  if (!is_f32 && !dt.is(py::dtype::of<double>())) {
    type_error("rewards has dtype " + py::str(dt).cast<std::string>() + "; the C++ scan takes float32 or float64");
  }
  if (!(gamma >= 0.0 && gamma <= 1.0)) value_error("gamma=" + std::to_string(gamma) + " is outside [0, 1]");
  if (!(lam >= 0.0 && lam <= 1.0)) value_error("lam=" + std::to_string(lam) + " is outside [0, 1]");
  for (auto [obj, name] : {std::pair{values, "values"}, std::pair{adv, "adv"}, std::pair{ret, "ret"},
                           std::pair{mask, "mask"}}) {
    if (!py::isinstance<py::array>(obj)) type_error(std::string(name) + " must be a NumPy array");
  }
  const auto rb = checked(rewards, "rewards", dt, B, T, false);
  const auto vb = checked(values, "values", dt, B, T, false);
  const auto mb = checked(mask, "mask", py::dtype::of<uint8_t>(), B, T, false);
  auto ab = checked(adv, "adv", dt, B, T, true);
  auto gb = checked(ret, "ret", dt, B, T, true);
  const Args a{rb.ptr, vb.ptr, static_cast<const uint8_t*>(mb.ptr), ab.ptr, gb.ptr, B, T, gamma, gamma * lam, simd};
  if (B == 0 || T == 0) return;
  py::gil_scoped_release release;
  if (is_f32) {
    run<float>(a, num_threads);
  } else {
    run<double>(a, num_threads);
  }
}

}  // namespace rlaif
