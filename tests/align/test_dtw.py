"""fastfuse.align.dtw against a pure-Python re-implementation of FuseLLM's MinED DTW."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfuse.align.dtw import DTWAlignment, dtw_align, dtw_align_batch

# FuseLLM's norm_func; in the `test` extra (pip install editdistance).
editdistance = pytest.importorskip("editdistance")


# ----------------------------------------------------------------------------- reference
def reference_dtw(series_1, series_2, norm_func=editdistance.eval):
    """FuseLLM's ``dtw`` (src/utils/others.py, from talcs/simpledtw), line for line."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i = matrix.shape[0] - 1
    j = matrix.shape[1] - 1
    matches = []
    mappings_series_1 = [list() for _ in range(matrix.shape[0])]
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_series_1[i].append(j)
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    matches.append((0, 0))
    mappings_series_1[0].append(0)
    mappings_series_2[0].append(0)
    matches.reverse()
    for mp in mappings_series_1:
        mp.reverse()
    for mp in mappings_series_2:
        mp.reverse()
    return matches, matrix[-1, -1], mappings_series_1, mappings_series_2, matrix


def check_same(src, tgt):
    _, ref_cost, _, ref_map2, _ = reference_dtw(src, tgt)
    got = dtw_align(src, tgt)
    assert got.to_lists() == ref_map2
    assert got.cost == int(ref_cost)
    assert got.indptr.shape == (len(tgt) + 1,) and got.indices.dtype == np.int32
    ones = got.one_to_one()
    assert ones.tolist() == [m[0] if len(m) == 1 else -1 for m in ref_map2]
    return got


# ----------------------------------------------------------------------------- basics
def test_small_examples():
    got = check_same(["he", "llo", " wor", "ld"], ["hel", "lo", " world"])
    assert isinstance(got, DTWAlignment)
    check_same(["a"], ["b"])
    check_same(["a"], ["b", "c", "d"])
    check_same(["a", "b", "c"], ["d"])
    check_same([""], [""])
    check_same(["", "", ""], ["", ""])


def test_levenshtein_cost_matches_editdistance():
    # 1 x 1 alignments expose the raw edit distance: Myers (<= 64 code points) and plain DP (> 64).
    rng = random.Random(0)
    alphabet = "ab\u00e9\u4e2d\U0001f600 \u0301"
    for _ in range(600):
        la, lb = rng.choice([0, 1, 3, 8, 63, 64, 65, 70, 130]), rng.randint(0, 140)
        a = "".join(rng.choice(alphabet[: rng.randint(1, len(alphabet))]) for _ in range(la))
        b = "".join(rng.choice(alphabet) for _ in range(lb))
        assert dtw_align([a], [b]).cost == editdistance.eval(a, b), (a, b)
        assert dtw_align([b], [a]).cost == editdistance.eval(a, b), (a, b)


@pytest.mark.parametrize("simd", [True, False])
def test_levenshtein_in_groups(simd):
    # Target tokens of one length are compared four at a time (AVX2 lanes or interleaved scalar):
    # a 1 x N alignment sums the distances from the one source token to every target token.
    from fastfuse import _C

    rng = random.Random(1)
    _C._testing.dtw_set_paths(simd=simd)
    try:
        for _ in range(150):
            alphabet = "abc\u4e2d"[: rng.randint(1, 4)]
            a = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 5, 31, 63, 64, 65])))
            length = rng.choice([1, 3, 7, 64, 65])
            tgt = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(rng.randint(1, 13))]
            tgt += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(0, 9))]
            got = dtw_align([a], tgt)
            assert got.cost == sum(editdistance.eval(a, b) for b in tgt)
            assert got.indices.tolist() == [0] * len(tgt)
    finally:
        _C._testing.dtw_set_paths(simd=True)


@pytest.mark.parametrize("seed", range(6))
def test_random_tiny_alphabet_many_ties(seed):
    rng = random.Random(seed)
    for _ in range(60):
        alpha = "ab"[: rng.randint(1, 2)]
        # Up to 40 tokens: the AVX2 row runs from 16 target tokens on, with scalar tails.
        n1, n2 = rng.randint(1, 12), rng.choice([rng.randint(1, 12), rng.randint(15, 40)])
        src = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 3))) for _ in range(n1)]
        tgt = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 3))) for _ in range(n2)]
        check_same(src, tgt)


def test_long_tokens_and_mixed_lengths():
    rng = random.Random(7)
    for _ in range(20):
        mk = lambda: "".join(rng.choice("ab ") for _ in range(rng.choice([0, 1, 2, 64, 65, 100])))
        check_same([mk() for _ in range(rng.randint(1, 8))], [mk() for _ in range(rng.randint(1, 8))])


