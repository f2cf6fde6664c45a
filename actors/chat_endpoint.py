"""An OpenAI-compatible ``POST /v1/chat/completions`` for agent code that cannot be rewritten
against ``Conversation``: each request is a turn of the episode its API key names.

Served per run on 127.0.0.1 (a free port) while the run lasts. ``register(conv)`` gives an episode
its ``base_url`` and a fresh key; the agent points the ``openai`` client at them. A request is
applied token-in/token-out: the messages the episode already holds (the history the agent sends
back) are never rendered again; only the new ones (a user turn, tool results) go through the
chat template, appended as environment tokens; then one policy turn is generated on the engines
and recorded (versions, logprobs) in the episode's sample. The first request's messages (with
``tools``, through the template) become the sample's prompt. The answer is OpenAI's
``chat.completion``; tool calls are parsed from the text (Hermes/Qwen ``<tool_call>`` JSON,
``policies.tool_calls``) into ``tool_calls``, and a malformed one is counted
(``tool_calls_malformed``) and left in ``content``.

Not supported, answered 400 with the reason: streaming, ``n`` > 1, a history that differs from the
episode's (edited or shorter), a request with no new message. Sampling parameters in the request
(temperature, top_p) are ignored: the run's are what the learner corrects for. ``max_tokens``
lowers the turn's bound. An episode limit (``actors.conversation``) answers 400 and ends the
episode with that reason, whatever the agent does with the error. One request at a time per key.
"""

from __future__ import annotations

import collections
import secrets
import time
from typing import Any

from aiohttp import web

from actors.conversation import Conversation, EpisodeLimit
from policies import chat
from policies.tool_calls import parse_hermes


class BadRequest(Exception):
    pass


class ChatEndpoint:
    def __init__(self, *, model: str = "policy", host: str = "127.0.0.1", port: int = 0):
        self.model, self.host, self.port = model, host, port
        self.counters: collections.Counter[str] = collections.Counter()
        self._episodes: dict[str, Conversation] = {}
        self._busy: set[str] = set()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, conv: Conversation) -> None:
        key = f"ep-{secrets.token_hex(12)}"
        conv.api_key, conv.base_url = key, self.base_url
        self._episodes[key] = conv

    def unregister(self, conv: Conversation) -> None:
        self._episodes.pop(conv.api_key, None)

    # -- requests --------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "owned_by": "asyncrl"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        conv = self._episodes.get(key)
        if conv is None:
            return _error(401, "unknown or finished episode key", "invalid_api_key")
        if key in self._busy:
            return _error(409, "this episode already has a request in flight", "conflict")
        self._busy.add(key)
        try:
            body = await request.json()
            return web.json_response(await self._turn(conv, body))
        except BadRequest as e:
            self.counters["chat_bad_requests"] += 1
            return _error(400, str(e), "invalid_request_error")
        except ValueError as e:  # the body is not JSON
            self.counters["chat_bad_requests"] += 1
            return _error(400, f"the body is not JSON: {e}", "invalid_request_error")
        except EpisodeLimit as e:
            conv.ended = e
            return _error(400, f"episode limit: {e}", "episode_limit")
        finally:
            self._busy.discard(key)

    async def _turn(self, conv: Conversation, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise BadRequest("messages must be a non-empty list")
        if body.get("stream"):
            raise BadRequest("streaming is not supported: send stream=false")
        if body.get("n", 1) != 1:
            raise BadRequest("n must be 1")
        before = len(conv.sample.response_ids)
        self._add_messages(conv, body["messages"], body.get("tools"))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        reply = await conv.generate(max_new_tokens=int(max_tokens) if max_tokens else None)
        conv.messages_seen = len(body["messages"]) + 1
        # special tokens (an end-of-turn like <|im_end|>) are not content; tool-call tags are not special
        parsed = parse_hermes(conv.tokenizer.decode(reply.token_ids, skip_special_tokens=True))
        self.counters["tool_calls"] += len(parsed.calls)
        self.counters["tool_calls_malformed"] += parsed.malformed
        calls = [{"id": f"call_{secrets.token_hex(8)}", "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.calls]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else reply.finish_reason
        prompt_tokens = len(conv.sample.prompt_ids) + before
        return {
            "id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model, "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                              "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.token_ids),
                      "total_tokens": prompt_tokens + len(reply.token_ids)},
        }

    def _add_messages(self, conv: Conversation, messages: list[Any], tools: Any) -> None:
        """The messages this episode does not hold yet, into its transcript (module docstring)."""
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("every message must be an object with a role")
        try:
            if conv.messages_seen == 0:  # the first request: its messages are the episode's prompt
                text = chat.render_messages(conv.tokenizer, chat.check_messages(messages),
                                            template_kwargs={"tools": tools} if tools else None)
                ids = conv.tokenizer.encode(text, add_special_tokens=False)
                if conv.sample.response_ids and ids != conv.sample.prompt_ids:  # a resumed episode, replaying
                    raise BadRequest("the first messages differ from this episode's prompt")
                conv.sample.prompt_ids = ids
                return
            seen = conv.messages_seen
            if len(messages) <= seen or messages[seen - 1].get("role") != "assistant":
                raise BadRequest(f"expected the episode's {seen} messages (the last one the assistant's answer) "
                                 "followed by new ones")
            conv.append_messages(messages[seen:])
        except chat.ChatFormatError as e:
            raise BadRequest(f"chat template: {e}") from None


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                             status=status)
