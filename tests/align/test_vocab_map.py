"""fastfuse.align.vocab_map: C++ vocabulary mapping against a brute-force pure-Python reference."""
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfuse import _C
from fastfuse.align.vocab_map import VocabMap, levenshtein_reference, reference_vocab_map


# ------------------------------------------------------------------ random vocabularies
def random_token(rng: random.Random, alphabet: bytes) -> bytes:
    r = rng.random()
    if r < 0.05:
        n = 0
    elif r < 0.85:
        n = rng.randint(1, 8)
    else:
        n = rng.randint(56, 80)  # around and beyond the 64-byte bit-parallel limit
    return bytes(rng.choice(alphabet) for _ in range(n))


def random_vocab(rng: random.Random, n: int, alphabet: bytes, pool: list[bytes]) -> tuple[list[bytes], np.ndarray]:
    toks = []
    for _ in range(n):
        toks.append(rng.choice(pool) if pool and rng.random() < 0.3 else random_token(rng, alphabet))
    special = np.array([rng.random() < 0.1 for _ in range(n)], dtype=bool)
    return toks, special


def check_against_reference(src, tgt, mode, ss=None, ts=None, num_threads=2):
    vm = VocabMap.from_token_bytes(src, tgt, mode, ss, ts, num_threads=num_threads)
    ref_ids, ref_dist = reference_vocab_map(src, tgt, mode, ss, ts)
    np.testing.assert_array_equal(vm.ids, ref_ids)
    np.testing.assert_array_equal(vm.distance, ref_dist)
    assert vm.ids.dtype == np.int32 and vm.distance.dtype == np.int32
    return vm


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("mode", ["exact", "mined"])
def test_random_vocab_matches_reference(seed, mode):
    rng = random.Random(1000 * seed + len(mode))
    alphabet = bytes(rng.sample(range(256), rng.choice([1, 2, 3, 4])))  # small alphabets force ties
    shared = [random_token(rng, alphabet) for _ in range(10)]  # shared tokens: exact matches, duplicates
    src, ss = random_vocab(rng, rng.randint(0, 60), alphabet, shared)
    tgt, ts = random_vocab(rng, rng.randint(1, 120), alphabet, shared)
    vm = check_against_reference(src, tgt, mode, ss, ts)
    special_targets = vm.ids[ss]
    assert ts[special_targets[special_targets >= 0]].all()  # specials only map to specials


@pytest.mark.parametrize("seed", range(4))
def test_wide_alphabet_pruning_matches_reference(seed):
    # Many short targets over wider alphabets: the length, byte-signature and prefix/suffix
    # seeding bounds all prune here, so a wrong bound shows up as a different nearest id.
    rng = random.Random(seed)
    alphabet = bytes(rng.sample(range(256), rng.choice([8, 16, 64, 256])))
    tgt = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(400)]
    src = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(25)]
    src += [t[:-1] + bytes([rng.choice(alphabet)]) for t in rng.sample(tgt, 10)]  # distance <= 1
    src += [t + t[:2] for t in rng.sample(tgt, 5)]  # a prefix of them is a target
    check_against_reference(src, tgt, "mined")


def test_levenshtein_bitparallel_matches_dp():
    rng = random.Random(7)
    for _ in range(400):
        alphabet = bytes(rng.sample(range(256), rng.choice([1, 2, 4, 256])))
        la, lb = rng.choice([0, 1, 5, 63, 64, 65, 100, 150]), rng.randint(0, 150)
        a = bytes(rng.choice(alphabet) for _ in range(la))
        b = bytes(rng.choice(alphabet) for _ in range(lb))
        d = _C._testing.vocab_levenshtein(a, b)
        assert d == _C._testing.vocab_levenshtein_dp(a, b) == _C._testing.vocab_levenshtein(b, a)
    for a, b in [(b"kitten", b"sitting"), (b"", b"abc"), (b"a" * 64, b"a" * 63 + b"b"), (b"x" * 70, b"")]:
        assert _C._testing.vocab_levenshtein(a, b) == levenshtein_reference(a, b)


