"""Test and benchmark helper: a tiny random Llama written as GGUF, served by llama-cpp-python's
OpenAI-compatible server on loopback (a real server process; always stopped)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

MODEL_ALIAS = "tiny-llama"


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random Llama over ``tokenizer``'s vocabulary with peaked next-token distributions. Byte-fallback
    and control tokens get zero output rows: a trained SentencePiece model gives them next to nothing,
    and a server that names tokens by text cannot tell ``<0x61>`` from ``a`` (fastfuse.teachers.served_tokens)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    quiet = [i for t, i in vocab.items() if (t.startswith("<0x") and t.endswith(">")) or t in ("<unk>", "<s>", "</s>")]
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w.mul_(40.0)
        w[quiet] = 0.0
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout of q/k rows -> GGUF's (as llama.cpp's convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, vocab_gguf: str, path: str) -> None:
    """``model`` (LlamaForCausalLM, fp32) as a GGUF file; the tokenizer fields are copied from the
    vocabulary-only GGUF of the same tokenizer (fastfuse.tokenizer_files.gguf_path)."""
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    reader = gguf.GGUFReader(vocab_gguf)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            types = field.types
            w.add_key_value(key, field.contents(), types[0], types[1] if len(types) > 1 else None)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf_path: str, api_key: str | None = None, startup_timeout: float = 120.0, threads: int = 2):
    """Start ``python -m llama_cpp.server`` on 127.0.0.1 with all logits kept; yield its base URL;
    always stop it. Raises (never skips) when llama-cpp-python is missing or the server does not come up."""
    import llama_cpp.server  # noqa: F401  (an ImportError here is a failure: CI installs it)

    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1", "--port", str(port),
           "--logits_all", "true", "--n_ctx", "512", "--n_batch", "512", "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--model_alias", MODEL_ALIAS, "--verbose", "false"]
    if api_key:
        cmd += ["--api_key", api_key]
    log = open(gguf_path + f".server-{port}.log", "w+b")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: {log.read()[-3000:].decode()}")
            try:
                urllib.request.urlopen(url + "/v1/models" if not api_key else url + "/docs", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not answer on {url} within {startup_timeout} s")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()
