// The compiled core, fastfuse._C: numpy in, numpy out, no torch headers.
#include "bindings.hpp"

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastfuse C++ core: token alignment and vocabulary mapping";
    fastfuse::bind_spans(m);
    fastfuse::bind_dtw(m);
    fastfuse::bind_vocab(m);
}
