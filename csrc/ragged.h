// Ragged token sequences (one flat buffer + offsets) and NumPy arrays that own C++ buffers.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace rlaif {

namespace py = pybind11;

// B sequences laid end to end: sequence i is values[offsets[i] : offsets[i + 1]].
struct Ragged {
  std::vector<int64_t> values;
  std::vector<int64_t> offsets{0};

  int64_t size() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t len(int64_t i) const { return offsets[i + 1] - offsets[i]; }
  const int64_t* row(int64_t i) const { return values.data() + offsets[i]; }
};

// Reads a sequence of sequences (lists/tuples of ints or 1-D integer NumPy arrays) into a Ragged,
// checking every id >= 0. Needs the GIL: it touches Python objects.
Ragged to_ragged(py::handle seqs, const char* name);

// An uninitialized buffer of n elements; every caller writes each element before handing it to Python.
template <class T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[n > 0 ? n : 1]);
}

// Hands the buffer to a NumPy array without a copy; the capsule frees it with the array.
template <class T>
py::array_t<T> to_numpy(std::unique_ptr<T[]> buf, std::vector<py::ssize_t> shape) {
  T* data = buf.release();
  py::capsule owner(data, [](void* p) { delete[] static_cast<T*>(p); });
  return py::array_t<T>(shape, data, owner);
}

}  // namespace rlaif
