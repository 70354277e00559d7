"""Fuse real Hugging Face models: several teachers with different tokenizers into one student.

The whole recipe, each stage one ``fastfuse`` command (printed before it runs, so any stage can be
rerun by hand; every stage resumes or skips finished work):

    corpus.jsonl ({"text": ...} per line)
      1. fastfuse chunk     cut documents where the student's and every teacher's tokenizer fit --block-size
      2. torchrun ... fastfuse extract   per teacher: its top-k next-token log-probs (one process per GPU),
                            or fastfuse extract --server for a teacher behind vLLM / an OpenAI-compatible server
      3. fastfuse align     the student's tokenisation, each teacher's positions and vocabulary map
      4. torchrun examples/fuse_hf.py train   FusionTrainer (bf16 on GPUs; DDP, or FSDP2 with --fsdp)
      5. python examples/fuse_hf.py eval      held-out nats/token and bits/byte, before and after

Three 7-8B teachers of three tokenizer families into a 1B student on one machine with 8 GPUs:

    python examples/fuse_hf.py run --student ./llama-3.2-1b \\
        --teacher llama2=./llama-2-7b --teacher qwen=./qwen2.5-7b --teacher mistral=./mistral-7b \\
        --corpus corpus.jsonl --heldout heldout.jsonl --work run/ --nproc 8 --block-size 2048 --k 10 \\
        --batch-size 4 --grad-accum 8 --lr 1e-5 --epochs 1 --fsdp

CI (tests/integrations/test_fuse_hf_example.py) runs exactly this on tiny random models saved to disk with the real
tokenizers of four families, on CPU: only the model paths and sizes differ.

Loss settings: ``--lm-weight`` and ``--temperature`` default to the demo's measured defaults
(``fastfuse.demo.presets``, README "The demo"); ``--tail`` and ``--fusion`` to fastfuse's own defaults
(``"renormalize"``, FuseLLM's MinCE). FuseLLM itself used lm_weight 0.9 and temperature 1
(``FusionTrainer``'s defaults). See README "Fusing real models" for why and what to try next.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fastfuse.demo.presets import PRESETS

DEMO = PRESETS["small"]   # the demo's measured defaults for lm_weight and temperature


def sh(cmd: list[str], shown: list[str] | None = None) -> None:
    """Print the command as a user would type it, then run it (the same interpreter for python/torchrun)."""
    print("+ " + " ".join(shlex.quote(c) for c in (shown or cmd)), flush=True)
    subprocess.run(cmd, check=True)


def torchrun(nproc: int, *args: str) -> tuple[list[str], list[str]]:
    """(what runs, what is shown): ``torchrun --standalone --nproc-per-node N ARGS``."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return run, ["torchrun", "--standalone", f"--nproc-per-node={nproc}", *args]


def fastfuse(*args: str) -> tuple[list[str], list[str]]:
    return [sys.executable, "-m", "fastfuse", *args], ["fastfuse", *args]


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"fuse_hf.py: error: {flag}: expected NAME=VALUE, got {v!r}")
        if name in out:
            raise SystemExit(f"fuse_hf.py: error: {flag}: the name {name!r} is given twice")
        out[name] = rest
    return out


