"""The demo's text: the train / held-out split of Python's docs, the sources' halves, the fusion
corpus, and documents cut into padded model inputs."""
from __future__ import annotations

import random

from fastfuse.corpus import python_docs, special_tokens


def load_corpus(seed: int, heldout_chars: int, max_train_chars: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of ``pydoc_data.topics``, split by document, deterministically.

    Documents are shuffled with ``seed``; held-out takes documents of at most 20000 characters
    until it holds ``heldout_chars``; train the rest (if ``max_train_chars`` > 0, only documents
    of at most a quarter of it, until it is reached)."""
    # some topics share one text ("Exceptions", "exceptions"): deduplicate, or it lands on both sides
    docs = list(dict.fromkeys(d for d in python_docs() if d.strip()))
    random.Random(seed).shuffle(docs)
    held, train, n = [], [], 0
    for d in docs:
        if n < heldout_chars and len(d) <= 20000:
            held.append(d)
            n += len(d)
        else:
            train.append(d)
    if max_train_chars > 0:  # whole documents of at most a quarter of the cap, until it is reached
        out, n = [], 0
        for d in train:
            if n < max_train_chars and len(d) <= max_train_chars // 4:
                out.append(d)
                n += len(d)
        train = out
    return train, held


def halves(docs: list[str]) -> tuple[list[str], list[str]]:
    """Two disjoint sets of documents with about the same number of characters (greedy)."""
    a, b, na, nb = [], [], 0, 0
    for d in sorted(docs, key=len, reverse=True):
        if na <= nb:
            a.append(d)
            na += len(d)
        else:
            b.append(d)
            nb += len(d)
    return a, b


def fusion_docs(train: list[str], fuse_chars: int) -> list[str]:
    """The fusion corpus: the first training documents, until they hold ``fuse_chars`` characters (0 = all)."""
    out, n = [], 0
    for d in train:
        if fuse_chars and n >= fuse_chars:
            break
        out.append(d)
        n += len(d)
    return out


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
    for i, x in enumerate(inputs):
        x = torch.as_tensor(x)
        ids[i, : len(x)] = x
        att[i, : len(x)] = 1
        labels[i, : len(x) - 1] = x[1:]
    return ids, att, labels
