"""Served extraction beside local extraction of the same tiny model on CPU: tokens/s and bytes/token.

    python benchmarks/bench_served.py [--docs 16] [--chars 1000] [--block-size 512] [--k 10]
                                      [--concurrency 1 2 4] [--threads 2] [--quick | --tiny] [--csv out.csv]

A random Llama (hidden 32, 2 layers, the llama-spm vocabulary; tests/_llama_server.py) is written
as GGUF and served by llama-cpp-python's OpenAI-compatible server on loopback (``--logits_all``).
``fastfuse.extract_served`` reads the first ``--docs`` pydoc topics, each cut to ``--chars``
characters (one sequence each: this server takes text and tokenises each prompt whole), through it
at each ``--concurrency``; ``fastfuse.extract_topk`` reads the same sequences with the same weights
in this process. Rows: tokens/s, seconds, bytes per token of the shards. llama-cpp-python's server
sorts the whole vocabulary in Python at every prompt position and runs one request at a time, so
its rows measure that server; the client's own cost is the last row's (a loopback endpoint that
answers each prompt at once from replies computed beforehand, vLLM's shape with token ids).
``--tiny``: 2 documents of 300 characters at concurrency 1 (``--quick``: 8 documents, 1 and 4).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import harness

sys.path.insert(0, os.path.join(harness.ROOT, "tests"))


def run(docs=16, chars=1000, block_size=512, k=10, concurrency=(1, 2, 4), threads=2) -> list[dict]:
    """One dict per provider and concurrency: provider, concurrency, tokens, seconds, tokens_per_s,
    bytes_per_token, rows_without_teacher."""
    import torch

    from _llama_server import MODEL_ALIAS, llama_server, tiny_llama, write_gguf
    from fastfuse.corpus import python_docs
    from fastfuse.teachers.local_extract import extract_topk
    from fastfuse.teachers.served import extract_served
    from fastfuse.tokenizer_files import gguf_path, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer("llama-spm")
    model = tiny_llama(tok)
    texts = [t[:chars] for t in python_docs(docs)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        g = os.path.join(d, "tiny.gguf")
        write_gguf(model, str(gguf_path("llama-spm")), g)
        t0 = time.perf_counter()
        st = extract_topk(model, tok, texts, os.path.join(d, "local"), k=k, block_size=block_size,
                          token_budget=4 * block_size, shard_size=64, device="cpu", progress=False)
        rows.append({"provider": "local extract_topk (torch, this process)", "concurrency": "-",
                     "tokens": st["tokens"], "seconds": time.perf_counter() - t0,
                     "tokens_per_s": st["tokens_per_s"], "bytes_per_token": st["bytes_per_token"],
                     "rows_without_teacher": 0})
        with llama_server(g, threads=threads) as url:
            for c in concurrency:
                out = os.path.join(d, f"served-{c}")
                t0 = time.perf_counter()
                st = extract_served(url, MODEL_ALIAS, tok, texts, out, k=k, block_size=block_size, shard_size=64,
                                    concurrency=c, progress=False)
                rows.append({"provider": "llama-cpp-python server (loopback)", "concurrency": c,
                             "tokens": st["tokens"], "seconds": time.perf_counter() - t0,
                             "tokens_per_s": st["tokens_per_s"], "bytes_per_token": st["bytes_per_token"],
                             "rows_without_teacher": st["rows_without_teacher"]})
        rows.append(stub_row(tok, model, texts, d, block_size, k))
    return rows


def stub_row(tok, model, texts, d, block_size, k) -> dict:
    """The client alone: a loopback endpoint that answers each prompt instantly from replies
    computed beforehand (tests/teachers/test_served.py's vLLM shape, token ids)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np
    import torch

    from fastfuse.corpus import source_sequences
    from fastfuse.teachers.served import extract_served

    replies = {}
    for s, _ in source_sequences(tok, texts, block_size):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0].float(), -1).numpy()
        ids = s.input_ids.tolist()
        top = np.argsort(-lp, axis=1)[:, :k]
        entries = [None] + [{f"token_id:{int(t)}": float(lp[j - 1, t]) for t in top[j - 1]} for j in range(1, len(ids))]
        entries.append({f"token_id:{int(t)}": float(lp[-1, t]) for t in top[-1]})
        tlp = [None] + [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))] + [float(lp[-1, top[-1, 0]])]
        body = {"choices": [{"index": 0, "logprobs": {"tokens": [f"token_id:{t}" for t in ids + [int(top[-1, 0])]],
                                                      "token_logprobs": tlp, "top_logprobs": entries}}]}
        replies[tuple(ids)] = json.dumps(body).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def do_POST(self):
            body = replies[tuple(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"])]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        st = extract_served(f"http://127.0.0.1:{srv.server_address[1]}", "stub", tok, texts, os.path.join(d, "stub"),
                            k=k, block_size=block_size, shard_size=64, concurrency=4, progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    return {"provider": "client only (instant loopback stub)", "concurrency": 4, "tokens": st["tokens"],
            "seconds": time.perf_counter() - t0, "tokens_per_s": st["tokens_per_s"],
            "bytes_per_token": st["bytes_per_token"], "rows_without_teacher": st["rows_without_teacher"]}


def main(argv=None) -> int:
    ap = harness.parser(__doc__, cuda=False)
    ap.add_argument("--docs", type=int, default=None, help="default 16 (--quick: 8, --tiny: 2)")
    ap.add_argument("--chars", type=int, default=None, help="default 1000 (--tiny: 300)")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 2 4")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    conc = a.concurrency or ([1] if a.tiny else [1, 4] if a.quick else [1, 2, 4])
    rows = run(a.docs or (2 if a.tiny else 8 if a.quick else 16), a.chars or (300 if a.tiny else 1000), a.block_size,
               a.k, conc, a.threads)
    with harness.Results(a.csv) as res:
        for r in rows:
            x = dict(concurrency=r["concurrency"], tokens=r["tokens"])
            res.add("extract_served", r["provider"], "time", "s", x, r["seconds"],
                    rows_without_teacher=r["rows_without_teacher"])
            res.add("extract_served", r["provider"], "throughput", "tok/s", x, r["tokens_per_s"])
            res.add("extract_served", r["provider"], "bytes_per_token", "B", x, r["bytes_per_token"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
