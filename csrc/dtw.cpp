// MinED / DTW alignment of two token sequences (see dtw.hpp for the contract): the DP over the
// cost rows of dtw_costs.cpp, its backtrack, the size checks and the entry point.
#include "dtw.hpp"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "dtw_internal.hpp"

namespace fastfuse {
namespace {

using dtw_detail::Interned;

std::atomic<bool> g_use_simd{true};
std::atomic<bool> g_force_wide{false};

// Backtrack directions as two bit planes, W bytes per DP row: bit j of `up` says the up
// predecessor is strictly below the diagonal one; bit j of `left` says the left one is strictly
// below both (so it wins). The first minimum of (diag, up, left) is: left if left bit, else up if
// up bit, else diag -- np.argmin's choice in the reference. Row 0 and column 0 are not stored
// (their only finite predecessor is left, resp. up).
struct Directions {
    int64_t W = 0;
    std::vector<uint8_t> up, left;
};

// Per-thread buffers reused across calls: fresh multi-megabyte allocations cost page faults
// that were ~15% of a 2048 x 2250 alignment. Released after a call that needed more than
// kKeepBytes, so a one-off huge alignment does not pin its memory.
struct Workspace {
    std::vector<uint8_t> cost8;
    std::vector<int32_t> cost32;
    Directions dir;
    size_t bytes() const {
        return cost8.capacity() + cost32.capacity() * 4 + dir.up.capacity() + dir.left.capacity();
    }
};
constexpr size_t kKeepBytes = size_t(64) << 20;

// One DP row i >= 1, columns [j, stop). Row i at column j - 1 is already in cu.
template <class T, class C>
inline void row_scalar(const T* pr, T* cu, const C* crow, uint8_t* ub, uint8_t* lb, int64_t j, int64_t stop) {
    T left = cu[j - 1];
    unsigned ubits = 0, lbits = 0;
    for (; j < stop; ++j) {
        const T dg = pr[j - 1], up = pr[j];
        const bool u_lt = up < dg;
        const T du = u_lt ? up : dg;
        const bool l_lt = left < du;
        const T m = l_lt ? left : du;
        ubits |= static_cast<unsigned>(u_lt) << (j & 7);
        lbits |= static_cast<unsigned>(l_lt) << (j & 7);
        if ((j & 7) == 7 || j + 1 == stop) {
            // Callers start at column 1 or at a multiple of 8 and stop at a multiple of 8 or at
            // n2, so every byte is written whole by exactly one flush: no zeroing needed.
            ub[j >> 3] = static_cast<uint8_t>(ubits);
            lb[j >> 3] = static_cast<uint8_t>(lbits);
            ubits = lbits = 0;
        }
        left = m + static_cast<T>(crow[j]);
        cu[j] = left;
    }
}

#if FASTFUSE_DTW_AVX2
template <class C>
__attribute__((target("avx2"))) inline __m256i load_costs(const C* crow) {
    if constexpr (sizeof(C) == 1)
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(crow)));
    else
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(crow));
}

// The same row, 8 columns at a time from an 8-aligned j (int32, all values < 2^29). Row i is a
// min-plus scan: cur[j] = min(A[j], cur[j-1] + C[j]) with C[j] the cost and
// A[j] = C[j] + min(diag, up), so the lanes compose as (A, C) pairs in three shift steps and one
// carry from the previous block. The directions compare the very same integers as row_scalar.
// Returns the first column it did not do.
template <class C>
__attribute__((target("avx2"))) int64_t row_avx2(const int32_t* pr, int32_t* cu, const C* crow, uint8_t* ub,
                                                 uint8_t* lb, int64_t j, int64_t n2) {
    const __m256i big = _mm256_set1_epi32(1 << 30), zero = _mm256_setzero_si256();
    const __m256i sh1 = _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6);
    const __m256i sh2 = _mm256_setr_epi32(0, 0, 0, 1, 2, 3, 4, 5);
    const __m256i sh4 = _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 2, 3);
    const __m256i last = _mm256_set1_epi32(7);
    __m256i carry = _mm256_set1_epi32(cu[j - 1]);
    for (; j + 8 <= n2; j += 8) {
        const __m256i up = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr + j));
        const __m256i dg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr + j - 1));
        const __m256i c = load_costs(crow + j);
        const __m256i u_lt = _mm256_cmpgt_epi32(dg, up);
        const __m256i du = _mm256_min_epi32(dg, up);
        __m256i a = _mm256_add_epi32(du, c), sc = c;
        // (a, sc)[j] <- (a[j-k], sc[j-k]) followed by (a[j], sc[j]); identity (big, 0) below lane 0.
        __m256i as = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(a, sh1), big, 0x01);
        __m256i cs = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(sc, sh1), zero, 0x01);
        a = _mm256_min_epi32(a, _mm256_add_epi32(as, sc));
        sc = _mm256_add_epi32(sc, cs);
        as = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(a, sh2), big, 0x03);
        cs = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(sc, sh2), zero, 0x03);
        a = _mm256_min_epi32(a, _mm256_add_epi32(as, sc));
        sc = _mm256_add_epi32(sc, cs);
        as = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(a, sh4), big, 0x0F);
        cs = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(sc, sh4), zero, 0x0F);
        a = _mm256_min_epi32(a, _mm256_add_epi32(as, sc));
        sc = _mm256_add_epi32(sc, cs);
        const __m256i cur = _mm256_min_epi32(a, _mm256_add_epi32(carry, sc));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(cu + j), cur);
        const __m256i left = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(cur, sh1), carry, 0x01);
        const __m256i l_lt = _mm256_cmpgt_epi32(du, left);
        ub[j >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(u_lt)));
        lb[j >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(l_lt)));
        carry = _mm256_permutevar8x32_epi32(cur, last);
    }
    return j;
}

