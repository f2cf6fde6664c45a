"""Generate functions that misbehave, loaded by path (``--custom-generate-function-path``) in the
multi-turn run tests."""

import asyncio
import os

from launchers.recipes import calculator


async def hung_tool_sometimes(conv):
    """The calculator episode, except that every third sample's tool never answers."""
    if conv.sample.index % 3 == 2:
        await conv.generate()
        await conv.call_tool(asyncio.Event().wait)  # hangs: --tool-timeout ends it
    return await calculator.generate(conv)


HOLD = "ASYNCRL_TEST_HOLD"  # "G,N": groups from G on stop after their first turn; the N of them
_first_turns = {"n": 0, "all": asyncio.Event()}  # ... before which the group batch before G may not end


async def held_after_a_turn(conv):
    """A two-turn episode for the kill-and-resume test, event-driven so that its checkpoint always
    holds episodes between their turns, whatever the machine's speed. With ``HOLD=G,N`` set (the
    first run only): episodes of groups >= G stop after their first turn until the run is killed,
    and those of the groups just before G (G - N/8 .. G - 1, 8 samples a group) finish only once
    all N held episodes have their first turn, so the step that trains them, and its checkpoint,
    come after every held episode has a turn. Unset (the resumed run): plain two turns."""
    hold = os.environ.get(HOLD)
    first, n = map(int, hold.split(",")) if hold else (-1, 0)
    g = conv.sample.group_id
    await conv.generate()
    if hold and g >= first:
        _first_turns["n"] += 1
        if _first_turns["n"] >= n:
            _first_turns["all"].set()
        await asyncio.Event().wait()  # held: the run is killed with this episode mid-way
    if hold and first - n // 8 <= g < first:
        await _first_turns["all"].wait()
    conv.append_text(f"{calculator.RESPONSE} 4 {calculator.END_RESPONSE}")
    answer = await conv.generate()
    return calculator.reward(conv.prompt, True, answer.text)