def run(a: argparse.Namespace) -> None:
    """The whole recipe, stage by stage."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    teachers = parse_pairs(a.teacher, "--teacher")            # name -> local model directory
    served = {n: v.split(",") for n, v in parse_pairs(a.served, "--served").items()}  # name -> URL,MODEL,TOKENIZER
    if any(len(v) != 3 for v in served.values()) or not teachers.keys().isdisjoint(served):
        raise SystemExit("fuse_hf.py: error: --served: expected NAME=URL,SERVED_MODEL,TOKENIZER with a new name")
    if not teachers and not served:
        raise SystemExit("fuse_hf.py: error: give at least one --teacher NAME=PATH or --served NAME=URL,MODEL,TOKENIZER")
    tokenizer_of = {**teachers, **{n: v[2] for n, v in served.items()}}
    chunks = str(work / "chunks.jsonl")
    block, k = str(a.block_size), str(a.k)
    # 1. chunk: every model will read the same text, at most --block-size tokens of each tokenizer
    sh(*fastfuse("chunk", "--tokenizers", a.student, *tokenizer_of.values(), "--input", *a.corpus,
                 "--block-size", block, "--out", chunks))
    # 2. extract: one torchrun per local teacher (each rank its share of the corpus), or a server
    for name, path in teachers.items():
        sh(*torchrun(a.nproc, "-m", "fastfuse", "extract", "--model", path, "--input", chunks,
                     "--out", str(work / "teachers" / name), "--k", k, "--block-size", block, "--quiet"))
    for name, (url, model, tok) in served.items():
        sh(*fastfuse("extract", "--server", url, "--served-model", model, "--tokenizer", tok, "--input", chunks,
                     "--out", str(work / "teachers" / name), "--k", k, "--block-size", block, "--quiet"))
    # 3. align: the student's tokenisation, each teacher's rows and vocabulary map, coverage printed
    sources = [f"{n}={t}:{work / 'teachers' / n}" for n, t in tokenizer_of.items()]
    sh(*fastfuse("align", "--target", a.student, *[x for s in sources for x in ("--source", s)], "--input", chunks,
                 "--out", str(work / "align"), "--workers", str(a.align_workers)))
    # 4. train the student with FusionTrainer, one process per GPU
    here = str(Path(__file__).resolve())
    options = ["--student", a.student, "--align", str(work / "align"), "--out", str(work / "student-fused"),
               "--lm-weight", str(a.lm_weight), "--temperature", str(a.temperature), "--tail", a.tail,
               "--fusion", a.fusion, "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
               "--lr", str(a.lr), "--epochs", str(a.epochs), "--steps", str(a.steps), "--seed", str(a.seed)]
    sh(*torchrun(a.nproc, here, "train", *options, *(["--fsdp"] if a.fsdp else [])))
    # 5. held-out evaluation of the student before and after
    if a.heldout:
        sh([sys.executable, here, "eval", "--heldout", a.heldout, "--block-size", block, "--json",
            str(work / "eval.json"), a.student, str(work / "student-fused")])


def train(a: argparse.Namespace) -> None:
    """One rank of the student's training (under torchrun; alone it is one process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from fastfuse import FusionDataset, FusionTrainer
    from fastfuse.corpus import pad_token_id

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(a.student)
    data = FusionDataset(a.align)
    collator = data.collator(pad_token_id(tok), fusion=None if a.fusion == "uniform" else a.fusion)
    # fp32 master weights; bf16 autocast on GPUs (Trainer's bf16=True)
    model = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    # activations of long sequences are recomputed in the backward on GPUs (under FSDP2 by its own wrapper)
    if a.fsdp:   # FSDP2: each decoder layer and the root fully sharded (Trainer's TRANSFORMER_BASED_WRAP)
        fsdp = dict(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True, "activation_checkpointing": cuda,
                                            "state_dict_type": "FULL_STATE_DICT"})
    else:
        fsdp = {}
        if cuda:
            model.gradient_checkpointing_enable()
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup, weight_decay=0.0,
        num_train_epochs=a.epochs, max_steps=a.steps if a.steps > 0 else -1, bf16=cuda, use_cpu=not cuda,
        ddp_find_unused_parameters=False, logging_steps=a.logging_steps, save_strategy="no", report_to=[], seed=a.seed,
        disable_tqdm=not sys.stderr.isatty(), **fsdp)
    trainer = FusionTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                            lm_weight=a.lm_weight, temperature=a.temperature, loss_kwargs={"tail": a.tail})
    if a.fsdp and trainer.accelerator.distributed_type.name != "FSDP":   # accelerate runs CPU processes as DDP
        raise SystemExit(f"fuse_hf.py: error: --fsdp: accelerate did not shard the model (it runs "
                         f"{trainer.accelerator.distributed_type.name}; FSDP needs GPUs); drop --fsdp for DDP")
    trainer.train()
    trainer.save_model(a.out)
    if trainer.is_world_process_zero():
        tok.save_pretrained(a.out)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        run = {"distributed_type": str(trainer.accelerator.distributed_type), "world_size": args.world_size}
        Path(a.out, "fusion_log.json").write_text(json.dumps({**run, "logs": logs}, indent=1) + "\n")


