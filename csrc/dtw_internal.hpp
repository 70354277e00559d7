// Shared by the two halves of the DTW alignment: dtw_costs.cpp (interning, edit distances, the
// cost rows) and dtw.cpp (the DP and its backtrack). Internal: the C++ interface is dtw.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTFUSE_DTW_AVX2 1
#include <immintrin.h>
#else
#define FASTFUSE_DTW_AVX2 0
#endif

namespace fastfuse::dtw_detail {

// Unique strings of one side, decoded to dense alphabet ids, concatenated.
struct Interned {
    std::vector<int32_t> uid;     // [n] token -> unique id
    std::vector<int64_t> offset;  // [U + 1] into chars
    std::vector<uint32_t> chars;  // dense alphabet ids
    int64_t size() const { return static_cast<int64_t>(offset.size()) - 1; }
    int64_t len(int64_t u) const { return offset[u + 1] - offset[u]; }
    const uint32_t* str(int64_t u) const { return chars.data() + offset[u]; }
};

// Interns one side's tokens (UTF-8; invalid bytes throw std::invalid_argument naming name[k]),
// growing the alphabet shared by both sides.
Interned intern(const std::vector<std::string_view>& tokens, std::unordered_map<uint32_t, uint32_t>& alphabet,
                const char* name);

// Whether the AVX2 paths run: the CPU has AVX2 and the testing hook (dtw_set_paths) allows them.
bool simd_enabled();

// The cost rows: cost[us * n2 + j] = editdistance(src unique token us, tgt token j), for every
// unique src token and every target position (C = uint8_t when every token has <= 255 code
// points, which bounds the distance, else int32_t). The edit distance is computed once per
// unique (src, tgt) pair, one src token as the pattern per task, then spread over positions.
// Defined for C = uint8_t and C = int32_t (explicit instantiations in dtw_costs.cpp).
template <class C>
void cost_rows(const Interned& s, const Interned& t, size_t alphabet_size, int num_threads, std::vector<C>& cost);

}  // namespace fastfuse::dtw_detail
