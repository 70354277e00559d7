// Python bindings for vocab_map.hpp: buffers in, int32 numpy arrays out, GIL released.
#include <pybind11/numpy.h>

#include <string>

#include "bindings.hpp"
#include "vocab_map.hpp"

namespace py = pybind11;

namespace fastfuse {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

// Holds the Python objects alive while the C++ side reads them without the GIL.
struct VocabArgs {
    py::buffer_info buf;
    I64Array offsets;
    U8Array special;
    ByteVocab view;
};

void require_1d(const py::array& a, const std::string& name) {
    if (a.ndim() != 1)
        throw py::value_error(name + ": expected a 1-D array, got " + std::to_string(a.ndim()) + " dimensions");
}

void load_vocab(VocabArgs& out, const py::buffer& buf, py::handle offsets, py::handle special, const std::string& name) {
    out.buf = buf.request();
    if (out.buf.itemsize != 1 || out.buf.ndim != 1 || (out.buf.ndim == 1 && out.buf.strides[0] != 1))
        throw py::type_error(name + ": expected a contiguous bytes buffer");
    out.offsets = I64Array::ensure(offsets);
    if (!out.offsets) throw py::type_error(name + "_offsets: expected a 1-D int64 array");
    require_1d(out.offsets, name + "_offsets");
    if (out.offsets.shape(0) < 1) throw py::value_error(name + "_offsets: needs n + 1 >= 1 entries");
    const int64_t n = out.offsets.shape(0) - 1;
    out.view.data = static_cast<const uint8_t*>(out.buf.ptr);
    out.view.offsets = out.offsets.data();
    out.view.n = n;
    out.view.special = nullptr;
    if (!special.is_none()) {
        out.special = U8Array::ensure(special);
        if (!out.special) throw py::type_error(name + "_special: expected a 1-D bool array or None");
        require_1d(out.special, name + "_special");
        if (out.special.shape(0) != n)
            throw py::value_error(name + "_special: expected " + std::to_string(n) + " entries (one per token), got " +
                                  std::to_string(out.special.shape(0)));
        out.view.special = out.special.data();
    }
    check_byte_vocab(out.view, static_cast<int64_t>(out.buf.size), (name + "_offsets").c_str());
}

py::tuple py_map_vocab(const py::buffer& src_buf, py::handle src_offsets, py::handle src_special,
                       const py::buffer& tgt_buf, py::handle tgt_offsets, py::handle tgt_special, bool mined,
                       int num_threads) {
    VocabArgs src, tgt;
    load_vocab(src, src_buf, src_offsets, src_special, "src");
    load_vocab(tgt, tgt_buf, tgt_offsets, tgt_special, "tgt");
    I32Array ids(src.view.n), distance(src.view.n);
    int32_t* ip = ids.mutable_data();
    int32_t* dp = distance.mutable_data();
    {
        py::gil_scoped_release release;
        map_vocab(src.view, tgt.view, mined, num_threads, ip, dp);
    }
    return py::make_tuple(ids, distance);
}

}  // namespace

void bind_vocab(py::module_& m) {
    m.def("map_vocab", &py_map_vocab, py::arg("src_buf"), py::arg("src_offsets"), py::arg("src_special"),
          py::arg("tgt_buf"), py::arg("tgt_offsets"), py::arg("tgt_special"), py::arg("mined"),
          py::arg("num_threads") = 0,
          "Map source token ids to target ids by normalised bytes -> (ids int32[S], distance int32[S]).\n"
          "Token k of a side is buf[offsets[k]:offsets[k+1]]; special is None or bool[n].");
}

}  // namespace fastfuse
