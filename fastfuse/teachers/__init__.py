"""Layer 2, teachers: each source model's top-k next-token distributions, on disk.

shards             the shard format of one source (written atomically, read back validated)
rank_parts         one source written by several ranks, read back as one
resume_loop        rows that come from elsewhere (a server, vLLM) into resumable shards
local_extract      a local model reads the corpus once and keeps its top-k
served             the same from an OpenAI-compatible ``/v1/completions`` server
served_tokens      a server's token strings mapped back to the source tokenizer's ids
completion_client  the HTTP client of served teachers (bounded requests, retries, no secrets in messages)
vllm_outputs       vLLM's offline ``LLM.generate`` outputs into shards
"""