def test_surrogates_and_nul():
    # Lone surrogates have no UTF-8 form (the binding passes them through "surrogatepass").
    check_same(["\ud800a", "\x00", "b\udfff"], ["\ud800", "a\x00", "b", "\udfff"])
    check_same(["\x00" * 70, "\x00"], ["\x00" * 3] * 20)


def test_identical_and_reversed_sequences():
    words = "the quick brown fox jumps over the lazy dog".split()
    got = check_same(words, words)
    assert got.one_to_one().tolist() == list(range(len(words)))
    check_same(words, words[::-1])


# ----------------------------------------------------------------------------- hypothesis
_chars = st.sampled_from(
    list("ab ")
    + list("\t\n  ")  # whitespace runs
    + list("def(x):return[]{};=#_.'\"")  # code
    + ["\u4e2d", "\u6587", "\u5b57", "\u3002"]  # CJK
    + ["\U0001f600", "\U0001f44d", "\U0001f3fd", "\u200d"]  # emoji, skin tone, ZWJ
    + ["e", "\u0301", "\u0308", "\u00e9"]  # combining marks and precomposed
    + ["\u2581", "\u0120", "\u010a", "#"]  # tokenizer markers
    + ["\x00", "\ud800", "\U0010ffff"]  # NUL, a lone surrogate, the last code point
)
_token = st.text(alphabet=_chars, min_size=0, max_size=6)
_seq = st.lists(_token, min_size=1, max_size=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=_seq, tgt=_seq)
def test_hypothesis_unicode(src, tgt):
    check_same(src, tgt)


@settings(max_examples=100, deadline=None)
@given(src=st.lists(st.text(max_size=4), min_size=1, max_size=6), tgt=st.lists(st.text(max_size=4), min_size=1, max_size=6))
def test_hypothesis_any_text(src, tgt):
    # Arbitrary code points, lone surrogates included.
    check_same(src, tgt)


@settings(max_examples=100, deadline=None)
@given(src=st.lists(st.text(alphabet="ab", max_size=2), min_size=1, max_size=30), data=st.data())
def test_hypothesis_derived_tokenisation(src, data):
    # The target re-splits the same text: the common case in fusion, with many exact ties.
    text = "".join(src)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=30)))
    bounds = [0] + cuts + [len(text)]
    tgt = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    check_same(src, tgt)


# ----------------------------------------------------------------------------- realistic
@pytest.fixture(scope="module")
def tokenizers_pair():
    tk = pytest.importorskip("tokenizers")
    from fastfuse.corpus import python_docs
    from tokenizers import models, pre_tokenizers, trainers

    corpus = python_docs()
    bpe = tk.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    wp = tk.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=3000, show_progress=False, special_tokens=["[UNK]"]))
    uni = tk.Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.train_from_iterator(
        corpus[:30], trainers.UnigramTrainer(vocab_size=1000, show_progress=False, unk_token="<unk>", special_tokens=["<unk>"])
    )
    paragraphs = [p for doc in corpus for p in doc.split("\n\n") if 20 < len(p) < 500]
    return bpe, wp, uni, paragraphs


@pytest.mark.slow
def test_realistic_tokenisations(tokenizers_pair):
    bpe, wp, uni, paragraphs = tokenizers_pair
    rng = random.Random(0)
    for para in rng.sample(paragraphs, 60):
        a, b, c = (t.encode(para).tokens for t in (bpe, wp, uni))
        check_same(a, b)
        check_same(c, a)


def test_realistic_long_pair_and_batch(tokenizers_pair):
    bpe, wp, uni, paragraphs = tokenizers_pair
    text = "\n\n".join(paragraphs[100:112])[:2000]
    src, tgt = uni.encode(text).tokens, bpe.encode(text).tokens
    assert len(src) > 300 and len(tgt) > 300
    single = check_same(src, tgt)
    for threads in (1, 2):
        again = dtw_align(src, tgt, num_threads=threads)
        assert np.array_equal(again.indptr, single.indptr) and np.array_equal(again.indices, single.indices)

    srcs = [bpe.encode(p).tokens for p in paragraphs[:40]]
    tgts = [wp.encode(p).tokens for p in paragraphs[:40]]
    for threads in (0, 1, 3):
        batch = dtw_align_batch(srcs, tgts, num_threads=threads)
        assert len(batch) == len(srcs)
        for s, t, got in zip(srcs, tgts, batch):
            ref = dtw_align(s, t)
            assert np.array_equal(got.indptr, ref.indptr) and np.array_equal(got.indices, ref.indices)
            assert got.cost == ref.cost
    for s, t, got in zip(srcs[:8], tgts[:8], batch[:8]):
        assert got.to_lists() == reference_dtw(s, t)[3]


