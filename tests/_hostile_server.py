"""A misbehaving OpenAI-compatible completions server on 127.0.0.1, in a thread (a real
``http.server``): well-formed vLLM-shaped replies (ids echoed, ``token_id:N`` strings) whose log-probs
depend on the prompt prefix alone (deterministic, no model), and, one per request from a queue, the
misbehaviours a hostile or broken server shows: drip-fed replies, huge bodies, impossible values,
server errors, echoes of the caller's secrets. Every misbehaviour ends by itself within ``MAX_S``."""
from __future__ import annotations

import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MAX_S = 20.0          # no reply from this server lasts longer, whatever the client does


def prefix_logprobs(ids: list[int], vocab: int) -> np.ndarray:
    """A log-softmax row that depends only on ``ids`` (the prefix): the "model"."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(ids, np.int64).tobytes()))
    z = rng.standard_normal(vocab) * 3.0
    return z - np.logaddexp.reduce(z)


def completion(ids: list[int], k: int, vocab: int) -> dict:
    """A vLLM-style choice: every prompt token echoed, entry j + 1 predicting token j + 1, plus one
    generated token, top-k as ``{"token_id:N": logprob}`` (the prompt token added when outside)."""
    rows = [prefix_logprobs(ids[:j + 1], vocab) for j in range(len(ids))]
    gen = int(np.argmax(rows[-1]))
    toks = list(ids) + [gen]
    top, tlp = [None], [None]
    for j in range(1, len(toks)):
        row = rows[j - 1]
        entry = {f"token_id:{int(t)}": float(row[t]) for t in np.argsort(-row, kind="stable")[:k]}
        entry[f"token_id:{toks[j]}"] = float(row[toks[j]])
        top.append(entry)
        tlp.append(float(row[toks[j]]))
    return {"index": 0, "finish_reason": "length",
            "logprobs": {"tokens": [f"token_id:{t}" for t in toks], "token_logprobs": tlp, "top_logprobs": top}}


def spoil(choice: dict, kind: str) -> str:
    """The JSON text of a reply whose values are impossible in the way ``kind`` names."""
    lp = choice["logprobs"]
    first = next(iter(lp["top_logprobs"][2]))
    if kind == "top_inf":
        lp["top_logprobs"][2][first] = float("inf")
    elif kind == "top_positive":
        lp["top_logprobs"][2][first] = 0.5
    elif kind == "top_huge":
        lp["top_logprobs"][2][first] = 1e6
    elif kind == "top_true":
        lp["top_logprobs"][2][first] = True
    elif kind == "top_tiny":
        lp["top_logprobs"][2][first] = -1e6            # float16 cannot hold it
    elif kind == "gold_inf":
        lp["token_logprobs"][2] = float("inf")
    elif kind == "gold_nan":
        lp["token_logprobs"][2] = float("nan")
    elif kind == "gold_abc":
        lp["token_logprobs"][2] = "abc"
    elif kind == "gold_dict":
        lp["token_logprobs"][2] = {"x": 1}
    else:
        raise ValueError(kind)
    return json.dumps({"choices": [choice]})           # Infinity / NaN: Python's json writes them


class HostileServer:
    """``with HostileServer(vocab) as s: ... s.url ...``; ``s.modes`` is consumed one per POST
    (then "ok"); ``s.calls`` counts POSTs, ``s.seen_auth`` the Authorization headers received."""

    def __init__(self, vocab: int, modes: list[str] | None = None, model: str = "stub"):
        self.vocab, self.modes, self.model = vocab, list(modes or []), model
        self.calls, self.seen_auth, self.lock = 0, [], threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, code: int, body: bytes, length: int | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.send(200, json.dumps({"data": [{"id": srv.model}]}).encode())

            def drip(self, data: bytes, every: float) -> None:
                t0 = time.monotonic()
                for i in range(len(data)):
                    if time.monotonic() - t0 > MAX_S:
                        return
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(every)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.calls += 1
                    srv.seen_auth.append(self.headers.get("Authorization"))
                    mode = srv.modes.pop(0) if srv.modes else "ok"
                try:
                    self.answer(req, mode)
                except (BrokenPipeError, ConnectionResetError):
                    pass                                   # the client gave up, as it should

            def answer(self, req: dict, mode: str) -> None:
                if isinstance(req["prompt"], str) or isinstance(req["prompt"][0], str):
                    return self.send(400, b'{"error": {"message": "this server takes token ids only"}}')
                ids = req["prompt"] if isinstance(req["prompt"][0], int) else req["prompt"][0]
                choice = completion(list(ids), int(req["logprobs"]), srv.vocab)
                body = json.dumps({"choices": [choice]}).encode()
                if mode == "ok":
                    return self.send(200, body)
                if mode == "drip":                         # headers now, then one byte every 0.5 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.flush()
                    return self.drip(body, 0.5)
                if mode == "drip_headers":                 # even the status line drips
                    return self.drip(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X: y\r\n" * 999,
                                     0.5)
                if mode == "huge":                         # no length; far more than any reply needs
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b" " * (1 << 20)
                    t0 = time.monotonic()
                    for _ in range(256):
                        if time.monotonic() - t0 > MAX_S:
                            break
                        self.wfile.write(chunk)
                    return
                if mode == "huge_length":
                    return self.send(200, body[:10], length=10 ** 12)
                if mode.startswith("status_"):             # an error status with a plain body
                    return self.send(int(mode[7:]), b'{"error": {"message": "Internal Server Error"}}')
                if mode == "echo_in_token":                # the key as a token string
                    choice["logprobs"]["top_logprobs"][2] = {str(self.headers.get("Authorization")): -0.1,
                                                             **choice["logprobs"]["top_logprobs"][2]}
                    return self.send(200, json.dumps({"choices": [choice]}).encode())
                if mode.startswith("echo_"):               # an error that quotes the request's headers
                    echo = json.dumps({"error": {"message": f"bad request; headers were: {dict(self.headers)}"}})
                    return self.send(int(mode[5:]), echo.encode())
                return self.send(200, spoil(choice, mode).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
