// The edit-distance half of the DTW alignment: interning, bit-parallel Levenshtein (four target
// tokens at a time), and the cost rows the DP in dtw.cpp reads (see dtw.hpp for the contract).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.hpp"
#include "dtw.hpp"
#include "dtw_internal.hpp"
#include "myers.hpp"

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

namespace dtw_detail {

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

namespace {

// Four texts of one length against one pattern, their symbols interleaved (ids[4 * k + q] is
// symbol k of text q): four independent dependency chains, and the texts are visited sorted by
// length so the trip count repeats and the branch predictor learns it.
inline void myers64_x4(const uint64_t* peq, int m, const uint32_t* ids, int64_t lt, int32_t* out) {
    uint64_t pv[4], mv[4];
    int64_t score[4];
    const uint64_t hb = uint64_t(1) << (m - 1);
    for (int q = 0; q < 4; ++q) { pv[q] = ~uint64_t(0); mv[q] = 0; score[q] = m; }
    for (int64_t k = 0; k < lt; ++k) {
        for (int q = 0; q < 4; ++q) {
            const uint64_t eq = peq[ids[4 * k + q]];
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

#if FASTFUSE_DTW_AVX2
// The same four chains in the four 64-bit lanes of an AVX2 register.
__attribute__((target("avx2"))) void myers64_x4_avx2(const uint64_t* peq, int m, const uint32_t* ids, int64_t lt,
                                                     int32_t* out) {
    const __m256i ones = _mm256_set1_epi64x(-1), one = _mm256_set1_epi64x(1);
    const __m128i shift = _mm_cvtsi32_si128(m - 1);
    __m256i pv = ones, mv = _mm256_setzero_si256(), score = _mm256_set1_epi64x(m);
    const long long* table = reinterpret_cast<const long long*>(peq);
    for (int64_t k = 0; k < lt; ++k) {
        const __m128i idx = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ids + 4 * k));
        const __m256i eq = _mm256_i32gather_epi64(table, idx, 8);
        const __m256i xv = _mm256_or_si256(eq, mv);
        const __m256i xh =
            _mm256_or_si256(_mm256_xor_si256(_mm256_add_epi64(_mm256_and_si256(eq, pv), pv), pv), eq);
        __m256i ph = _mm256_or_si256(mv, _mm256_andnot_si256(_mm256_or_si256(xh, pv), ones));
        __m256i mh = _mm256_and_si256(pv, xh);
        score = _mm256_add_epi64(score, _mm256_and_si256(_mm256_srl_epi64(ph, shift), one));
        score = _mm256_sub_epi64(score, _mm256_and_si256(_mm256_srl_epi64(mh, shift), one));
        ph = _mm256_or_si256(_mm256_slli_epi64(ph, 1), one);
        mh = _mm256_slli_epi64(mh, 1);
        pv = _mm256_or_si256(mh, _mm256_andnot_si256(_mm256_or_si256(xv, ph), ones));
        mv = _mm256_and_si256(ph, xv);
    }
    alignas(32) int64_t sc[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc), score);
    for (int q = 0; q < 4; ++q) out[q] = static_cast<int32_t>(sc[q]);
}
#endif

}  // namespace

template <class C>
void cost_rows(const Interned& s, const Interned& t, size_t alphabet_size, int num_threads, std::vector<C>& cost) {
    const int64_t Us = s.size(), Ut = t.size();
    const int64_t n2 = static_cast<int64_t>(t.uid.size());
    cost.resize(static_cast<size_t>(Us * n2));
    // Threads only pay off on larger tables.
    if (Us * (Ut + n2 / 8) < 32768) num_threads = 1;
    // Target tokens sorted by length; runs of equal length go in quads with interleaved symbols,
    // the rest (and empty tokens) one by one.
    std::vector<int32_t> by_len(Ut);
    for (int64_t v = 0; v < Ut; ++v) by_len[v] = static_cast<int32_t>(v);
    std::stable_sort(by_len.begin(), by_len.end(), [&](int32_t x, int32_t y) { return t.len(x) < t.len(y); });
    struct Quad {
        int32_t v[4];
        int64_t len, off;
    };
    std::vector<Quad> quads;
    std::vector<uint32_t> quad_ids;
    std::vector<int32_t> singles;
    for (int64_t r = 0; r < Ut;) {
        int64_t e = r;
        const int64_t len = t.len(by_len[r]);
        while (e < Ut && t.len(by_len[e]) == len) ++e;
        for (; len > 0 && r + 4 <= e; r += 4) {
            Quad qd{{by_len[r], by_len[r + 1], by_len[r + 2], by_len[r + 3]}, len,
                    static_cast<int64_t>(quad_ids.size())};
            for (int64_t k = 0; k < len; ++k)
                for (int q = 0; q < 4; ++q) quad_ids.push_back(t.str(qd.v[q])[k]);
            quads.push_back(qd);
        }
        for (; r < e; ++r) singles.push_back(by_len[r]);
    }
#if FASTFUSE_DTW_AVX2
    const bool simd = simd_enabled();
#endif
    const int32_t* tu = t.uid.data();
    // Each thread keeps a zeroed match-mask scratch (bits are set for the pattern and cleared
    // again after it) and a row of distances over the unique target tokens.
    const int64_t chunk = 4;
    parallel_for((Us + chunk - 1) / chunk, num_threads, [&](int64_t c) {
        thread_local std::vector<uint64_t> peq_scratch;
        thread_local std::vector<int32_t> row_scratch;
        if (peq_scratch.size() < alphabet_size) peq_scratch.assign(alphabet_size, 0);
        row_scratch.resize(Ut);
        // Plain locals: C may be a char type that aliases everything, and thread_locals are slow.
        uint64_t* const peq = peq_scratch.data();
        int32_t* const row = row_scratch.data();
        const int32_t* const tu_local = tu;
        const int64_t n2_local = n2;
        for (int64_t u = c * chunk, stop = std::min(Us, (c + 1) * chunk); u < stop; ++u) {
            const int64_t m = s.len(u);
            const uint32_t* p = s.str(u);
            if (m == 0) {
                for (int64_t v = 0; v < Ut; ++v) row[v] = static_cast<int32_t>(t.len(v));
            } else if (m <= 64) {
                for (int64_t k = 0; k < m; ++k) peq[p[k]] |= uint64_t(1) << k;
                const int mi = static_cast<int>(m);
                for (const Quad& qd : quads) {
                    int32_t o[4];
#if FASTFUSE_DTW_AVX2
                    if (simd) myers64_x4_avx2(peq, mi, quad_ids.data() + qd.off, qd.len, o);
                    else
#endif
                        myers64_x4(peq, mi, quad_ids.data() + qd.off, qd.len, o);
                    for (int q = 0; q < 4; ++q) row[qd.v[q]] = o[q];
                }
                for (int32_t v : singles) row[v] = myers64(peq, mi, t.str(v), t.len(v));
                for (int64_t k = 0; k < m; ++k) peq[p[k]] = 0;
            } else {
                for (int64_t v = 0; v < Ut; ++v)
                    row[v] = static_cast<int32_t>(levenshtein(p, m, t.str(v), t.len(v)));
            }
            C* const out = cost.data() + u * n2_local;
            for (int64_t j = 0; j < n2_local; ++j) out[j] = static_cast<C>(row[tu_local[j]]);
        }
    });
}

template void cost_rows<uint8_t>(const Interned&, const Interned&, size_t, int, std::vector<uint8_t>&);
template void cost_rows<int32_t>(const Interned&, const Interned&, size_t, int, std::vector<int32_t>&);

}  // namespace dtw_detail
}  // namespace fastfuse
