"""Shard format: deterministic atomic writes, validated reads, resume checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastfuse.teachers.shards import META_NAME, ShardReader, ShardWriter, shard_name
from fastfuse.storage import read_safetensors

K = 4


def meta(**over):
    m = dict(source_name="src", model="tiny", tokenizer_fingerprint="ab" * 32, tokenizer_size=100, vocab_size=104,
             k=K, block_size=16, token_budget=64, shard_size=3, dtype="float32")
    m.update(over)
    return m


def fake_shard(rng, first: int, lens: list[int]):
    n = sum(lens)
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    ce = rng.random(len(lens)).astype(np.float32)
    ce[np.array(lens) < 2] = np.nan
    return dict(offsets=off, topk_ids=rng.integers(0, 100, (n, K)).astype(np.int32),
                topk_logprobs=(-rng.random((n, K)) * 10).astype(np.float16), ce=ce,
                seq_index=np.arange(first, first + len(lens), dtype=np.int64),
                doc_spans=np.stack([np.arange(len(lens)), np.zeros(len(lens)), np.full(len(lens), 5)], 1)
                .astype(np.int64))


def write(tmp, shards_lens, seed=0, **over):
    rng = np.random.default_rng(seed)
    w = ShardWriter(tmp, meta(**over))
    data = []
    for lens in shards_lens:
        s = fake_shard(rng, w.next_seq, lens)
        data.append(s)
        w.write_shard(**s, corpus_fingerprint=f"fp{w.next_seq}")
    w.finish()
    return data


LENS = [[5, 1, 7], [3, 3, 2], [9]]


def test_roundtrip(tmp_path):
    data = write(tmp_path, LENS)
    r = ShardReader(tmp_path)
    r.verify()
    assert len(r) == 7 and r.complete and r.num_tokens == 30
    flat = [(s, j) for s in data for j in range(len(s["seq_index"]))]
    for g, (s, j) in enumerate(flat):
        item = r[g]
        a, b = s["offsets"][j], s["offsets"][j + 1]
        np.testing.assert_array_equal(item["topk_ids"], s["topk_ids"][a:b])
        np.testing.assert_array_equal(item["topk_logprobs"], s["topk_logprobs"][a:b])
        assert item["seq_index"] == g and item["topk_ids"].dtype == np.int32
        assert item["topk_logprobs"].dtype == np.float16
        np.testing.assert_equal(item["ce"], s["ce"][j])
    assert [it["seq_index"] for it in r] == list(range(7))
    np.testing.assert_array_equal(r.ce, np.concatenate([s["ce"] for s in data]))
    assert np.isnan(r[1]["ce"])
    assert r[-1]["seq_index"] == 6
    with pytest.raises(IndexError):
        r[7]


def test_deterministic_bytes_and_standard_safetensors(tmp_path):
    write(tmp_path / "a", LENS)
    write(tmp_path / "b", LENS)
    for name in [META_NAME] + [shard_name(i) for i in range(3)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    from safetensors import safe_open
    from safetensors.numpy import load_file

    p = tmp_path / "a" / shard_name(1)
    t = load_file(str(p))
    assert set(t) == {"offsets", "topk_ids", "topk_logprobs", "ce", "seq_index", "doc_spans"}
    assert t["topk_ids"].dtype == np.int32 and t["topk_logprobs"].dtype == np.float16 and t["offsets"].dtype == np.int64
    with safe_open(str(p), "np") as f:
        md = f.metadata()
    assert md["first_seq"] == "3" and md["last_seq"] == "5" and md["k"] == str(K)
    assert md["source_name"] == "src" and md["tokenizer_fingerprint"] == "ab" * 32 and md["format_version"] == "1"
    m = json.loads((tmp_path / "a" / META_NAME).read_text())
    assert m["num_sequences"] == 7 and [s["seq_start"] for s in m["shards"]] == [0, 3, 6]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])


def test_resume_state_and_stray_tmp(tmp_path):
    write(tmp_path, LENS[:2])
    (tmp_path / f".{shard_name(2)}.tmp").write_bytes(b"partial")
    w = ShardWriter(tmp_path, meta())
    assert w.next_seq == 6 and w.next_shard == 2
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("key,value", [("k", 5), ("tokenizer_fingerprint", "cd" * 32), ("block_size", 32),
                                       ("dtype", "bfloat16")])
def test_resume_mismatch_names_key(tmp_path, key, value):
    write(tmp_path, LENS[:1])
    with pytest.raises(ValueError, match=key):
        ShardWriter(tmp_path, meta(**{key: value}))


def test_truncated_shard(tmp_path):
    write(tmp_path, LENS)
    p = tmp_path / shard_name(1)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match=shard_name(1)):
        ShardReader(tmp_path)
    with pytest.raises(ValueError, match=shard_name(1)):
        ShardWriter(tmp_path, meta())
    with pytest.raises(ValueError, match="truncated|runs past|inconsistent"):
        read_safetensors(p)


def test_missing_shard(tmp_path):
    write(tmp_path, LENS)
    (tmp_path / shard_name(2)).unlink()
    with pytest.raises(ValueError, match=shard_name(2)):
        ShardReader(tmp_path)


def test_corrupted_shard(tmp_path):
    write(tmp_path, LENS)
    p = tmp_path / shard_name(0)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    r = ShardReader(tmp_path)  # same size: found lazily
    assert r[4]["seq_index"] == 4
    with pytest.raises(ValueError, match=shard_name(0)):
        r[0]
    with pytest.raises(ValueError, match=shard_name(0)):
        ShardReader(tmp_path).verify()
    # garbage header, sha256 check off: still a clear error naming the file
    raw = bytearray(p.read_bytes())
    raw[10:14] = b"\xff\xfe{{"
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=shard_name(0)):
        ShardReader(tmp_path, check_sha256=False)[0]


def test_bad_meta(tmp_path):
    with pytest.raises(ValueError, match="meta.json"):
        ShardReader(tmp_path)
    (tmp_path / META_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        ShardReader(tmp_path)


def test_writer_validates(tmp_path):
    w = ShardWriter(tmp_path, meta())
    s = fake_shard(np.random.default_rng(0), 0, [2, 3])
    with pytest.raises(TypeError, match="topk_logprobs"):
        w.write_shard(**{**s, "topk_logprobs": s["topk_logprobs"].astype(np.float32)}, corpus_fingerprint="x")
    with pytest.raises(ValueError, match="seq_index"):
        w.write_shard(**{**s, "seq_index": s["seq_index"] + 1}, corpus_fingerprint="x")
    with pytest.raises(ValueError, match="topk_ids"):
        w.write_shard(**{**s, "topk_ids": s["topk_ids"][:, :2].copy()}, corpus_fingerprint="x")
    with pytest.raises(ValueError, match="missing keys"):
        ShardWriter(tmp_path / "x", {"k": 3})
