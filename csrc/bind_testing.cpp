// fastfuse._C._testing: test-only hooks. Reference implementations and path switches that the
// tests compare the production code against; nothing in fastfuse/ calls them.
#include <pybind11/pybind11.h>

#include <string_view>

#include "bindings.hpp"
#include "dtw.hpp"
#include "vocab_map.hpp"

namespace py = pybind11;

namespace fastfuse {
namespace {

std::string_view as_view(const py::bytes& b) {
    char* p = nullptr;
    Py_ssize_t n = 0;
    if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
    return {p, static_cast<size_t>(n)};
}

}  // namespace

void bind_testing(py::module_& t) {
    t.def("dtw_set_paths", &dtw_set_paths, py::arg("simd") = true, py::arg("force_wide") = false,
          "Pick the DTW DP path, process-wide (AVX2 row on/off, int64 forced); all give the same result.");
    t.def(
        "vocab_levenshtein", [](const py::bytes& a, const py::bytes& b) { return levenshtein(as_view(a), as_view(b)); },
        py::arg("a"), py::arg("b"),
        "Byte-level Levenshtein distance as map_vocab computes it (bit-parallel when the shorter is <= 64 bytes).");
    t.def(
        "vocab_levenshtein_dp",
        [](const py::bytes& a, const py::bytes& b) { return levenshtein_dp(as_view(a), as_view(b)); }, py::arg("a"),
        py::arg("b"), "Byte-level Levenshtein distance by plain dynamic programming (the reference).");
}

}  // namespace fastfuse
