"""Tool calls in a model's text, per model family, as OpenAI ``tool_calls``.

Hermes / Qwen style (Qwen2.5, Qwen3, SmolLM2's tool format, and this project's tool recipe):
``<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>``, any number
of them, after optional free text. A call that is not a JSON object with a string ``name`` and an
object ``arguments`` (or a tag left open, say by a length cut) is *malformed*: it is counted,
kept in the content as text, and never raises; the model is trained on what it wrote either way.
"""

from __future__ import annotations

import json
import re

import msgspec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class ToolCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)


class Parsed(msgspec.Struct, frozen=True):
    content: str  # the text outside well-formed calls
    calls: list[ToolCall]
    malformed: int  # calls that could not be read


def parse_hermes(text: str) -> Parsed:
    calls: list[ToolCall] = []
    malformed = 0
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _read(m.group(1))
        kept.append(text[pos:m.start()])
        if call is None:
            malformed += 1
            kept.append(m.group(0))
        else:
            calls.append(call)
        pos = m.end()
    rest = text[pos:]
    if OPEN in rest:  # opened, never closed
        malformed += 1
    kept.append(rest)
    return Parsed(content="".join(kept).strip(), calls=calls, malformed=malformed)


def _read(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args))

