"""velora_fx.integrations: training a tiny Llama with transformers.Trainer through VeloraCallback."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from velora_fx.integrations import VeloraCallback, compile_for_trainer  # noqa: E402


def tiny_llama():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_dataset(n=8, seq=16):
    ids = torch.randint(0, 64, (n, seq))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                  logging_steps=1, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**kwargs, **overrides})


def test_trainer_trains_through_the_velora_backend(tmp_path):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged = []
    callback = VeloraCallback(compiler="eager", mode="max_memory", log_report=logged.append)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(), callbacks=[callback])
    result = trainer.train()

    assert math.isfinite(result.training_loss)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # the optimizer stepped

    # compiled in place, through the callback's backend, with the options given
    assert callback.model is model and trainer.model is model
    assert model._compiled_call_impl is not None
    assert callback.backend.compiler == "eager"
    assert callback.backend.config.mode == "max_memory"
    report = callback.backend.report()
    rewritten = [g for g in report.graphs if g.status == "rewritten" and g.sites]
    assert rewritten, report.table()
    assert report.compressed  # max_memory compresses something on a Llama block
    assert report.saved_bytes_after < report.saved_bytes_before

    # the report was logged: numbers in every step's log, the table at the end
    step_logs = [e for e in trainer.state.log_history if "loss" in e]
    for entry in step_logs:
        assert entry["velora/sites"] >= 1
        assert entry["velora/saved_bytes_after"] == report.saved_bytes_after
        assert entry["velora/saved_bytes_before"] == report.saved_bytes_before
    assert logged == [callback.table] and "sites compressed" in callback.table
    assert callback.table == report.table()

    # state-dict keys keep their names (nn.Module.compile keeps the module object)
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())

    # a second train() does not compile again
    trainer.train()
    assert callback.model is model


def test_log_report_true_prints_the_table(tmp_path, capsys):
    callback = VeloraCallback(compiler="eager")
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=1), train_dataset=tiny_dataset(2),
                      callbacks=[callback])
    trainer.train()
    out = capsys.readouterr().out
    assert "velora_fx report:" in out and callback.table in out


def test_bad_option_fails_when_the_callback_is_built():
    with pytest.raises(TypeError, match="unknown velora_fx option"):
        VeloraCallback(compiler="eager", max_eror=0.1)
    with pytest.raises(TypeError, match="either backend= or"):
        VeloraCallback(backend=object(), mode="auto")


def test_compile_for_trainer_refuses_a_compiled_model():
    model = tiny_llama()
    compile_for_trainer(model, compiler="eager")
    with pytest.raises(ValueError, match="already compiled"):
        compile_for_trainer(model, compiler="eager")
    with pytest.raises(ValueError, match="OptimizedModule"):
        compile_for_trainer(torch.compile(tiny_llama(), backend="eager"), compiler="eager")


def test_training_arguments_backend_velora_is_refused_by_accelerate(tmp_path):
    """The documented limitation: accelerate's TorchDynamoPlugin validates torch_compile_backend
    against its closed DynamoBackend enum (accelerate/utils/dataclasses.py, __post_init__), so
    Trainer construction fails even though "velora" is registered with dynamo."""
    import torch._dynamo

    import velora_fx  # noqa: F401  (registers "velora")
    assert "velora" in torch._dynamo.list_backends(exclude_tags=())
    args = training_args(tmp_path, torch_compile=True, torch_compile_backend="velora")
    with pytest.raises(ValueError, match="'VELORA' is not a valid DynamoBackend"):
        Trainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset())


def test_callback_refuses_torch_compile_true(tmp_path):
    args = training_args(tmp_path, torch_compile=True, torch_compile_backend="inductor")
    with pytest.raises(ValueError, match="torch_compile=False"):
        Trainer(model=tiny_llama(), args=args, train_dataset=tiny_dataset(),
                callbacks=[VeloraCallback(compiler="eager")])


def test_trainer_gets_the_exact_loss_head_on_its_plain_call(tmp_path):
    """The Trainer calls ``model(**batch)`` with labels (and ``num_items_in_batch``): the compiled
    causal LM returns no logits in training, so the chunked head applies, and the loss is eager's."""
    import copy
    torch._dynamo.reset()  # earlier tests compiled this forward at other shapes: dynamo would go dynamic
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    data = tiny_dataset(n=4, seq=48)  # 96 tokens a step: the logits outweigh what the head keeps
    callback = VeloraCallback(compiler="eager", memory_budget=0.5, log_report=False)
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=2, learning_rate=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    loss = trainer.train().training_loss
    heads = [s for s in callback.backend.report().sites if s.codec == "chunked_loss"]
    assert [s.decision for s in heads] == ["compressed"], callback.backend.report().table()
    # the Trainer's sampler shuffles: the one step's loss is eager's loss of one of the two batches
    eager = []
    for order in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        pair = [data[i] for i in order]
        eager.append(reference(input_ids=torch.stack([d["input_ids"] for d in pair]),
                               labels=torch.stack([d["labels"] for d in pair])).loss.item())
    assert any(math.isclose(loss, e, rel_tol=1e-4) for e in eager), (loss, eager)
