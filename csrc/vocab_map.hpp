// Vocabulary mapping: source token id -> target token id, by the tokens' normalised bytes.
// Plain C++17, no Python: the bindings (bind_vocab.cpp) only convert arguments.
#pragma once
#include <cstdint>
#include <string_view>

namespace fastfuse {

// A vocabulary as one concatenated byte buffer: token k is data[offsets[k], offsets[k+1]).
// offsets has n + 1 entries, offsets[0] == 0. special is null (no special tokens) or n flags.
struct ByteVocab {
    const uint8_t* data = nullptr;
    const int64_t* offsets = nullptr;
    int64_t n = 0;
    const uint8_t* special = nullptr;

    std::string_view token(int64_t k) const {
        return {reinterpret_cast<const char*>(data) + offsets[k], static_cast<size_t>(offsets[k + 1] - offsets[k])};
    }
    bool is_special(int64_t k) const { return special != nullptr && special[k] != 0; }
};

// Throws std::invalid_argument (message starts with name) unless offsets start at 0, never
// decrease, and end at buf_len.
void check_byte_vocab(const ByteVocab& v, int64_t buf_len, const char* name);

// Byte-level Levenshtein distance (unit costs). Bit-parallel (Myers / Hyyro) when the shorter
// string has at most 64 bytes, plain two-row dynamic programming otherwise.
int32_t levenshtein(std::string_view a, std::string_view b);

// The plain DP, exposed so tests can check the bit-parallel path against it.
int32_t levenshtein_dp(std::string_view a, std::string_view b);

// Map every source token to a target token; writes ids[src.n] (target id or -1) and
// distance[src.n] (0 exact, edit distance for mined matches, -1 unmapped).
//  - exact: the smallest target id with identical bytes. Special tokens only match special
//    tokens and ordinary tokens only ordinary ones; empty tokens never match.
//  - mined (mined == true): exact first; an ordinary non-empty source token without an exact
//    match takes the ordinary non-empty target token at minimum Levenshtein distance, ties
//    broken by the smallest target id. Special tokens are never mapped by distance.
// Threads over source tokens with parallel_for; needs no Python and no GIL.
void map_vocab(const ByteVocab& src, const ByteVocab& tgt, bool mined, int num_threads, int32_t* ids,
               int32_t* distance);

}  // namespace fastfuse
