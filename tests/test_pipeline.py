"""End to end on CPU: split -> extract -> align -> batch -> fused_loss equals the loss computed
directly from the full outputs of tiny random source models (dense teacher built in Python)."""
import json

import numpy as np
import pytest
import torch

from fastfuse.align.spans import TokenizerOffsets
from fastfuse.align.chunking import split_corpus
from fastfuse.batches.corpus_align import AlignedStore, align_corpus
from fastfuse.batches.dataset import FusionDataset
from fastfuse.corpus import source_sequences
from fastfuse.teachers.local_extract import extract_topk
from fastfuse.loss.logits_loss import fused_loss
from fastfuse.align.surface import token_surfaces

pytestmark = pytest.mark.slow       # every test shares `run`: a real extraction and alignment (~15 s)
K = 5
TARGET, SOURCES = "llama-spm", ("gpt-2", "llama-bpe")


def tiny_model(vocab_size, arch, seed):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=256)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_tokenizer, corpus):
    out = tmp_path_factory.mktemp("run")
    toks = {n: real_tokenizer(n) for n in (TARGET,) + SOURCES}
    chunks = [c for _, c in split_corpus(corpus[:3], [TokenizerOffsets(t) for t in toks.values()], 96)]
    models = {"gpt-2": tiny_model(50304, "gpt2", 1),  # padded embedding: 50304 > 50257
              "llama-bpe": tiny_model(len(toks["llama-bpe"]), "llama", 2)}
    for n in SOURCES:
        extract_topk(models[n], toks[n], chunks, out / n, k=K, block_size=96, token_budget=2048, source_name=n,
                     progress=False)
    cov = align_corpus(chunks, toks[TARGET], {n: (toks[n], out / n) for n in SOURCES}, out / "align", progress=False)
    return out, toks, chunks, models, cov


def test_coverage_report(run):
    *_, cov = run
    for n in SOURCES:
        c = cov[n]
        assert 0.5 < c["aligned_1to1"] <= 1 and 0 <= c["one_hot_fallback"] < 0.7 and 0 < c["vocab_mapped_mass"] <= 1


def test_align_is_skipped_when_done_and_refuses_other_tokenizers(run, real_tokenizer):
    out, toks, chunks, _, cov = run
    again = align_corpus(chunks, toks[TARGET], {n: (toks[n], out / n) for n in SOURCES}, out / "align", progress=False)
    assert again == cov
    with pytest.raises(ValueError, match="sources\\['gpt-2'\\]: the tokenizer given is not the one"):
        align_corpus(chunks, toks[TARGET], {"gpt-2": (toks["llama-bpe"], out / "gpt-2")}, out / "other", progress=False)
    with pytest.raises(ValueError, match="shards hold .* sequences but the corpus gives"):
        align_corpus(chunks[:-1], toks[TARGET], {"gpt-2": (toks["gpt-2"], out / "gpt-2")}, out / "other2",
                     progress=False)


