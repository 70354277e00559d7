"""FusionTrainer: a Hugging Face Trainer whose loss is fused_loss, on a tiny random Llama (CPU)."""
import numpy as np
import pytest
import torch

from fastfuse.data import FusionCollator
from fastfuse.schedules import LinearSchedule

V = 64


class RandomFusionData(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            T = int(rng.integers(6, 12))
            ids = rng.integers(1, V, T)
            ex = {"input_ids": ids, "topk_ids": [], "topk_logprobs": [], "pos": [], "ce": rng.uniform(1, 3, 2)}
            for Vs in (40, 50):
                Ts = T + 1
                tk = rng.integers(0, Vs, (Ts, 4))
                ex["topk_ids"].append(tk.astype(np.int32))
                ex["topk_logprobs"].append(np.log(rng.dirichlet(np.ones(4) * 0.3, Ts)).astype(np.float16))
                ex["pos"].append(np.where(rng.random(T) < 0.8, rng.integers(0, Ts, T), -1).astype(np.int32))
            self.items.append(ex)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


@pytest.mark.parametrize("lm_weight", [0.5, LinearSchedule(0.2, 0.9, 10)])
def test_trainer_trains_and_logs_terms(tmp_path, lm_weight):
    from transformers import TrainingArguments

    from fastfuse.trainer import FusionTrainer

    rng = np.random.default_rng(1)
    maps = [rng.integers(0, V, 40).astype(np.int32), np.where(rng.random(50) < 0.7, rng.integers(0, V, 50), -1).astype(np.int32)]
    data = RandomFusionData(16)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=5,
                             learning_rate=3e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    trainer = FusionTrainer(model=tiny_llama(), args=args, train_dataset=data, lm_weight=lm_weight,
                            data_collator=FusionCollator(maps, pad_token_id=0, pin_memory=False))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) >= 3
    for h in logs:
        assert {"ce_loss", "fusion_loss", "lm_weight"} <= set(h)
        assert np.isfinite(h["ce_loss"]) and np.isfinite(h["fusion_loss"])
    assert logs[-1]["loss"] < logs[0]["loss"]
    if not callable(lm_weight):
        # the logged loss is the mixture of the two logged terms (same batches, before the update)
        for h in logs:
            assert h["loss"] == pytest.approx(lm_weight * h["ce_loss"] + (1 - lm_weight) * h["fusion_loss"], rel=0.05)


def test_missing_inputs_are_a_clear_error(tmp_path):
    from transformers import TrainingArguments

    from fastfuse.trainer import FusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = FusionTrainer(model=tiny_llama(), args=args)
    with pytest.raises(ValueError, match="inputs: missing"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
