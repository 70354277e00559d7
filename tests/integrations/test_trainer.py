"""FusionTrainer: a Hugging Face Trainer whose loss is fused_linear_loss (default) or fused_loss,
on tiny random Llama / GPT-2 models (CPU): both paths give the same loss and gradients (also
through a DDP-like wrapper), training lowers the loss, the terms are logged, evaluation works and
the loss is divided by the gradient-accumulation steps."""
import numpy as np
import pytest
import torch

from fastfuse.batches.dataset import FusionCollator
from fastfuse.batches.schedules import LinearSchedule

from _wrappers import Wrapper  # tests/ is on sys.path under pytest

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


def tiny_gpt2():
    """Tied embeddings (lm_head.weight is wte.weight), base_model_prefix "transformer"; no dropout,
    so that two forwards in train mode compare exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def maps():
    rng = np.random.default_rng(1)
    return [rng.integers(0, V, 40).astype(np.int32),
            np.where(rng.random(50) < 0.7, rng.integers(0, V, 50), -1).astype(np.int32)]


def make_trainer(tmp_path, model, **kwargs):
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    train = kwargs.pop("train", {})
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", seed=0, disable_tqdm=True, **train)
    return FusionTrainer(model=model, args=args, data_collator=FusionCollator(maps(), pad_token_id=0, pin_memory=False),
                         **kwargs)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("wrapped", [False, True])
def test_linear_equals_logits_loss_and_gradients(tmp_path, make_model, wrapped):
    model = make_model().train()
    batch = FusionCollator(maps(), pad_token_id=0, pin_memory=False)([RandomFusionData(5, seed=3)[i] for i in range(5)])
    params = list(model.parameters())
    results = {}
    for loss in ("linear", "logits"):
        trainer = make_trainer(tmp_path, model, loss=loss, lm_weight=0.7, temperature=1.5,
                               loss_kwargs={"chunk_tokens": 7} if loss == "linear" else {})
        net = Wrapper(model) if wrapped else model
        calls = []
        hook = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
        value = trainer.compute_loss(net, trainer._prepare_inputs(batch))
        hook.remove()
        results[loss] = (value.detach(), torch.autograd.grad(value, params, allow_unused=True))
        assert bool(calls) == (loss == "logits"), "the linear path must not run the lm_head on the sequence"
        if wrapped:
            assert net.calls == 1, "the wrapper's forward must run (DDP's bookkeeping)"
    (loss, grads), (ref, ref_grads) = results["linear"], results["logits"]
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert len(set(map(id, params))) == len(params)
    for p, g, r in zip(params, grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().sum()) == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert model.get_output_embeddings().weight.grad is None
    if make_model is tiny_gpt2:  # the swap left the tie intact
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_head_restored_after_an_error_in_the_forward(tmp_path):
    model = tiny_gpt2()
    head = model.get_output_embeddings()
    trainer = make_trainer(tmp_path, model)
    batch = trainer._prepare_inputs(FusionCollator(maps(), pad_token_id=0, pin_memory=False)(
        [RandomFusionData(2)[i] for i in range(2)]))

    def fail(*args):
        raise RuntimeError("boom in the backbone")

    hook = model.transformer.ln_f.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.compute_loss(Wrapper(model), batch)
    hook.remove()
    assert model.get_output_embeddings() is head and model.lm_head.weight is model.transformer.wte.weight
    # the model still works, with its own head
    assert model(input_ids=batch["input_ids"]).logits.shape == (*batch["input_ids"].shape, V)
    assert torch.isfinite(trainer.compute_loss(model, batch))


@pytest.mark.parametrize("lm_weight", [0.5, LinearSchedule(0.2, 0.9, 10)])
def test_trainer_trains_and_logs_terms(tmp_path, lm_weight):
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

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


def test_both_paths_train_and_log_the_same(tmp_path):
    """Same data, seed and schedule: the linear and logits paths log the same losses and terms."""
    logs = {}
    for loss in ("linear", "logits"):
        trainer = make_trainer(tmp_path, tiny_llama(), loss=loss, lm_weight=LinearSchedule(0.3, 0.9, 8),
                               train_dataset=RandomFusionData(8),
                               train=dict(per_device_train_batch_size=4, num_train_epochs=4, learning_rate=3e-3,
                                          logging_steps=2))
        trainer.train()
        logs[loss] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["linear"]) == len(logs["logits"]) >= 3
    for a, b in zip(logs["linear"], logs["logits"]):
        for key in ("loss", "ce_loss", "fusion_loss", "lm_weight"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)
    assert logs["logits"][-1]["loss"] < logs["logits"][0]["loss"]


@pytest.mark.parametrize("loss", ["linear", "logits"])
def test_default_training_arguments_keep_the_teacher_fields(tmp_path, loss):
    """Trainer's default remove_unused_columns=True drops what the model's forward does not take;
    FusionTrainer keeps the teacher fields, so default TrainingArguments train (and evaluate)."""
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                             num_train_epochs=3, learning_rate=3e-3, logging_steps=2, disable_tqdm=True)
    assert args.remove_unused_columns  # the default this test is about
    data = RandomFusionData(8, seed=3)
    trainer = FusionTrainer(model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data, loss=loss,
                            data_collator=FusionCollator(maps(), pad_token_id=0, pin_memory=False))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) >= 2 and logs[-1]["loss"] < logs[0]["loss"]
    assert np.isfinite(trainer.evaluate()["eval_loss"])


def test_return_outputs_and_evaluate(tmp_path):
    """Trainer.evaluate / predict ask for outputs: the model's own, with real logits, same loss."""
    model = tiny_llama()
    data = RandomFusionData(6, seed=2)
    trainer = make_trainer(tmp_path, model, eval_dataset=data, loss_kwargs={"chunk_tokens": 4},
                           train=dict(per_device_eval_batch_size=3))
    batch = trainer._prepare_inputs(FusionCollator(maps(), pad_token_id=0, pin_memory=False)([data[i] for i in range(3)]))
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape == (*batch["input_ids"].shape, V)
    torch.testing.assert_close(loss, trainer.compute_loss(model, batch), rtol=1e-5, atol=1e-6)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])


def test_gradient_accumulation_divides_the_loss(tmp_path):
    """Two accumulated micro-batches of the same examples make one SGD step of lr * their gradient."""
    model = tiny_llama()
    item = RandomFusionData(1, seed=4)[0]
    data = [item] * 4
    trainer = make_trainer(tmp_path, model, lm_weight=0.7, train_dataset=data,
                           train=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                                      optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
                                      max_grad_norm=0.0, weight_decay=0.0, logging_strategy="no"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = trainer._prepare_inputs(FusionCollator(maps(), pad_token_id=0, pin_memory=False)([item, item]))
    grads = torch.autograd.grad(trainer.compute_loss(model, batch), list(model.parameters()))
    trainer.train()
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(before[n] - p.detach(), 0.1 * g, rtol=1e-3, atol=1e-7, msg=n)


def test_bad_loss_argument(tmp_path):
    with pytest.raises(ValueError, match="loss: expected one of"):
        make_trainer(tmp_path, tiny_llama(), loss="fused")


def test_missing_inputs_are_a_clear_error(tmp_path):
    from transformers import TrainingArguments

    from fastfuse.integrations.trainer import FusionTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = FusionTrainer(model=tiny_llama(), args=args)
    with pytest.raises(ValueError, match="inputs: missing"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
