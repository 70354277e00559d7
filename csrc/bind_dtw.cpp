// Placeholder until the DTW module lands.
#include "bindings.hpp"
namespace fastfuse {
void bind_dtw(pybind11::module_&) {}
}  // namespace fastfuse
