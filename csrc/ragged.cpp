// Reading Python token sequences into one flat int64 buffer.
//
// Lists of Python ints are read through the CPython API directly: that loop is where a pure-Python
// batcher spends most of its time, and here it costs a few nanoseconds per token.
#include "ragged.h"

#include <string>

#include "checks.h"

namespace rlaif {

namespace {

std::string item_name(const char* name, int64_t i, int64_t j) {
  return at(name, i) + "[" + std::to_string(j) + "]";
}

// One list or tuple of n ints, written to out[0:n].
void read_list(PyObject* seq, const char* name, int64_t i, int64_t* out, int64_t n) {
  for (Py_ssize_t j = 0; j < n; ++j) {
    // re-read each time: an __index__ method could resize the list while we read it
    if (PySequence_Fast_GET_SIZE(seq) != n) value_error(at(name, i) + " changed size while being read");
    PyObject* obj = PySequence_Fast_ITEMS(seq)[j];
    int overflow = 0;
    long long v;
    if (PyLong_CheckExact(obj)) {
      v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    } else {
      // numpy integers, bools, anything with __index__; floats and strings are refused
      PyObject* index = PyNumber_Index(obj);
      if (index == nullptr) {
        PyErr_Clear();
        type_error(item_name(name, i, j) + " is a " + Py_TYPE(obj)->tp_name +
                   "; token ids must be integers");
      }
      v = PyLong_AsLongLongAndOverflow(index, &overflow);
      Py_DECREF(index);
    }
    if (overflow != 0) value_error(item_name(name, i, j) + " does not fit in int64; token ids must be >= 0");
    check_token(name, i, j, v);
    out[j] = v;
  }
}

// One 1-D NumPy array of any integer dtype, written to out.
void read_array(const py::array& arr, const char* name, int64_t i, int64_t* out) {
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    type_error(at(name, i) + " has dtype " + std::string(py::str(arr.dtype())) +
               "; token ids must be an integer dtype (cast with .astype(np.int64) or .long())");
  }
  if (arr.ndim() != 1) {
    value_error(at(name, i) + " has " + std::to_string(arr.ndim()) + " dimensions; each sequence must be 1-D");
  }
  auto ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  const int64_t* data = ids.data();
  for (py::ssize_t j = 0; j < ids.shape(0); ++j) {
    check_token(name, i, j, data[j]);
    out[j] = data[j];
  }
}

}  // namespace

Ragged to_ragged(py::handle seqs, const char* name) {
  if (!PyList_Check(seqs.ptr()) && !PyTuple_Check(seqs.ptr())) {
    type_error(std::string(name) + " is a " + Py_TYPE(seqs.ptr())->tp_name +
               "; pass a list of sequences (lists of ints, 1-D integer arrays or tensors)");
  }
  py::sequence outer = py::reinterpret_borrow<py::sequence>(seqs);
  const int64_t n = static_cast<int64_t>(outer.size());
  Ragged r;
  r.offsets.reserve(n + 1);
  // offsets from the lengths first: one allocation, then each sequence is written in place
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    Py_ssize_t len = PyObject_Length(PySequence_Fast_GET_ITEM(outer.ptr(), i));
    if (len < 0) {
      PyErr_Clear();
      type_error(at(name, i) + " is a " + Py_TYPE(PySequence_Fast_GET_ITEM(outer.ptr(), i))->tp_name +
                 "; each sequence must be a list of ints, a 1-D integer array or tensor");
    }
    total += len;
    r.offsets.push_back(total);
  }
  r.values = uninitialized<int64_t>(total);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(outer.ptr(), i);
    if (PyList_Check(item) || PyTuple_Check(item)) {
      read_list(item, name, i, r.values.get() + r.offsets[i], r.len(i));
    } else if (py::isinstance<py::array>(item)) {
      read_array(py::reinterpret_borrow<py::array>(item), name, i, r.values.get() + r.offsets[i]);
    } else {
      type_error(at(name, i) + " is a " + Py_TYPE(item)->tp_name +
                 "; each sequence must be a list of ints, a 1-D integer array or tensor");
    }
  }
  return r;
}

}  // namespace rlaif
