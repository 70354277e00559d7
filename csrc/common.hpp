// Small shared helpers for the fastfuse C++ core: threading and UTF-8 decoding.
// Plain C++17, no Python: everything here can be unit-tested and benchmarked alone.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace fastfuse {

// The most threads one call starts; exported as _C.MAX_THREADS, where fastfuse/align/native_threads.py
// reads it to cap every num_threads argument.
constexpr int kMaxThreads = 1024;

// Resolve a user thread count: <= 0 means "all hardware threads"; at most kMaxThreads.
inline int resolve_threads(int num_threads) {
    if (num_threads > 0) return std::min(num_threads, kMaxThreads);
    unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1 : static_cast<int>(std::min<unsigned>(hc, kMaxThreads));
}

// Run fn(i) for i in [0, n) on up to num_threads threads with dynamic scheduling.
// Work items are claimed in chunks from an atomic counter, so uneven items balance out.
// The first exception thrown by any worker is re-thrown on the calling thread.
template <class Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn, int64_t chunk = 1) {
    if (n <= 0) return;
    int nt = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), (n + chunk - 1) / chunk));
    if (nt <= 1) {
        for (int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto worker = [&]() {
        try {
            for (;;) {
                int64_t start = next.fetch_add(chunk);
                if (start >= n) break;
                int64_t stop = std::min(n, start + chunk);
                for (int64_t i = start; i < stop; ++i) fn(i);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            next.store(n);  // stop the other workers early
        }
    };
    // The OS may refuse a thread (no memory for its stack, a process limit): std::thread then
    // throws. Stop starting more and let the threads that exist, this one included, claim the
    // remaining items; destroying a joinable std::thread would call std::terminate.
    std::vector<std::thread> threads;
    try {
        threads.reserve(nt - 1);
        for (int t = 0; t < nt - 1; ++t) threads.emplace_back(worker);
    } catch (...) {
    }
    worker();
    for (auto& th : threads) th.join();
    if (error) std::rethrow_exception(error);
}

// Decode UTF-8 into code points. Invalid bytes raise std::invalid_argument (the bindings
// turn that into ValueError): Python str values always arrive as valid UTF-8.
inline void utf8_to_codepoints(std::string_view s, std::vector<uint32_t>& out) {
    out.clear();
    size_t i = 0, n = s.size();
    while (i < n) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        uint32_t cp;
        int extra;
        if (c < 0x80) { cp = c; extra = 0; }
        else if ((c >> 5) == 0x6) { cp = c & 0x1F; extra = 1; }
        else if ((c >> 4) == 0xE) { cp = c & 0x0F; extra = 2; }
        else if ((c >> 3) == 0x1E) { cp = c & 0x07; extra = 3; }
        else throw std::invalid_argument("invalid UTF-8 lead byte");
        for (int k = 1; k <= extra; ++k) {
            if (i + k >= n) throw std::invalid_argument("truncated UTF-8 sequence");
            unsigned char cc = static_cast<unsigned char>(s[i + k]);
            if ((cc >> 6) != 0x2) throw std::invalid_argument("invalid UTF-8 continuation byte");
            cp = (cp << 6) | (cc & 0x3F);
        }
        out.push_back(cp);
        i += extra + 1;
    }
}

}  // namespace fastfuse
