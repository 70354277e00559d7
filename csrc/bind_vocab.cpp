// Placeholder until the vocabulary-mapping module lands.
#include "bindings.hpp"
namespace fastfuse {
void bind_vocab(pybind11::module_&) {}
}  // namespace fastfuse
