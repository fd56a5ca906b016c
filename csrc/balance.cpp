// balanced_microbatches: sequences -> micro-batches (all sequences longest first, cut at the padded
// token budget) -> the same number on every rank (split the fullest) -> ranks (Karmarkar-Karp largest
// differencing with equal counts, then pairwise swaps).
//
// Every step and tie-break mirrors rlaif_fast/reference/batching.py, so both backends return one plan.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <numeric>
#include <queue>
#include <tuple>
#include <vector>

#include "batching.h"
#include "checks.h"

namespace rlaif {

namespace {

using Batches = std::vector<std::vector<int64_t>>;

Batches cut_by_length(const int64_t* len, int64_t n, int64_t max_tokens) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  Batches batches;
  for (int64_t i : order) {
    if (!batches.empty() &&
        static_cast<int64_t>(batches.back().size() + 1) * len[batches.back().front()] <= max_tokens) {
      batches.back().push_back(i);
    } else {
      batches.push_back({i});
    }
  }
  return batches;
}

void split_to_multiple(Batches& batches, size_t k) {
  while (batches.size() % k != 0) {
    size_t j = 0;  // the fullest, first on ties
    for (size_t t = 1; t < batches.size(); ++t) {
      if (batches[t].size() > batches[j].size()) j = t;
    }
    if (batches[j].size() < 2) {
      batches.emplace_back();
      continue;
    }
    const size_t cut = (batches[j].size() + 1) / 2;
    std::vector<int64_t> tail(batches[j].begin() + cut, batches[j].end());
    batches[j].resize(cut);
    batches.insert(batches.begin() + j + 1, std::move(tail));
  }
}

// One of the k sets of a partial solution: its load and its members as a linked list through next[].
struct Set {
  int64_t sum, head, tail;  // head = tail = -1 when empty
};

// Heap order: the largest spread first, then the oldest partial solution.
struct Entry {
  int64_t spread, uid;
  bool operator<(const Entry& o) const { return spread != o.spread ? spread < o.spread : uid > o.uid; }
};

Batches karmarkar_karp_equal(const std::vector<int64_t>& w, int64_t k) {
  const int64_t n = static_cast<int64_t>(w.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return w[a] > w[b]; });
  std::vector<int64_t> next(n, -1);
  std::vector<Set> sets;  // partial solution u owns sets[u * k, (u + 1) * k), heaviest first
  sets.reserve(static_cast<size_t>(2 * n));
  std::priority_queue<Entry> heap;
  for (int64_t row = 0; row < n / k; ++row) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = order[row * k + j];
      sets.push_back({w[i], i, i});
    }
    heap.push({sets[row * k].sum - sets[row * k + k - 1].sum, row});
  }
  int64_t uid = n / k;
  std::vector<Set> merged(k);
  while (heap.size() > 1) {
    const int64_t a = heap.top().uid;
    heap.pop();
    const int64_t b = heap.top().uid;
    heap.pop();
    for (int64_t j = 0; j < k; ++j) {
      const Set& x = sets[a * k + j];
      const Set& y = sets[b * k + (k - 1 - j)];  // heaviest of a with the lightest of b
      next[x.tail] = y.head;                        // every set holds >= 1 member: counts stay equal
      merged[j] = {x.sum + y.sum, x.head, y.tail};
    }
    std::stable_sort(merged.begin(), merged.end(), [](const Set& p, const Set& q) { return p.sum > q.sum; });
    sets.insert(sets.end(), merged.begin(), merged.end());
    heap.push({merged[0].sum - merged[k - 1].sum, uid++});
  }
  const int64_t root = heap.top().uid;
  Batches ranks(k);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = sets[root * k + j].head; i >= 0; i = next[i]) ranks[j].push_back(i);
    std::sort(ranks[j].begin(), ranks[j].end());
  }
  return ranks;
}

void refine_swaps(const std::vector<int64_t>& w, Batches& ranks, int max_rounds = 1000) {
  const size_t k = ranks.size();
  std::vector<int64_t> loads(k, 0);
  for (size_t r = 0; r < k; ++r) {
    for (int64_t m : ranks[r]) loads[r] += w[m];
  }
  for (int round = 0; round < max_rounds; ++round) {
    size_t h = 0, lo = 0;  // heaviest and lightest, first on ties
    for (size_t r = 1; r < k; ++r) {
      if (loads[r] > loads[h]) h = r;
      if (loads[r] < loads[lo]) lo = r;
    }
    const int64_t gap = loads[h] - loads[lo];
    bool found = false;
    std::tuple<int64_t, int64_t, int64_t> best;  // (|gap - 2d|, a, b): the smallest wins
    size_t pa = 0, pb = 0;
    for (size_t x = 0; x < ranks[h].size(); ++x) {
      for (size_t y = 0; y < ranks[lo].size(); ++y) {
        const int64_t a = ranks[h][x], b = ranks[lo][y], d = w[a] - w[b];
        if (d <= 0 || d >= gap) continue;
        const auto cand = std::make_tuple(std::abs(gap - 2 * d), a, b);
        if (!found || cand < best) {
          best = cand;
          pa = x;
          pb = y;
          found = true;
        }
      }
    }
    if (!found) break;
    const int64_t d = w[ranks[h][pa]] - w[ranks[lo][pb]];
    std::swap(ranks[h][pa], ranks[lo][pb]);
    loads[h] -= d;
    loads[lo] += d;
  }
  for (auto& r : ranks) std::sort(r.begin(), r.end());
}

}  // namespace

py::tuple balanced_microbatches(py::handle lengths, int64_t max_tokens, int64_t num_ranks) {
  check_at_least("max_tokens", max_tokens, 1);
  check_at_least("num_ranks", num_ranks, 1);
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(lengths);
  if (!arr || arr.ndim() != 1) type_error("lengths must be a 1-D int64 array; convert with np.asarray(..., np.int64)");
  const int64_t n = arr.shape(0);
  if (n == 0) value_error("lengths is empty; pass at least one sequence length");
  const int64_t* len = arr.data();
  for (int64_t i = 0; i < n; ++i) check_length(i, len[i], max_tokens);

  Batches batches, ranks;
  std::vector<int64_t> weights;
  int64_t padded = 0, real = 0;
  {
    py::gil_scoped_release release;
    batches = cut_by_length(len, n, max_tokens);
    split_to_multiple(batches, static_cast<size_t>(num_ranks));
    for (const auto& mb : batches) {
      int64_t s = 0;
      for (int64_t i : mb) s += len[i];
      weights.push_back(s);
      real += s;
      if (!mb.empty()) padded += static_cast<int64_t>(mb.size()) * len[mb.front()];
    }
    ranks = karmarkar_karp_equal(weights, num_ranks);
    refine_swaps(weights, ranks);
  }
  py::list plan;
  std::vector<int64_t> rank_tokens;
  for (const auto& r : ranks) {
    py::list steps;
    int64_t load = 0;
    for (int64_t m : r) {
      steps.append(py::cast(batches[m]));
      load += weights[m];
    }
    plan.append(steps);
    rank_tokens.push_back(load);
  }
  return py::make_tuple(plan, py::cast(rank_tokens), padded - real, padded);
}

}  // namespace rlaif
