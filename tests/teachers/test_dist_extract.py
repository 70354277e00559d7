"""Extraction on several processes: `torchrun --nproc-per-node 2 -m fastfuse extract` gives the
sequences, ids and log-probs of one process; a rank killed after its first shard resumes alone to
the same bytes; the aligner reads the parts as one source and writes what it writes for a
one-process extraction, with 1 or 2 worker processes; broken layouts are refused, naming the part."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastfuse.align.spans import TokenizerOffsets  # noqa: E402
from fastfuse.align.chunking import split_corpus  # noqa: E402
from fastfuse.cli import main as cli_main  # noqa: E402
from fastfuse.batches.corpus_align import align_corpus  # noqa: E402
from fastfuse.batches.dataset import FusionDataset  # noqa: E402
from fastfuse.teachers.local_extract import extract_topk  # noqa: E402
from fastfuse.teachers.rank_parts import PartsReader, open_shards, part_name, token_ranges  # noqa: E402
from fastfuse.teachers.shards import META_NAME, ShardReader  # noqa: E402
from fastfuse.align.vocab_map import VocabMap  # noqa: E402

TARGET, SOURCE, BLOCK = "llama-spm", "gpt-2", 64
FLAGS = ["--tokenizer", SOURCE, "--k", "5", "--block-size", str(BLOCK), "--token-budget", "128", "--shard-size", "4",
         "--quiet"]
# one thread per process: the same float results in every run; no torchrun/launcher variables leak in
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | \
    {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

KILL_AFTER_FIRST_SHARD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from fastfuse.teachers.local_extract import extract_topk
    from fastfuse.tokenizer_files import load_tokenizer

    model_dir, corpus, out = sys.argv[1:4]
    extract_topk(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer("gpt-2"), [Path(corpus)], out,
                 k=5, block_size=64, token_budget=128, shard_size=4, progress=False, rank=1, world_size=2,
                 on_shard=lambda i, path: os.kill(os.getpid(), signal.SIGKILL))
""")


def extract(*args: str, torchrun: int = 0):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] if torchrun else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "fastfuse", "extract", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_tokenizer, corpus):
    root = tmp_path_factory.mktemp("dist")
    tgt, src = real_tokenizer(TARGET), real_tokenizer(SOURCE)
    texts = [corpus[i][:1200] for i in (1, 2, 5, 9)]
    chunks = [c for _, c in split_corpus(texts, [TokenizerOffsets(t) for t in (tgt, src)], BLOCK)]
    data = root / "chunks.jsonl"
    data.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(src), n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=BLOCK))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)     # peaked outputs: a meaningful top-k order
    model.save_pretrained(root / "model")
    common = ["--model", str(root / "model"), "--input", str(data), *FLAGS]
    extract(*common, "--out", str(root / "single"))
    extract(*common, "--out", str(root / "dist"), torchrun=2)
    return root, tgt, src, chunks, data, common


def records(reader):
    return [(r["seq_index"], r["doc_index"], r["char_start"], r["char_end"], r["topk_ids"], r["topk_logprobs"],
             r["ce"]) for r in reader]


def test_two_ranks_give_the_one_process_result(runs):
    root, _, _, chunks, _, _ = runs
    assert sorted(p.name for p in (root / "dist").iterdir()) == [part_name(0, 2), part_name(1, 2)]
    one, two = open_shards(root / "single"), open_shards(root / "dist")
    assert isinstance(one, ShardReader) and isinstance(two, PartsReader)
    two.verify()
    assert len(one) == len(two) == len(chunks) and one.num_tokens == two.num_tokens
    for a, b in zip(records(one), records(two), strict=True):
        assert a[:4] == b[:4]
        np.testing.assert_array_equal(a[4], b[4])
        np.testing.assert_array_equal(a[5], b[5])
        assert a[6] == b[6] or np.isnan(a[6]) and np.isnan(b[6])
    np.testing.assert_array_equal(one.ce, two.ce)
    # the ranks split the tokens about evenly, in corpus order
    parts = [p.meta["partition"] for p in two.parts]
    lens = [len(r["topk_ids"]) for r in one]
    assert [(p["seq_start"], p["seq_end"]) for p in parts] == token_ranges(lens, 2)
    assert abs(two.parts[0].num_tokens - two.parts[1].num_tokens) <= max(lens)
    assert two.meta["num_sequences"] == len(one) and len(two.meta["shards"]) == sum(len(p.meta["shards"])
                                                                                   for p in two.parts)


