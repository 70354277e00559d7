"""Limits of the C++ core: thread creation that fails, and thread counts checked alike everywhere."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Run in a subprocess: RLIMIT_AS is set just above the memory already mapped, so a new thread's
# stack mmap fails (root is not exempt, unlike RLIMIT_NPROC) and std::thread throws.
_UNDER_LIMIT = textwrap.dedent(
    """
    import resource, threading
    import numpy as np
    from fastfuse.align import align_offsets_batch
    from fastfuse.dtw import dtw_align, dtw_align_batch
    from fastfuse.vocab import VocabMap

    ends = [np.arange(1, 200, dtype=np.int64)] * 2000
    words = [f"w{k % 97}" for k in range(300)]
    vocab = [bytes([97 + k % 26, 97 + k // 26 % 26, 97 + k // 676]) for k in range(3000)]
    calls = {
        "align_offsets_batch": lambda n: [a.match.tolist() for a in align_offsets_batch(ends, ends, num_threads=n)],
        "dtw_align_batch": lambda n: [a.to_lists() for a in dtw_align_batch([words] * 300, [words[::-1]] * 300, num_threads=n)],
        "dtw_align": lambda n: dtw_align(words * 30, words[::-1] * 30, num_threads=n).to_lists(),
        "map_vocab": lambda n: VocabMap.from_token_bytes(vocab, [v[:2] + b"z" for v in vocab], "mined",
                                                         num_threads=n).ids.tolist(),
    }
    call = calls[NAME]
    expected = call(1)  # also leaves the heap grown, so the limited run needs no new memory
    status = [l for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
    resource.setrlimit(resource.RLIMIT_AS, (int(status.split()[1]) * 1024 + (48 << 20), resource.RLIM_INFINITY))
    gate, started = threading.Event(), []
    try:
        for _ in range(64):
            t = threading.Thread(target=gate.wait)
            t.start()
            started.append(t)
    except RuntimeError:
        pass
    gate.set()
    for t in started:
        t.join()
    assert len(started) < 32, f"the memory limit did not stop thread creation ({len(started)} threads)"
    try:
        ok = call(64) == expected
    except (RuntimeError, MemoryError) as e:  # a clean error is acceptable, a signal is not
        ok = f"clean error: {e}"
    print("RESULT", ok)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
@pytest.mark.parametrize("name", ["align_offsets_batch", "dtw_align_batch", "dtw_align", "map_vocab"])
def test_thread_creation_failure_does_not_abort(name):
    proc = subprocess.run([sys.executable, "-c", f"NAME = {name!r}\n" + _UNDER_LIMIT],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert "RESULT True" in proc.stdout or "RESULT clean error" in proc.stdout, proc.stdout
