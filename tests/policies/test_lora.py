"""LoRA with peft: only the adapter trains, it is published and checkpointed in peft's format, the
engine's merge equals peft's, and an engine that loaded a published adapter generates exactly what
an engine started on the merged model does."""

import asyncio
import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from policies import lora
from policies.engine import EngineClient, EngineProcess
from policies.trainer import PolicyTrainer
from runtime.config import GrpoConfig, OptimizerConfig
from tests.policies.test_trainer import make_group, tiny_checkpoint

SPEC = lora.LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _trainer(path, **kw):
    return PolicyTrainer(path, grpo=GrpoConfig(), optim=OptimizerConfig(lr=5e-2), temperature=1.0, pad_id=0,
                         lora=SPEC, **kw)


def _train(trainer, steps, start=0):
    group = make_group([1, 4, 5, 13], [[4, 5, 2], [6, 6, 2]], [1.0, 0.0])
    for v in range(start, start + steps):
        for s in group.samples:
            s.token_versions = [v] * len(s.token_versions)
        trainer.step([group], version=v)


def test_only_the_adapter_trains_and_is_what_a_sync_sends(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    trainer = _trainer(path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    _train(trainer, 2)
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed), changed
    assert any(".lora_B." in k for k in changed)  # B starts at 0: the adapter did move off the base

    out = trainer.save_weights(tmp_path / "v2")
    assert sorted(p.name for p in out.iterdir()) == [lora.CONFIG_FILE, lora.WEIGHTS_FILE]
    sent = out.joinpath(lora.WEIGHTS_FILE).stat().st_size
    assert trainer.sync_bytes < sent < 2 * trainer.sync_bytes  # the adapter, plus a small header
    assert trainer.full_bytes > 10 * trainer.sync_bytes


def test_engine_merge_equals_peft_merge_and_unload(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    trainer = _trainer(path)
    _train(trainer, 2)
    adapter_dir = trainer.save_weights(tmp_path / "adapter")
    reference = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    tensors, scaling = lora.read_adapter(adapter_dir)
    merged = dict(lora.merged_weights(base, tensors, scaling))
    assert {k.rsplit(".", 2)[-2] for k in merged} == {"q_proj", "v_proj", "down_proj"}
    for name, w in merged.items():
        assert torch.equal(w, reference[name]), name


def test_checkpoint_holds_a_peft_adapter_and_resumes_exactly(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    torch.manual_seed(0)
    whole = _trainer(path)
    _train(whole, 4)

    torch.manual_seed(0)
    first = _trainer(path)
    _train(first, 2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    first.save_checkpoint(ckpt)
    # peft loads the adapter onto the base, and transformers the merged policy: the same model
    x = torch.tensor([[1, 4, 5, 13, 6]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(ckpt / "base")), ckpt / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"))
    with torch.no_grad():
        want = first.model.eval()(x).logits
        assert torch.allclose(peft_model(x).logits, want, atol=1e-5)
        assert torch.allclose(merged(x).logits, want, atol=1e-5)
    first.model.train()

    resumed = _trainer(ckpt / "base", version=2)
    resumed.load_checkpoint(ckpt)
    _train(resumed, 2, start=2)
    a, b = lora.adapter_state(whole.model), lora.adapter_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_after_an_adapter_sync_generates_as_the_merged_model(copy_task, tmp_path):
    path = tiny_checkpoint(copy_task, tmp_path)
    trainer = _trainer(path)
    _train(trainer, 3)
    adapter_dir = trainer.save_weights(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    copy.deepcopy(trainer.model).merge_and_unload().save_pretrained(merged_dir)
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    prompts = [[1, 4, 5, 13], [1, 6, 7, 8, 13]]

    async def generate(model_dir, adapter=None, unload=False):
        proc = EngineProcess(model_dir, log_path=tmp_path / f"{model_dir.name}{adapter is not None}.log")
        proc.start()
        try:
            async with EngineClient(await proc.wait_ready(timeout_s=90)) as client:
                base = await client.generate_batch(prompts, greedy)
                if adapter is None:
                    return base, None, None
                await client.load_lora_adapter("policy-v3", str(adapter))
                await client.update_weight_version("3")
                adapted = await client.generate_batch(prompts, greedy, lora_path="policy-v3")
                with pytest.raises(Exception, match="not loaded"):
                    await client.generate(prompts[0], greedy, lora_path="policy-v9")
                await client.unload_lora_adapter("policy-v3")
                again = await client.generate_batch(prompts, greedy)
                return adapted, base, again
        finally:
            await proc.stop()

    adapted, base, again = asyncio.run(generate(path, adapter_dir))
    (want, _, _) = asyncio.run(generate(merged_dir))
    assert [o.output_ids for o in adapted] == [o.output_ids for o in want]
    for got, ref in zip(adapted, want):
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert got.weight_version == "3" and set(got.token_versions) == {"3"}
    assert [o.output_ids for o in again] == [o.output_ids for o in base]  # unloaded: the base again
    assert [o.output_ids for o in adapted] != [o.output_ids for o in base]  # (the adapter matters)
