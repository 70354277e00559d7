"""Vocabulary mapping benchmark: Llama-2 SPM (32000) -> Llama-3 BPE (128256), exact and mined.

    python benchmarks/bench_vocab.py [--pairs llama-spm:llama-bpe,llama-spm:gpt-2] [--threads 1,2]
                                     [--sample 3] [--csv out.csv]

prints one row per (pair, mode, provider): the C++ map over the whole vocabulary, a Python dict
for exact matching, and a brute-force pure-Python minimum-edit-distance search timed on a sample
of the source tokens that need it and extrapolated to all of them. Targets on 2 cores: mined
<= 30 s, exact <= 1 s. Under pytest (``pytest benchmarks/bench_vocab.py --benchmark-enable``)
the same maps run through pytest-benchmark; both skip when ``fastfuse.tokenizer_files`` is missing.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pytest

from fastfuse.align.vocab_map import VocabMap, reference_vocab_map

from _common import write_csv

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


def run_pair(src_name: str, tgt_name: str, threads: list[int], sample: int, seed: int = 0) -> list[dict]:
    t0 = time.perf_counter()
    s, t = surfaces(src_name), surfaces(tgt_name)
    print(f"# {src_name} ({len(s.bytes)}) -> {tgt_name} ({len(t.bytes)}): tokenizers + surfaces "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    pair = f"{src_name}->{tgt_name}"
    rows = []
    maps = {}
    for mode in ("exact", "mined"):
        for nt in threads:
            t0 = time.perf_counter()
            vm = VocabMap.from_token_bytes(s.bytes, t.bytes, mode, s.special, t.special, num_threads=nt)
            el = time.perf_counter() - t0
            maps[mode] = vm
            rows.append(dict(pair=pair, mode=mode, provider=f"fastfuse C++ ({nt} thr)", time_s=el,
                             note=f"exact_rate={vm.exact_rate:.4f} unmapped={vm.stats()['n_unmapped']}"))

    t0 = time.perf_counter()
    ids = python_exact(s.bytes, t.bytes, s.special, t.special)
    el = time.perf_counter() - t0
    assert np.array_equal(ids, maps["exact"].ids), "python dict and C++ exact maps differ"
    rows.append(dict(pair=pair, mode="exact", provider="python dict", time_s=el, note="same ids as C++"))

    mined = maps["mined"]
    pending = np.flatnonzero(mined.distance > 0)  # the tokens that need the distance search
    rng = np.random.default_rng(seed)
    pick = rng.choice(pending, min(sample, len(pending)), replace=False) if len(pending) else pending
    t0 = time.perf_counter()
    rid, rdist = reference_vocab_map(s.bytes, t.bytes, "mined", s.special, t.special, src_ids=pick)
    el = time.perf_counter() - t0
    agree = bool(np.array_equal(rid[pick], mined.ids[pick]) and np.array_equal(rdist[pick], mined.distance[pick]))
    est = el / max(len(pick), 1) * len(pending)
    rows.append(dict(pair=pair, mode="mined", provider="python brute force (extrapolated)", time_s=est,
                     note=f"{len(pick)} of {len(pending)} tokens in {el:.1f} s; agrees with C++: {agree}"))
    return rows


def print_table(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r["provider"].startswith("fastfuse"):
            key = (r["pair"], r["mode"])
            best[key] = min(best.get(key, float("inf")), r["time_s"])
    print(f"{'pair':<24} {'mode':<6} {'provider':<36} {'time (s)':>10} {'vs C++':>9}  note")
    for r in rows:
        ratio = r["time_s"] / best[(r["pair"], r["mode"])]
        lim = LIMITS_S[r["mode"]]
        flag = "" if not r["provider"].startswith("fastfuse") or r["time_s"] <= lim else f"  OVER {lim} s"
        print(f"{r['pair']:<24} {r['mode']:<6} {r['provider']:<36} {r['time_s']:>10.3f} {ratio:>8.1f}x  "
              f"{r['note']}{flag}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=f"{SRC}:{TGT}", help="comma-separated src:tgt tokenizer names")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (0 = all cores)")
    ap.add_argument("--sample", type=int, default=3, help="source tokens for the Python brute force")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    try:
        import fastfuse.align.surface  # noqa: F401
        import fastfuse.tokenizer_files  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_vocab: needs fastfuse.tokenizer_files and fastfuse.align.surface ({e})")
    threads = [int(x) for x in args.threads.split(",")]
    rows = []
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        rows += run_pair(a, b, threads, args.sample)
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows)


# ------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def llama_pair():
    pytest.importorskip("fastfuse.tokenizer_files")
    pytest.importorskip("fastfuse.align.surface")
    return surfaces(SRC), surfaces(TGT)


@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_bench_vocab_map(benchmark, llama_pair, mode):
    s, t = llama_pair
    benchmark.extra_info.update(pair=f"{SRC}->{TGT}", mode=mode)
    vm = benchmark.pedantic(VocabMap.from_token_bytes, args=(s.bytes, t.bytes, mode, s.special, t.special),
                            kwargs={"num_threads": 2}, rounds=3 if mode == "exact" else 1, iterations=1)
    assert vm.src_size == len(s.bytes)
    assert 0.7 < vm.exact_rate < 0.95  # Llama-2 -> Llama-3: most SentencePiece pieces exist in both


if __name__ == "__main__":
    main()