@pytest.fixture(params=["scalar", "wide"])
def dp_path(request):
    from fastfuse import _C

    _C._testing.dtw_set_paths(simd=request.param != "scalar", force_wide=request.param == "wide")
    yield request.param
    _C._testing.dtw_set_paths(simd=True, force_wide=False)


def test_other_dp_paths_agree(dp_path, tokenizers_pair):
    # The default (AVX2 int32 row where available) is checked everywhere above; here the scalar
    # int32 row and the int64 row against the reference and against the default path.
    from fastfuse import _C

    bpe, wp, uni, paragraphs = tokenizers_pair
    rng = random.Random(11)
    cases = [(bpe.encode(p).tokens, uni.encode(p).tokens) for p in rng.sample(paragraphs, 6)]
    for _ in range(80):
        n1, n2 = rng.randint(1, 40), rng.randint(1, 40)
        cases.append(
            (
                ["".join(rng.choice("ab") for _ in range(rng.randint(0, 3))) for _ in range(n1)],
                ["".join(rng.choice("ab") for _ in range(rng.randint(0, 3))) for _ in range(n2)],
            )
        )
    cases.append((["x" * 300, "y", "x" * 256], ["x" * 299] * 20 + ["y"]))  # int32 cost rows
    got = [dtw_align(s, t) for s, t in cases]
    _C._testing.dtw_set_paths(simd=True, force_wide=False)
    for (s, t), g in zip(cases, got):
        d = dtw_align(s, t)
        assert np.array_equal(g.indptr, d.indptr) and np.array_equal(g.indices, d.indices) and g.cost == d.cost
    for (s, t), g in zip(cases[::4], got[::4]):
        assert g.to_lists() == reference_dtw(s, t)[3]


@pytest.mark.slow
def test_realistic_full_size_pair(tokenizers_pair):
    # The benchmark's size (~2048 x ~2250 tokens of the Python docs), once against the reference.
    bpe, wp, uni, paragraphs = tokenizers_pair
    text = "\n\n".join(paragraphs[300:])[:9000]
    tgt, src = bpe.encode(text).tokens[:2048], wp.encode(text).tokens[:2250]
    assert len(tgt) == 2048 and len(src) == 2250
    check_same(src, tgt)


# ----------------------------------------------------------------------------- API details
def test_one_to_one_and_sources():
    got = dtw_align(["ab", "c", "d"], ["abc", "d"])
    lists = got.to_lists()
    for t, lst in enumerate(lists):
        assert got.sources(t).tolist() == lst
    assert got.one_to_one().dtype == np.int32
    assert got.one_to_one().tolist() == [lst[0] if len(lst) == 1 else -1 for lst in lists]


def test_tuples_accepted_and_outputs_owned():
    a = dtw_align(("x", "y"), ("x", "y"))
    b = dtw_align(["x", "y"], ["x", "y"])
    assert np.array_equal(a.indices, b.indices) and a.cost == b.cost == 0
    assert a.indptr.dtype == np.int64 and a.indptr.flags.owndata | (a.indptr.base is not None)


