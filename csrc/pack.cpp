// pack_rollouts: rollouts laid end to end without padding, in the flash-attention varlen layout
// (cu_seqlens int32, position ids restarting at 0 for each sequence).
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "batching.h"
#include "checks.h"
#include "ragged.h"

namespace rlaif {

py::tuple pack_rollouts(py::handle prompts, py::handle responses) {
  const Ragged P = to_ragged(prompts, "prompts");
  const Ragged R = to_ragged(responses, "responses");
  check_same_count(P.size(), R.size());
  const int64_t B = P.size();
  for (int64_t i = 0; i < B; ++i) check_prompt_nonempty(i, P.len(i));
  const int64_t total = P.total() + R.total();
  if (total > std::numeric_limits<int32_t>::max()) {
    value_error("the batch has " + std::to_string(total) +
                " tokens, more than cu_seqlens (int32, the flash-attention format) can index; split it");
  }

  auto ids = uninitialized<int64_t>(total);
  auto pos = uninitialized<int64_t>(total);
  auto resp = uninitialized<bool>(total);
  auto cu = uninitialized<int32_t>(B + 1);
  int64_t max_seqlen = 0;
  {
    py::gil_scoped_release release;
    int64_t o = 0;
    cu[0] = 0;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t p = P.len(i), r = R.len(i), n = p + r;
      std::memcpy(ids.get() + o, P.row(i), sizeof(int64_t) * p);
      std::memcpy(ids.get() + o + p, R.row(i), sizeof(int64_t) * r);
      for (int64_t t = 0; t < n; ++t) pos[o + t] = t;
      std::fill(resp.get() + o, resp.get() + o + p, false);
      std::fill(resp.get() + o + p, resp.get() + o + n, true);
      o += n;
      cu[i + 1] = static_cast<int32_t>(o);
      max_seqlen = std::max(max_seqlen, n);
    }
  }
  return py::make_tuple(to_numpy(std::move(ids), {total}), to_numpy(std::move(pos), {total}),
                        to_numpy(std::move(resp), {total}), to_numpy(std::move(cu), {B + 1}), max_seqlen);
}

}  // namespace rlaif
