// Exact alignment from byte end offsets (see spans.hpp for the contract). Plain C++17, no Python.
#include "spans.hpp"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastfuse {

static void check_ends(const int64_t* ends, int64_t n, const char* name) {
    int64_t prev = 0;
    for (int64_t k = 0; k < n; ++k) {
        if (ends[k] < prev)
            throw std::invalid_argument(std::string(name) + ": byte end offsets must be non-negative and "
                                        "non-decreasing, got " + std::to_string(ends[k]) + " after " +
                                        std::to_string(prev) + " at index " + std::to_string(k));
        prev = ends[k];
    }
}

int64_t align_spans(const int64_t* te, int64_t nt, const int64_t* se, int64_t ns, int32_t* match) {
    check_ends(te, nt, "tgt_ends");
    check_ends(se, ns, "src_ends");
    int64_t i = 0, j = 0, matched = 0;
    while (i < nt && j < ns) {
        const int64_t ts = i ? te[i - 1] : 0, tend = te[i];
        const int64_t ss = j ? se[j - 1] : 0, send = se[j];
        if (tend == ts) { match[i++] = -1; continue; }   // empty target span
        if (send == ss) { ++j; continue; }                // empty source span
        if (ts == ss && tend == send) {
            match[i++] = static_cast<int32_t>(j++);
            ++matched;
        } else if (tend < send) {
            match[i++] = -1;
        } else if (send < tend) {
            ++j;
        } else {  // same end, different starts: a many-to-many group closes here
            match[i++] = -1;
            ++j;
        }
    }
    for (; i < nt; ++i) match[i] = -1;
    return matched;
}

void match_to_next_token_pos(const int32_t* match, int64_t n, int32_t* pos) {
    for (int64_t i = 0; i + 1 < n; ++i) pos[i] = match[i + 1] >= 1 ? match[i + 1] - 1 : -1;
    if (n > 0) pos[n - 1] = -1;
}

}  // namespace fastfuse
