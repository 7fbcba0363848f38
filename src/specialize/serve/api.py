"""OpenAI-compatible HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions (both
streaming), plus /admin/adapters to register, mix and unregister specialists at run time.

`model` picks the base model or any adapter. Errors use OpenAI's shape ({"error": {...}}) and status codes,
so the official clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specialize.data import Turn
from specialize.generation.loop import Output
from specialize.generation.params import SamplingParams
from specialize.prompts import ChatTemplate, PromptTemplate, get_template
from specialize.serve.engine import CombinationType, Engine, EngineError
from specialize.serve.engine import Request as EngineRequest

# How often a non-streaming request checks that its client is still there (a gone client's rows are cancelled).
DISCONNECT_POLL_S = 0.25


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_request_bytes: int = Field(1 << 20, ge=1024)
    max_tokens: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    max_prompt_tokens: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)


# ------------------------------------------------------------------------------------------- schemas


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logit_bias=None, ...)
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model says (benchmarks)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None  # load from a directory ...
    mix: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = None  # ... or combine: {name: weight}
    combination_type: CombinationType = "cat"


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ------------------------------------------------------------------------------------------- the app


def build_app(
    engine: Engine,
    *,
    token: str | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """`token`: bearer token required on every endpoint when set; admin endpoints always need it."""
    limits = limits or Limits()
    app = FastAPI(title="specialize", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.code, err.param)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
        return _error(err.status, str(err), err.code)

    def authorize(request: Request, *, admin: bool = False) -> None:
        if token is None:
            if admin:
                raise APIError(403, "admin endpoints are disabled: start the server with a token", "forbidden")
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise APIError(401, "missing or wrong bearer token", "invalid_api_key")

    async def body(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise APIError(413, f"request body over {limits.max_request_bytes} bytes", "request_too_large")
        raw = b""
        async for chunk in request.stream():  # also bounds bodies sent without a length
            raw += chunk
            if len(raw) > limits.max_request_bytes:
                raise APIError(413, f"request body over {limits.max_request_bytes} bytes", "request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"malformed JSON: {err}", "invalid_json") from err
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{param}: {first['msg']}", "invalid_request", param) from err

    def check_model(name: str) -> None:
        if name not in engine.model_names():
            raise APIError(404, f"the model {name!r} does not exist; see /v1/models", "model_not_found", "model")

    def params(req: _Sampling, max_tokens: int | None, seed_offset: int) -> SamplingParams:
        max_tokens = max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit {limits.max_tokens}",
                           "max_tokens_too_large", "max_tokens")  # fmt: skip
        if req.n > limits.max_n:
            raise APIError(400, f"n {req.n} is over this server's limit {limits.max_n}", "invalid_request", "n")
        if req.stream and req.n > 1:
            raise APIError(400, "streaming supports n=1 only", "invalid_request", "n")
        seed = None if req.seed is None else req.seed + seed_offset
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  stop=req.stops(), seed=seed, ignore_eos=req.ignore_eos)  # fmt: skip
        except ValidationError as err:
            first = err.errors()[0]
            raise APIError(400, f"{first['loc'][0]}: {first['msg']}", "invalid_request", "stop") from err

    def encode(text: str, *, special: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON allows "\ud800"; no tokenizer can encode a lone surrogate
            raise APIError(400, f"the prompt is not valid Unicode ({err.reason} at {err.start})", "invalid_request",
                           "prompt") from err  # fmt: skip
        ids = engine.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit "
                           f"{limits.max_prompt_tokens}", "context_length_exceeded", "prompt")  # fmt: skip
        if not ids:
            raise APIError(400, "the prompt is empty", "invalid_request", "prompt")
        return ids

    def template_of(model: str) -> PromptTemplate:
        """The model's own template: the one its adapter was trained with (or the server's override)."""
        return get_template(engine.template_of(model), engine.tokenizer)

    def chat_prompt(messages: list[ChatMessage], template: PromptTemplate) -> str:
        system = [m.content for m in messages if m.role in ("system", "developer")]
        turns = [m for m in messages if m.role not in ("system", "developer")]
        if not turns or turns[-1].role != "user":
            raise APIError(400, "the last message must come from the user", "invalid_request", "messages")
        history = []
        for i in range(0, len(turns) - 1, 2):
            u, a = turns[i], turns[i + 1] if i + 1 < len(turns) else None
            if u.role != "user" or a is None or a.role != "assistant":
                raise APIError(400, "messages must alternate user and assistant", "invalid_request", "messages")
            history.append(Turn(user=u.content, assistant=a.content))
        t = template
        if system:
            if not isinstance(template, ChatTemplate):
                raise APIError(400, f"system messages need the chat template; this server renders {template.name}",
                               "invalid_request", "messages")  # fmt: skip
            t = dataclasses.replace(template, system="\n".join(system))
        return t.render(turns[-1].content, "", history)

    def handles(model: str, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[EngineRequest, Any]]:
        """Submit every job of one HTTP request, all or none; each gets a queue its outputs arrive on."""
        loop = asyncio.get_running_loop()
        out = []
        for ids, p in jobs:
            queue: asyncio.Queue[Output] = asyncio.Queue()
            out.append((engine.request(model, ids, p, lambda o, q=queue: loop.call_soon_threadsafe(q.put_nowait, o)),
                        queue))  # fmt: skip
        engine.submit(*(r for r, _ in out))
        return out

    async def collect(handle: tuple[EngineRequest, Any], http: Request) -> Output:
        """The whole output of a request; cancelled as soon as the client goes away."""
        req, queue = handle
        text = []
        try:
            while True:
                try:
                    out: Output = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "the client closed the request", "client_closed") from None
                    continue
                text.append(out.text)
                if out.error is not None:
                    raise APIError(500, out.error, "server_error")
                if out.finished:
                    return Output("".join(text), tuple(req.tokens), out.finish_reason)
        finally:
            if req.result is None:
                req.cancel()

    async def gather(hs: list[tuple[EngineRequest, Any]], http: Request) -> list[Output]:
        try:
            return await asyncio.gather(*(collect(h, http) for h in hs))
        finally:  # one failed or the client left: the others stop decoding too
            for r, _ in hs:
                if r.result is None:
                    r.cancel()

    def sse(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    async def stream(handle: tuple[EngineRequest, Any], chunk, usage_of) -> AsyncIterator[bytes]:
        req, queue = handle
        try:
            while True:
                out: Output = await queue.get()
                if out.error is not None:
                    yield sse({"error": {"message": out.error, "type": "server_error"}})
                    break
                if out.text or out.finish_reason:
                    yield sse(chunk(out.text, out.finish_reason))
                if out.finish_reason:
                    usage = usage_of(len(req.tokens))
                    if usage is not None:
                        yield sse(usage)
                    break
            yield b"data: [DONE]\n\n"
        finally:  # the client went away, or we are done: stop decoding this row either way
            req.cancel()

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # liveness only, open without the token (load balancers probe it); what is served is behind the token
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        authorize(request)  # like every endpoint but /health: behind the token when one is set
        rows, tokens = engine.loop.in_flight()
        return {"models": engine.model_names(), "waiting": len(engine.loop.waiting), "rows_in_flight": rows,
                "tokens_in_flight": tokens, **engine.stats}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "specialize"} for n in engine.model_names()
        ]}  # fmt: skip

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        authorize(request)
        req: CompletionRequest = await body(request, CompletionRequest)
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: empty list", "invalid_request", "prompt")
        encoded = [encode(p, special=True) for p in prompts]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if len(prompts) > 1:
                raise APIError(400, "streaming supports one prompt at a time", "invalid_request", "prompt")
            [handle] = handles(req.model, [(encoded[0], params(req, req.max_tokens, 0))])
            include = bool((req.stream_options or {}).get("include_usage"))

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": now, "model": req.model,
                        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}  # fmt: skip

            def final(n: int) -> dict[str, Any] | None:
                return {"id": rid, "object": "text_completion", "created": now, "model": req.model, "choices": [],
                        "usage": usage(len(encoded[0]), n)} if include else None  # fmt: skip

            return StreamingResponse(stream(handle, chunk, final), media_type="text/event-stream")
        jobs = [(ids, params(req, req.max_tokens, j)) for ids in encoded for j in range(req.n)]
        results = await gather(handles(req.model, jobs), request)
        choices = [{"text": (prompts[i // req.n] if req.echo else "") + r.text, "index": i, "logprobs": None,
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]  # fmt: skip
        n_prompt = sum(len(ids) for ids in encoded) * req.n
        return {"id": rid, "object": "text_completion", "created": now, "model": req.model, "choices": choices,
                "usage": usage(n_prompt, sum(len(r.token_ids) for r in results))}  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        authorize(request)
        req: ChatRequest = await body(request, ChatRequest)
        check_model(req.model)
        template = template_of(req.model)
        ids = encode(chat_prompt(req.messages, template), special=template.add_special_tokens)
        max_tokens = req.max_completion_tokens or req.max_tokens
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            [handle] = handles(req.model, [(ids, params(req, max_tokens, 0))])
            include = bool((req.stream_options or {}).get("include_usage"))
            first = [True]

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": req.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

            def final(n: int) -> dict[str, Any] | None:
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": req.model,
                        "choices": [], "usage": usage(len(ids), n)} if include else None  # fmt: skip

            return StreamingResponse(stream(handle, chunk, final), media_type="text/event-stream")
        results = await gather(handles(req.model, [(ids, params(req, max_tokens, j)) for j in range(req.n)]), request)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": now, "model": req.model, "choices": choices,
                "usage": usage(len(ids) * req.n, sum(len(r.token_ids) for r in results))}  # fmt: skip

    @app.get("/admin/adapters")
    async def adapters(request: Request) -> dict[str, Any]:
        authorize(request, admin=True)
        return {"base": engine.base_name, "adapters": engine.adapters}

    @app.post("/admin/adapters")
    async def add_adapter(request: Request) -> dict[str, Any]:
        authorize(request, admin=True)
        req: AdapterRequest = await body(request, AdapterRequest)
        if (req.path is None) == (req.mix is None):
            raise APIError(400, "give either path (load a directory) or mix ({adapter: weight})", "invalid_request")
        if req.path is not None:
            await asyncio.to_thread(engine.add_adapter, req.name, req.path)
        else:
            mix = req.mix or {}
            await asyncio.to_thread(engine.mix_adapters, req.name, list(mix), list(mix.values()), req.combination_type)
        return {"name": req.name, **engine.adapters[req.name]}

    @app.delete("/admin/adapters/{name}")
    async def remove_adapter(name: str, request: Request) -> dict[str, Any]:
        authorize(request, admin=True)
        await asyncio.to_thread(engine.remove_adapter, name)
        return {"name": name, "deleted": True}

    return app
