// MinED alignment: dynamic time warping of two token sequences with Levenshtein cost, exactly as
// FuseLLM's `dtw(src, tgt, norm_func=editdistance.eval)` (ties included).
// Plain C++17, no Python: tokens arrive as UTF-8 string_views, distances are over code points.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace fastfuse {

// The warping path as CSR over target tokens: the source tokens mapped to target token t are
// indices[indptr[t] .. indptr[t+1]), ascending. cost is the DTW total cost (matrix[-1, -1]).
struct DTWResult {
    std::vector<int64_t> indptr;   // [n_tgt + 1]
    std::vector<int32_t> indices;  // [path length], the path's source coordinates in path order
    int64_t cost = 0;
};

// Levenshtein distance between two code point sequences (any lengths).
int64_t levenshtein(const uint32_t* a, int64_t la, const uint32_t* b, int64_t lb);

// DTW alignment of src (series_1) to tgt (series_2). Both must be non-empty (std::invalid_argument
// otherwise; the message names the side). Invalid UTF-8 throws std::invalid_argument.
// num_threads parallelises the edit-distance table (<= 0: all hardware threads).
//
// How it is fast and still exact:
//  - tokens are interned and the edit distance is computed once per unique (src, tgt) pair
//    (Hyyrö's bit-parallel Levenshtein for tokens of <= 64 code points, four target tokens of
//    one length at a time in AVX2 lanes; plain DP beyond 64), then spread into one cost row per
//    unique source token (uint8 when every token has <= 255 code points);
//  - integer DP with two rolling rows (int32 while it cannot overflow, else int64); a row is a
//    min-plus scan, done 8 columns at a time with AVX2 where the CPU has it;
//  - the backtrack's first-minimum argmin over (diag, up, left) at cell (i, j) compares exactly
//    the three predecessors that the forward min at (i, j) compares (out-of-matrix ones are
//    +inf in both), so the choice is recorded in the forward pass as two bits per cell and the
//    backtrack just follows it. Ties resolve as np.argmin does: diag, then up, then left.
// The whole matrix is computed (no band), as in the reference: a band could change the path.
//
// max_cells refuses (std::invalid_argument with the sizes, before any large allocation) inputs
// whose work would not fit or not finish: more than max_cells DTW cells (n_src * n_tgt; about
// 1.25 bytes each, 4.25 when a token has > 255 code points), or more than max_cells edit-distance
// DP cells for the pairs involving a token longer than 64 code points (such a pair costs
// len_a * len_b, or len_long bit-parallel steps when the source token is short).
constexpr int64_t kDefaultMaxCells = int64_t(1) << 30;
DTWResult dtw_align(const std::vector<std::string_view>& src, const std::vector<std::string_view>& tgt,
                    int num_threads = 1, int64_t max_cells = kDefaultMaxCells);

// Testing hook, process-wide: simd = use the AVX2 DP row where the CPU has it (default true);
// force_wide = run the DP in int64 even when int32 is safe (default false). Every path must
// give the same result.
void dtw_set_paths(bool simd, bool force_wide);

}  // namespace fastfuse
