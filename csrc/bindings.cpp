// rlaif_fast._C: rollout batching in C++. Arguments are checked in each function; see rlaif_fast/_C.pyi.
#include <pybind11/pybind11.h>

#include "batching.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlaif_fast rollout batching: pad, pack and balance variable-length rollouts (C++17)";
  namespace py = pybind11;
  m.def("pad_rollouts", &rlaif::pad_rollouts, py::arg("prompts"), py::arg("responses"), py::arg("pad_id"),
        py::arg("padding_side"), py::arg("max_len"), py::arg("truncation"),
        "Pad prompt + response rows; returns (input_ids, attention_mask, position_ids, response_mask, "
        "prompt_lengths, response_lengths) as NumPy arrays owning C++ buffers. max_len=-1 means no limit.");
  m.def("pack_rollouts", &rlaif::pack_rollouts, py::arg("prompts"), py::arg("responses"),
        "Pack rollouts end to end; returns (input_ids, position_ids, response_mask, cu_seqlens, max_seqlen).");
  m.def("balanced_microbatches", &rlaif::balanced_microbatches, py::arg("lengths"), py::arg("max_tokens"),
        py::arg("num_ranks"),
        "Plan micro-batches; returns (microbatches, rank_tokens, padding, padded_tokens).");
}
