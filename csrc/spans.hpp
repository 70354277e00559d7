// Exact alignment of two tokenisations of one text from their byte end offsets.
#pragma once
#include <cstdint>

namespace fastfuse {

// Token k of a tokenisation covers the bytes [ends[k-1], ends[k]) (ends[-1] = 0), so the
// spans partition the text whatever convention a tokenizer uses for leading spaces.
// Tokens with an empty span (special tokens, the first pieces of a split character) never match.
//
// For each target token i writes match[i] = the source token covering exactly the same bytes,
// or -1, in one linear merge. Returns the number of matched target tokens.
// Throws std::invalid_argument when ends are negative or decreasing (arg names the side).
int64_t align_spans(const int64_t* tgt_ends, int64_t n_tgt, const int64_t* src_ends, int64_t n_src,
                    int32_t* match);

// Next-token semantics (DESIGN.md §1): target position i predicts token i+1, source position j
// predicts token j+1, so pos[i] = match[i+1] - 1 when that is >= 0, else -1; pos[n-1] = -1.
void match_to_next_token_pos(const int32_t* match, int64_t n, int32_t* pos);

}  // namespace fastfuse
