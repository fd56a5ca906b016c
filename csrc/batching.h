// The functions bindings.cpp exposes as rlaif_fast._C; see rlaif_fast/_C.pyi for their Python face.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace rlaif {

namespace py = pybind11;

py::tuple pad_rollouts(py::handle prompts, py::handle responses, int64_t pad_id, const std::string& padding_side,
                       int64_t max_len, const std::string& truncation);

py::tuple pack_rollouts(py::handle prompts, py::handle responses);

py::tuple balanced_microbatches(py::handle lengths, int64_t max_tokens, int64_t num_ranks);

void gae(py::handle rewards, py::handle values, py::handle mask, py::handle adv, py::handle ret, double gamma,
         double lam, int64_t num_threads, bool simd);

}  // namespace rlaif
