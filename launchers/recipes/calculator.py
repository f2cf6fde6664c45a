"""A tool recipe: multiply two 2-digit numbers, with a calculator the policy learns to call.

One episode (``generate``, run by --custom-generate-function-path on every sample):
    prompt        ``<bos> 4 7 * 8 3 =``
    policy turn   ``<tool_call>{...,"expression":" 4 7 * 8 3 "}}</tool_call>``   (Hermes format; the
                  call's head and tail are one word each in this vocabulary, so it is 7 tokens)
    environment   ``<tool_response> 3 9 0 1 </tool_response>``                   (masked)
    policy turn   ``3 9 0 1 <eos>``
A policy may also answer at once (no call), or write a call that does not parse (counted; the
environment answers ``error``). Reward in [0, 1]: 0.4 x the call's expression, position by
position against the problem (0 without a call; a broken call's expression counts too) + 0.6 x the
final answer's score (the default task's: 0.8 x share of digit positions right + 0.2 x right
length then ``<eos>``). The call's share is a shaping term: a random-init policy never writes a
whole right call by chance, and without it neither half of the skill (copy the problem into the
call, copy the result into the answer) pays before the other. Answering without the tool, a
small model does not learn 2-digit products in minutes: the right leading digit and length are
worth about 0.2 at best; with the tool, 1.0.

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
from launchers.recipes import Recipe
from launchers.recipes.task import Task
from policies.tokenizer import EOS, word_tokenizer
from policies.tool_calls import parse_hermes

CALL_HEAD = '<tool_call>{"name":"calculator","arguments":{"expression":"'
CALL_TAIL = '"}}</tool_call>'
RESPONSE, END_RESPONSE = "<tool_response>", "</tool_response>"
WORDS = [str(d) for d in range(10)] + ["*", "=", CALL_HEAD, CALL_TAIL, RESPONSE, END_RESPONSE, "error"]
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<bos> {{ m.content }} = "
    "{% elif m.role == 'assistant' %}{{ m.content }} <eos> "
    "{% elif m.role == 'tool' %}" + RESPONSE + " {{ m.content }} " + END_RESPONSE + " {% endif %}"
    "{% endfor %}"
)
CALL_WEIGHT = 0.4  # the shaping term's share of the reward (module docstring)
TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate an arithmetic expression of digits separated by spaces",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


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
        return reward(conv.prompt, None, reply.text)
    conv.counters["tool_calls_malformed"] += parsed.malformed
    expression = _expression(parsed.calls[0].arguments) if parsed.calls else None
    try:
        result = await conv.call_tool(calculate, expression) if expression is not None else "error"
    except ToolTimeout:
        result = "error"
    conv.append_text(f"{RESPONSE} {result} {END_RESPONSE}")
    answer = await conv.generate()
    return reward(conv.prompt, attempted(reply.text), answer.text)


def transcript_reward(prompt: Prompt, sample: Sample) -> float:
    """The same reward read from a finished transcript: for agents that return None (say, one
    driving the OpenAI endpoint, ``examples/openai_agent.py``)."""
    text = sample.response_text
    if END_RESPONSE not in text:
        return reward(prompt, None, text)
    first, _, rest = text.partition(RESPONSE)
    return reward(prompt, attempted(first), rest.rsplit(END_RESPONSE, 1)[-1])


def attempted(turn: str) -> str:
    """The expression a call turn wrote, well-formed or not: the words after the call's head, up
    to its tail or ``<eos>`` (the shaping term scores a broken call's expression too)."""
    body = turn.split(CALL_HEAD, 1)[-1]
    return body.split(CALL_TAIL, 1)[0].split(EOS, 1)[0]


def _expression(arguments: str) -> str | None:
    expression = json.loads(arguments).get("expression")
    return expression if isinstance(expression, str) else None


def reward(prompt: Prompt, call: str | None, answer: str) -> float:
    """``CALL_WEIGHT`` x the call's expression, position by position, + the rest x the answer's score."""
    problem, product = prompt.label.split("=")
    call_words = call.split() if call is not None else []
    call_share = sum(a == b for a, b in zip(call_words, problem.split())) / len(problem.split())
    return CALL_WEIGHT * call_share + (1 - CALL_WEIGHT) * answer_score(answer, product)


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
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)

    def prompt(i: int, a: int, b: int) -> Prompt:
        problem = " ".join([*str(a), "*", *str(b)])
        text = f"<bos> {problem} ="
        return Prompt(index=i, input_ids=tok.encode(text), label=f"{problem}={a * b}", text=text)

    held_out = [prompt(i, a, b) for i, (a, b) in enumerate(pairs[:eval_num_prompts])]
    train = [prompt(i, a, b) for i, (a, b) in enumerate(pairs[eval_num_prompts:])]
    return Task(tokenizer=tok, train_prompts=train, eval_prompts=held_out,
                reward_path="launchers.recipes.calculator:transcript_reward",
                stop_token_ids=[tok.eos_token_id, tok.convert_tokens_to_ids(CALL_TAIL)])


RECIPE = Recipe(
    name="calculator",
    description="2-digit multiplication with a calculator tool: multi-turn episodes, tool output masked",
    defaults={
        "rollout": {"custom_generate_function_path": "launchers.recipes.calculator:generate",
                    "rollout_max_response_len": 8, "max_turns": 2, "num_rollout": 300},
        "optimizer": {"lr": 1e-3},
        "eval": {"eval_num_prompts": 64, "eval_interval": 20},
    },
    make_task=make_task,
)
