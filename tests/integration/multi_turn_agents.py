"""Generate functions that misbehave, loaded by path (``--custom-generate-function-path``) in the
multi-turn run tests."""

import asyncio

from launchers.recipes import calculator


async def hung_tool_sometimes(conv):
    """The calculator episode, except that every third sample's tool never answers."""
    if conv.sample.index % 3 == 2:
        await conv.generate()
        await conv.call_tool(asyncio.Event().wait)  # hangs: --tool-timeout ends it
    return await calculator.generate(conv)


async def slow_tool(conv):
    """A two-turn episode whose tool takes 3 seconds, called by every episode whatever the policy
    wrote (a random-init policy seldom writes a call): generation is then slower than training,
    so a checkpoint always catches episodes between their turns."""
    await conv.generate()
    result = await conv.call_tool(slow_echo, "4")  # the tool's own latency, not a wait for an event
    conv.append_text(f"{calculator.RESPONSE} {result} {calculator.END_RESPONSE}")
    answer = await conv.generate()
    return calculator.reward(conv.prompt, True, answer.text)


async def slow_echo(value: str) -> str:
    await asyncio.sleep(3.0)
    return value