def test_threads_from_python_release_gil():
    # Many Python threads calling in at once: results must not interfere.
    rng = random.Random(3)
    pairs = [
        ([rng.choice(["ab", "a", "b", ""]) for _ in range(30)], [rng.choice(["ab", "ba", "b"]) for _ in range(25)])
        for _ in range(8)
    ]
    expected = [dtw_align(s, t).to_lists() for s, t in pairs]
    results = [None] * len(pairs)

    def work(k):
        results[k] = dtw_align(*pairs[k], num_threads=2).to_lists()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(pairs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == expected


@pytest.mark.parametrize(
    "src,tgt,exc,name",
    [
        ([], ["a"], ValueError, "src_tokens"),
        (["a"], [], ValueError, "tgt_tokens"),
        ("abc", ["a"], TypeError, "src_tokens"),
        (["a"], "abc", TypeError, "tgt_tokens"),
        (None, ["a"], TypeError, "src_tokens"),
        (["a", 1], ["a"], TypeError, "src_tokens[1]"),
        (["a"], ["a", b"b"], TypeError, "tgt_tokens[1]"),
        (["a"], ["a", None], TypeError, "tgt_tokens[1]"),
        (np.array(["a"]), ["a"], TypeError, "src_tokens"),
    ],
)
def test_bad_input(src, tgt, exc, name):
    with pytest.raises(exc, match=name.replace("[", r"\[").replace("]", r"\]")):
        dtw_align(src, tgt)


def test_bad_batch_input():
    with pytest.raises(ValueError, match="tgt_batch"):
        dtw_align_batch([["a"], ["b"]], [["a"]])
    with pytest.raises(TypeError, match="src_batch"):
        dtw_align_batch("ab", [["a"]])
    with pytest.raises(TypeError, match="tgt_batch"):
        dtw_align_batch([["a"]], None)
    with pytest.raises(TypeError, match=r"src_batch\[1\]"):
        dtw_align_batch([["a"], "b"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"tgt_batch\[0\]"):
        dtw_align_batch([["a"]], [[]])
    with pytest.raises(TypeError, match=r"tgt_batch\[0\]\[1\]"):
        dtw_align_batch([["a"]], [["a", 3]])
    with pytest.raises(TypeError, match="num_threads"):
        dtw_align(["a"], ["a"], num_threads=1.5)
    with pytest.raises(ValueError, match="num_threads"):
        dtw_align_batch([["a"]], [["a"]], num_threads=-1)
    assert dtw_align_batch([], []) == []


# ----------------------------------------------------------------------------- size limits
def test_max_cells_bounds_the_dtw_matrix():
    src, tgt = ["ab", "a", ""] * 40, ["b", "ab"] * 50  # 120 x 100
    got = dtw_align(src, tgt, max_cells=120 * 100)  # the limit itself is allowed, and exact
    assert got.to_lists() == reference_dtw(src, tgt)[3]
    with pytest.raises(ValueError, match=r"120 x 100 alignment has 12000 DTW cells, more than max_cells=11999"):
        dtw_align(src, tgt, max_cells=120 * 100 - 1)
    with pytest.raises(ValueError, match=r"max_cells=11999 .*\(pair 1\)"):
        dtw_align_batch([["a"], src], [["a"], tgt], max_cells=11999)
    for bad, exc in ((True, TypeError), (1.5, TypeError), ("9", TypeError), (0, ValueError), (-5, ValueError)):
        with pytest.raises(exc, match="max_cells"):
            dtw_align(["a"], ["a"], max_cells=bad)
    assert dtw_align(["a"], ["b"], max_cells=np.int64(1)).cost == 1
    assert dtw_align(["a"], ["b"], max_cells=2**100).cost == 1  # capped, not overflowed


def test_max_cells_bounds_long_token_edit_distances():
    # A long source token runs a len x len DP against each unique target token; a short one
    # a bit-parallel pass over each long target token. Within the limit, still exact.
    rng = random.Random(5)
    long_a = "".join(rng.choice("ab") for _ in range(3000))
    long_b = "".join(rng.choice("ab") for _ in range(2000))
    got = dtw_align([long_a, "ab"], ["b", long_b, "a"])
    assert got.to_lists() == reference_dtw([long_a, "ab"], ["b", long_b, "a"])[3]
    assert dtw_align([long_a], [long_b]).cost == editdistance.eval(long_a, long_b)
    work = 3000 * (1 + 2000 + 1) + 2000  # long_a against every target token, "ab" against long_b
    dtw_align([long_a, "ab"], ["b", long_b, "a"], max_cells=work)
    with pytest.raises(ValueError, match=rf"need about {work} DP cells, more than max_cells={work - 1} "
                                         r"\(the longest token, src_tokens\[0\], has 3000 code points\)"):
        dtw_align([long_a, "ab"], ["b", long_b, "a"], max_cells=work - 1)
    with pytest.raises(ValueError, match=r"the longest token, tgt_tokens\[2\], has 3000 code points"):
        dtw_align(["a", "b"], ["a", "b", long_a], max_cells=3000)


# Sizes that used to allocate gigabytes or never finish: refused at once with the default limit.
# A subprocess under a 1 GiB address-space margin and a timeout, so a regression fails fast.
_HUGE = {
    "100k x 100k tokens": "dtw_align(['a', 'b'] * 50_000, ['b', 'a'] * 50_000)",
    "two 10^6-character tokens": "dtw_align(['ab' * 500_000], ['ba' * 500_000])",
    "a 10^6-character token vs 5000 short ones": "dtw_align(['ab' * 500_000], [str(k) for k in range(5000)])",
}


@pytest.mark.parametrize("case", sorted(_HUGE))
def test_default_limit_refuses_huge_work(case):
    import subprocess
    import sys

    code = (
        "import resource\nfrom fastfuse.align.dtw import dtw_align\n"
        "vm = [l for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (int(vm.split()[1]) * 1024 + (1 << 30), resource.RLIM_INFINITY))\n"
        f"try:\n    {_HUGE[case]}\nexcept ValueError as e:\n    print('REFUSED', e)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: still running after 60 s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "max_cells=1073741824" in proc.stdout, proc.stdout
