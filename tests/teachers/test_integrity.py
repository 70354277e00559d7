"""Nothing outside the output, no mixed or stale data: source names, the model and the corpus as
part of a run's identity, checksums of every file a dataset reads, NaN models, malformed meta.json,
empty corpora (issue #11, items 1-5, 10, 12)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fastfuse.cli import main as cli_main  # noqa: E402
from fastfuse.batches.corpus_align import AlignedStore, align_corpus  # noqa: E402
from fastfuse.batches.dataset import FusionDataset  # noqa: E402
from fastfuse.teachers.local_extract import extract_topk  # noqa: E402
from fastfuse.teachers.shards import META_NAME, ShardReader  # noqa: E402

TARGET, SOURCE = "llama-spm", "gpt-2"
KW = dict(k=4, block_size=128, token_budget=512, shard_size=2, progress=False)  # every text fits a block


def tiny_gpt2(vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=8, n_layer=1, n_head=2, n_positions=128)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_tokenizer, corpus):
    root = tmp_path_factory.mktemp("integrity")
    tgt, src = real_tokenizer(TARGET), real_tokenizer(SOURCE)
    texts = [corpus[i][:150] for i in (1, 2, 5, 9)]
    extract_topk(tiny_gpt2(len(src), 0), src, texts, root / "src", **KW)
    align_corpus(texts, tgt, {"gpt2": (src, root / "src")}, root / "align", progress=False)
    return root, tgt, src, texts


def test_source_names_stay_inside_the_output(setup, tmp_path):
    root, tgt, src, texts = setup
    out = tmp_path / "deep" / "out"
    for bad in ("../../escape", "target", "TARGET", "a/b", "", "x" * 65, ".hidden", "meta.json"):
        with pytest.raises(ValueError, match="sources: name"):
            align_corpus(texts, tgt, {bad: (src, root / "src")}, out, progress=False)
    assert not (tmp_path / "escape").exists() and not out.exists()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = f"gpt2={SOURCE}:{root / 'src'}"
    args = ["align", "--target", TARGET, "--input", str(docs), "--out", str(out), "--quiet"]
    assert cli_main(args + ["--source", spec, "--source", spec]) == 2
    assert cli_main(args + ["--source", f"../x={SOURCE}:{root / 'src'}"]) == 2
    assert not out.exists()


def test_resume_with_other_weights_is_refused(setup, tmp_path):
    _, _, src, texts = setup

    def die(i, path):
        if i == 0:
            raise KeyboardInterrupt   # killed after the first shard

    with pytest.raises(KeyboardInterrupt):
        extract_topk(tiny_gpt2(len(src), 0), src, texts, tmp_path / "run", on_shard=die, **KW)
    with pytest.raises(ValueError, match="model_fingerprint"):
        extract_topk(tiny_gpt2(len(src), 1), src, texts, tmp_path / "run", **KW)
    stats = extract_topk(tiny_gpt2(len(src), 0), src, texts, tmp_path / "run", **KW)   # the same weights resume
    assert stats["shards_written"] == 1 and ShardReader(tmp_path / "run").complete


def test_dataset_refuses_shards_it_was_not_aligned_against(setup, tmp_path):
    root, tgt, src, texts = setup
    assert len(FusionDataset(root / "align")) == 4
    # re-extract the source (other weights, same sequence count) where the alignment points
    import shutil

    shutil.copytree(root / "align", tmp_path / "align")
    shutil.copytree(root / "src", tmp_path / "src")
    meta = json.loads((tmp_path / "align" / "meta.json").read_text())
    assert meta["sources"]["gpt2"]["dir"] == "../src"
    shutil.rmtree(tmp_path / "src")
    extract_topk(tiny_gpt2(len(src), 7), src, list(reversed(texts)), tmp_path / "src", **KW)
    with pytest.raises(ValueError, match="not the ones .* aligned against"):
        FusionDataset(tmp_path / "align")


@pytest.mark.parametrize("rel", ["target/shard-00000.safetensors", "gpt2/shard-00000.safetensors",
                                 "gpt2/vocab.safetensors"])
def test_edited_alignment_outputs_are_refused(setup, tmp_path, rel):
    import shutil

    root, *_ = setup
    shutil.copytree(root / "align", tmp_path / "align")
    shutil.copytree(root / "src", tmp_path / "src")
    f = tmp_path / "align" / rel
    b = bytearray(f.read_bytes())
    b[-1] ^= 1                                       # same size, one bit flipped
    f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="sha256 differs"):
        ds = FusionDataset(tmp_path / "align")
        ds.collator(0)
    f.unlink()
    with pytest.raises(ValueError, match="missing"):
        AlignedStore(tmp_path / "align")


def test_align_of_another_corpus_is_not_the_cached_result(setup, corpus):
    root, tgt, src, texts = setup
    cov = json.loads((root / "align" / "meta.json").read_text())["coverage"]
    assert align_corpus(texts, tgt, {"gpt2": (src, root / "src")}, root / "align", progress=False) == cov
    other = [corpus[i][:150] for i in (3, 4, 6, 7)]
    with pytest.raises(ValueError, match="sequence"):
        align_corpus(other, tgt, {"gpt2": (src, root / "src")}, root / "align", progress=False)


def test_nan_model_fails_at_extraction(setup, tmp_path):
    _, _, src, texts = setup
    m = tiny_gpt2(len(src), 0)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model: produced NaN log-probs at position \d+ of sequence \d"):
        extract_topk(m, src, texts, tmp_path / "nan", **KW)
    assert not (tmp_path / "nan" / META_NAME).exists()


def test_block_size_beyond_the_models_positions(setup, tmp_path):
    _, _, src, texts = setup
    with pytest.raises(ValueError, match="block_size: 256 exceeds the model's 128 positions"):
        extract_topk(tiny_gpt2(len(src), 0), src, texts, tmp_path / "x", **{**KW, "block_size": 256})


@pytest.mark.parametrize("edit", [
    lambda m: None, lambda m: [], lambda m: {**m, "shards": 5}, lambda m: {**m, "k": "ten"},
    lambda m: {**m, "shards": [{}]}, lambda m: {**m, "num_tokens": -1},
    lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../etc/passwd"}] + m["shards"][1:]},
    lambda m: {k: v for k, v in m.items() if k != "source_name"},
])
def test_malformed_shard_meta_is_one_clear_error(setup, tmp_path, edit):
    import shutil

    root, *_ = setup
    shutil.copytree(root / "src", tmp_path / "src")
    meta = json.loads((tmp_path / "src" / META_NAME).read_text())
    (tmp_path / "src" / META_NAME).write_text(json.dumps(edit(meta)))
    with pytest.raises(ValueError, match="meta.json"):
        ShardReader(tmp_path / "src")


@pytest.mark.parametrize("text", ["", "{", "null", '{"complete": true}', '{"format_version": 2, "complete": true, '
                                  '"sources": {"../x": {"dir": "..", "shards": []}}, "num_sequences": 1, "files": {}}'])
def test_malformed_align_meta_is_one_clear_error(setup, tmp_path, text):
    import shutil

    root, *_ = setup
    shutil.copytree(root / "align", tmp_path / "align")
    (tmp_path / "align" / "meta.json").write_text(text)
    with pytest.raises(ValueError, match="meta.json"):
        AlignedStore(tmp_path / "align")


def test_empty_corpus_is_named_at_the_first_step(setup, tmp_path):
    _, tgt, src, _ = setup
    with pytest.raises(ValueError, match="corpus is empty"):
        extract_topk(tiny_gpt2(len(src), 0), src, [""], tmp_path / "e", **KW)
    with pytest.raises(ValueError, match="corpus is empty"):
        align_corpus(["", " "], tgt, {}, tmp_path / "a", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["chunk", "--tokenizers", TARGET, "--input", str(empty), "--block-size", "64",
                     "--out", str(tmp_path / "c.jsonl"), "--quiet"]) == 2
    assert np.all([not (tmp_path / "c.jsonl").exists()])
