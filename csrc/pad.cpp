// pad_rollouts: prompt + response rows padded to one width, with the masks and position ids a causal
// LM needs. Left padding keeps every row's last token in the last column (generation); right padding
// keeps every row's first token in column 0 (training).
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>

#include "batching.h"
#include "checks.h"
#include "ragged.h"

namespace rlaif {

namespace {

// The part of rollout i that survives truncation: prompt[p0 : p0 + p_len] + response[0 : r_len].
struct Kept {
  int64_t p0, p_len, r_len;
};

Kept truncate(int64_t i, int64_t p, int64_t r, int64_t max_len, const std::string& truncation) {
  if (max_len < 0 || p + r <= max_len) return {0, p, r};
  if (truncation == "error") fail_too_long(i, p, r, max_len);
  if (truncation == "left") {
    // the response is what the loss is about: drop the oldest prompt tokens only, keep at least one
    check_left_truncation(i, r, max_len);
    const int64_t keep = max_len - r;
    return {p - keep, keep, r};
  }
  const int64_t keep_p = std::min(p, max_len);  // "right": the first max_len tokens
  return {0, keep_p, max_len - keep_p};
}

}  // namespace

py::tuple pad_rollouts(py::handle prompts, py::handle responses, int64_t pad_id, const std::string& padding_side,
                       int64_t max_len, const std::string& truncation) {
  if (padding_side != "left" && padding_side != "right") {
    value_error("padding_side='" + padding_side + "' is not supported; use 'left' or 'right'");
  }
  if (truncation != "error" && truncation != "left" && truncation != "right") {
    value_error("truncation='" + truncation + "' is not supported; use 'error', 'left' or 'right'");
  }
  check_at_least("pad_id", pad_id, 0);
  if (max_len != -1) check_at_least("max_len", max_len, 1);  // -1 stands for None
  const Ragged P = to_ragged(prompts, "prompts");
  const Ragged R = to_ragged(responses, "responses");
  check_same_count(P.size(), R.size());
  const int64_t B = P.size();
  std::vector<Kept> kept(B);
  int64_t W = 0;
  for (int64_t i = 0; i < B; ++i) check_prompt_nonempty(i, P.len(i));
  for (int64_t i = 0; i < B; ++i) {
    kept[i] = truncate(i, P.len(i), R.len(i), max_len, truncation);
    W = std::max(W, kept[i].p_len + kept[i].r_len);
  }

  auto ids = uninitialized<int64_t>(B * W);
  auto attn = uninitialized<int64_t>(B * W);
  auto pos = uninitialized<int64_t>(B * W);
  auto resp = uninitialized<bool>(B * W);
  auto p_lens = uninitialized<int64_t>(B);
  auto r_lens = uninitialized<int64_t>(B);
  const bool left = padding_side == "left";
  {
    // inputs are copied into P and R: the fill needs no Python objects, so other threads may run
    py::gil_scoped_release release;
    for (int64_t i = 0; i < B; ++i) {
      const Kept& k = kept[i];
      const int64_t n = k.p_len + k.r_len;
      const int64_t start = left ? W - n : 0;  // first real column
      const int64_t pad0 = left ? 0 : n;       // first pad column
      int64_t* row_ids = ids.get() + i * W;
      int64_t* row_attn = attn.get() + i * W;
      int64_t* row_pos = pos.get() + i * W;
      bool* row_resp = resp.get() + i * W;
      std::fill(row_ids + pad0, row_ids + pad0 + (W - n), pad_id);
      std::fill(row_attn + pad0, row_attn + pad0 + (W - n), int64_t{0});
      std::fill(row_pos + pad0, row_pos + pad0 + (W - n), int64_t{0});
      std::fill(row_resp + pad0, row_resp + pad0 + (W - n), false);
      std::memcpy(row_ids + start, P.row(i) + k.p0, sizeof(int64_t) * k.p_len);
      std::memcpy(row_ids + start + k.p_len, R.row(i), sizeof(int64_t) * k.r_len);
      std::fill(row_attn + start, row_attn + start + n, int64_t{1});
      for (int64_t t = 0; t < n; ++t) row_pos[start + t] = t;
      std::fill(row_resp + start, row_resp + start + k.p_len, false);
      std::fill(row_resp + start + k.p_len, row_resp + start + n, true);
      p_lens[i] = k.p_len;
      r_lens[i] = k.r_len;
    }
  }
  return py::make_tuple(to_numpy(std::move(ids), {B, W}), to_numpy(std::move(attn), {B, W}),
                        to_numpy(std::move(pos), {B, W}), to_numpy(std::move(resp), {B, W}),
                        to_numpy(std::move(p_lens), {B}), to_numpy(std::move(r_lens), {B}));
}

}  // namespace rlaif
