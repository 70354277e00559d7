"""Online teachers (fastfuse.batches.online) against the offline pipeline: on the same text, the batch that
OnlineTeachers builds from the target ids equals, tensor by tensor and bit for bit, the batch of
chunk -> extract_topk -> align_corpus -> FusionDataset -> FusionCollator, for two real tokenizer
setups (tiny random models from configs, real vocabularies); and the "no teacher" cases."""
import numpy as np
import pytest
import torch

from fastfuse.align.spans import TokenizerOffsets
from fastfuse.align.chunking import split_corpus
from fastfuse.batches.corpus_align import align_corpus
from fastfuse.batches.dataset import FusionDataset
from fastfuse.teachers.local_extract import extract_topk
from fastfuse.batches.online import OnlineTeachers, TargetText
from fastfuse.teachers.online_teachers import LocalTeacher

pytestmark = pytest.mark.slow       # its tests share a real extraction per set-up (~17 s each)
K = 5
BLOCK = 96
BUDGET = 2048
SETUPS = {"spm-target": ("llama-spm", ("gpt-2", "llama-bpe")),      # SentencePiece student, byte-level teachers
          "bpe-target": ("gpt-2", ("llama-spm", "qwen2"))}          # byte-level student, SentencePiece + NFC teachers


def tiny_model(vocab_size, arch, seed, positions=256):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2,
                                          n_positions=positions)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=positions)).eval()


def teacher_model(name, tok, seed):
    if name == "gpt-2":
        return tiny_model(50304, "gpt2", seed)      # a padded embedding: 50304 > 50257 tokens
    return tiny_model(len(tok), "llama", seed)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def offline(request, tmp_path_factory, real_tokenizer, corpus):
    target, sources = SETUPS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    toks = {n: real_tokenizer(n) for n in (target,) + sources}
    chunks = [c for _, c in split_corpus(corpus[:3], [TokenizerOffsets(toks[n]) for n in (target,) + sources], BLOCK)]
    models = {n: teacher_model(n, toks[n], seed) for seed, n in enumerate(sources, 1)}
    for n in sources:
        extract_topk(models[n], toks[n], chunks, out / n, k=K, block_size=BLOCK, token_budget=BUDGET,
                     shard_size=4096, source_name=n, progress=False)
    align_corpus(chunks, toks[target], {n: (toks[n], out / n) for n in sources}, out / "align", progress=False)
    return {"target": target, "sources": sources, "toks": toks, "chunks": chunks, "models": models,
            "dataset": FusionDataset(out / "align")}


def online_teachers(off, **kwargs):
    teachers = {n: LocalTeacher(off["models"][n], off["toks"][n], k=K, token_budget=BUDGET) for n in off["sources"]}
    return OnlineTeachers(teachers, off["toks"][off["target"]], pin_memory=False, **kwargs)


