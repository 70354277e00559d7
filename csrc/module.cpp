// The compiled core, fastfuse._C: numpy in, numpy out, no torch headers.
#include "bindings.hpp"
#include "common.hpp"

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastfuse C++ core: token alignment and vocabulary mapping";
    // The one thread cap: fastfuse/align/native_threads.py reads it from here.
    m.attr("MAX_THREADS") = fastfuse::kMaxThreads;
    fastfuse::bind_spans(m);
    fastfuse::bind_dtw(m);
    fastfuse::bind_vocab(m);
    pybind11::module_ testing = m.def_submodule("_testing", "Test-only hooks: references and path switches");
    fastfuse::bind_testing(testing);
}
