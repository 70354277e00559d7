// Python bindings for spans.hpp: integer arrays of byte end offsets in, int32 numpy arrays out, GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "common.hpp"
#include "spans.hpp"

namespace py = pybind11;

namespace fastfuse {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

// Byte end offsets: an integer array or a list of int, nothing numpy would have to cast (a float
// end would be truncated, NaN become INT64_MIN, "1" be parsed). Empty input may have any dtype.
I64Array as_ends(py::handle obj, const char* name) {
    const std::string expected = std::string(name) + ": expected a 1-D integer array (or list of int) of byte end offsets";
    py::array raw = py::array::ensure(obj);  // no dtype given: nothing is cast yet
    if (!raw) throw py::type_error(expected + ", got " + std::string(Py_TYPE(obj.ptr())->tp_name));
    const char kind = raw.dtype().kind();
    if (raw.size() > 0 && kind != 'i' && kind != 'u')
        throw py::type_error(expected + ", got " + std::string(Py_TYPE(obj.ptr())->tp_name) + " of dtype " +
                             std::string(py::str(raw.dtype())));
    if (raw.ndim() != 1)
        throw py::value_error(std::string(name) + ": expected a 1-D array, got " + std::to_string(raw.ndim()) +
                              " dimensions");
    if (kind == 'u' && raw.itemsize() == 8 && raw.size() > 0 &&
        py::cast<uint64_t>(raw.attr("max")()) > static_cast<uint64_t>(INT64_MAX))
        throw py::value_error(std::string(name) + ": byte end offsets must fit int64");
    return I64Array::ensure(raw);
}

py::tuple py_align_spans(py::handle tgt_ends, py::handle src_ends) {
    I64Array t = as_ends(tgt_ends, "tgt_ends"), s = as_ends(src_ends, "src_ends");
    const int64_t nt = t.shape(0), ns = s.shape(0);
    I32Array match(nt), pos(nt);
    int64_t matched;
    {
        py::gil_scoped_release release;
        matched = align_spans(t.data(), nt, s.data(), ns, match.mutable_data());
        match_to_next_token_pos(match.data(), nt, pos.mutable_data());
    }
    return py::make_tuple(match, pos, matched);
}

py::list py_align_spans_batch(py::sequence tgt, py::sequence src, int num_threads) {
    const int64_t n = static_cast<int64_t>(py::len(tgt));
    if (static_cast<int64_t>(py::len(src)) != n)
        throw py::value_error("src_ends: expected as many sequences as tgt_ends (" + std::to_string(n) +
                              "), got " + std::to_string(py::len(src)));
    std::vector<I64Array> ts, ss;
    std::vector<I32Array> matches, poses;
    ts.reserve(n); ss.reserve(n); matches.reserve(n); poses.reserve(n);
    for (int64_t b = 0; b < n; ++b) {
        std::string tn = "tgt_ends[" + std::to_string(b) + "]", sn = "src_ends[" + std::to_string(b) + "]";
        ts.push_back(as_ends(tgt[b], tn.c_str()));
        ss.push_back(as_ends(src[b], sn.c_str()));
        matches.emplace_back(ts.back().shape(0));
        poses.emplace_back(ts.back().shape(0));
    }
    std::vector<int64_t> counts(n);
    // Raw pointers only inside the parallel region: no Python objects are touched without the GIL.
    std::vector<const int64_t*> tp(n), sp(n);
    std::vector<int64_t> tn(n), sn(n);
    std::vector<int32_t*> mp(n), pp(n);
    for (int64_t b = 0; b < n; ++b) {
        tp[b] = ts[b].data(); tn[b] = ts[b].shape(0);
        sp[b] = ss[b].data(); sn[b] = ss[b].shape(0);
        mp[b] = matches[b].mutable_data(); pp[b] = poses[b].mutable_data();
    }
    {
        py::gil_scoped_release release;
        parallel_for(n, num_threads, [&](int64_t b) {
            try {
                counts[b] = align_spans(tp[b], tn[b], sp[b], sn[b], mp[b]);
            } catch (const std::invalid_argument& e) {
                throw std::invalid_argument(std::string(e.what()) + " (sequence " + std::to_string(b) + ")");
            }
            match_to_next_token_pos(mp[b], tn[b], pp[b]);
        });
    }
    py::list out;
    for (int64_t b = 0; b < n; ++b) out.append(py::make_tuple(matches[b], poses[b], counts[b]));
    return out;
}

}  // namespace

void bind_spans(py::module_& m) {
    m.def("align_spans", &py_align_spans, py::arg("tgt_ends"), py::arg("src_ends"),
          "Exact alignment from byte end offsets -> (match int32[T], pos int32[T], n_matched).");
    m.def("align_spans_batch", &py_align_spans_batch, py::arg("tgt_ends"), py::arg("src_ends"),
          py::arg("num_threads") = 0, "Batched align_spans over many sequence pairs, multithreaded.");
}

}  // namespace fastfuse