def evaluate(a: argparse.Namespace) -> None:
    """Held-out loss of each model: nats per token of its own tokenisation, and bits per UTF-8 byte
    (comparable across tokenizers): the documents cut into --block-size windows, every token after a
    window's first predicted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastfuse.corpus import iter_corpus

    texts = list(iter_corpus([Path(a.heldout)], "text"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = {}
    for path in a.models:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        nats = tokens = 0.0
        for text in texts:
            ids = tok(text, add_special_tokens=True)["input_ids"]
            for s in range(0, max(len(ids) - 1, 1), a.block_size):
                window = torch.tensor(ids[s:s + a.block_size + 1], device=device)[None]
                if window.shape[1] < 2:
                    continue
                with torch.no_grad():
                    logits = model(window[:, :-1]).logits.float()
                nats += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
                tokens += window.shape[1] - 1
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        figures[path] = {"nats_per_token": nats / tokens, "bits_per_byte": nats / math.log(2) / n_bytes,
                         "tokens": int(tokens)}
        print(f"{path}: {nats / tokens:.4f} nats/token, {nats / math.log(2) / n_bytes:.4f} bits/byte "
              f"({int(tokens)} tokens)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")


def add_loss_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm-weight", type=float, default=DEMO.lm_weight,
                   help=f"weight of the gold-token CE (default {DEMO.lm_weight}, the demo's measured default)")
    p.add_argument("--temperature", type=float, default=DEMO.temperature,
                   help=f"teacher temperature (default {DEMO.temperature}, the demo's measured default)")
    p.add_argument("--tail", default="renormalize", choices=["renormalize", "uniform", "bucket"],
                   help="what the teachers' mass outside their top-k means (default renormalize, fastfuse's)")
    p.add_argument("--fusion", default="min_ce", choices=["min_ce", "avg_ce", "uniform"],
                   help="per-sequence teacher weights (default min_ce, FuseLLM's and fastfuse's)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per GPU per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate, cosine schedule (default 1e-5)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the corpus (default 1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps instead of --epochs (0: use --epochs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully sharded) instead of DDP")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("run", help="the whole recipe, stage by stage")
    p.add_argument("--student", required=True, help="the student: a local Hugging Face model directory")
    p.add_argument("--teacher", action="append", metavar="NAME=PATH", help="a local teacher model (repeat)")
    p.add_argument("--served", action="append", metavar="NAME=URL,SERVED_MODEL,TOKENIZER",
                   help="a teacher behind an OpenAI-compatible server (repeat)")
    p.add_argument("--corpus", nargs="+", required=True, help='.jsonl files, {"text": ...} per line')
    p.add_argument("--heldout", default=None, help="held-out .jsonl for the evaluation (optional)")
    p.add_argument("--work", required=True, help="working directory (chunks, teachers/, align/, student-fused/)")
    p.add_argument("--nproc", type=int, default=max(1, _cuda_count()), help="processes (GPUs) per stage")
    p.add_argument("--block-size", type=int, default=2048, help="training sequence length in tokens")
    p.add_argument("--k", type=int, default=10, help="teacher log-probs kept per position (default 10)")
    p.add_argument("--align-workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="processes of fastfuse align")
    add_loss_flags(p)
    p.set_defaults(func=run)
    p = sub.add_parser("train", help="one rank of the training (under torchrun)")
    p.add_argument("--student", required=True)
    p.add_argument("--align", required=True, help="fastfuse align's output directory")
    p.add_argument("--out", required=True, help="where the trained student is saved")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 0)")
    p.add_argument("--logging-steps", type=int, default=1, help="log every N steps (default 1)")
    add_loss_flags(p)
    p.set_defaults(func=train)
    p = sub.add_parser("eval", help="held-out loss of one or more models")
    p.add_argument("models", nargs="+", help="model directories")
    p.add_argument("--heldout", required=True)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--json", default=None)
    p.set_defaults(func=evaluate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


if __name__ == "__main__":
    main()
