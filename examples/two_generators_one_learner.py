"""Embedding the runtime: two generators, each on its own task, feeding one learner.

A topology no recipe offers, built from the runtime's parts in a user's own program:

    copy-3 prompts -> Generator A --+                                  (one staleness bound for both:
                                    +--> StalenessBuffer --> Learner    admission is the buffer's)
    copy-4 prompts -> Generator B --+         ^                 | publish(v+1)
                        |                     | served v+1      v
                        +--- EngineSet <--- WeightBroadcaster --+

Both generators share the engines, the buffer and the ledger (one id space, one exactly-once
record), so the learner's batches mix both tasks earliest-deadline-first. Every loop is a named
task; the learner returning is the end, any other task ending first is an error (no hangs).

    python examples/two_generators_one_learner.py --steps 20
"""

import argparse
import asyncio
import tempfile
from pathlib import Path

from actors.broadcaster import WeightBroadcaster
from actors.generator import Generator
from actors.learner import Learner
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from buffers.buffer import StalenessBuffer
from launchers.recipes.copy_digits import make_task, reward
from policies.model import qwen3_config, write_random_checkpoint
from policies.trainer_process import TrainerProcess
from runtime.config import GrpoConfig, OptimizerConfig
from runtime.core.ledger import Ledger
from runtime.engines import EngineSet


async def main(steps: int, out: Path) -> None:
    tasks = [make_task(seed=0, eval_num_prompts=10, digits=d) for d in (3, 4)]
    tok = tasks[0].tokenizer  # both tasks share the digit vocabulary
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 max_position_embeddings=64)
    model = write_random_checkpoint(out / "model", qwen3_config(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **shape), tok, seed=0)
    engines = EngineSet(model_path=model, n=1, log_dir=out / "logs")
    buffer, ledger = StalenessBuffer(groups_per_step=4, max_staleness=1), Ledger()
    scorer = RewardScorer(reward, timeout_s=5)

    def generator(task, seed: int) -> Generator:
        runner = SampleRunner(engines=engines, seed=seed, decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
                              sampling_params={"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 7,
                                               "stop_token_ids": task.stop_token_ids})
        return Generator(prompts=task.train_prompt, buffer=buffer, ledger=ledger, runner=runner, scorer=scorer,
                         n_samples=8)

    trainer = TrainerProcess(model, grpo=GrpoConfig(), optim=OptimizerConfig(lr=5e-4), temperature=1.0,
                             pad_id=tok.pad_token_id)
    broadcaster = WeightBroadcaster(engines=engines, buffer=buffer, timeout_s=60, pause_mode="in_place")
    learner = Learner(trainer=trainer, buffer=buffer, ledger=ledger, publisher=broadcaster, num_steps=steps,
                      max_staleness=1, weights_dir=out / "weights")
    learner.on_step = lambda rec: print(f"step {rec.step}: reward {rec.reward_mean:.3f}, groups {rec.group_ids}")
    await engines.start()
    loops = {"generator-copy3": generator(tasks[0], 1).run(), "generator-copy4": generator(tasks[1], 2).run(),
             "broadcaster": broadcaster.run(), "engine-health": engines.monitor(), "learner": learner.run()}
    running = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        if first.get_name() != "learner" or first.exception() is not None:
            raise RuntimeError(f"{first.get_name()} ended first") from first.exception()
        await asyncio.wait_for(broadcaster.wait_served(learner.version), 60)  # engines serve the final policy
        print(f"done: version {learner.version}, ledger {ledger.counts()}")
    finally:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await engines.stop()
        learner.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="two-generators-") as tmp:
        asyncio.run(main(args.steps, args.out or Path(tmp)))
