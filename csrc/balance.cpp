// balanced_microbatches: which rank runs which sequences in which micro-batch.
//
// Two candidate plans; the one whose busiest rank computes the fewest padded tokens wins (then fewer
// steps, then "global"):
// - global: all sequences longest first, cut at the padded budget (count x longest <= max_tokens),
//   split up to a multiple of the rank count, dealt to ranks by Karmarkar-Karp with equal counts, then
//   micro-batch swaps and single-sequence moves. Little padding: similar lengths share a micro-batch.
// - per rank: sequences dealt by Karmarkar-Karp, each rank's share cut longest first, counts equalized
//   by splitting. Near-perfect balance; wins on small batches, where micro-batches are too coarse.
// Every step and tie-break mirrors rlaif_fast/reference/batching.py, so both backends return one plan.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "batching.h"
#include "checks.h"

namespace rlaif {

namespace {

using Batch = std::vector<int64_t>;  // sequence indices, longest first (ties: lower index first)
using Plan = std::vector<std::vector<Batch>>;  // rank -> step -> micro-batch

std::vector<Batch> cut_by_length(const int64_t* len, Batch members, int64_t max_tokens) {
  std::sort(members.begin(), members.end(),
            [&](int64_t a, int64_t b) { return len[a] != len[b] ? len[a] > len[b] : a < b; });
  std::vector<Batch> batches;
  for (int64_t i : members) {
    if (!batches.empty() &&
        static_cast<int64_t>(batches.back().size() + 1) * len[batches.back().front()] <= max_tokens) {
      batches.back().push_back(i);
    } else {
      batches.push_back({i});
    }
  }
  return batches;
}

// Split the fullest micro-batch (first on ties) until there are target; empty ones once all hold one.
void split_to(std::vector<Batch>& batches, size_t target) {
  while (batches.size() < target) {
    size_t j = 0;
    for (size_t t = 1; t < batches.size(); ++t) {
      if (batches[t].size() > batches[j].size()) j = t;
    }
    if (batches.empty() || batches[j].size() < 2) {
      batches.emplace_back();
      continue;
    }
    const size_t cut = (batches[j].size() + 1) / 2;
    Batch tail(batches[j].begin() + cut, batches[j].end());
    batches[j].resize(cut);
    batches.insert(batches.begin() + j + 1, std::move(tail));
  }
}

// One of the k sets of a partial solution: its load and its members as a linked list through next[].
struct Set {
  int64_t sum, head, tail;  // head = tail = -1 when empty
};

// Heap order: the largest spread first, then the oldest partial solution (lowest uid).
struct Entry {
  int64_t spread, uid, slot;
  bool operator<(const Entry& o) const { return spread != o.spread ? spread < o.spread : uid > o.uid; }
};

// Largest differencing into k sets; equal_size deals the sorted items in rows of k (n % k == 0).
std::vector<Batch> karmarkar_karp(const std::vector<int64_t>& w, int64_t k, bool equal_size) {
  const int64_t n = static_cast<int64_t>(w.size());
  Batch order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return w[a] > w[b]; });
  std::vector<int64_t> next(n, -1);
  // the partial solution in slot u owns sets[u * k, (u + 1) * k), heaviest first; a merge writes into
  // the slot of its first parent, so memory stays n x k sets (it fits in L2 for n = 4096, k = 8)
  const int64_t rows = equal_size ? n / k : n;
  std::vector<Set> sets(static_cast<size_t>(rows * k), Set{0, -1, -1});
  std::vector<Entry> heap;
  heap.reserve(rows);
  for (int64_t u = 0; u < rows; ++u) {
    for (int64_t j = 0; j < (equal_size ? k : 1); ++j) {
      const int64_t i = order[equal_size ? u * k + j : u];
      sets[u * k + j] = {w[i], i, i};
    }
    heap.push_back({sets[u * k].sum - sets[u * k + k - 1].sum, u, u});
  }
  std::make_heap(heap.begin(), heap.end());
  int64_t uid = rows;
  std::vector<Set> merged(k);
  while (heap.size() > 1) {
    std::pop_heap(heap.begin(), heap.end());
    const int64_t a = heap.back().slot;
    heap.pop_back();
    std::pop_heap(heap.begin(), heap.end());
    const int64_t b = heap.back().slot;
    heap.pop_back();
    for (int64_t j = 0; j < k; ++j) {
      const Set x = sets[a * k + j];
      const Set y = sets[b * k + (k - 1 - j)];  // heaviest of a with the lightest of b
      Set s{x.sum + y.sum, x.head, x.tail};
      if (y.head >= 0) {
        if (s.head < 0) {
          s.head = y.head;
        } else {
          next[s.tail] = y.head;
        }
        s.tail = y.tail;
      }
      merged[j] = s;
    }
    // stable insertion sort, heaviest first: k is small, and std::stable_sort allocates per call
    for (int64_t j = 1; j < k; ++j) {
      const Set s = merged[j];
      int64_t t = j;
      for (; t > 0 && merged[t - 1].sum < s.sum; --t) merged[t] = merged[t - 1];
      merged[t] = s;
    }
    std::copy(merged.begin(), merged.end(), sets.begin() + a * k);
    heap.push_back({merged[0].sum - merged[k - 1].sum, uid++, a});
    std::push_heap(heap.begin(), heap.end());
  }
  const int64_t root = heap.front().slot;
  std::vector<Batch> out(k);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = sets[root * k + j].head; i >= 0; i = next[i]) out[j].push_back(i);
    std::sort(out[j].begin(), out[j].end());
  }
  return out;
}

