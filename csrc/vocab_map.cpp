#include "vocab_map.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.hpp"
#include "myers.hpp"

namespace fastfuse {

void check_byte_vocab(const ByteVocab& v, int64_t buf_len, const char* name) {
    if (v.n < 0 || v.n > INT32_MAX)
        throw std::invalid_argument(std::string(name) + ": vocabulary size " + std::to_string(v.n) +
                                    " does not fit int32 token ids");
    if (v.offsets[0] != 0)
        throw std::invalid_argument(std::string(name) + ": offsets must start at 0, got " +
                                    std::to_string(v.offsets[0]));
    for (int64_t k = 0; k < v.n; ++k)
        if (v.offsets[k + 1] < v.offsets[k])
            throw std::invalid_argument(std::string(name) + ": offsets must be non-decreasing, got " +
                                        std::to_string(v.offsets[k + 1]) + " after " +
                                        std::to_string(v.offsets[k]) + " at index " + std::to_string(k + 1));
    if (v.offsets[v.n] != buf_len)
        throw std::invalid_argument(std::string(name) + ": last offset " + std::to_string(v.offsets[v.n]) +
                                    " != buffer length " + std::to_string(buf_len));
}

namespace {

inline void build_peq(uint64_t* peq, const uint8_t* p, int m) {
    std::memset(peq, 0, 256 * sizeof(uint64_t));
    for (int i = 0; i < m; ++i) peq[p[i]] |= uint64_t(1) << i;
}

// Two-row DP; returns cutoff + 1 as soon as a whole row exceeds cutoff (the minimum of a row
// never decreases further down).
int32_t dp_cutoff(const uint8_t* a, int64_t m, const uint8_t* b, int64_t n, int32_t cutoff, std::vector<int32_t>& row) {
    row.resize(n + 1);
    for (int64_t j = 0; j <= n; ++j) row[j] = static_cast<int32_t>(j);
    for (int64_t i = 1; i <= m; ++i) {
        int32_t diag = row[0];
        row[0] = static_cast<int32_t>(i);
        int32_t rmin = row[0];
        const uint8_t ai = a[i - 1];
        for (int64_t j = 1; j <= n; ++j) {
            const int32_t up = row[j];
            int32_t v = diag + (ai != b[j - 1]);
            v = std::min(v, up + 1);
            v = std::min(v, row[j - 1] + 1);
            diag = up;
            row[j] = v;
            rmin = std::min(rmin, v);
        }
        if (rmin > cutoff) return cutoff + 1;
    }
    return row[n];
}

inline const uint8_t* as_u8(std::string_view s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// Which of 64 byte classes occur in a string. Each byte class present in one string but absent
// from the other needs its own edit (an edit touches at most one byte on each side), so
// max(popcount(a & ~b), popcount(b & ~a)) is a lower bound on the edit distance: a few word ops
// that skip most candidates once a good match is known.
inline uint64_t byte_signature(const uint8_t* p, int64_t n) {
    uint64_t sig = 0;
    for (int64_t i = 0; i < n; ++i) sig |= uint64_t(1) << ((uint32_t(p[i]) * 0x9E3779B1u) >> 26);
    return sig;
}

inline int32_t signature_bound(uint64_t a, uint64_t b) {
    return std::max(__builtin_popcountll(a & ~b), __builtin_popcountll(b & ~a));
}

// Ordinary non-empty target tokens of one byte length, unique bytes (smallest id kept),
// in increasing id order, bytes stored contiguously with stride len.
struct Bucket {
    std::vector<int32_t> ids;
    std::vector<uint8_t> bytes;
    std::vector<uint64_t> sigs;  // byte_signature of each token
};

}  // namespace

int32_t levenshtein_dp(std::string_view a, std::string_view b) {
    std::vector<int32_t> row;
    return dp_cutoff(as_u8(a), static_cast<int64_t>(a.size()), as_u8(b), static_cast<int64_t>(b.size()), INT32_MAX - 1,
                     row);
}

int32_t levenshtein(std::string_view a, std::string_view b) {
    if (a.size() > b.size()) std::swap(a, b);  // a: the shorter one, used as the pattern
    if (a.empty()) return static_cast<int32_t>(b.size());
    if (a.size() > 64) return levenshtein_dp(a, b);
    uint64_t peq[256];
    build_peq(peq, as_u8(a), static_cast<int>(a.size()));
    return myers64(peq, static_cast<int>(a.size()), as_u8(b), static_cast<int64_t>(b.size()));
}

void map_vocab(const ByteVocab& src, const ByteVocab& tgt, bool mined, int num_threads, int32_t* ids,
               int32_t* distance) {
    // Exact lookup tables: inserting in id order keeps the smallest id for duplicate bytes.
    std::unordered_map<std::string_view, int32_t> ordinary, special;
    ordinary.reserve(static_cast<size_t>(tgt.n) * 2);
    for (int64_t k = 0; k < tgt.n; ++k) {
        std::string_view s = tgt.token(k);
        if (s.empty()) continue;
        (tgt.is_special(k) ? special : ordinary).emplace(s, static_cast<int32_t>(k));
    }

    std::vector<int32_t> pending;  // ordinary non-empty source tokens without an exact match
    for (int64_t k = 0; k < src.n; ++k) {
        ids[k] = -1;
        distance[k] = -1;
        std::string_view s = src.token(k);
        if (s.empty()) continue;
        const bool sp = src.is_special(k);
        const auto& table = sp ? special : ordinary;
        auto it = table.find(s);
        if (it != table.end()) {
            ids[k] = it->second;
            distance[k] = 0;
        } else if (!sp) {
            pending.push_back(static_cast<int32_t>(k));
        }
    }
    if (!mined || pending.empty() || ordinary.empty()) return;

    // Buckets by byte length, each in increasing target id order.
    std::vector<std::pair<int32_t, std::string_view>> uniq;
    uniq.reserve(ordinary.size());
    for (const auto& kv : ordinary) uniq.emplace_back(kv.second, kv.first);
    std::sort(uniq.begin(), uniq.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    size_t max_len = 0;
    for (const auto& u : uniq) max_len = std::max(max_len, u.second.size());
    std::vector<Bucket> buckets(max_len + 1);
    for (const auto& u : uniq) {
        Bucket& b = buckets[u.second.size()];
        b.ids.push_back(u.first);
        b.bytes.insert(b.bytes.end(), u.second.begin(), u.second.end());
        b.sigs.push_back(byte_signature(as_u8(u.second), static_cast<int64_t>(u.second.size())));
    }
    const int64_t maxl = static_cast<int64_t>(max_len);

    parallel_for(static_cast<int64_t>(pending.size()), num_threads, [&](int64_t pi) {
        const int32_t k = pending[pi];
        std::string_view s = src.token(k);
        const int64_t m = static_cast<int64_t>(s.size());
        const bool bitpar = m <= 64;
        uint64_t peq[256];
        std::vector<int32_t> row;
        if (bitpar) build_peq(peq, as_u8(s), static_cast<int>(m));
        const uint64_t ssig = byte_signature(as_u8(s), m);

        int32_t best = INT32_MAX, best_id = INT32_MAX;
        // Seed with the longest prefix or suffix of s that is a target token: its distance is
        // exactly the number of bytes cut off, and a tight start lets the bounds below prune.
        for (int64_t len = m - 1; len >= 1 && best == INT32_MAX; --len) {
            for (std::string_view part : {s.substr(0, len), s.substr(m - len)}) {
                auto it = ordinary.find(part);
                if (it != ordinary.end() && it->second < best_id) {
                    best = static_cast<int32_t>(m - len);
                    best_id = it->second;
                }
            }
        }
        // Lengths differing by d give distance >= d: visit d = 0, 1, ... while d can still
        // beat the best, or tie it with a smaller id.
        for (int64_t d = 0; d <= best; ++d) {
            if (m - d < 1 && m + d > maxl) break;
            for (int side = 0; side < (d == 0 ? 1 : 2); ++side) {
                const int64_t len = side == 0 ? m - d : m + d;
                if (len < 1 || len > maxl) continue;
                const Bucket& b = buckets[len];
                const size_t cnt = b.ids.size();
                for (size_t i = 0; i < cnt; ++i) {
                    const int32_t id = b.ids[i];
                    if (d > best || (d == best && id >= best_id)) break;  // ids ascend: nothing left can win
                    const int32_t limit = id < best_id ? best : best - 1;  // must reach <= limit to win
                    if (signature_bound(ssig, b.sigs[i]) > limit) continue;
                    const uint8_t* t = b.bytes.data() + i * len;
                    const int32_t dist = bitpar ? myers64(peq, static_cast<int>(m), t, len)
                                                : dp_cutoff(as_u8(s), m, t, len, limit, row);
                    if (dist <= limit) {
                        best = dist;
                        best_id = id;
                    }
                }
            }
        }
        if (best_id != INT32_MAX) {
            ids[k] = best_id;
            distance[k] = best;
        }
    });
}

}  // namespace fastfuse
