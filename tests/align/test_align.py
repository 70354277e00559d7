"""Exact alignment from byte offsets: C++ merge vs a brute-force reference, real tokenizers, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastfuse.align.spans import TokenizerOffsets, align_offsets, align_offsets_batch, align_texts


def reference_match(tgt_ends, src_ends):
    """Brute force: target token i matches the source token with the identical non-empty span."""
    def spans(ends):
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        return list(zip(starts.tolist(), np.asarray(ends).tolist()))
    src = {s: j for j, s in enumerate(spans(src_ends)) if s[1] > s[0]}
    return np.array([src.get(s, -1) if s[1] > s[0] else -1 for s in spans(tgt_ends)], dtype=np.int32)


def reference_pos(match):
    pos = np.full(len(match), -1, dtype=np.int32)
    for i in range(len(match) - 1):
        if match[i + 1] >= 1:
            pos[i] = match[i + 1] - 1
    return pos


def random_ends(rng, text_len, n_tokens, n_empty):
    cuts = np.sort(rng.choice(np.arange(1, text_len), size=min(n_tokens - 1, text_len - 1), replace=False))
    ends = np.concatenate([cuts, [text_len]])
    for _ in range(n_empty):  # special tokens / split characters: repeated ends
        k = rng.integers(0, len(ends))
        ends = np.insert(ends, k, ends[k - 1] if k > 0 else 0)
    return ends.astype(np.int64)


@pytest.mark.parametrize("seed", range(30))
def test_matches_reference_on_random_partitions(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 400))
    # share many boundaries so that there are 1-to-1 and many-to-many groups
    t = random_ends(rng, L, int(rng.integers(1, L)), int(rng.integers(0, 4)))
    s = np.union1d(t, random_ends(rng, L, int(rng.integers(1, L // 2 + 2)), 0)) if seed % 2 else random_ends(rng, L, int(rng.integers(1, L)), int(rng.integers(0, 4)))
    al = align_offsets(t, s)
    ref = reference_match(t, s)
    np.testing.assert_array_equal(al.match, ref)
    np.testing.assert_array_equal(al.pos, reference_pos(ref))
    assert al.n_matched == int((ref >= 0).sum())


def test_batch_equals_single():
    rng = np.random.default_rng(0)
    pairs = [(random_ends(rng, 300, 100, 2), random_ends(rng, 300, 120, 1)) for _ in range(50)]
    batch = align_offsets_batch([t for t, _ in pairs], [s for _, s in pairs], num_threads=2)
    for (t, s), b in zip(pairs, batch):
        one = align_offsets(t, s)
        np.testing.assert_array_equal(one.match, b.match)
        np.testing.assert_array_equal(one.pos, b.pos)


def test_identical_tokenisations_align_fully():
    ends = np.array([3, 5, 9, 12])
    al = align_offsets(ends, ends)
    np.testing.assert_array_equal(al.match, [0, 1, 2, 3])
    np.testing.assert_array_equal(al.pos, [0, 1, 2, -1])  # position i predicts token i+1
    assert al.one_to_one_rate == 1.0


def test_next_token_semantics_with_extra_bos():
    # target: <bos> "Hello" " world";  source: "Hello" " world" (no BOS)
    al = align_offsets(np.array([0, 5, 11]), np.array([5, 11]))
    np.testing.assert_array_equal(al.match, [-1, 0, 1])
    # target position 0 (BOS) predicts "Hello", which no source position predicts.
    # target position 1 predicts " world" = source token 1, predicted at source position 0.
    np.testing.assert_array_equal(al.pos, [-1, 0, -1])


@pytest.mark.parametrize("bad,msg", [
    (np.array([3, 2]), "tgt_ends: byte end offsets must be non-negative and non-decreasing"),
    (np.array([-1, 2]), "tgt_ends: byte end offsets must be non-negative"),
    (np.zeros((2, 2), dtype=np.int64), "tgt_ends: expected a 1-D array"),
])
def test_bad_offsets(bad, msg):
    with pytest.raises(ValueError, match=msg):
        align_offsets(bad, np.array([1, 2]))


def test_bad_types_and_batch_lengths():
    with pytest.raises(TypeError, match="src_ends"):
        align_offsets(np.array([1]), "abc")
    with pytest.raises(ValueError, match="src_ends: expected as many sequences"):
        align_offsets_batch([np.array([1])], [])
    with pytest.raises(ValueError, match=r"sequence 1"):
        align_offsets_batch([np.array([1]), np.array([2, 1])], [np.array([1]), np.array([1])])


@pytest.mark.parametrize("bad", [
    [1.7, 3.0], np.array([1.0, 3.0]), np.array([np.nan, 3.0]), ["1", "3"], np.array([True, True]),
    [1, None], np.float32(2.0),
], ids=["float-list", "float-array", "nan", "str", "bool", "none", "float-scalar"])
def test_ends_must_be_integers(bad):
    # Floats used to be truncated (1.7 -> 1), strings parsed, NaN reported as INT64_MIN.
    from fastfuse.align.spans import align_groups

    ok = np.array([2, 3])
    for call, arg in ((lambda b: align_offsets(b, ok), "tgt_ends"), (lambda b: align_offsets(ok, b), "src_ends"),
                      (lambda b: align_offsets_batch([ok, b], [ok, ok]), r"tgt_ends\[1\]"),
                      (lambda b: align_groups(ok, b), "src_ends")):
        with pytest.raises(TypeError, match=arg + ": expected a 1-D integer array"):
            call(bad)


def test_integer_ends_of_any_width_and_lists():
    ref = align_offsets(np.array([1, 3, 4]), np.array([3, 4]))
    for t, s in (([1, 3, 4], [3, 4]), (np.array([1, 3, 4], np.uint8), np.array([3, 4], np.int32)), ((1, 3, 4), (3, 4))):
        got = align_offsets(t, s)
        np.testing.assert_array_equal(got.match, ref.match)
        np.testing.assert_array_equal(got.pos, ref.pos)
    assert len(align_offsets([], [1]).match) == 0  # an empty list has no dtype to check
    with pytest.raises(ValueError, match="tgt_ends: byte end offsets must fit int64"):
        align_offsets(np.array([2**63], dtype=np.uint64), [1])


def test_empty_sequences():
    al = align_offsets(np.zeros(0, dtype=np.int64), np.array([1, 2]))
    assert len(al.match) == 0 and len(al.pos) == 0 and al.one_to_one_rate == 0.0
    al = align_offsets(np.array([1, 2]), np.zeros(0, dtype=np.int64))
    np.testing.assert_array_equal(al.match, [-1, -1])


def _check_pos_spans(tgt_ends, src_ends, pos):
    def span(ends, k):
        return (ends[k - 1] if k else 0, ends[k])
    for i, j in enumerate(pos):
        if j >= 0:
            assert span(tgt_ends, i + 1) == span(src_ends, j + 1)
            assert span(tgt_ends, i + 1)[1] > span(tgt_ends, i + 1)[0]


@pytest.mark.parametrize("tgt,src,floor", [("llama-bpe", "qwen2", 0.98), ("llama-spm", "gpt-2", 0.75), ("mpt", "llama-spm", 0.75)])
def test_real_tokenizers_on_corpus(real_tokenizer, corpus, tgt, src, floor):
    t, s = real_tokenizer(tgt), real_tokenizer(src)
    texts = corpus[:60]
    als = align_texts(t, s, texts)
    te = TokenizerOffsets(t).encode(texts)
    se = TokenizerOffsets(s).encode(texts)
    tsurf, ssurf = TokenizerOffsets(t).surfaces, TokenizerOffsets(s).surfaces
    total = matched = 0
    for al, (tid, tends), (sid, sends) in zip(als, te, se):
        _check_pos_spans(tends, sends, al.pos)
        for i, j in enumerate(al.match):
            if j >= 0 and i > 1:  # past the text start, matched tokens spell the same bytes
                assert tsurf.bytes[tid[i]] == ssurf.bytes[sid[j]]
        total += len(al.pos) - 1
        matched += int((al.pos[:-1] >= 0).sum())
    assert matched / total > floor


@pytest.fixture(scope="module")
def bpe_and_spm_offsets(real_tokenizer):
    return TokenizerOffsets(real_tokenizer("llama-bpe")), TokenizerOffsets(real_tokenizer("llama-spm"))


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_fuzz_real_tokenizers(bpe_and_spm_offsets, text):
    bpe, spm = bpe_and_spm_offsets
    (tid, tends), = bpe.encode([text], add_special_tokens=False)
    (sid, sends), = spm.encode([text])
    nbytes = len(text.encode("utf-8"))
    # byte-level BPE without a normaliser: the token spans tile the text's bytes exactly
    assert tends.tolist() == np.cumsum([len(bpe.surfaces.bytes[i]) for i in tid]).tolist()
    assert (tends[-1] if len(tends) else 0) == nbytes
    assert len(sends) == 0 or sends[-1] <= nbytes
    al = align_offsets(tends, sends)
    _check_pos_spans(tends, sends, al.pos)


def test_texts_must_be_strings(real_tokenizer):
    with pytest.raises(TypeError, match="texts: expected a list of strings"):
        TokenizerOffsets(real_tokenizer("gpt-2")).encode("just one string")
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str"):
        TokenizerOffsets(real_tokenizer("gpt-2")).encode(["ok", b"bytes"])


def test_byte_ends_bad_input(real_tokenizer):
    from fastfuse.align.spans import byte_ends
    from fastfuse.align.surface import token_surfaces

    surf = token_surfaces(real_tokenizer("gpt-2"))
    with pytest.raises(ValueError, match="ids: token ids must lie in"):
        byte_ends([50257 + 5], [(0, 1)], "a", surf)
    with pytest.raises(ValueError, match="offsets: expected one"):
        byte_ends([1, 2], [(0, 1)], "ab", surf)
    with pytest.raises(ValueError, match="offsets: character offsets"):
        byte_ends([0, 0], [(0, 1), (1, 9)], "ab", surf)  # surfaces don't spell the text -> offsets path


def test_slow_tokenizer_is_rejected():
    class Slow:
        is_fast = False
    with pytest.raises(TypeError, match="tgt_tokenizer"):
        align_texts(Slow(), Slow(), ["x"])


@settings(max_examples=300, deadline=None)
@given(t=st.lists(st.integers(-3, 40), max_size=30), s=st.lists(st.integers(-3, 40), max_size=30))
def test_fuzz_align_spans_entry_point(t, s):
    """Arbitrary integer arrays: a clear ValueError or exactly the reference, never a crash."""
    t, s = np.array(t, dtype=np.int64), np.array(s, dtype=np.int64)
    valid = lambda e: len(e) == 0 or (e[0] >= 0 and (np.diff(e) >= 0).all())
    if not (valid(t) and valid(s)):
        with pytest.raises(ValueError, match="(tgt|src)_ends: byte end offsets"):
            align_offsets(t, s)
        return
    al = align_offsets(t, s)
    np.testing.assert_array_equal(al.match, reference_match(t, s))


@pytest.mark.parametrize("seed", range(10))
def test_groups_partition_consistently(seed):
    from fastfuse.align.spans import align_groups

    rng = np.random.default_rng(seed)
    t = random_ends(rng, 200, 80, 2)
    s = random_ends(rng, 200, 60, 1)
    gt, gs = align_groups(t, s)
    assert (np.diff(gt) >= 0).all() and (np.diff(gs) >= 0).all()
    al = align_offsets(t, s)
    for i, j in enumerate(al.match):
        if j >= 0:  # 1-to-1 matches are groups holding exactly one non-empty token on each side
            g = gt[i]
            assert gs[j] == g
            tspan = [k for k in np.flatnonzero(gt == g) if t[k] > (t[k - 1] if k else 0)]
            sspan = [k for k in np.flatnonzero(gs == g) if s[k] > (s[k - 1] if k else 0)]
            assert tspan == [i] and sspan == [j]
    # both texts are 200 bytes: every group ends at the same shared boundary on both sides
    assert set(gt.tolist()) == set(gs.tolist())
    for g in np.unique(gt):
        assert t[gt == g].max() == s[gs == g].max()
