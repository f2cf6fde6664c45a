"""What feeds a run's agents, from its config: the producer and the evaluation beside it.

One agent: the generator admitting the recipe's (or ``--prompt-data``'s) prompts, scored by the
reward (``--custom-rm-path``, ``--group-rm``, ``--reward-key``), optionally filtered
(``--dynamic-sampling-filter-path``), each sample a multi-turn episode of
``--custom-generate-function-path`` when given, or read rather than generated (SFT). Several
agents: the episode driver running ``--episode-fn``. ``load_feed`` loads the plug-ins and checks
the prompts' lengths before any process starts; the closure it returns builds the producer once
the agents exist (``runtime.launch.build``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from actors.chat_endpoint import ChatEndpoint
from actors.conversation import EpisodeLimits
from actors.episode_driver import EpisodeDriver
from actors.evaluator import Evaluator
from actors.generate_fn import Episodes
from actors.generator import Generator
from actors.reward import RewardScorer
from actors.rollout import SampleRunner
from actors.sft_samples import SftSamples
from launchers.recipes.task import Task
from runtime import checkpoint, preflight, run_task
from runtime.agent_config import RunSpec
from runtime.agents import Agent, is_sft
from runtime.config import Config, ConfigError
from runtime.core.failures import FailureBudget
from runtime.plugins import load_function
from runtime.producers import EpisodeEvals, EpisodeFeed, HeldOut, PromptFeed
from runtime.scheduler import Evaluation, Producer

Resumes = dict[str, checkpoint.Resume | None]
Feed = Callable[[list[Agent], Resumes], tuple[Producer, Evaluation]]


def load_feed(spec: RunSpec, task: Task, budget: FailureBudget) -> Feed:
    """What will feed the agents, its plug-in loaded now: the episode function, or the reward (and
    the prompts' lengths checked against the model's context). ``budget``: the run's failure budget."""
    cfg = spec.base
    if spec.episodes is not None:
        ep = spec.episodes
        episode_fn = load_function(ep.episode_fn, flag="--episode-fn")

        def episodes(agents: list[Agent], resumes: Resumes) -> tuple[Producer, Evaluation]:
            states = {name: r.state for name, r in resumes.items() if r is not None}
            driver = EpisodeDriver(agents=agents, episode_fn=episode_fn, timeout_s=ep.episode_timeout,
                                   seed=cfg.rollout.rollout_seed, started=max((s.cursor for s in states.values()),
                                                                              default=0),
                                   resume={name: s.slots for name, s in states.items()})
            return EpisodeFeed(driver), EpisodeEvals(driver, ep.eval_episodes)

        return episodes
    r, e = cfg.rollout, cfg.eval
    reward_fn = load_function(run_task.reward_path(cfg, task), flag="--custom-rm-path")
    held_out = run_task.held_out(cfg, task)
    context = preflight.model_context(cfg)
    preflight.check_lengths(context=context, train_lengths=[len(p.input_ids) for p in task.train_prompts],
                            eval_lengths=[len(p.input_ids) for ps in held_out.values() for p in ps],
                            max_response_len=r.rollout_max_response_len,
                            eval_max_response_len=e.eval_max_response_len or r.rollout_max_response_len)

    def scorer() -> RewardScorer:
        return RewardScorer(reward_fn, timeout_s=r.reward_timeout, group=r.group_rm, reward_key=r.reward_key,
                            budget=budget)

    def prompts(agents: list[Agent], resumes: Resumes) -> tuple[Producer, Evaluation]:
        (agent,), (resume,) = agents, resumes.values()
        state = resume.state if resume else None
        assert agent.buffer is not None
        endpoint = ChatEndpoint(model=cfg.run.recipe) if r.custom_generate_function_path else None
        group_filter = (load_function(r.dynamic_sampling_filter_path, flag="--dynamic-sampling-filter-path")
                        if r.dynamic_sampling_filter_path else None)
        sft = SftSamples(task.example) if is_sft(cfg) else None  # no engine: the data is the sample
        generator = Generator(prompts=task.train_prompt, buffer=agent.buffer, ledger=agent.ledger,
                              runner=agent.runner, scorer=scorer(), group_filter=group_filter,
                              n_samples=r.n_samples_per_prompt, cursor=state.cursor if state else 0,
                              resume=state.live if state else (), redo=state.redo if state else (),
                              expiry=cfg.async_.partial_expiry, max_prompt_len=context - r.rollout_max_response_len,
                              episodes=sft or episodes_of(cfg, task, agent.runner, endpoint))
        evaluator = Evaluator(sets=held_out, runner=agent.eval_runner, scorer=scorer(),
                              n_samples=e.n_samples_per_eval_prompt,
            episodes=episodes_of(cfg, task, agent.eval_runner, endpoint))
        return PromptFeed(generator, endpoint), HeldOut(evaluator, agent)

    return prompts


def episodes_of(cfg: Config, task: Task, runner: SampleRunner, endpoint: ChatEndpoint | None) -> Episodes | None:
    """``--custom-generate-function-path``: every sample run as a multi-turn episode of it."""
    r = cfg.rollout
    if not r.custom_generate_function_path:
        return None
    fn = load_function(r.custom_generate_function_path, flag="--custom-generate-function-path")
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError("--custom-generate-function-path", f"{r.custom_generate_function_path} must be an async "
                          "function: async def generate(conv: Conversation) -> float | None")
    context = r.rollout_max_context_len or (0 if cfg.ckpt.hf_checkpoint else cfg.model.max_position_embeddings)
    limits = EpisodeLimits(max_turns=r.max_turns, turn_max_tokens=runner.max_new_tokens, max_context_len=context,
                           tool_timeout_s=r.tool_timeout, episode_timeout_s=r.generate_timeout)
    return Episodes(fn, runner=runner, tokenizer=task.tokenizer, limits=limits, endpoint=endpoint)