def direct_reference(run, logits, lm_weight):
    """Per-token loss [B, T] from full source outputs, without the library's pipeline."""
    out, toks, chunks, models, _ = run
    tsurf = token_surfaces(toks[TARGET])
    ssurfs = {n: token_surfaces(toks[n]) for n in SOURCES}
    first_id = {}
    for i, b in enumerate(tsurf.bytes):
        if b and not tsurf.special[i]:
            first_id.setdefault(b, i)
    total = torch.zeros(logits.shape[:2], dtype=torch.float64)
    store = AlignedStore(out / "align")
    per_seq = []
    for seq_i, chunk in enumerate(chunks):
        tgt = store.target_ids(seq_i)
        teachers, ces = [], []
        for n in SOURCES:
            (s, _), = list(source_sequences(toks[n], [chunk], 1 << 30))
            ssurf = ssurfs[n]
            with torch.no_grad():
                lg = models[n](torch.as_tensor(s.input_ids)[None]).logits[0].double()
            lg = lg[:, : len(toks[n])]  # padded embedding rows are no tokens
            lp = torch.log_softmax(lg, -1)
            ces.append(float(-lp[:-1].gather(1, torch.as_tensor(s.input_ids[1:])[:, None]).mean()))
            top = torch.topk(lp.float(), K, dim=-1)
            # byte spans: concatenated surfaces (specials empty); SentencePiece's dummy space is the first token's
            def spans(ids, surf):
                lens = np.array([0 if surf.special[t] else len(surf.bytes[t]) for t in ids])
                return np.cumsum(lens)
            te, se = spans(tgt, tsurf), spans(s.input_ids, ssurf)
            te = np.maximum(te - (te[-1] - len(chunk.encode())), 0)
            se = np.maximum(se - (se[-1] - len(chunk.encode())), 0)
            sspan = {((se[j - 1] if j else 0), se[j]): j for j in range(len(se)) if se[j] > (se[j - 1] if j else 0)}
            rows = []
            for i in range(len(tgt)):
                if i + 1 >= len(tgt):
                    rows.append(None)
                    continue
                key = (te[i], te[i + 1])
                j = sspan.get(key, 0) - 1 if key[1] > key[0] else -1
                q = {}
                if j >= 0:
                    ids, lps = top.indices[j].tolist(), top.values[j].half().double().tolist()  # stored as fp16
                    keep = [(first_id.get(ssurf.bytes[t]) if not ssurf.special[t] else None, l) for t, l in zip(ids, lps)]
                    keep = [(t, l) for t, l in keep if t is not None]
                    if keep:
                        m = max(l for _, l in keep)
                        z = sum(np.exp(l - m) for _, l in keep)
                        for t, l in keep:
                            q[t] = q.get(t, 0.0) + np.exp(l - m) / z
                rows.append(q or {int(tgt[i + 1]): 1.0})
            teachers.append(rows)
        best = int(np.argmin(ces))  # MinCE
        for i in range(len(tgt) - 1):
            z = logits[seq_i, i].double()
            lse = torch.logsumexp(z, 0)
            q = teachers[best][i]
            total[seq_i, i] = lse - lm_weight * z[int(tgt[i + 1])] - (1 - lm_weight) * sum(p * z[t] for t, p in q.items())
    return total


