// Each C++ concept registers its own Python functions; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace fastfuse {
void bind_spans(pybind11::module_& m);   // bind_spans.cpp: exact alignment from byte offsets
void bind_dtw(pybind11::module_& m);     // bind_dtw.cpp: MinED / DTW alignment of token strings
void bind_vocab(pybind11::module_& m);   // bind_vocab.cpp: vocabulary mapping (exact, min edit distance)
void bind_testing(pybind11::module_& t); // bind_testing.cpp: test-only hooks, in the _C._testing submodule
}  // namespace fastfuse
