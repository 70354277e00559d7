// Bit-parallel Levenshtein distance (Hyyro's formulation of Myers' algorithm) for a pattern of
// 1..64 symbols, shared by the DTW cost table (code-point ids) and the vocabulary map (bytes).
#pragma once
#include <cstdint>

namespace fastfuse {

// peq[s]: bit i set when pattern symbol i == s (built once per pattern); m: pattern length
// (1..64); t: the text, n symbols. Column state: Pv/Mv = vertical +1/-1 deltas down the
// pattern; score = D[m][j]. Each text symbol costs a few word operations.
template <class Sym>
inline int32_t myers64(const uint64_t* peq, int m, const Sym* t, int64_t n) {
    const uint64_t last = uint64_t(1) << (m - 1);
    uint64_t pv = ~uint64_t(0), mv = 0;
    int64_t score = m;
    for (int64_t j = 0; j < n; ++j) {
        const uint64_t eq = peq[t[j]];
        const uint64_t xv = eq | mv;
        const uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
        uint64_t ph = mv | ~(xh | pv);
        uint64_t mh = pv & xh;
        score += static_cast<int64_t>((ph & last) != 0) - static_cast<int64_t>((mh & last) != 0);
        ph = (ph << 1) | 1;  // row 0 is D[0][j] = j: every horizontal step there is +1
        mh <<= 1;
        pv = mh | ~(xv | ph);
        mv = ph & xv;
    }
    return static_cast<int32_t>(score);
}

}  // namespace fastfuse