def assert_batches_equal(got, want):
    assert set(got) == set(want)
    for key in ("input_ids", "attention_mask", "labels", "source_weights", "source_ce"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(got[key].nan_to_num(-7.0), want[key].nan_to_num(-7.0)), key
        assert torch.equal(got[key].isnan(), want[key].isnan()), key
    for key in ("source_topk", "align_map"):
        for field, a, b in zip(got[key]._fields, got[key], want[key]):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{key}.{field}"
            assert torch.equal(a, b), f"{key}.{field}"


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce_norm", "token"])
def test_online_batch_equals_offline_batch(offline, fusion):
    ds = offline["dataset"]
    assert ds.sources == sorted(offline["sources"])
    want = ds.collator(pad_token_id=0, pin_memory=False, fusion=fusion)([ds[i] for i in range(len(ds))])
    teachers = online_teachers(offline, fusion=fusion, pad_token_id=0)
    assert teachers.sources == ds.sources
    got = teachers(want["input_ids"], want["attention_mask"])
    assert_batches_equal(got, want)
    # the test has teeth: every source is aligned at most positions, with real top-k rows and CEs
    assert (got["align_map"].pos >= 0).float().mean() > 0.5 * got["attention_mask"].float().mean()
    longer = got["attention_mask"].sum(1) > 6      # a chunk of one teacher token has no CE (NaN)
    assert longer.float().mean() > 0.5 and torch.isfinite(got["source_ce"][:, longer]).all()
    assert all(s["no_teacher"] == 0 for s in teachers.last_stats["teachers"].values())


def test_target_text_is_the_chunk_exactly(offline):
    """Target ids -> bytes by token surfaces gives back each chunk (no decode/re-encode)."""
    ds, text_of = offline["dataset"], TargetText(offline["toks"][offline["target"]])
    for i, chunk in enumerate(offline["chunks"]):
        text, ends = text_of(ds[i]["input_ids"].astype(np.int64))
        assert text == chunk
        assert ends[-1] == len(chunk.encode()) and (np.diff(ends) >= 0).all()


def test_no_teacher_rows_for_what_a_teacher_cannot_score(offline):
    """A sequence longer than a teacher's max_length, and bytes cut inside a UTF-8 character, get
    "no teacher" rows (never a wrong alignment); the other teacher still scores."""
    ds, toks = offline["dataset"], offline["toks"]
    first, second = offline["sources"]
    lens = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    long_i = int(np.argmax(lens))
    short_i = min((i for i in range(len(lens)) if 10 <= lens[i] < lens[long_i]), key=lens.__getitem__)
    teachers = {n: LocalTeacher(offline["models"][n], toks[n], k=K) for n in offline["sources"]}
    n_first = len(toks[first](offline["chunks"][long_i])["input_ids"])
    teachers[first] = LocalTeacher(offline["models"][first], toks[first], k=K, max_length=n_first - 1)
    online = OnlineTeachers(teachers, toks[offline["target"]], pin_memory=False, pad_token_id=0)
    full = online_teachers(offline, pad_token_id=0)
    want = ds.collator(pad_token_id=0, pin_memory=False)([ds[i] for i in (long_i, short_i)])
    got = online(want["input_ids"], want["attention_mask"])
    s1, s2 = online.sources.index(first), online.sources.index(second)
    assert (got["align_map"].pos[s1, 0] == -1).all() and got["source_ce"][s1, 0].isnan()
    assert (got["align_map"].pos[s2, 0] >= 0).any() and (got["align_map"].pos[s1, 1] >= 0).any()
    ref = full(want["input_ids"], want["attention_mask"])
    assert torch.equal(got["align_map"].pos[s2], ref["align_map"].pos[s2])
    assert online.last_stats["teachers"][first]["no_teacher"] == 1

    # a target sequence whose bytes stop being UTF-8 half-way: positions past the cut have no teacher
    tt = TargetText(toks[offline["target"]])
    surf = tt.offsets.surfaces
    partial = [i for i, b in enumerate(surf.bytes) if len(b) == 1 and b[0] >= 0xC0 and not surf.special[i]]
    if not partial:
        pytest.skip("no lone UTF-8 lead byte token in this vocabulary")
    ids = ds[short_i]["input_ids"].astype(np.int64)
    cut = len(ids) // 2
    bad = np.concatenate([ids[:cut], [partial[0]], ids[cut:]])
    text, ends = tt(bad)
    assert ends[cut] > len(text.encode())           # the lead byte is past the teachers' text
    got = full(torch.as_tensor(bad)[None], torch.ones(1, len(bad), dtype=torch.int64))
    pos = got["align_map"].pos[:, 0]
    assert (pos[:, cut - 1:] == -1).all()           # nothing predicts the cut token or anything after it
    assert (pos[:, : cut - 1] >= 0).any()


def test_bad_inputs_name_the_argument(offline):
    online = online_teachers(offline, pad_token_id=0)
    with pytest.raises(ValueError, match="attention_mask: row 0 is not right-padded"):
        online(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids: target ids must lie in"):
        online(torch.tensor([[5, 10 ** 7]]))
    with pytest.raises(ValueError, match="teachers: expected a non-empty"):
        OnlineTeachers({}, offline["toks"][offline["target"]])
    with pytest.raises(TypeError, match=r"teachers\['x'\]: expected a LocalTeacher"):
        OnlineTeachers({"x": object()}, offline["toks"][offline["target"]])


def test_trainer_with_online_teachers_gives_the_offline_loss(offline, tmp_path):
    """FusionTrainer(teachers=..., on_policy=0) on plain (input_ids, attention_mask) batches: the same loss
    and gradients as the offline batch without teachers."""
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    ds = offline["dataset"]
    want = ds.collator(pad_token_id=0, pin_memory=False)([ds[i] for i in range(6)])
    student = tiny_model(len(offline["toks"][offline["target"]]), "llama", 7).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", seed=0, disable_tqdm=True)
    results = []
    for teachers in (None, online_teachers(offline, pad_token_id=0)):
        trainer = FusionTrainer(model=student, args=args, teachers=teachers, lm_weight=0.5,
                                loss_kwargs={"divergence": "reverse_kl"})
        inputs = {k: want[k] for k in ("input_ids", "attention_mask")} if teachers is not None else want
        loss = trainer.compute_loss(student, trainer._prepare_inputs(inputs))
        results.append((loss.detach(), torch.autograd.grad(loss, list(student.parameters()))))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_vocab_maps_cached_on_disk_and_wider_input_columns(offline, tmp_path):
    ds = offline["dataset"]
    first = online_teachers(offline, pad_token_id=0, vocab_cache_dir=tmp_path, fusion="token")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == len(offline["sources"]) and all(f.endswith(".vocab.safetensors") for f in files)
    again = online_teachers(offline, pad_token_id=0, vocab_cache_dir=tmp_path, fusion="token")  # read back
    assert torch.equal(first.collator.vocab, again.collator.vocab)
    assert torch.equal(first.collator.vocab[0, : len(ds.store.vocab_map(ds.sources[0]).ids)],
                       torch.as_tensor(ds.store.vocab_map(ds.sources[0]).ids))
    # columns past every sequence's end (a batch padded wider than its longest row) are kept, as padding
    want = ds.collator(pad_token_id=0, pin_memory=False, fusion="token")([ds[i] for i in range(3)])
    B, T = want["input_ids"].shape
    wide = torch.nn.functional.pad(want["input_ids"], (0, 5)), torch.nn.functional.pad(want["attention_mask"], (0, 5))
    got = again(*wide)
    assert got["input_ids"].shape == (B, T + 5) and got["source_weights"].shape[-1] == T + 5
    assert torch.equal(got["input_ids"][:, :T], want["input_ids"]) and (got["labels"][:, T:] == -100).all()
    assert torch.equal(got["align_map"].pos[..., :T], want["align_map"].pos)
    assert (got["align_map"].pos[..., T:] == -1).all()