def test_killed_rank_resumes_alone_to_the_same_bytes(runs, tmp_path):
    root, _, _, _, data, common = runs
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_FIRST_SHARD)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(root / "model"), str(data), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = out / part_name(1, 2)
    assert sorted(p.name for p in killed.iterdir()) == [META_NAME, "shard-00000.safetensors"]
    with pytest.raises(ValueError, match="rank-00000-of-00002: missing"):
        open_shards(out)
    extract(*common, "--out", str(out), "--rank", "0", "--world-size", "2")
    with pytest.raises(ValueError, match="rank-00001-of-00002: incomplete"):
        open_shards(out)
    extract(*common, "--out", str(out), "--rank", "1", "--world-size", "2")     # resumes after shard 0
    for r in range(2):
        a, b = root / "dist" / part_name(r, 2), out / part_name(r, 2)
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir()) and len(names) >= 3
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{part_name(r, 2)}/{n}"


def test_alignment_is_the_same_for_parts_and_workers(runs, tmp_path):
    root, tgt, src, chunks, data, _ = runs
    cov1 = align_corpus(chunks, tgt, {"gpt2": (src, root / "single")}, tmp_path / "a1", progress=False)
    cov2 = align_corpus(chunks, tgt, {"gpt2": (src, root / "dist")}, tmp_path / "a2", progress=False, workers=2)
    assert cov1 == cov2
    args = ["align", "--target", TARGET, "--source", f"gpt2={SOURCE}:{root / 'dist'}", "--input", str(data),
            "--workers", "2", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "a3")]) == 0
    files = sorted(p.relative_to(tmp_path / "a1") for p in (tmp_path / "a1").rglob("*") if p.is_file())
    assert len(files) >= 4
    for d in ("a2", "a3"):
        assert files == sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).rglob("*") if p.is_file())
        for f in files:
            if f.name == "vocab.safetensors":      # the same map; its file's metadata order varies by process
                a, b = (VocabMap.load(tmp_path / x / f) for x in ("a1", d))
                assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distance, b.distance)
            elif f.name != "meta.json":            # meta.json names the source's shard files, which differ
                assert (tmp_path / "a1" / f).read_bytes() == (tmp_path / d / f).read_bytes(), f"{d}/{f}"
    m1, m2 = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("a1", "a2"))
    assert m2["sources"]["gpt2"]["shards"] == [s["sha256"] for s in open_shards(root / "dist").meta["shards"]]
    assert m1["coverage"] == m2["coverage"] and m1["num_sequences"] == m2["num_sequences"]
    assert {f: r for f, r in m1["files"].items() if not f.endswith("vocab.safetensors")} == \
        {f: r for f, r in m2["files"].items() if not f.endswith("vocab.safetensors")}
    d1, d2 = FusionDataset(tmp_path / "a1"), FusionDataset(tmp_path / "a2")
    assert len(d1) == len(d2) == len(chunks)
    for i in (0, len(d1) // 2, len(d1) - 1):
        a, b = d1[i], d2[i]
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["topk_logprobs"][0], b["topk_logprobs"][0])
        np.testing.assert_array_equal(a["pos"][0], b["pos"][0])


