// Input checks at the C++ boundary. Every message names the offending index and value and says how to
// fix it, word for word the same as rlaif_fast/reference/batching.py, so both backends read alike.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace rlaif {

namespace py = pybind11;

[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] inline void type_error(const std::string& msg) { throw py::type_error(msg); }

inline std::string at(const char* name, int64_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

inline void check_token(const char* name, int64_t i, int64_t j, int64_t tok) {
  if (tok < 0) {
    value_error(at(name, i) + "[" + std::to_string(j) + "] = " + std::to_string(tok) +
                ": token ids must be >= 0; fix the tokenizer output");
  }
}

inline void check_prompt_nonempty(int64_t i, int64_t n) {
  if (n == 0) {
    value_error(at("prompts", i) +
                " is empty: every rollout needs at least one prompt token (e.g. BOS) to condition on");
  }
}

inline void check_same_count(int64_t n_prompts, int64_t n_responses) {
  if (n_prompts != n_responses) {
    value_error("got " + std::to_string(n_prompts) + " prompts but " + std::to_string(n_responses) +
                " responses; pass one response per prompt");
  }
  if (n_prompts == 0) value_error("the batch is empty (0 rollouts); pass at least one prompt and response");
}

[[noreturn]] inline void fail_too_long(int64_t i, int64_t p, int64_t r, int64_t max_len) {
  value_error("rollout " + std::to_string(i) + " has " + std::to_string(p + r) + " tokens (prompt " +
              std::to_string(p) + " + response " + std::to_string(r) + ") > max_len=" + std::to_string(max_len) +
              "; pass truncation='left' or 'right', or a larger max_len");
}

inline void check_left_truncation(int64_t i, int64_t r, int64_t max_len) {
  if (r >= max_len) {
    value_error("rollout " + std::to_string(i) + " has a response of " + std::to_string(r) +
                " tokens >= max_len=" + std::to_string(max_len) +
                ": truncation='left' only drops prompt tokens and keeps at least one; use truncation='right' "
                "or a larger max_len");
  }
}

inline void check_length(int64_t i, int64_t n, int64_t max_tokens) {
  if (n < 0) value_error(at("lengths", i) + " = " + std::to_string(n) + " is negative; lengths count tokens");
  if (n > max_tokens) {
    value_error(at("lengths", i) + " = " + std::to_string(n) + " > max_tokens=" + std::to_string(max_tokens) +
                ": one sequence must fit one micro-batch; raise max_tokens or truncate that rollout");
  }
}

inline void check_at_least(const char* name, int64_t value, int64_t low) {
  if (value < low) {
    value_error(std::string(name) + "=" + std::to_string(value) + " must be >= " + std::to_string(low));
  }
}

}  // namespace rlaif
