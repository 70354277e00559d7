// Python bindings for the MinED / DTW alignment: lists of str in, CSR numpy arrays out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bindings.hpp"
#include "common.hpp"
#include "dtw.hpp"

namespace py = pybind11;

namespace fastfuse {
namespace {

// A token sequence borrowed from Python: a tuple snapshot keeps every str (and so its cached
// UTF-8) alive while the GIL is released, whatever other threads do to the caller's list.
struct Tokens {
    py::tuple items;
    std::vector<py::bytes> encoded;  // only for strs with lone surrogates
    std::vector<std::string_view> views;
};

Tokens borrow_tokens(py::handle seq, const std::string& name) {
    if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
        throw py::type_error(name + ": expected a list of str, got " +
                             std::string(Py_TYPE(seq.ptr())->tp_name));
    Tokens out;
    out.items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(seq.ptr()));
    if (!out.items) throw py::error_already_set();
    const Py_ssize_t n = PyTuple_GET_SIZE(out.items.ptr());
    if (n == 0) throw py::value_error(name + ": expected at least one token, got an empty sequence");
    out.views.reserve(n);
    for (Py_ssize_t k = 0; k < n; ++k) {
        PyObject* item = PyTuple_GET_ITEM(out.items.ptr(), k);
        if (!PyUnicode_Check(item))
            throw py::type_error(name + "[" + std::to_string(k) + "]: expected str, got " +
                                 std::string(Py_TYPE(item)->tp_name));
        Py_ssize_t size = 0;
        const char* data = PyUnicode_AsUTF8AndSize(item, &size);
        if (!data) {
            // Lone surrogates have no UTF-8 form; "surrogatepass" keeps them as 3-byte code
            // points, so the code point sequence (what editdistance compares) is unchanged.
            PyErr_Clear();
            PyObject* b = PyUnicode_AsEncodedString(item, "utf-8", "surrogatepass");
            if (!b) throw py::error_already_set();
            out.encoded.push_back(py::reinterpret_steal<py::bytes>(b));
            data = PyBytes_AS_STRING(b);
            size = PyBytes_GET_SIZE(b);
        }
        out.views.emplace_back(data, static_cast<size_t>(size));
    }
    return out;
}

py::tuple to_python(const DTWResult& r) {
    py::array_t<int64_t> indptr(static_cast<py::ssize_t>(r.indptr.size()), r.indptr.data());
    py::array_t<int32_t> indices(static_cast<py::ssize_t>(r.indices.size()), r.indices.data());
    return py::make_tuple(indptr, indices, r.cost);
}

py::tuple py_dtw_align(py::handle src_tokens, py::handle tgt_tokens, int num_threads, int64_t max_cells) {
    Tokens s = borrow_tokens(src_tokens, "src_tokens");
    Tokens t = borrow_tokens(tgt_tokens, "tgt_tokens");
    DTWResult r;
    {
        py::gil_scoped_release release;
        r = dtw_align(s.views, t.views, num_threads, max_cells);
    }
    return to_python(r);
}

py::list py_dtw_align_batch(py::handle src_batch, py::handle tgt_batch, int num_threads, int64_t max_cells) {
    for (auto [obj, name] : {std::pair{src_batch, "src_batch"}, std::pair{tgt_batch, "tgt_batch"}})
        if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr()))
            throw py::type_error(std::string(name) + ": expected a list of token lists, got " +
                                 std::string(Py_TYPE(obj.ptr())->tp_name));
    const Py_ssize_t n = PySequence_Size(src_batch.ptr());
    const Py_ssize_t nt = PySequence_Size(tgt_batch.ptr());
    if (n != nt)
        throw py::value_error("tgt_batch: expected as many sequences as src_batch (" + std::to_string(n) +
                              "), got " + std::to_string(nt));
    py::tuple sb = py::reinterpret_steal<py::tuple>(PySequence_Tuple(src_batch.ptr()));
    py::tuple tb = py::reinterpret_steal<py::tuple>(PySequence_Tuple(tgt_batch.ptr()));
    if (!sb || !tb) throw py::error_already_set();
    std::vector<Tokens> ss, ts;
    ss.reserve(n);
    ts.reserve(n);
    for (Py_ssize_t b = 0; b < n; ++b) {
        ss.push_back(borrow_tokens(sb[b], "src_batch[" + std::to_string(b) + "]"));
        ts.push_back(borrow_tokens(tb[b], "tgt_batch[" + std::to_string(b) + "]"));
    }
    std::vector<DTWResult> results(n);
    {
        py::gil_scoped_release release;
        // One sequence pair per task, single-threaded inside (a lone pair may use the threads).
        const int inner = n == 1 ? num_threads : 1;
        parallel_for(n, num_threads, [&](int64_t b) {
            try {
                results[b] = dtw_align(ss[b].views, ts[b].views, inner, max_cells);
            } catch (const std::invalid_argument& e) {
                throw std::invalid_argument(std::string(e.what()) + " (pair " + std::to_string(b) + ")");
            }
        });
    }
    py::list out;
    for (const auto& r : results) out.append(to_python(r));
    return out;
}

}  // namespace

void bind_dtw(py::module_& m) {
    m.attr("DTW_DEFAULT_MAX_CELLS") = kDefaultMaxCells;
    m.def("dtw_align", &py_dtw_align, py::arg("src_tokens"), py::arg("tgt_tokens"), py::arg("num_threads") = 0,
          py::arg("max_cells") = kDefaultMaxCells,
          "MinED / DTW alignment (FuseLLM semantics) -> (indptr int64[T+1], indices int32[P], cost int).");
    m.def("dtw_align_batch", &py_dtw_align_batch, py::arg("src_batch"), py::arg("tgt_batch"),
          py::arg("num_threads") = 0, py::arg("max_cells") = kDefaultMaxCells,
          "Batched dtw_align over many sequence pairs, multithreaded, GIL released.");
}

}  // namespace fastfuse
