"""Vocabulary mapping benchmark: Llama-2 SPM (32000) -> Llama-3 BPE (128256), exact and mined.

    python benchmarks/bench_vocab.py [--pairs llama-spm:llama-bpe,llama-spm:gpt-2] [--threads 1,2]
                                     [--sample 3] [--quick | --tiny] [--csv out.csv]

measures one row per (pair, mode, provider): the C++ map over the whole vocabulary, a Python dict
for exact matching, and a brute-force pure-Python minimum-edit-distance search timed on a sample
of the source tokens that need it and extrapolated to all of them. Targets on 2 cores: mined
<= 30 s, exact <= 1 s. ``--quick``/``--tiny``: one thread count, one sampled token.
"""
from __future__ import annotations

import sys

import numpy as np

import harness
from fastfuse.align.vocab_map import VocabMap, reference_vocab_map

SRC, TGT = "llama-spm", "llama-bpe"
LIMITS_S = {"exact": 1.0, "mined": 30.0}


def surfaces(name: str):
    from fastfuse.align.surface import token_surfaces
    from fastfuse.tokenizer_files import load_tokenizer

    return token_surfaces(load_tokenizer(name))


def python_exact(src, tgt, ss, ts) -> np.ndarray:
    """The obvious pure-Python exact map: dicts keyed by (special, bytes), smallest id kept."""
    table: dict[tuple[bool, bytes], int] = {}
    for j, b in enumerate(tgt):
        if b:
            table.setdefault((bool(ts[j]), b), j)
    return np.array([table.get((bool(ss[k]), b), -1) if b else -1 for k, b in enumerate(src)], dtype=np.int32)


def run_pair(res: harness.Results, src_name: str, tgt_name: str, threads: list[int], sample: int,
             seed: int = 0) -> None:
    s, t = surfaces(src_name), surfaces(tgt_name)
    x = dict(pair=f"{src_name}->{tgt_name}", source_vocab=len(s.bytes), target_vocab=len(t.bytes))
    maps = {}

    def timed(fn):
        out = []
        tm = harness.measure(lambda: out.append(fn()), "cpu", warmup=0, iters=1)
        return tm, out[-1]

    for mode in ("exact", "mined"):
        for nt in threads:
            tm, vm = timed(lambda: VocabMap.from_token_bytes(s.bytes, t.bytes, mode, s.special, t.special,
                                                             num_threads=nt))
            maps[mode] = vm
            res.add(f"vocab_map {mode}", f"fastfuse C++ ({nt} thr)", "time", "s", x, tm.seconds,
                    exact_rate=round(vm.exact_rate, 4), unmapped=vm.stats()["n_unmapped"],
                    within_target=tm.seconds <= LIMITS_S[mode])

    tm, ids = timed(lambda: python_exact(s.bytes, t.bytes, s.special, t.special))
    if not np.array_equal(ids, maps["exact"].ids):
        raise SystemExit("bench_vocab: the Python dict and the C++ exact maps differ")
    res.add("vocab_map exact", "python dict", "time", "s", x, tm.seconds, note="same ids as C++")

    mined = maps["mined"]
    pending = np.flatnonzero(mined.distance > 0)  # the tokens that need the distance search
    rng = np.random.default_rng(seed)
    pick = rng.choice(pending, min(sample, len(pending)), replace=False) if len(pending) else pending
    tm, (rid, rdist) = timed(lambda: reference_vocab_map(s.bytes, t.bytes, "mined", s.special, t.special,
                                                         src_ids=pick))
    agree = bool(np.array_equal(rid[pick], mined.ids[pick]) and np.array_equal(rdist[pick], mined.distance[pick]))
    if not agree:
        raise SystemExit("bench_vocab: the Python brute force and the C++ mined map differ")
    res.add("vocab_map mined", "python brute force (extrapolated)", "time", "s", x,
            tm.seconds / max(len(pick), 1) * len(pending),
            note=f"{len(pick)} of {len(pending)} tokens in {tm.seconds:.1f} s, same as C++")


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__, cuda=False)
    ap.add_argument("--pairs", default=f"{SRC}:{TGT}", help="comma-separated src:tgt tokenizer names")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (0 = all cores; default 1,2)")
    ap.add_argument("--sample", type=int, default=None, help="source tokens for the Python brute force (default 3)")
    a = ap.parse_args(argv)
    small = a.tiny or a.quick
    threads = [int(x) for x in (a.threads or ("2" if small else "1,2")).split(",")]
    with harness.Results(a.csv) as res:
        for pair in a.pairs.split(","):
            src, tgt = pair.split(":")
            run_pair(res, src, tgt, threads, a.sample or (1 if small else 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