// Heaviest and lightest rank, first on ties.
std::pair<size_t, size_t> extremes(const std::vector<int64_t>& loads) {
  size_t h = 0, lo = 0;
  for (size_t r = 1; r < loads.size(); ++r) {
    if (loads[r] > loads[h]) h = r;
    if (loads[r] < loads[lo]) lo = r;
  }
  return {h, lo};
}

// Swap micro-batches a (heaviest rank) and b (lightest) while that narrows the gap: the lowest
// (|gap - 2d|, a, b) with 0 < d = w[a] - w[b] < gap.
void refine_swaps(const std::vector<int64_t>& w, std::vector<Batch>& ranks, int max_rounds = 1000) {
  std::vector<int64_t> loads(ranks.size(), 0);
  for (size_t r = 0; r < ranks.size(); ++r) {
    for (int64_t m : ranks[r]) loads[r] += w[m];
  }
  for (int round = 0; round < max_rounds; ++round) {
    const auto [h, lo] = extremes(loads);
    const int64_t gap = loads[h] - loads[lo];
    std::tuple<int64_t, int64_t, int64_t> best{-1, -1, -1};
    size_t pa = 0, pb = 0;
    for (size_t x = 0; x < ranks[h].size(); ++x) {
      for (size_t y = 0; y < ranks[lo].size(); ++y) {
        const int64_t a = ranks[h][x], b = ranks[lo][y], d = w[a] - w[b];
        if (d <= 0 || d >= gap) continue;
        const auto cand = std::make_tuple(std::abs(gap - 2 * d), a, b);
        if (std::get<0>(best) < 0 || cand < best) {
          best = cand;
          pa = x;
          pb = y;
        }
      }
    }
    if (std::get<0>(best) < 0) break;
    const int64_t d = w[ranks[h][pa]] - w[ranks[lo][pb]];
    std::swap(ranks[h][pa], ranks[lo][pb]);
    loads[h] -= d;
    loads[lo] += d;
  }
  for (auto& r : ranks) std::sort(r.begin(), r.end());
}

// Move single sequences from the heaviest rank's micro-batches into the lightest rank's while that
// narrows the gap by more than it adds padding; the lowest (score, sequence, destination) wins.
void refine_moves(const int64_t* len, std::vector<Batch>& batches, const std::vector<Batch>& ranks,
                  int64_t max_tokens, int max_rounds = 1000) {
  std::vector<int64_t> loads(ranks.size(), 0);
  for (size_t r = 0; r < ranks.size(); ++r) {
    for (int64_t m : ranks[r]) {
      for (int64_t i : batches[m]) loads[r] += len[i];
    }
  }
  for (int round = 0; round < max_rounds; ++round) {
    const auto [h, lo] = extremes(loads);
    const int64_t gap = loads[h] - loads[lo];
    bool found = false;
    std::tuple<int64_t, int64_t, int64_t> best;  // (score, sequence, destination)
    int64_t best_x = -1;
    for (int64_t x : ranks[h]) {
      const Batch& src = batches[x];
      if (src.size() < 2) continue;
      for (size_t pos = 0; pos < src.size(); ++pos) {
        const int64_t d = len[src[pos]];
        if (d <= 0 || d >= gap) continue;
        const int64_t rest_max = pos == 0 ? len[src[1]] : len[src[0]];
        const int64_t n_src = static_cast<int64_t>(src.size());
        const int64_t src_pad = (n_src - 1) * rest_max - n_src * len[src[0]];  // its padded size change
        for (int64_t y : ranks[lo]) {
          const Batch& dst = batches[y];
          const int64_t dst_max = dst.empty() ? 0 : len[dst[0]];
          const int64_t new_max = std::max(dst_max, d);
          const int64_t n_dst = static_cast<int64_t>(dst.size());
          if ((n_dst + 1) * new_max > max_tokens) continue;
          const int64_t score = std::abs(gap - 2 * d) + src_pad + (n_dst + 1) * new_max - n_dst * dst_max;
          if (score >= gap) continue;
          const auto cand = std::make_tuple(score, src[pos], y);
          if (!found || cand < best) {
            best = cand;
            best_x = x;
            found = true;
          }
        }
      }
    }
    if (!found) break;
    const auto [unused_score, s, y] = best;
    (void)unused_score;
    Batch& src = batches[best_x];
    src.erase(std::find(src.begin(), src.end(), s));
    Batch& dst = batches[y];
    const auto at = std::lower_bound(dst.begin(), dst.end(), s, [&](int64_t a, int64_t b) {
      return len[a] != len[b] ? len[a] > len[b] : a < b;
    });
    dst.insert(at, s);
    loads[h] -= len[s];
    loads[lo] += len[s];
  }
}