#endif

template <class T, class C>
int64_t forward_backtrack(const std::vector<int32_t>& src_uid, int64_t n2, const std::vector<C>& cost,
                          Directions& dir, DTWResult& out) {
    const int64_t n1 = static_cast<int64_t>(src_uid.size());
    dir.W = (n2 + 7) / 8;
    dir.up.resize(static_cast<size_t>(n1 * dir.W));  // every byte read is written first
    dir.left.resize(static_cast<size_t>(n1 * dir.W));
    std::vector<T> prev(n2), cur(n2);
    {
        const C* crow = cost.data() + static_cast<int64_t>(src_uid[0]) * n2;
        T acc = 0;
        for (int64_t j = 0; j < n2; ++j) {
            acc += static_cast<T>(crow[j]);
            prev[j] = acc;
        }
    }
#if FASTFUSE_DTW_AVX2
    const bool simd = std::is_same<T, int32_t>::value && n2 >= 16 && dtw_detail::simd_enabled();
#endif
    for (int64_t i = 1; i < n1; ++i) {
        const C* crow = cost.data() + static_cast<int64_t>(src_uid[i]) * n2;
        uint8_t* ub = dir.up.data() + i * dir.W;
        uint8_t* lb = dir.left.data() + i * dir.W;
        const T* pr = prev.data();
        T* cu = cur.data();
        cu[0] = pr[0] + static_cast<T>(crow[0]);
#if FASTFUSE_DTW_AVX2
        if constexpr (std::is_same<T, int32_t>::value) {
            if (simd) {
                row_scalar(pr, cu, crow, ub, lb, 1, 8);
                const int64_t j = row_avx2(pr, cu, crow, ub, lb, 8, n2);
                if (j < n2) row_scalar(pr, cu, crow, ub, lb, j, n2);
                std::swap(prev, cur);
                continue;
            }
        }
#endif
        if (n2 > 1) row_scalar(pr, cu, crow, ub, lb, 1, n2);
        std::swap(prev, cur);
    }
    const int64_t total = static_cast<int64_t>(prev[n2 - 1]);

    // Backtrack from (n1-1, n2-1) to (0, 0); the path's cells, reversed, are in CSR order.
    std::vector<int32_t> pi, pj;
    pi.reserve(n1 + n2);
    pj.reserve(n1 + n2);
    int64_t i = n1 - 1, j = n2 - 1;
    while (i > 0 || j > 0) {
        pi.push_back(static_cast<int32_t>(i));
        pj.push_back(static_cast<int32_t>(j));
        if (i == 0) { --j; continue; }
        if (j == 0) { --i; continue; }
        const int64_t byte = i * dir.W + (j >> 3);
        const int bit = static_cast<int>(j & 7);
        if ((dir.left[byte] >> bit) & 1) --j;
        else if ((dir.up[byte] >> bit) & 1) --i;
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
    return total;
}

std::string first_index(const Interned& side, int64_t u, const char* name) {
    const auto k = std::find(side.uid.begin(), side.uid.end(), static_cast<int32_t>(u)) - side.uid.begin();
    return std::string(name) + "[" + std::to_string(k) + "]";
}

std::string mib(double bytes) { return std::to_string(static_cast<int64_t>(bytes / (1 << 20)) + 1) + " MiB"; }

// Refuse, before allocating, work that would not fit in memory or not finish (see dtw.hpp).
void check_size(const Interned& s, const Interned& t, int64_t max_len, int64_t max_cells) {
    const int64_t n1 = static_cast<int64_t>(s.uid.size()), n2 = static_cast<int64_t>(t.uid.size());
    if (n1 * n2 > max_cells) {  // both < 2^31: no overflow
        // Cost rows (one per unique source token) plus two direction bits per cell.
        const double bytes = double(s.size()) * double(n2) * (max_len <= 255 ? 1 : 4) + 2.0 * n1 * ((n2 + 7) / 8);
        throw std::invalid_argument("src_tokens/tgt_tokens: a " + std::to_string(n1) + " x " + std::to_string(n2) +
                                    " alignment has " + std::to_string(n1 * n2) + " DTW cells, more than max_cells=" +
                                    std::to_string(max_cells) + " (it would need about " + mib(bytes) +
                                    "); align shorter pieces or raise max_cells");
    }
    // Edit distances: a source token of m > 64 code points runs an m x len DP against every unique
    // target token; a shorter one costs one bit-parallel step per target code point, which only
    // adds up for long target tokens. Short-short pairs are bounded by the check above.
    double t_all = 0, t_long = 0, work = 0;
    int64_t longest_s = 0, longest_t = 0;
    for (int64_t v = 0; v < t.size(); ++v) {
        t_all += double(t.len(v));
        if (t.len(v) > 64) t_long += double(t.len(v));
        if (t.len(v) > t.len(longest_t)) longest_t = v;
    }
    for (int64_t u = 0; u < s.size(); ++u) {
        const int64_t m = s.len(u);
        work += m > 64 ? double(m) * t_all : m > 0 ? t_long : 0.0;
        if (m > s.len(longest_s)) longest_s = u;
    }
    if (work > double(max_cells)) {
        const bool src_side = s.len(longest_s) >= t.len(longest_t);
        const std::string where = src_side ? first_index(s, longest_s, "src_tokens") : first_index(t, longest_t, "tgt_tokens");
        throw std::invalid_argument(
            "src_tokens/tgt_tokens: the edit distances of tokens longer than 64 code points need about " +
            std::to_string(static_cast<int64_t>(work)) + " DP cells, more than max_cells=" + std::to_string(max_cells) +
            " (the longest token, " + where + ", has " + std::to_string(src_side ? s.len(longest_s) : t.len(longest_t)) +
            " code points); shorten such tokens or raise max_cells");
    }
}

}  // namespace

