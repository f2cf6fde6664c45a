"""A tool recipe: multiply a 2-digit number by a 1-digit one, with a calculator the policy learns to call.

One episode (``generate``, run by --custom-generate-function-path on every sample):
    prompt        ``<bos> 4 7 * 8 =``
    policy turn   ``<tool_call>{"name":"calculator","arguments":{}}</tool_call>``  (Hermes format; one
                  word of this vocabulary: with no expression the calculator evaluates the user's)
    environment   ``<tool_response> 3 7 6 </tool_response>``                     (masked)
    policy turn   ``3 7 6 <eos>``
The calculator also takes an expression, ``{"expression": " 4 7 * 8 "}`` (its head and tail are one
word each here: ``CALL_HEAD 4 7 * 8 CALL_TAIL``), as agents through the OpenAI endpoint write it.
A policy may also answer at once (no call), or write a call that does not parse (counted; the
environment answers ``error``). Reward in [0, 1]: 0.2 for a well-formed call + 0.8 x the final
answer's score (the default task's: 0.8 x share of digit positions right + 0.2 x right length then
``<eos>``). Answering without the tool, a small model does not learn these products (carries
across digits) in minutes: the right length and leading digit are worth about 0.2 at best; with
the tool, 1.0. The call bonus is shaping: without it the direct answer's early gains win before
copying the tool's answer pays. Why the call takes no expression by default: a random-init policy
that must also copy the problem into the call learned too slowly for a CPU demo (with the
expression required, 120-250 steps moved the reward only from 0.03 to 0.09-0.1 on 2 loaded cores).

Measured (2 CPU cores shared with other jobs, load ~17; 2026-12-03), defaults: held-out eval reward
(greedy, 64 prompts) 0.00 at step 0, 0.25 at 60, 0.43 at 140, 0.52 at 240, 0.60 at 400; 400 steps in
950 s after a ~70 s start, no group dropped or duplicated, 778 malformed calls counted. Every
episode calls the tool from about step 100; the answer's digits are still being learned at 400.
With lr 1e-3 and no entropy bonus the eval reward stalled at 0.46 from step 120 on.

The tokenizer carries a chat template written in its words, so the OpenAI-compatible endpoint
renders ``[{"role": "user", "content": "4 7 * 8 3"}]`` and a tool message to exactly the tokens
this module appends itself (``examples/openai_agent.py`` is the same agent through the endpoint).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

from actors.conversation import Conversation, ToolTimeout
from buffers.types import Prompt, Sample
from launchers.recipes.recipe import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import EOS, word_tokenizer
from policies.tool_calls import parse_hermes

CALL = '<tool_call>{"name":"calculator","arguments":{}}</tool_call>'
CALL_HEAD = '<tool_call>{"name":"calculator","arguments":{"expression":"'
CALL_TAIL = '"}}</tool_call>'
RESPONSE, END_RESPONSE = "<tool_response>", "</tool_response>"
WORDS = [str(d) for d in range(10)] + ["*", "=", CALL, CALL_HEAD, CALL_TAIL, RESPONSE, END_RESPONSE, "error"]
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<bos> {{ m.content }} = "
    "{% elif m.role == 'assistant' %}{{ m.content }} <eos> "
    "{% elif m.role == 'tool' %}" + RESPONSE + " {{ m.content }} " + END_RESPONSE + " {% endif %}"
    "{% endfor %}"
)
CALL_BONUS = 0.2  # a well-formed call's share of the reward (module docstring)
TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate an arithmetic expression of digits separated by spaces "
    "(default: the user's)", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}


def calculate(expression: str) -> str:
    """``"4 7 * 8 3"`` -> ``"3 9 0 1"``: integers (digits may be spaced) joined by * or +."""
    text = expression.replace(" ", "")
    if not re.fullmatch(r"\d{1,6}([*+]\d{1,6})*", text):
        return "error"
    terms = [[int(f) for f in t.split("*")] for t in text.split("+")]
    total = sum(_product(fs) for fs in terms)
    return " ".join(str(total))


def _product(factors: list[int]) -> int:
    out = 1
    for f in factors:
        out *= f
    return out


async def generate(conv: Conversation, calculate: Callable[[str], Any] = calculate) -> float:
    """One episode (module docstring); returns its reward. ``calculate``: the tool (tests slow it down)."""
    reply = await conv.generate()
    parsed = parse_hermes(reply.text)
    if not (parsed.calls or parsed.malformed):  # answered without the tool
        return reward(conv.prompt, False, reply.text)
    conv.counters["tool_calls_malformed"] += parsed.malformed
    result = "error"
    if parsed.calls:
        expression = json.loads(parsed.calls[0].arguments).get("expression", problem_of(conv.prompt))
        try:
            result = await conv.call_tool(calculate, str(expression))
        except ToolTimeout:
            pass
    conv.append_text(f"{RESPONSE} {result} {END_RESPONSE}")
    answer = await conv.generate()
    return reward(conv.prompt, bool(parsed.calls), answer.text)


def transcript_reward(prompt: Prompt, sample: Sample) -> float:
    """The same reward read from a finished transcript: for agents that return None (say, one
    driving the OpenAI endpoint, ``examples/openai_agent.py``)."""
    text = sample.response_text
    if END_RESPONSE not in text:
        return reward(prompt, False, text)
    first, _, rest = text.partition(RESPONSE)
    return reward(prompt, bool(parse_hermes(first).calls), rest.rsplit(END_RESPONSE, 1)[-1])


def problem_of(prompt: Prompt) -> str:
    return prompt.label.split("=")[0]


def reward(prompt: Prompt, called: bool, answer: str) -> float:
    """``CALL_BONUS`` for a well-formed call + the rest x the final answer's score."""
    return CALL_BONUS * called + (1 - CALL_BONUS) * answer_score(answer, prompt.label.split("=")[1])


