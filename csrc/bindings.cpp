// rlaif_fast._C: rollout batching and the CPU GAE scan in C++. Arguments are checked in each function;
// see rlaif_fast/_C.pyi.
#include <pybind11/pybind11.h>

#include "batching.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlaif_fast C++17: pad, pack and balance variable-length rollouts; the CPU GAE scan";
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
  m.def("gae", &rlaif::gae, py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("adv"), py::arg("ret"),
        py::arg("gamma"), py::arg("lam"), py::arg("num_threads"), py::arg("simd") = true,
        "Masked GAE into adv and ret (float32 or float64 (B, T), C-contiguous; mask uint8), arithmetic in "
        "its dtype in the reference loop's order (simd=False: the scalar loop), GIL released.");
}