DTWResult dtw_align(const std::vector<std::string_view>& src, const std::vector<std::string_view>& tgt,
                    int num_threads, int64_t max_cells) {
    if (src.empty()) throw std::invalid_argument("src_tokens: expected at least one token");
    if (tgt.empty()) throw std::invalid_argument("tgt_tokens: expected at least one token");
    if (src.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
        tgt.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
        throw std::invalid_argument("src_tokens/tgt_tokens: too many tokens");
    std::unordered_map<uint32_t, uint32_t> alphabet;
    Interned s = dtw_detail::intern(src, alphabet, "src_tokens");
    Interned t = dtw_detail::intern(tgt, alphabet, "tgt_tokens");
    const int64_t n1 = static_cast<int64_t>(src.size()), n2 = static_cast<int64_t>(tgt.size());
    // Levenshtein distance <= the longer token's length: that bounds every cost.
    int64_t max_len = 0;
    for (int64_t u = 0; u < s.size(); ++u) max_len = std::max(max_len, s.len(u));
    for (int64_t u = 0; u < t.size(); ++u) max_len = std::max(max_len, t.len(u));
    check_size(s, t, max_len, max_cells);
    DTWResult out;
    // Any cell is a sum of at most n1 + n2 - 1 costs: int32 (and the SIMD row, whose sentinel
    // is 2^30) while that stays below 2^29, else int64.
    const bool narrow = max_len * (n1 + n2) < (int64_t(1) << 29) && !g_force_wide.load(std::memory_order_relaxed);
    thread_local Workspace ws;
    auto run = [&](auto& cost) {
        dtw_detail::cost_rows(s, t, alphabet.size(), num_threads, cost);
        out.cost = narrow ? forward_backtrack<int32_t>(s.uid, n2, cost, ws.dir, out)
                          : forward_backtrack<int64_t>(s.uid, n2, cost, ws.dir, out);
    };
    try {
        if (max_len <= 255) run(ws.cost8);
        else run(ws.cost32);
    } catch (...) {
        ws = Workspace();
        throw;
    }
    if (ws.bytes() > kKeepBytes) ws = Workspace();
    return out;
}

void dtw_set_paths(bool simd, bool force_wide) {
    g_use_simd.store(simd);
    g_force_wide.store(force_wide);
}

namespace dtw_detail {

bool simd_enabled() {
#if FASTFUSE_DTW_AVX2
    static const bool has = __builtin_cpu_supports("avx2");
    return has && g_use_simd.load(std::memory_order_relaxed);
#else
    return false;
#endif
}

}  // namespace dtw_detail
}  // namespace fastfuse