def answer_score(text: str, label: str) -> float:
    """The default task's score of ``text`` (digits then ``<eos>``) against the digits ``label``."""
    words = text.split()
    body = words[: words.index(EOS)] if EOS in words else words
    right = sum(a == b for a, b in zip(body, label))
    well_formed = EOS in words and len(body) == len(label)
    return (4 * right / len(label) + well_formed) / 5


def make_task(*, seed: int, eval_num_prompts: int) -> Task:
    tok = word_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    pairs = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    random.Random(seed).shuffle(pairs)

    def prompt(i: int, a: int, b: int) -> Prompt:
        problem = " ".join([*str(a), "*", *str(b)])
        text = f"<bos> {problem} ="
        return Prompt(index=i, input_ids=tok.encode(text), label=f"{problem}={a * b}", text=text)

    held_out = [prompt(i, a, b) for i, (a, b) in enumerate(pairs[:eval_num_prompts])]
    train = [prompt(i, a, b) for i, (a, b) in enumerate(pairs[eval_num_prompts:])]
    return Task(tokenizer=tok, train_prompts=train, eval_prompts=held_out,
                reward_path="launchers.recipes.calculator:transcript_reward",
                stop_token_ids=[tok.eos_token_id, *tok.convert_tokens_to_ids([CALL, CALL_TAIL])])


RECIPE = Recipe(
    name="calculator",
    description="2-digit multiplication with a calculator tool: multi-turn episodes, tool output masked",
    defaults={
        "rollout": {"custom_generate_function_path": "launchers.recipes.calculator:generate",
                    "rollout_max_response_len": 7, "max_turns": 2, "num_rollout": 400},
        # lr 1e-3 without the entropy bonus plateaued at eval 0.46 from step 120 on (the policy
        # stopped exploring the answer's digits); 5e-4 with it was still climbing (module docstring)
        "optimizer": {"lr": 5e-4}, "grpo": {"entropy_coef": 0.01},
        "eval": {"eval_num_prompts": 64, "eval_interval": 20},
    },
    make_task=make_task,
)