def test_exact_semantics():
    tgt = [b"", b"a", b"b", b"a", b"<s>", b"<s>", b"ab"]
    ts = np.array([0, 0, 0, 0, 1, 1, 0], dtype=bool)
    src = [b"a", b"<s>", b"<s>", b"", b"zz", b"ab"]
    ss = np.array([0, 0, 1, 0, 0, 1], dtype=bool)
    vm = VocabMap.from_token_bytes(src, tgt, "exact", ss, ts)
    # duplicate bytes -> smallest id; specials only match specials (and never by distance);
    # empty tokens never match.
    assert vm.ids.tolist() == [1, -1, 4, -1, -1, -1]
    assert vm.distance.tolist() == [0, -1, 0, -1, -1, -1]
    vm = VocabMap.from_token_bytes(src, tgt, "mined", ss, ts)
    assert vm.ids.tolist() == [1, 1, 4, -1, 1, -1]  # b"<s>" ordinary: nearest ordinary target
    assert vm.distance.tolist() == [0, 3, 0, -1, 2, -1]
    assert vm.exact_rate == pytest.approx(1 / 4)


def test_mined_ties_go_to_smallest_id():
    vm = VocabMap.from_token_bytes([b"ab", b"abc"], [b"zzz", b"ay", b"ax", b"abcd", b"ab"], "mined")
    assert vm.ids.tolist() == [4, 3]
    assert vm.distance.tolist() == [0, 1]
    vm = VocabMap.from_token_bytes([b"ab"], [b"axy", b"ay", b"xb"], "mined")
    assert (vm.ids[0], vm.distance[0]) == (1, 1)


def test_threads_are_deterministic():
    rng = random.Random(3)
    alphabet = b"abcde"
    src, ss = random_vocab(rng, 400, alphabet, [])
    tgt, ts = random_vocab(rng, 3000, alphabet, src[:100])
    runs = [VocabMap.from_token_bytes(src, tgt, "mined", ss, ts, num_threads=n) for n in (1, 2, 4)]
    for vm in runs[1:]:
        np.testing.assert_array_equal(vm.ids, runs[0].ids)
        np.testing.assert_array_equal(vm.distance, runs[0].distance)
    sample = rng.sample(range(len(src)), 5)
    ref_ids, ref_dist = reference_vocab_map(src, tgt, "mined", ss, ts, src_ids=sample)
    np.testing.assert_array_equal(runs[0].ids[sample], ref_ids[sample])
    np.testing.assert_array_equal(runs[0].distance[sample], ref_dist[sample])


_text = st.text(alphabet=st.sampled_from("ab ▁\n語言模型日本🙂🚀é\u0301"), max_size=20).map(str.encode)
_token = st.one_of(st.binary(max_size=70), _text, st.sampled_from([b"", b"a", b"ab", b" the"]))


@settings(max_examples=300, deadline=None)
@given(
    src=st.lists(st.tuples(_token, st.booleans()), max_size=10),
    tgt=st.lists(st.tuples(_token, st.booleans()), max_size=12),
    mode=st.sampled_from(["exact", "mined"]),
)
def test_fuzz_against_reference(src, tgt, mode):
    sb, ss = [t for t, _ in src], np.array([s for _, s in src], dtype=bool)
    tb, ts = [t for t, _ in tgt], np.array([s for _, s in tgt], dtype=bool)
    check_against_reference(sb, tb, mode, ss, ts)
    check_against_reference(sb, tb, mode)  # no special tokens at all


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    vm = VocabMap.from_token_bytes([b"a", b"b", b"<s>", b"xyz"], [b"<s>", b"a", b"xy"], "mined",
                                   np.array([0, 0, 1, 0], bool), np.array([1, 0, 0], bool))
    path = tmp_path / "map.safetensors"
    vm.save(path)
    back = VocabMap.load(path)
    np.testing.assert_array_equal(back.ids, vm.ids)
    np.testing.assert_array_equal(back.distance, vm.distance)
    np.testing.assert_array_equal(back.src_special, vm.src_special)
    assert (back.mode, back.tgt_size, back.stats()) == (vm.mode, vm.tgt_size, vm.stats())
    assert os.listdir(tmp_path) == ["map.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "map.safetensors"
    old = VocabMap.from_token_bytes([b"a"], [b"a"], "exact")
    old.save(path)
    before = path.read_bytes()

    def broken_fsync(fd):                # the temp file is written, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        VocabMap.from_token_bytes([b"b", b"c"], [b"b"], "exact").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["map.safetensors"]  # no temp file left behind


def test_save_is_byte_deterministic(tmp_path):
    vm = VocabMap.from_token_bytes([b"a", b"bc", b"x"], [b"a", b"bc"], "mined")
    vm.save(tmp_path / "a.safetensors")
    VocabMap.load(tmp_path / "a.safetensors").save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_load_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.bin"):
        VocabMap.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"ids": np.zeros(3, np.int32)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors"):
        VocabMap.load(other)
    with pytest.raises(FileNotFoundError):
        VocabMap.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"src_bytes\[1\]"):
        VocabMap.from_token_bytes([b"a", "b"], [b"a"])
    with pytest.raises(TypeError, match="tgt_bytes"):
        VocabMap.from_token_bytes([b"a"], b"abc")
    with pytest.raises(TypeError, match=r"tgt_bytes\[0\]"):
        VocabMap.from_token_bytes([b"a"], [None])
    with pytest.raises(ValueError, match="src_special"):
        VocabMap.from_token_bytes([b"a", b"b"], [b"a"], src_special=np.array([True]))
    with pytest.raises(ValueError, match="tgt_special"):
        VocabMap.from_token_bytes([b"a"], [b"a"], tgt_special=[False, True])
    with pytest.raises(TypeError, match="tgt_special"):
        VocabMap.from_token_bytes([b"a"], [b"a"], tgt_special=[0.5])
    with pytest.raises(ValueError, match="mode"):
        VocabMap.from_token_bytes([b"a"], [b"a"], mode="soft")
    with pytest.raises(ValueError, match="num_threads"):
        VocabMap.from_token_bytes([b"a"], [b"a"], num_threads=-1)
    with pytest.raises(ValueError, match="src_offsets"):
        _C.map_vocab(b"ab", np.array([0, 2, 1], np.int64), None, b"", np.zeros(1, np.int64), None, True)


