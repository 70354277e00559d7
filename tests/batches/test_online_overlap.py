"""fastfuse.batches.online_overlap.prefetch: the teachers score the next batch in a background thread while
the caller works on this one; the batches are the direct calls' exactly, in order, and an error
surfaces at its own batch."""
import threading
import time

import pytest
import torch

from fastfuse.batches.online import OnlineTeachers
from fastfuse.batches.online_overlap import prefetch
from fastfuse.teachers.online_teachers import LocalTeacher

from test_online import tiny_model


class Timed(OnlineTeachers):
    """Real online teachers that record when and on which thread each call ran."""

    def __call__(self, input_ids, attention_mask=None):
        start = time.perf_counter()
        out = super().__call__(input_ids, attention_mask)
        self.calls.append((start, time.perf_counter(), threading.current_thread().name))
        return out


@pytest.fixture(scope="module")
def setup(real_tokenizer, corpus):
    tgt, gpt2, bpe = (real_tokenizer(n) for n in ("llama-spm", "gpt-2", "llama-bpe"))
    teachers = Timed({"gpt2": LocalTeacher(tiny_model(50257, "gpt2", 1), gpt2, k=4),
                      "bpe": LocalTeacher(tiny_model(len(bpe), "llama", 2), bpe, k=4)}, tgt, pin_memory=False)
    teachers.calls = []
    batches = []
    for i in range(0, 8, 2):
        seqs = [torch.tensor(tgt(t[:300])["input_ids"]) for t in corpus[i:i + 2]]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        batches.append((ids, mask))
    return teachers, batches


def same(a, b):
    return all(torch.equal(torch.nan_to_num(torch.as_tensor(x), -7.0), torch.nan_to_num(torch.as_tensor(y), -7.0))
               for k in a for x, y in (zip(a[k], b[k]) if isinstance(a[k], tuple) else [(a[k], b[k])]))


def test_prefetched_batches_are_the_direct_ones_in_order(setup):
    teachers, batches = setup
    direct = [teachers(*b) for b in batches]
    got = list(prefetch(teachers, batches, depth=2))
    assert [g[0] for g in got] == batches
    assert all(same(g[1], d) for g, d in zip(got, direct))
    assert len(list(prefetch(teachers, [{"input_ids": b[0], "attention_mask": b[1]} for b in batches[:1]]))) == 1


def test_next_batch_is_scored_while_the_caller_works(setup):
    teachers, batches = setup
    teachers.calls.clear()
    work = []
    for item, batch in prefetch(teachers, batches[:3]):
        t0 = time.perf_counter()
        time.sleep(0.5)                                     # the student's step
        work.append((t0, time.perf_counter()))
    calls = teachers.calls
    assert len(calls) == 3 and all(name.startswith("fastfuse-teachers") for *_, name in calls)
    # batch i + 1's scoring started before the caller finished batch i
    assert all(calls[i + 1][0] < work[i][1] for i in range(2))


def test_errors_surface_at_their_batch_and_bad_depth(setup):
    teachers, batches = setup
    bad = (torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 1]]))       # not right-padded
    it = prefetch(teachers, [batches[0], bad, batches[1]])
    assert next(it)[0] is batches[0]
    with pytest.raises(ValueError, match="attention_mask: row 0 is not right-padded"):
        next(it)
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(teachers, batches, depth=0))
