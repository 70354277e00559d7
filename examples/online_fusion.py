"""Online and on-policy fusion in a plain PyTorch loop: no extraction, no shards.

    python examples/online_fusion.py [--steps 20] [--on-policy 0.5] [--divergence reverse_kl]
                                     [--server http://127.0.0.1:8000 --served-model NAME --served-tokenizer llama-spm]

The student (a tiny Llama over the Llama-2 SentencePiece vocabulary) trains on pydoc text. Two
teachers with other tokenizers (a tiny GPT-2 over GPT-2's byte-level BPE, a tiny Qwen2 over Qwen2's)
score every batch online through ``fastfuse.OnlineTeachers``; with ``--server`` a served model joins
them. A share ``--on-policy`` of the steps is on-policy (GKD's lambda): the student continues the
first ``--prompt-tokens`` tokens of each sequence, the teachers score its own tokens, and the loss is
the divergence alone on them (prompt tokens masked). The models are random (from configs) so the
script runs anywhere in seconds; swap in ``AutoModelForCausalLM.from_pretrained(...)`` and the
models' own tokenizers for real ones -- nothing else changes.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import torch


def tiny(kind: str, vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=256))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **small))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **small))


def batches(tok, texts: list[str], batch_size: int, length: int, seed: int):
    """Right-padded [B, T] batches of the texts' first ``length`` tokens, forever, shuffled."""
    seqs = [torch.tensor(tok(t)["input_ids"][:length]) for t in texts]
    rng = random.Random(seed)
    while True:
        rng.shuffle(seqs)
        for a in range(0, len(seqs) - batch_size + 1, batch_size):
            part = seqs[a:a + batch_size]
            ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(part):
                ids[b, :len(s)], mask[b, :len(s)] = s, 1
            yield ids, mask


def main(argv=None) -> dict:
    import fastfuse
    from fastfuse.corpus import python_docs
    from fastfuse.integrations.on_policy import on_policy_batch
    from fastfuse.tokenizer_files import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--on-policy", type=float, default=0.5, help="share of on-policy steps (GKD's lambda)")
    p.add_argument("--divergence", default="reverse_kl", choices=fastfuse.DIVERGENCES)
    p.add_argument("--lm-weight", type=float, default=0.3, help="CE weight of the off-policy steps (the demo's measured default)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=64, help="target tokens per training sequence")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--server", help="an OpenAI-compatible server as a third teacher")
    p.add_argument("--served-model")
    p.add_argument("--served-tokenizer", default="llama-spm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    student_tok = load_tokenizer("llama-spm")
    teachers = {"gpt2": fastfuse.LocalTeacher(tiny("gpt2", 50257, 1), load_tokenizer("gpt-2"), k=8),
                "qwen2": fastfuse.LocalTeacher(tiny("qwen2", 151936, 2), load_tokenizer("qwen2"), k=8)}
    if args.server:
        teachers["served"] = fastfuse.ServedTeacher(args.server, args.served_model,
                                                    load_tokenizer(args.served_tokenizer), k=8)
    online = fastfuse.OnlineTeachers(teachers, student_tok, fusion="min_ce_norm", pin_memory=False)
    student = tiny("llama", len(student_tok), 0).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    texts = python_docs()
    data = batches(student_tok, texts[:-8], args.batch_size, args.length, args.seed)
    rng = random.Random(args.seed)
    loss_kw = {"divergence": args.divergence, **({"beta": 0.5} if args.divergence == "jsd" else {}),
               **({"alpha": 0.1} if args.divergence.startswith("skew") else {})}
    log = []
    for step in range(args.steps):
        ids, mask = next(data)
        t0 = time.perf_counter()
        on = rng.random() < args.on_policy
        if on:     # the student's own continuations, scored by the teachers; prompt tokens masked
            batch = on_policy_batch(student, online, ids, mask, prompt_tokens=args.prompt_tokens,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        else:      # the batch's own text, scored by the teachers
            batch = online(ids, mask)
        t1 = time.perf_counter()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = fastfuse.fused_loss(logits, batch["source_topk"], batch["align_map"], batch["labels"],
                                   source_weights=batch["source_weights"],
                                   lm_weight=0.0 if on else args.lm_weight, **loss_kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        n = int((batch["labels"] != -100).sum())
        log.append({"step": step, "on_policy": on, "loss": float(loss.detach()), "tokens": n, "teacher_s": t1 - t0,
                    "student_s": t2 - t1})
        print(f"step {step:3d} {'on ' if on else 'off'}-policy loss {float(loss.detach()):.4f} on {n:4d} tokens  "
              f"teachers {t1 - t0:.3f} s  student {t2 - t1:.3f} s")
    # held-out CE per token of the student on texts it never saw
    student.eval()
    with torch.no_grad():
        ids, mask = next(batches(student_tok, texts[-8:], 8, args.length, 0))
        out = student(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    result = {"steps": log, "held_out_ce": float(out.loss)}
    print(f"held-out CE {result['held_out_ce']:.4f} nats/token (ln V = {math.log(len(student_tok)):.2f})")
    return result


if __name__ == "__main__":
    main()
