// MinED / DTW alignment of two token sequences (see dtw.hpp for the contract).
#include "dtw.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "common.hpp"

namespace fastfuse {

int64_t levenshtein(const uint32_t* a, int64_t la, const uint32_t* b, int64_t lb) {
    if (la < lb) { std::swap(a, b); std::swap(la, lb); }
    if (lb == 0) return la;
    std::vector<int64_t> row(lb + 1);
    for (int64_t j = 0; j <= lb; ++j) row[j] = j;
    for (int64_t i = 1; i <= la; ++i) {
        int64_t diag = row[0];
        row[0] = i;
        for (int64_t j = 1; j <= lb; ++j) {
            int64_t up = row[j];
            int64_t v = diag + (a[i - 1] != b[j - 1]);
            v = std::min(v, up + 1);
            v = std::min(v, row[j - 1] + 1);
            row[j] = v;
            diag = up;
        }
    }
    return row[lb];
}

namespace {

// Unique strings of one side, decoded to dense alphabet ids, concatenated.
struct Interned {
    std::vector<int32_t> uid;     // [n] token -> unique id
    std::vector<int64_t> offset;  // [U + 1] into chars
    std::vector<uint32_t> chars;  // dense alphabet ids
    int64_t size() const { return static_cast<int64_t>(offset.size()) - 1; }
    int64_t len(int64_t u) const { return offset[u + 1] - offset[u]; }
    const uint32_t* str(int64_t u) const { return chars.data() + offset[u]; }
};

Interned intern(const std::vector<std::string_view>& tokens, std::unordered_map<uint32_t, uint32_t>& alphabet,
                const char* name) {
    Interned out;
    out.uid.resize(tokens.size());
    out.offset.push_back(0);
    std::unordered_map<std::string_view, int32_t> ids;
    ids.reserve(tokens.size() * 2);
    std::vector<uint32_t> cps;
    for (size_t k = 0; k < tokens.size(); ++k) {
        auto it = ids.find(tokens[k]);
        if (it != ids.end()) { out.uid[k] = it->second; continue; }
        int32_t id = static_cast<int32_t>(ids.size());
        ids.emplace(tokens[k], id);
        out.uid[k] = id;
        try {
            utf8_to_codepoints(tokens[k], cps);
        } catch (const std::invalid_argument& e) {
            throw std::invalid_argument(std::string(name) + "[" + std::to_string(k) + "]: " + e.what());
        }
        for (uint32_t cp : cps) {
            auto a = alphabet.emplace(cp, static_cast<uint32_t>(alphabet.size())).first;
            out.chars.push_back(a->second);
        }
        out.offset.push_back(static_cast<int64_t>(out.chars.size()));
    }
    return out;
}

// Hyyrö's bit-parallel Levenshtein for a pattern of 1..64 symbols given as its match masks.
inline int32_t myers64(const uint64_t* peq, int m, const uint32_t* t, int64_t lt) {
    uint64_t pv = ~uint64_t(0), mv = 0;
    const uint64_t hb = uint64_t(1) << (m - 1);
    int64_t score = m;
    for (int64_t k = 0; k < lt; ++k) {
        const uint64_t eq = peq[t[k]];
        const uint64_t xv = eq | mv;
        const uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
        uint64_t ph = mv | ~(xh | pv);
        uint64_t mh = pv & xh;
        score += static_cast<int64_t>((ph & hb) != 0) - static_cast<int64_t>((mh & hb) != 0);
        ph = (ph << 1) | 1;
        mh <<= 1;
        pv = mh | ~(xv | ph);
        mv = ph & xv;
    }
    return static_cast<int32_t>(score);
}

// Four texts of one length against one pattern: four independent dependency chains, and the
// loop trip count is the same for runs of texts (the texts are visited sorted by length), so
// the branch predictor learns it.
inline void myers64_x4(const uint64_t* peq, int m, const uint32_t* const* t, int64_t lt, int32_t* out) {
    uint64_t pv[4], mv[4];
    int64_t score[4];
    const uint64_t hb = uint64_t(1) << (m - 1);
    for (int q = 0; q < 4; ++q) { pv[q] = ~uint64_t(0); mv[q] = 0; score[q] = m; }
    for (int64_t k = 0; k < lt; ++k) {
        for (int q = 0; q < 4; ++q) {
            const uint64_t eq = peq[t[q][k]];
            const uint64_t xv = eq | mv[q];
            const uint64_t xh = (((eq & pv[q]) + pv[q]) ^ pv[q]) | eq;
            uint64_t ph = mv[q] | ~(xh | pv[q]);
            uint64_t mh = pv[q] & xh;
            score[q] += static_cast<int64_t>((ph & hb) != 0) - static_cast<int64_t>((mh & hb) != 0);
            ph = (ph << 1) | 1;
            mh <<= 1;
            pv[q] = mh | ~(xv | ph);
            mv[q] = ph & xv;
        }
    }
    for (int q = 0; q < 4; ++q) out[q] = static_cast<int32_t>(score[q]);
}

// dist[us * Ut + ut] for every unique (src, tgt) pair; one src token is the pattern per task.
void distance_table(const Interned& s, const Interned& t, size_t alphabet_size, int num_threads,
                    std::vector<int32_t>& dist) {
    const int64_t Us = s.size(), Ut = t.size();
    dist.resize(static_cast<size_t>(Us * Ut));
    // Threads only pay off on larger tables.
    if (Us * Ut < 32768) num_threads = 1;
    // Target tokens sorted by length, split into runs of equal length.
    std::vector<int32_t> by_len(Ut);
    for (int64_t v = 0; v < Ut; ++v) by_len[v] = static_cast<int32_t>(v);
    std::stable_sort(by_len.begin(), by_len.end(), [&](int32_t x, int32_t y) { return t.len(x) < t.len(y); });
    std::vector<int64_t> runs;
    for (int64_t r = 0; r < Ut; ++r)
        if (r == 0 || t.len(by_len[r]) != t.len(by_len[r - 1])) runs.push_back(r);
    runs.push_back(Ut);
    // One src token is the pattern per task; each thread keeps a zeroed match-mask scratch
    // (bits are set for the pattern and cleared again after it).
    const int64_t chunk = 4;
    parallel_for((Us + chunk - 1) / chunk, num_threads, [&](int64_t c) {
        thread_local std::vector<uint64_t> peq;
        if (peq.size() < alphabet_size) peq.assign(alphabet_size, 0);
        for (int64_t u = c * chunk, stop = std::min(Us, (c + 1) * chunk); u < stop; ++u) {
            int32_t* row = dist.data() + u * Ut;
            const int64_t m = s.len(u);
            const uint32_t* p = s.str(u);
            if (m == 0) {
                for (int64_t v = 0; v < Ut; ++v) row[v] = static_cast<int32_t>(t.len(v));
            } else if (m <= 64) {
                for (int64_t k = 0; k < m; ++k) peq[p[k]] |= uint64_t(1) << k;
                for (size_t g = 0; g + 1 < runs.size(); ++g) {
                    const int64_t a = runs[g], b = runs[g + 1];
                    const int64_t lt = t.len(by_len[a]);
                    if (lt == 0) {
                        for (int64_t r = a; r < b; ++r) row[by_len[r]] = static_cast<int32_t>(m);
                        continue;
                    }
                    int64_t r = a;
                    for (; r + 4 <= b; r += 4) {
                        const uint32_t* ts[4] = {t.str(by_len[r]), t.str(by_len[r + 1]), t.str(by_len[r + 2]),
                                                 t.str(by_len[r + 3])};
                        int32_t o[4];
                        myers64_x4(peq.data(), static_cast<int>(m), ts, lt, o);
                        for (int q = 0; q < 4; ++q) row[by_len[r + q]] = o[q];
                    }
                    for (; r < b; ++r) row[by_len[r]] = myers64(peq.data(), static_cast<int>(m), t.str(by_len[r]), lt);
                }
                for (int64_t k = 0; k < m; ++k) peq[p[k]] = 0;
            } else {
                for (int64_t v = 0; v < Ut; ++v)
                    row[v] = static_cast<int32_t>(levenshtein(p, m, t.str(v), t.len(v)));
            }
        }
    });
}

template <class T>
int64_t forward_backtrack(const Interned& s, const Interned& t, const std::vector<int32_t>& dist, DTWResult& out) {
    const int64_t n1 = static_cast<int64_t>(s.uid.size()), n2 = static_cast<int64_t>(t.uid.size());
    const int64_t Ut = t.size();
    // dir: 0 diag, 1 up (i-1), 2 or 3 left (j-1); cell (0, 0) is never read.
    std::vector<uint8_t> dir(static_cast<size_t>(n1 * n2));
    std::vector<T> prev(n2), cur(n2);
    const int32_t* tu = t.uid.data();
    {
        const int32_t* drow = dist.data() + static_cast<int64_t>(s.uid[0]) * Ut;
        T acc = 0;
        uint8_t* d = dir.data();
        for (int64_t j = 0; j < n2; ++j) {
            acc += static_cast<T>(drow[tu[j]]);
            prev[j] = acc;
            d[j] = 2;
        }
    }
    for (int64_t i = 1; i < n1; ++i) {
        const int32_t* drow = dist.data() + static_cast<int64_t>(s.uid[i]) * Ut;
        uint8_t* d = dir.data() + i * n2;
        const T* pr = prev.data();
        T* cu = cur.data();
        T left = pr[0] + static_cast<T>(drow[tu[0]]);
        cu[0] = left;
        d[0] = 1;
        for (int64_t j = 1; j < n2; ++j) {
            const T dg = pr[j - 1], up = pr[j];
            // First minimum of (diag, up, left) wins, as np.argmin in the reference backtrack.
            const bool u_lt = up < dg;
            const T du = u_lt ? up : dg;
            const bool l_lt = left < du;
            const T m = l_lt ? left : du;
            d[j] = static_cast<uint8_t>(u_lt | (l_lt << 1));  // bit 1: left, else bit 0: up
            left = m + static_cast<T>(drow[tu[j]]);
            cu[j] = left;
        }
        std::swap(prev, cur);
    }
    const int64_t cost = static_cast<int64_t>(prev[n2 - 1]);

    // Backtrack from (n1-1, n2-1) to (0, 0); the path's cells, reversed, are in CSR order.
    std::vector<int32_t> pi, pj;
    pi.reserve(n1 + n2);
    pj.reserve(n1 + n2);
    int64_t i = n1 - 1, j = n2 - 1;
    while (i > 0 || j > 0) {
        pi.push_back(static_cast<int32_t>(i));
        pj.push_back(static_cast<int32_t>(j));
        const uint8_t mv = dir[i * n2 + j];
        if (mv & 2) --j;
        else if (mv & 1) --i;
        else { --i; --j; }
    }
    pi.push_back(0);
    pj.push_back(0);
    std::reverse(pi.begin(), pi.end());
    std::reverse(pj.begin(), pj.end());
    out.indices = std::move(pi);
    out.indptr.assign(n2 + 1, 0);
    for (int32_t jj : pj) ++out.indptr[jj + 1];
    for (int64_t k = 0; k < n2; ++k) out.indptr[k + 1] += out.indptr[k];
    return cost;
}

}  // namespace

DTWResult dtw_align(const std::vector<std::string_view>& src, const std::vector<std::string_view>& tgt,
                    int num_threads) {
    if (src.empty()) throw std::invalid_argument("src_tokens: expected at least one token");
    if (tgt.empty()) throw std::invalid_argument("tgt_tokens: expected at least one token");
    if (src.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
        tgt.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
        throw std::invalid_argument("src_tokens/tgt_tokens: too many tokens");
    std::unordered_map<uint32_t, uint32_t> alphabet;
    Interned s = intern(src, alphabet, "src_tokens");
    Interned t = intern(tgt, alphabet, "tgt_tokens");
    std::vector<int32_t> dist;
    distance_table(s, t, alphabet.size(), num_threads, dist);

    int64_t max_cost = 0;
    for (int32_t v : dist) max_cost = std::max<int64_t>(max_cost, v);
    const int64_t n1 = static_cast<int64_t>(src.size()), n2 = static_cast<int64_t>(tgt.size());
    DTWResult out;
    // Any cell is a sum of at most n1 + n2 - 1 costs: int32 unless that could overflow.
    if (max_cost * (n1 + n2) < std::numeric_limits<int32_t>::max())
        out.cost = forward_backtrack<int32_t>(s, t, dist, out);
    else
        out.cost = forward_backtrack<int64_t>(s, t, dist, out);
    return out;
}

}  // namespace fastfuse
