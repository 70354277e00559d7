"""The demo's text: Python's documentation (prose) and standard library (code), split into held-out,
fusion and source pre-training sets, and documents cut into padded model inputs."""
from __future__ import annotations

import random
from dataclasses import dataclass

from fastfuse.corpus import cut_text, python_code, python_docs, special_tokens
from fastfuse.demo.presets import DOMAINS, SOURCES, Preset


@dataclass
class DemoCorpus:
    """The demo's text, split by document into four disjoint sets: ``heldout`` and ``fusion`` (domain ->
    documents), ``sources`` (source name -> its pre-training documents) and ``train`` (every document
    but the held-out ones: what the models' vocabulary rows are built from)."""
    heldout: dict[str, list[str]]
    fusion: dict[str, list[str]]
    sources: dict[str, list[str]]

    @property
    def train(self) -> list[str]:
        return [d for docs in (*self.fusion.values(), *self.sources.values()) for d in docs]

    def fusion_docs(self) -> tuple[list[str], list[str]]:
        """The fusion corpus as one document list (domains interleaved, deterministic) and each document's domain."""
        tagged = [(d, dom) for dom, docs in self.fusion.items() for d in docs]
        random.Random(len(tagged)).shuffle(tagged)
        return [d for d, _ in tagged], [dom for _, dom in tagged]


def take(pool: list[str], chars: int, max_len: int = 8000) -> tuple[list[str], list[str]]:
    """Documents of at most ``max_len`` characters from the front of ``pool`` until they hold ``chars``
    characters; returns (taken, the rest of the pool in order)."""
    taken, rest, n = [], [], 0
    for d in pool:
        if n < chars and len(d) <= max_len:
            taken.append(d)
            n += len(d)
        else:
            rest.append(d)
    return taken, rest


def load_corpus(seed: int, preset: Preset) -> DemoCorpus:
    """Prose (``pydoc_data.topics``) and code (the standard library's modules) shuffled with ``seed``,
    then cut into held-out and fusion documents per domain and each source's pre-training text:
    ``src_chars`` characters, ``1 - src_mix`` of them from its own domain (``SOURCES``)."""
    # some topics share one text ("Exceptions", "exceptions"): deduplicate, or it lands on two sides;
    # long topics are cut at paragraphs like the code at top-level statements (documents of ~4000 chars)
    prose = [p for d in dict.fromkeys(python_docs()) for p in cut_text(d, 4000) if p.strip()]
    pools = {"prose": prose, "code": python_code(doc_chars=4000)}
    rng = random.Random(seed)
    for dom in DOMAINS:
        rng.shuffle(pools[dom])
    heldout, fusion = {}, {}
    for dom in DOMAINS:
        heldout[dom], pools[dom] = take(pools[dom], preset.heldout_chars)
        fusion[dom], pools[dom] = take(pools[dom], preset.fuse_chars)
    sources = {}
    for name, (_, own) in SOURCES.items():
        docs = []
        for dom in DOMAINS:
            want = preset.src_chars * ((1 - preset.src_mix) if dom == own else preset.src_mix / (len(DOMAINS) - 1))
            got, pools[dom] = take(pools[dom], int(want))
            if sum(map(len, got)) < 0.9 * want:
                raise ValueError(f"src_chars: source {name} wants {int(want)} characters of {dom}, only "
                                 f"{sum(map(len, got))} are left after the held-out and fusion text")
            docs += got
        sources[name] = docs
    return DemoCorpus(heldout, fusion, sources)


def windows(tokenizer, docs: list[str], block_size: int) -> tuple[list[list[int]], int]:
    """Each document cut into model inputs of <= ``block_size`` tokens; returns (inputs, bytes predicted).

    Input ``t`` predicts input ``t+1``. With a BOS prefix every text token is predicted; without
    one, a document's first token is context only, and each later window starts with the last
    token of the previous one (context again), so no other token is skipped."""
    prefix, _ = special_tokens(tokenizer)
    cap = block_size - len(prefix)
    inputs, nbytes = [], 0
    for doc in docs:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        nbytes += len(doc.encode("utf-8"))
        if not prefix:
            nbytes -= len(doc[: offs[0][1]].encode("utf-8"))  # the first token is never predicted
        a = 0
        while True:
            b = min(a + cap, len(ids))
            inputs.append(list(prefix) + ids[a:b])
            if b == len(ids):
                break
            a = b if prefix else b - 1
    return inputs, nbytes


def pad_batch(inputs: list[list[int]], pad_id: int):
    """[B, T] input ids, attention mask and shifted labels (-100 where nothing is predicted)."""
    import torch

    T = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(inputs), T), dtype=torch.long)
    labels = torch.full((len(inputs), T), -100, dtype=torch.long)
    for i, seq in enumerate(inputs):
        x = torch.as_tensor(seq)
        ids[i, : len(x)] = x
        att[i, : len(x)] = 1
        labels[i, : len(x) - 1] = x[1:]
    return ids, att, labels