def test_broken_layouts_are_refused_naming_the_part(runs, tmp_path, capsys):
    root, tgt, src, chunks, _, common = runs
    d = tmp_path / "d"
    shutil.copytree(root / "dist", d)
    (d / part_name(0, 3)).mkdir()
    with pytest.raises(ValueError, match=r"several world sizes \[2, 3\]"):
        open_shards(d)
    with pytest.raises(ValueError, match="out_dir: .* world size 2, this run has world size 3"):
        extract_topk(transformers.GPT2LMHeadModel.from_pretrained(root / "model"), src, chunks, d, k=5,
                     block_size=BLOCK, token_budget=128, shard_size=4, progress=False, rank=0, world_size=3)
    with pytest.raises(ValueError, match="out_dir: .* world size 2, this run has world size 1"):
        extract_topk(transformers.GPT2LMHeadModel.from_pretrained(root / "model"), src, chunks, d, k=5,
                     block_size=BLOCK, token_budget=128, shard_size=4, progress=False)
    (d / part_name(0, 3)).rmdir()
    meta = json.loads((d / part_name(1, 2) / META_NAME).read_text())
    (d / part_name(1, 2) / META_NAME).write_text(json.dumps(meta | {"k": 6}))
    with pytest.raises(ValueError, match=r"rank-00001-of-00002: written with other settings than .*\['k'\]"):
        open_shards(d)
    (d / part_name(1, 2) / META_NAME).write_text(json.dumps(meta | {"partition": meta["partition"] | {"rank": 0}}))
    with pytest.raises(ValueError, match="does not name rank 1 of 2"):
        open_shards(d)
    with pytest.raises(ValueError, match="texts: an iterator"):
        extract_topk(transformers.GPT2LMHeadModel.from_pretrained(root / "model"), src, iter(chunks), tmp_path / "e",
                     k=5, block_size=BLOCK, token_budget=128, progress=False, rank=0, world_size=2)
    assert cli_main(["extract", *common, "--out", str(tmp_path / "f"), "--rank", "2", "--world-size", "2"]) == 2
    assert "--rank: 2 is not in [0, 2)" in capsys.readouterr().err
    assert cli_main(["align", "--target", TARGET, "--source", f"gpt2={SOURCE}:{root / 'dist'}", "--input", "x",
                     "--out", str(tmp_path / "g"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_token_ranges():
    rng = np.random.default_rng(0)
    for n, w in [(1, 1), (1, 3), (5, 2), (100, 7), (1000, 8)]:
        lens = rng.integers(1, 50, n)
        ranges = token_ranges(lens, w)
        assert len(ranges) == w and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
        share = [int(lens[a:b].sum()) for a, b in ranges]
        assert all(abs(s - lens.sum() / w) <= lens.max() for s in share), (share, lens.sum() / w)
        assert token_ranges(lens.tolist(), w) == ranges
    assert token_ranges([10, 10, 10], 2) == [(0, 1), (1, 3)]      # a tie goes to the earlier cut
    with pytest.raises(ValueError, match="world_size"):
        token_ranges([1], 0)


def test_more_ranks_than_sequences(runs, tmp_path):
    """A rank whose range is empty writes an empty, complete part; the parts still read as the corpus."""
    root, _, src, _, _, _ = runs
    texts = ["A first short document.", "", "And a second one."]
    kw = dict(k=5, block_size=BLOCK, token_budget=128, shard_size=4, progress=False)
    model = transformers.GPT2LMHeadModel.from_pretrained(root / "model")
    extract_topk(model, src, texts, tmp_path / "one", **kw)
    for r in range(3):
        extract_topk(model, src, texts, tmp_path / "three", rank=r, world_size=3, **kw)
    one, three = open_shards(tmp_path / "one"), open_shards(tmp_path / "three")
    assert sorted(len(p) for p in three.parts) == [0, 1, 1] and len(three) == len(one) == 2
    for a, b in zip(records(one), records(three), strict=True):
        assert a[:4] == b[:4]
        np.testing.assert_array_equal(a[4], b[4])
        np.testing.assert_array_equal(a[5], b[5])
