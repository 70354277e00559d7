"""Online teachers' cost per training step beside the student's step alone (CPU or GPU).

    python benchmarks/bench_online.py [--batch 4] [--length 256] [--hidden 256] [--layers 2] [--k 10]
                                      [--iters 5] [--threads 2] [--new-tokens 32] [--csv out.csv]

A student (Llama over the Llama-2 SentencePiece vocabulary) and two teachers of other tokenizers
(GPT-2 over GPT-2's byte-level BPE, Qwen2 over Qwen2's 152k vocabulary), all random from configs of
``--hidden`` x ``--layers``, on pydoc text: ``--batch`` sequences of ``--length`` target tokens.
Rows (median of ``--iters`` after one warm-up):

- ``student step``: forward, ``fused_loss``, backward and AdamW on a ready batch: the step alone;
- ``online teachers``: ``OnlineTeachers(ids, mask)`` end to end, and its stages from ``last_stats``:
  target ids -> text, the teachers' tokenisation, their forward + top-k, alignment + vocabulary map,
  the collator. ``share`` is each stage's fraction of the online call; the alignment's part
  (text + tokenize + align + collate) is what online fusion adds to offline extraction's forward;
- ``on-policy``: the student's ``generate`` of ``--new-tokens`` per sequence, then the teachers.
- ``--overlap``: ``--iters`` training steps with the teachers before each student step, then with
  the next batch's teachers in a background thread (:func:`fastfuse.batches.online_overlap.prefetch`); with
  ``--served`` also for a served teacher alone (a tiny Llama behind llama-cpp-python's server on
  loopback, tests/_llama_server.py), whose work leaves this process.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import harness


def models(hidden: int, layers: int, sizes: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                  max_position_embeddings=1024)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=sizes["llama-spm"], **common))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=sizes["gpt-2"], n_embd=hidden, n_layer=layers,
                                      n_head=max(1, hidden // 64), n_positions=1024))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=sizes["qwen2"], **common))
    return student, gpt2, qwen


def batch_of(tok, texts, B: int, T: int):
    import torch

    seqs = []
    for t in texts:
        ids = tok(t)["input_ids"]
        if len(ids) >= T:
            seqs.append(ids[:T])
        if len(seqs) == B:
            break
    ids = torch.tensor(seqs)
    return ids, torch.ones_like(ids)


def median_s(fn, iters: int) -> tuple[float, object]:
    out = fn()              # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def overlap_rows(label: str, teachers, student_step, ids, mask, iters: int) -> list[dict]:
    """ms per training step: teachers then student, and teachers prefetched beside the student."""
    from fastfuse.batches.online_overlap import prefetch

    items = [(ids, mask)] * iters
    student_step(teachers(ids, mask))      # warm-up: the optimizer's state, the first calls

    ready = teachers(ids, mask)

    def timed(fn):
        def run():
            t, c = time.perf_counter(), time.process_time()
            fn()
            return (time.perf_counter() - t) / iters, (time.process_time() - c) / iters
        return run

    modes = {
        "teachers alone": timed(lambda: [teachers(*item) for item in items]),
        "student alone": timed(lambda: [student_step(ready) for _ in items]),
        "step, teachers then student": timed(lambda: [student_step(teachers(*item)) for item in items]),
        "step, next batch's teachers in a background thread":
            timed(lambda: [student_step(batch) for _, batch in prefetch(teachers, items)]),
    }
    rounds = [{name: fn() for name, fn in modes.items()} for _ in range(2)]   # interleaved: the load drifts
    med = {name: tuple(statistics.median(r[name][j] for r in rounds) for j in (0, 1)) for name in modes}
    seq = med["step, teachers then student"][0]
    return [{"what": f"{label}: {name}", "ms": 1e3 * wall, "tokens_per_s": ids.numel() / wall,
             "share": f"{wall / seq:.2f}x the sequential step; CPU {1e3 * cpu:.0f} ms"}
            for name, (wall, cpu) in med.items()]


def served_teachers(k: int, target_tok, stack):
    """A tiny Llama served by llama-cpp-python on loopback, as the only online teacher."""
    import tempfile

    sys.path.insert(0, os.path.join(harness.ROOT, "tests"))
    from _llama_server import MODEL_ALIAS, llama_server, tiny_llama, write_gguf

    import fastfuse
    from fastfuse.tokenizer_files import gguf_path, load_tokenizer

    tok = load_tokenizer("llama-spm")
    d = stack.enter_context(tempfile.TemporaryDirectory())
    write_gguf(tiny_llama(tok), str(gguf_path("llama-spm")), os.path.join(d, "tiny.gguf"))
    url = stack.enter_context(llama_server(os.path.join(d, "tiny.gguf")))
    return fastfuse.OnlineTeachers({"served": fastfuse.ServedTeacher(url, MODEL_ALIAS, tok, k=k, timeout=600)},
                                   target_tok, pin_memory=False)


def run(batch=4, length=256, hidden=256, layers=2, k=10, iters=5, threads=2, new_tokens=32, overlap=False,
        served=False) -> list[dict]:
    import torch

    import fastfuse
    from fastfuse.corpus import python_docs
    from fastfuse.integrations.on_policy import on_policy_batch
    from fastfuse.tokenizer_files import load_tokenizer

    torch.set_num_threads(threads)
    toks = {n: load_tokenizer(n) for n in ("llama-spm", "gpt-2", "qwen2")}
    student, gpt2, qwen = models(hidden, layers, {n: len(t) for n, t in toks.items()})
    online = fastfuse.OnlineTeachers({"gpt2": fastfuse.LocalTeacher(gpt2, toks["gpt-2"], k=k, device="cpu"),
                                      "qwen2": fastfuse.LocalTeacher(qwen, toks["qwen2"], k=k, device="cpu")},
                                     toks["llama-spm"], pin_memory=False)
    ids, mask = batch_of(toks["llama-spm"], python_docs(), batch, length)
    tokens = ids.numel()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ready = online(ids, mask)

    def step_on(b):
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = fastfuse.fused_loss(logits, b["source_topk"], b["align_map"], b["labels"],
                                   source_weights=b["source_weights"], lm_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def student_step():
        step_on(ready)

    stages: list[dict] = []

    def teachers_call():
        out = online(ids, mask)
        stages.append(dict(online.last_stats["seconds"]))
        return out

    if overlap:
        import contextlib

        rows = overlap_rows("2 local teachers", online, step_on, ids, mask, iters)
        if served:
            with contextlib.ExitStack() as stack:
                rows += overlap_rows("1 served teacher", served_teachers(k, toks["llama-spm"], stack), step_on,
                                     ids[:, :128], mask[:, :128], iters)
        return rows
    t_student, _ = median_s(student_step, iters)
    t_online, _ = median_s(teachers_call, iters)
    med = {key: statistics.median(s[key] for s in stages[1:]) for key in stages[0]}
    rows = [{"what": "student step (forward + loss + backward + AdamW)", "ms": 1e3 * t_student,
             "tokens_per_s": tokens / t_student, "share": ""},
            {"what": "online teachers, end to end (2 teachers)", "ms": 1e3 * t_online,
             "tokens_per_s": tokens / t_online, "share": f"{t_online / t_student:.2f}x the student step"}]
    names = {"text": "  target ids -> text (token surfaces)", "tokenize": "  teachers' tokenisation + byte offsets",
             "teacher": "  teachers' forward + top-k", "align": "  byte-span alignment",
             "collate": "  collator (vocab maps, weights, padding)"}
    for key, label in names.items():
        rows.append({"what": label, "ms": 1e3 * med[key], "tokens_per_s": "", "share": f"{med[key] / t_online:.1%}"})
    added = sum(med[key] for key in ("text", "tokenize", "align", "collate"))
    rows.append({"what": "  all but the forward (what online adds to extraction's work)", "ms": 1e3 * added,
                 "tokens_per_s": "", "share": f"{added / t_online:.1%}"})
    prompt = min(length // 2, 64)

    def on_policy():
        return on_policy_batch(student, online, ids, mask, prompt_tokens=prompt, max_new_tokens=new_tokens)

    t_on, _ = median_s(on_policy, max(1, iters // 2))
    rows.append({"what": f"on-policy batch (generate {new_tokens} tokens after {prompt}, then the teachers)",
                 "ms": 1e3 * t_on, "tokens_per_s": "", "share": f"{t_on / t_student:.2f}x the student step"})
    return rows


def main(argv=None) -> int:
    ap = harness.parser(__doc__, cuda=False)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, --tiny 2)")
    ap.add_argument("--length", type=int, default=None, help="student tokens per sequence (default 256, --tiny 32)")
    ap.add_argument("--hidden", type=int, default=None, help="every model's width (default 256, --tiny 32)")
    ap.add_argument("--layers", type=int, default=None, help="every model's depth (default 2, --tiny 1)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=None, help="on-policy tokens (default 32, --tiny 4)")
    ap.add_argument("--overlap", action="store_true", help="sequential vs prefetched steps instead")
    ap.add_argument("--served", action="store_true", help="with --overlap: also a served teacher")
    a = ap.parse_args(argv)
    _, iters = harness.iterations(a, full=(1, 5), quick=(1, 3))
    tiny = a.tiny
    shape = dict(B=a.batch or (2 if tiny else 4), T=a.length or (32 if tiny else 256),
                 hidden=a.hidden or (32 if tiny else 256), layers=a.layers or (1 if tiny else 2))
    rows = run(shape["B"], shape["T"], shape["hidden"], shape["layers"], a.k, iters, a.threads,
               a.new_tokens or (4 if tiny else 32), a.overlap, a.served)
    with harness.Results(a.csv) as res:
        for r in rows:
            note = {"share": r["share"]} if r["share"] else {}
            res.add("online teachers", r["what"].strip(), "time", "ms", shape, r["ms"], **note)
            if r["tokens_per_s"] != "":
                res.add("online teachers", r["what"].strip(), "throughput", "tok/s", shape, r["tokens_per_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
