"""On-policy fusion (fastfuse.integrations.on_policy, FusionTrainer(teachers=, on_policy=)): a GPT-2-tokenizer
student continues its prompts, two local teachers of other tokenizers (Qwen2, MPT) and one served
teacher (a real llama-cpp-python server process on loopback, Llama-2 SentencePiece) score its tokens;
the step's loss is finite, gradients reach the student only, and the teachers stay frozen in eval mode.
Also: the served teacher online gives the offline served pipeline's batch exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _llama_server import MODEL_ALIAS, llama_server, tiny_llama, write_gguf
from fastfuse.batches.online import OnlineTeachers
from fastfuse.loss.spec import DIVERGENCES
from fastfuse.integrations.on_policy import OnPolicy, on_policy_batch
from fastfuse.teachers.online_teachers import LocalTeacher, ServedTeacher

pytestmark = pytest.mark.slow       # real teachers (a served one too) and training steps: 3-8 s a test
K = 5
STUDENT = "gpt-2"
PROMPT, NEW = 8, 10


def gpt2(vocab_size, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama(vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_tokenizer, vocab_dir):
    tok = real_tokenizer("llama-spm")
    d = tmp_path_factory.mktemp("online-served")
    write_gguf(tiny_llama(tok), str(vocab_dir / "ggml-vocab-llama-spm.gguf"), str(d / "tiny.gguf"))
    with llama_server(str(d / "tiny.gguf")) as url:
        yield url


@pytest.fixture(scope="module")
def teachers(server, real_tokenizer):
    qwen, mpt, spm = (real_tokenizer(n) for n in ("qwen2", "mpt", "llama-spm"))
    local = {"qwen": LocalTeacher(llama(len(qwen), 1).train(), qwen, k=K),    # .train(): the teacher must undo it
             "mpt": LocalTeacher(gpt2(len(mpt), 2), mpt, k=K)}
    served = ServedTeacher(server, MODEL_ALIAS, spm, k=K, timeout=60, max_retries=1, concurrency=2)
    return OnlineTeachers({**local, "served": served}, real_tokenizer(STUDENT), fusion="avg_ce", pin_memory=False)


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok, texts):
        self.items = [np.asarray(tok(t)["input_ids"][:24], np.int64) for t in texts]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def pad(examples):
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        ids[b, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        mask[b, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def teacher_models(teachers):
    return [t.model for t in teachers.teachers if hasattr(t, "model")]


def test_served_teacher_scores_the_batch_text(teachers, real_tokenizer, corpus):
    """Off-policy, through all three teachers: the server scores every sequence of plain text."""
    batch = pad([Texts(real_tokenizer(STUDENT), [corpus[i][:200] for i in (0, 2)])[i] for i in range(2)])
    out = teachers(batch["input_ids"], batch["attention_mask"])
    assert all(s["no_teacher"] == 0 for s in teachers.last_stats["teachers"].values()), teachers.last_stats
    s = teachers.sources.index("served")
    assert (out["align_map"].pos[s] >= 0).float().mean() > 0.5 and torch.isfinite(out["source_ce"][s]).all()


def test_on_policy_batch_masks_the_prompt(teachers, real_tokenizer, corpus):
    tok = real_tokenizer(STUDENT)
    data = Texts(tok, [corpus[i][:200] for i in (0, 2, 3)])
    batch = pad([data[i] for i in range(3)])
    torch.manual_seed(0)
    student = gpt2(len(tok), 0)
    out = on_policy_batch(student, teachers, batch["input_ids"], batch["attention_mask"], prompt_tokens=PROMPT,
                          max_new_tokens=NEW, temperature=1.0)
    ids, labels, mask = out["input_ids"], out["labels"], out["attention_mask"]
    assert torch.equal(ids[:, :PROMPT], batch["input_ids"][:, :PROMPT])                  # the prompts, then samples
    assert (mask.sum(1) > PROMPT).all() and (mask.sum(1) <= PROMPT + NEW).all()
    assert (labels[:, : PROMPT - 1] == -100).all()                                      # prompt tokens masked
    taught = (out["align_map"].pos >= 0).any(0)
    assert not ((labels != -100) & ~taught).any()                                       # no teacher, no loss
    assert (labels[:, PROMPT - 1:] != -100).any()                                        # samples are scored
    with pytest.raises(ValueError, match="max_new_tokens"):
        on_policy_batch(student, teachers, batch["input_ids"], max_new_tokens=0)
    with pytest.raises(ValueError, match="on_policy: expected a fraction"):
        OnPolicy(teachers, fraction=1.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)       # every divergence of the family, at its default mix
def test_on_policy_training_step(teachers, real_tokenizer, corpus, tmp_path, divergence):
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    tok = real_tokenizer(STUDENT)
    student = gpt2(len(tok), 0).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", seed=0, disable_tqdm=True, per_device_train_batch_size=2,
                             max_steps=2, learning_rate=1e-2, logging_steps=1)
    trainer = FusionTrainer(model=student, args=args, train_dataset=Texts(tok, [corpus[i][:200] for i in range(4)]),
                            data_collator=pad, teachers=teachers, on_policy=1.0,
                            on_policy_kwargs=dict(prompt_tokens=PROMPT, max_new_tokens=NEW, temperature=1.0),
                            loss_kwargs={"divergence": divergence})
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(student, inputs)
    assert trainer.online.counts == {"on_policy": 1, "off_policy": 0}
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for m in teacher_models(teachers):
        assert not m.training and all(p.grad is None and not p.requires_grad for p in m.parameters())
    if divergence != "reverse_kl":          # the end-to-end run once (GKD's usual choice)
        return
    before = [p.detach().clone() for m in teacher_models(teachers) for p in m.parameters()]
    student.zero_grad()
    result = trainer.train()                                    # two on-policy optimizer steps, end to end
    assert math.isfinite(result.training_loss) and trainer.online.counts["on_policy"] == 3
    after = [p for m in teacher_models(teachers) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(not m.training for m in teacher_models(teachers))


def test_on_policy_needs_teachers(tmp_path):
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="on_policy: needs teachers="):
        FusionTrainer(model=gpt2(64, 0), args=args, on_policy=0.5)


def test_served_online_equals_served_offline(server, real_tokenizer, corpus, tmp_path):
    """The served teacher online gives the batch of extract_served -> align_corpus -> FusionDataset."""
    from fastfuse.align.chunking import split_corpus
    from fastfuse.batches.corpus_align import align_corpus
    from fastfuse.batches.dataset import FusionDataset
    from fastfuse.teachers.served import extract_served

    tgt, spm = real_tokenizer(STUDENT), real_tokenizer("llama-spm")
    texts = [c for _, c in split_corpus([corpus[i][:120] for i in (0, 2)], [tgt, spm], 96)]
    extract_served(server, MODEL_ALIAS, spm, texts, tmp_path / "served", k=K, block_size=96, concurrency=1,
                   timeout=60, progress=False)
    align_corpus(texts, tgt, {"served": (spm, tmp_path / "served")}, tmp_path / "align", progress=False)
    ds = FusionDataset(tmp_path / "align")
    want = ds.collator(pad_token_id=0, pin_memory=False)([ds[i] for i in range(len(ds))])
    online = OnlineTeachers({"served": ServedTeacher(server, MODEL_ALIAS, spm, k=K, timeout=60, concurrency=1)}, tgt,
                            pad_token_id=0, pin_memory=False)
    got = online(want["input_ids"], want["attention_mask"])
    for key in ("input_ids", "attention_mask", "labels", "source_weights"):
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(got["source_ce"], want["source_ce"], rtol=0, atol=0, equal_nan=True)
    for key in ("source_topk", "align_map"):
        for a, b in zip(got[key], want[key]):
            assert torch.equal(a, b), key
    assert (got["align_map"].pos >= 0).float().mean() > 0.5 * got["attention_mask"].float().mean()
    # the server hides the prediction after BOS: that row is "no teacher" online as offline
    assert (got["source_topk"].ids[0, :, 0] == -1).all()


def test_served_teacher_refusals_are_no_teacher_rows(server, real_tokenizer, corpus):
    """A served teacher that tokenises the text otherwise (here: told the wrong tokenizer), or a sequence
    over its max_length, gives "no teacher" rows -- never an alignment of the wrong tokens."""
    tgt = real_tokenizer(STUDENT)
    batch = pad([Texts(tgt, [corpus[i][:120] for i in (0, 2)])[i] for i in range(2)])
    wrong = ServedTeacher(server, MODEL_ALIAS, real_tokenizer("mpt"), k=K, timeout=60, max_retries=0)
    online = OnlineTeachers({"served": wrong}, tgt, pin_memory=False)
    with pytest.warns(RuntimeWarning, match="refused or tokenised otherwise all 2 sequences"):
        out = online(batch["input_ids"], batch["attention_mask"])
    assert (out["align_map"].pos == -1).all() and out["source_ce"].isnan().all() and wrong.refused == 2
    short = ServedTeacher(server, MODEL_ALIAS, real_tokenizer("llama-spm"), k=K, timeout=60, max_length=3)
    online = OnlineTeachers({"served": short}, tgt, pin_memory=False)
    out = online(batch["input_ids"], batch["attention_mask"])       # nothing sent: too long for max_length
    assert (out["align_map"].pos == -1).all() and online.last_stats["teachers"]["served"]["no_teacher"] == 2
