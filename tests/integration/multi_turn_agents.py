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
    """The calculator episode with a tool that takes 3 seconds: generation is then slower than
    training, so a checkpoint always catches episodes between their turns."""
    original = calculator.calculate

    async def slow_calculate(expression):
        await asyncio.sleep(3.0)  # the tool's own latency, not a wait for an event
        return original(expression)

    return await calculator.generate(conv, calculate=slow_calculate)