@pytest.mark.parametrize("lm_weight", [0.0, 0.9])
def test_batch_loss_equals_direct_reference(run, lm_weight):
    out, toks, chunks, *_ = run
    ds = FusionDataset(out / "align")
    assert len(ds) == len(chunks)
    batch = ds.collator(pad_token_id=0, pin_memory=False)([ds[i] for i in range(len(ds))])
    B, T = batch["input_ids"].shape
    torch.manual_seed(0)
    logits = torch.randn(B, T, len(toks[TARGET]))
    got = fused_loss(logits, batch["source_topk"], batch["align_map"], batch["labels"], lm_weight=lm_weight,
                     source_weights=batch["source_weights"], reduction="none", impl="torch")
    want = direct_reference(run, logits, lm_weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_cli_chunk_and_align_reproduce_the_python_api(run, corpus, tmp_path):
    from fastfuse.cli import main

    out, toks, chunks, _, cov = run
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:3]))
    assert main(["chunk", "--tokenizers", TARGET, *SOURCES, "--input", str(docs), "--block-size", "96",
                 "--out", str(tmp_path / "chunks.jsonl"), "--quiet"]) == 0
    got = [json.loads(line)["text"] for line in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    assert got == chunks
    args = ["align", "--target", TARGET, "--input", str(tmp_path / "chunks.jsonl"), "--out", str(tmp_path / "al"), "--quiet"]
    for n in SOURCES:
        args += ["--source", f"{n}={n}:{out / n}"]
    assert main(args) == 0
    assert json.loads((tmp_path / "al" / "meta.json").read_text())["coverage"] == cov
    assert main(["align", "--target", TARGET, "--source", "oops", "--input", str(docs), "--out", str(tmp_path / "x")]) == 2


def test_mined_sequence_alignment_agrees_with_offsets_where_it_matches(run, tmp_path):
    out, toks, chunks, _, _ = run
    cov = align_corpus(chunks, toks[TARGET], {n: (toks[n], out / n) for n in SOURCES}, tmp_path / "mined",
                       seq_mode="mined", progress=False)
    exact, mined = AlignedStore(out / "align"), AlignedStore(tmp_path / "mined")
    for n in SOURCES:
        agree = total = 0
        for i in range(len(exact)):
            a, b = exact.pos(n, i), mined.pos(n, i)
            sel = b >= 0
            total += int(sel.sum())
            agree += int((a[sel] == b[sel]).sum())
        assert total > 0.3 * sum(len(exact.pos(n, i)) for i in range(len(exact)))
        assert agree >= 0.97 * total  # DTW's equal-token 1-to-1 matches are (nearly always) the exact spans
        assert 0 < cov[n]["aligned_1to1"] <= 1
    with pytest.raises(ValueError, match="seq_mode"):
        align_corpus(chunks, toks[TARGET], {}, tmp_path / "bad", seq_mode="dtw")


@pytest.mark.parametrize("seq_mode", ["offsets", "mined"])
def test_align_workers_give_the_one_process_output(run, tmp_path, seq_mode):
    """--workers N: chunks of documents tokenised and aligned in spawned processes, collected in order."""
    out, toks, chunks, _, _ = run
    srcs = {n: (toks[n], out / n) for n in SOURCES}
    one = out / "align" if seq_mode == "offsets" else tmp_path / "one"
    cov1 = align_corpus(chunks, toks[TARGET], srcs, one, seq_mode=seq_mode, progress=False)
    cov2 = align_corpus(chunks, toks[TARGET], srcs, tmp_path / "two", seq_mode=seq_mode, progress=False, workers=2)
    assert cov1 == cov2
    m1, m2 = (json.loads((d / "meta.json").read_text()) for d in (one, tmp_path / "two"))
    files = [f for f in m1["files"] if not f.endswith("vocab.safetensors")]   # its metadata order varies
    assert len(files) >= 3 and all(m1["files"][f] == m2["files"][f] for f in files)
    with pytest.raises(ValueError, match="workers"):
        align_corpus(chunks, toks[TARGET], srcs, tmp_path / "bad", workers=0)


def test_dataset_source_order_is_by_name_and_explicit(run):
    """Index s of every batch tensor is ``dataset.sources[s]``: sorted by name by default, the given order
    otherwise -- each source's vocab map, top-k and CE stay with its name."""
    out, toks, *_ = run
    store = AlignedStore(out / "align")
    default = FusionDataset(out / "align")
    assert default.sources == sorted(SOURCES)
    for order in (list(SOURCES), list(reversed(SOURCES))):
        ds = FusionDataset(out / "align", sources=order)
        assert ds.sources == order
        batch = ds.collator(pad_token_id=0, pin_memory=False)([ds[i] for i in range(len(ds))])
        for s, name in enumerate(order):
            alone = FusionDataset(out / "align", sources=[name])
            one = alone.collator(pad_token_id=0, pin_memory=False)([alone[i] for i in range(len(alone))])
            ids = store.vocab_map(name).ids
            assert torch.equal(batch["align_map"].vocab[s, : len(ids)], torch.as_tensor(ids))
            Ts, K = one["source_topk"].ids.shape[2:]
            assert torch.equal(batch["source_topk"].ids[s, :, :Ts, :K], one["source_topk"].ids[0])
            torch.testing.assert_close(batch["source_ce"][s], one["source_ce"][0], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="each source at most once"):
        FusionDataset(out / "align", sources=[SOURCES[0], SOURCES[0]])