Plan global_plan(const int64_t* len, int64_t n, int64_t max_tokens, int64_t k) {
  Batch all(n);
  std::iota(all.begin(), all.end(), 0);
  std::vector<Batch> batches = cut_by_length(len, std::move(all), max_tokens);
  split_to(batches, (batches.size() + k - 1) / k * k);
  std::vector<int64_t> w;
  for (const Batch& mb : batches) {
    int64_t s = 0;
    for (int64_t i : mb) s += len[i];
    w.push_back(s);
  }
  std::vector<Batch> ranks = karmarkar_karp(w, k, true);
  refine_swaps(w, ranks);
  refine_moves(len, batches, ranks, max_tokens);
  Plan plan(k);
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t m : ranks[r]) plan[r].push_back(std::move(batches[m]));
  }
  return plan;
}

Plan per_rank_plan(const int64_t* len, int64_t n, int64_t max_tokens, int64_t k) {
  std::vector<Batch> ranks = karmarkar_karp(std::vector<int64_t>(len, len + n), k, false);
  Plan plan(k);
  size_t steps = 0;
  for (int64_t r = 0; r < k; ++r) {
    plan[r] = cut_by_length(len, std::move(ranks[r]), max_tokens);
    steps = std::max(steps, plan[r].size());
  }
  for (auto& rank : plan) split_to(rank, steps);
  return plan;
}

int64_t padded_size(const int64_t* len, const Batch& mb) {
  return mb.empty() ? 0 : static_cast<int64_t>(mb.size()) * len[mb.front()];
}

int64_t busiest(const int64_t* len, const Plan& plan) {
  int64_t most = 0;
  for (const auto& rank : plan) {
    int64_t s = 0;
    for (const Batch& mb : rank) s += padded_size(len, mb);
    most = std::max(most, s);
  }
  return most;
}

}  // namespace

py::tuple balanced_microbatches(py::handle lengths, int64_t max_tokens, int64_t num_ranks) {
  check_at_least("max_tokens", max_tokens, 1);
  check_at_least("num_ranks", num_ranks, 1);
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(lengths);
  if (!arr || arr.ndim() != 1) {
    type_error("lengths must be a 1-D int64 array; convert with np.asarray(..., np.int64)");
  }
  const int64_t n = arr.shape(0);
  if (n == 0) value_error("lengths is empty; pass at least one sequence length");
  // a copy: arr may be the caller's own buffer, and another thread can write to it once the GIL is
  // released below (the sorts then see lengths change under them and corrupt the heap)
  const std::vector<int64_t> owned(arr.data(), arr.data() + n);
  const int64_t* len = owned.data();
  for (int64_t i = 0; i < n; ++i) check_length(i, len[i], max_tokens);

  Plan plan;
  std::string strategy = "global";
  std::vector<int64_t> rank_tokens(num_ranks, 0), rank_padded(num_ranks, 0);
  {
    py::gil_scoped_release release;
    plan = global_plan(len, n, max_tokens, num_ranks);
    Plan other = per_rank_plan(len, n, max_tokens, num_ranks);
    const auto cost = std::make_pair(busiest(len, plan), plan[0].size());
    if (std::make_pair(busiest(len, other), other[0].size()) < cost) {
      plan = std::move(other);
      strategy = "per_rank";
    }
    for (int64_t r = 0; r < num_ranks; ++r) {
      // longest micro-batch first (ties: lower first index), empty ones last
      std::stable_sort(plan[r].begin(), plan[r].end(), [&](const Batch& a, const Batch& b) {
        if (a.empty() || b.empty()) return !a.empty() && b.empty();
        return len[a[0]] != len[b[0]] ? len[a[0]] > len[b[0]] : a[0] < b[0];
      });
      for (const Batch& mb : plan[r]) {
        rank_padded[r] += padded_size(len, mb);
        for (int64_t i : mb) rank_tokens[r] += len[i];
      }
    }
  }
  py::list out;
  for (const auto& rank : plan) {
    py::list steps;
    for (const Batch& mb : rank) steps.append(py::cast(mb));
    out.append(steps);
  }
  return py::make_tuple(out, py::cast(rank_tokens), py::cast(rank_padded), strategy);
}

}  // namespace rlaif
