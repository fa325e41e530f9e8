"""``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed or not.

Both run the same way: the body is checked (``_openai``), chat messages become the
prompt through the graph's chat template (``Model.chat_prompt``), each prompt is one
engine stream (its ``n`` sequences inside it), and the answer's usage, finish reasons and
logprobs come from the generate node's ``df.Chunk`` outputs (``_sequences``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from ..graph import TokenLogprob
from ._asgi import SSEWriter, WatchedResponse, send_error, send_json
from ._errors import ApiError
from ._models import Model
from ._openai import GenRequest, parse_chat, parse_completion
from ._sequences import Outcome, generate, run_all
from ._shapes import Frames, chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from ._app import ServeApp

__all__ = ["generation_route"]


async def generation_route(state: ServeApp, request: Request, chat: bool) -> Response:
    """The handler of both generation endpoints."""
    arrived = time.perf_counter()
    endpoint = "chat/completions" if chat else "completions"
    try:
        body = await state.read_json(request)
        parse = parse_chat if chat else parse_completion
        req = parse(body, state.lookup(request.scope))
        model = state.models[req.model]
        model.check_endpoint(endpoint)
        prompts = [model.chat_prompt(req.prompts[0])] if chat else req.prompts
        if req.user is not None:
            state.log_user(model.name, endpoint, req.user)
    except ApiError as err:
        return state.error_response(err)
    job = Job(state, model, req, prompts, arrived)
    return WatchedResponse(job.stream if req.stream else job.complete)


class Job:
    """One checked generation request on its way through the engine."""

    def __init__(
        self, state: ServeApp, model: Model, req: GenRequest, prompts: list[Any], arrived: float
    ) -> None:
        self.state = state
        self.model = model
        self.req = req
        self.prompts = prompts
        self.arrived = arrived
        self.out = Outcome(req)
        self.submitted: float | None = None

    async def _run(self, emit: Any) -> BaseException | None:
        many = len(self.prompts) > 1
        try:
            if many:
                self.state.admit(self.model)  # a request is admitted as a whole
        except ApiError as err:
            return err
        self.submitted = time.perf_counter()

        async def one(i: int) -> None:
            # wait=False: a full engine answers 429 at once; the prompts of a request
            # already admitted wait for their turn instead.
            await generate(
                self.model, self.req, i, self.prompts[i], self.state.timeout, many,
                self.out, emit,
            )  # fmt: skip

        try:
            return await run_all(len(self.prompts), one, self.state.window(self.model))
        except TypeError as exc:  # an output that is not text
            return ApiError(
                400, f"model {self.model.name!r} does not generate text: {exc}",
                param="model", code="wrong_model_kind",
            )  # fmt: skip

    def _record(self) -> None:
        out, now = self.out, time.perf_counter()
        counts = out.usage()
        self.state.metrics.generation(
            self.model.name,
            # until a generate node gave it a slot (a graph without one: its submission)
            queue=(out.scheduled or self.submitted or now) - self.arrived,
            ttft=None if out.first is None else out.first - self.arrived,
            e2e=now - self.arrived,
            gaps=out.gaps,
            prompt_tokens=counts["prompt_tokens"],
            completion_tokens=counts["completion_tokens"],
        )

    async def _run_cancellable(self, emit: Any) -> BaseException | None:
        with self.state.requests.scope() as scope:
            return await self._run(emit)
        assert scope.cancelled_caught
        return self.state.cut()  # a shutdown's grace ran out

    async def complete(self, send: Send) -> None:
        error = await self._run_cancellable(self.out.collect)
        if error is not None:
            await send_error(send, self.state.fail(error, self.model))
            return
        self._record()
        frames = Frames(self.model.name, self.req.chat)
        await send_json(send, 200, frames.response(self.out.choices(), self.out.usage()))

    async def stream(self, send: Send) -> None:
        req, chat = self.req, self.req.chat
        frames = Frames(self.model.name, chat)
        if req.include_usage:
            frames.null_usage()
        sse = SSEWriter(send)
        choices = len(self.prompts) * req.n
        opened = [False] * choices  # chat: the role chunk went out
        offsets = [0] * choices  # completions logprobs: text_offset
        lock = anyio.Lock() if len(self.prompts) > 1 else None

        async def emit(
            choice: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None
        ) -> None:
            data = b""
            if chat and not opened[choice]:
                opened[choice] = True
                data += frames.chunk(choice, "", role=True)
            if logprobs:
                lp = (
                    chat_logprobs(logprobs)
                    if chat
                    else completion_logprobs(logprobs, offsets[choice])
                )
                offsets[choice] += len(text)
                data += frames.chunk(choice, text, logprobs=lp)
            elif text:
                offsets[choice] += len(text)
                data += frames.text(choice, text)
            if finish is not None:
                data += frames.chunk(choice, None if chat else "", finish=finish)
            if not data:
                return
            if lock is None:
                await sse.raw(data)
            else:
                async with lock:
                    await sse.raw(data)

        error = await self._run_cancellable(emit)
        if error is not None:
            await sse.fail(self.state.fail(error, self.model))
            return
        self._record()
        if req.include_usage:
            await sse.raw(frames.usage_frame(self.out.usage()))
        await sse.done()