def test_empty_vocabularies():
    vm = VocabMap.from_token_bytes([], [b"a"], "mined")
    assert vm.ids.shape == (0,) and vm.exact_rate == 0.0 and vm.stats()["n_unmapped"] == 0
    vm = VocabMap.from_token_bytes([b"a", b""], [], "mined")
    assert vm.ids.tolist() == [-1, -1]


# ------------------------------------------------------------------ real tokenizers
@pytest.fixture(scope="module")
def real_maps(request):
    vocabfiles = pytest.importorskip("fastfuse.tokenizer_files")
    surface = pytest.importorskip("fastfuse.align.surface")
    try:  # the session-wide cached loader from conftest.py, where there is one
        load = request.getfixturevalue("real_tokenizer")
    except pytest.FixtureLookupError:
        load = vocabfiles.load_tokenizer
    src, tgt = load("llama-spm"), load("gpt-2")
    return surface.token_surfaces(src), surface.token_surfaces(tgt), src, tgt


def test_real_tokenizers_exact(real_maps):
    s, t, src_tok, tgt_tok = real_maps
    vm = VocabMap.build(src_tok, tgt_tok, "exact")
    assert vm.src_size == len(s.bytes) == len(src_tok) and vm.tgt_size == len(t.bytes)
    # Llama-2 SPM -> GPT-2: about 57% of the SPM pieces are GPT-2 tokens too.
    assert 0.45 < vm.exact_rate < 0.75, vm.stats()
    for k in np.flatnonzero(vm.ids >= 0):
        assert s.bytes[k] == t.bytes[vm.ids[k]]
        assert bool(s.special[k]) == bool(t.special[vm.ids[k]])
    assert vm.ids[s.bytes.index(b" the")] == t.bytes.index(b" the")


@pytest.mark.slow
def test_real_tokenizers_mined(real_maps):
    s, t, _, _ = real_maps
    vm = VocabMap.from_token_bytes(s.bytes, t.bytes, "mined", s.special, t.special)
    ordinary = ~np.asarray(s.special) & np.array([len(b) > 0 for b in s.bytes])
    assert (vm.ids[ordinary] >= 0).all()
    rng = np.random.default_rng(0)
    cands = [j for j, b in enumerate(t.bytes) if b and not t.special[j]]
    for k in rng.choice(np.flatnonzero(vm.distance > 0), 3, replace=False):
        dists = np.array([_C._testing.vocab_levenshtein(s.bytes[k], t.bytes[j]) for j in cands])
        assert vm.distance[k] == dists.min() == _C._testing.vocab_levenshtein(s.bytes[k], t.bytes[vm.ids[k]])
        assert vm.ids[k] == cands[int(np.argmin(dists))]
