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
    from fastfuse.align.spans import align_offsets_batch
    from fastfuse.align.dtw import dtw_align, dtw_align_batch
    from fastfuse.align.vocab_map import VocabMap

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


# ----------------------------------------------------------------------------- num_threads
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _entry_points():
    import numpy as np

    from fastfuse.align.spans import align_offsets_batch, align_texts
    from fastfuse.align.dtw import dtw_align, dtw_align_batch
    from fastfuse.align.vocab_map import VocabMap

    ends = [np.array([1, 3], dtype=np.int64)] * 3
    tok = _word_tokenizer()
    return {
        "align_offsets_batch": lambda n: [a.match.tolist() for a in align_offsets_batch(ends, ends, num_threads=n)],
        "align_texts": lambda n: [a.match.tolist() for a in align_texts(tok, tok, ["a b", "ab"], num_threads=n)],
        "dtw_align": lambda n: dtw_align(["a", "b"], ["ab"], num_threads=n).to_lists(),
        "dtw_align_batch": lambda n: [a.to_lists() for a in dtw_align_batch([["a", "b"]] * 3, [["ab"]] * 3, num_threads=n)],
        "VocabMap.build": lambda n: VocabMap.build(tok, tok, "mined", num_threads=n).ids.tolist(),
        "VocabMap.from_token_bytes": lambda n: VocabMap.from_token_bytes([b"ab", b"x"], [b"a"], "mined",
                                                                         num_threads=n).ids.tolist(),
    }


@pytest.mark.parametrize("entry", sorted(_entry_points()))
def test_num_threads_checked_alike_everywhere(entry):
    import numpy as np

    call = _entry_points()[entry]
    expected = call(1)
    for bad in (True, 1.5, "2", None, np.float64(2.0)):
        with pytest.raises(TypeError, match="num_threads: expected an int"):
            call(bad)
    for bad in (-1, -(2**40)):
        with pytest.raises(ValueError, match="num_threads: expected an int >= 0"):
            call(bad)
    # Huge counts are capped (MAX_THREADS), not passed on to overflow the C++ int.
    for big in (0, 3, np.int64(2), 2**31, 2**64):
        assert call(big) == expected


def test_check_num_threads():
    import numpy as np

    from fastfuse import _C
    from fastfuse.align.native_threads import MAX_THREADS, check_num_threads

    assert check_num_threads(0) == 0 and check_num_threads(np.uint8(7)) == 7
    assert check_num_threads(10**30) == MAX_THREADS == _C.MAX_THREADS == 1024    # the C++ core's one cap
    with pytest.raises(TypeError, match="workers: expected an int"):
        check_num_threads(np.bool_(True), name="workers")
