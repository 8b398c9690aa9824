"""``eft-local serve``: the OpenAI HTTP API over one EFT (FastAPI on uvicorn).

Thin by design: requests become ``SamplingParams`` and ``create_chat_completion`` /
``create_completion`` calls, which already return OpenAI-shaped dicts. Generations run in worker
threads (``--parallel`` of them decoded together by the EFT's batcher; the rest wait in a
bounded queue), and streamed chunks cross back to the event loop through an asyncio queue. A
client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..core.errors import EFTError, UnavailableError
from ..core.params import SamplingParams, http_fields
from ..engine.eft import EFT

# A chat of this many bytes is far beyond any context eft-local runs; larger bodies are refused.
MAX_BODY = 8 * 1024 * 1024


class APIError(Exception):
    """An error answered with an OpenAI error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Admission:
    """At most ``running`` generations at once and ``queue`` more waiting; beyond that, 503."""

    def __init__(self, running: int, queue: int):
        self.limit = running + queue
        self.inside = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.inside >= self.limit:
                raise APIError(503, "the server is busy: every slot and queue place is taken; retry shortly",
                               kind="server_error", code="overloaded", headers={"Retry-After": "1"})
            self.inside += 1

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def sampling_options(body: dict[str, Any], eft: EFT) -> dict[str, Any]:
    """The generation options a request asks for: SamplingParams' fields under their own names
    (EFT's own included), checked later by SamplingParams, and ``weight`` for the first delta's."""
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1: eft-local returns one choice per request", param="n")
    options = {}
    for f in http_fields():
        # The first name given wins: an alias (OpenAI's newer max_completion_tokens), then the field's own.
        given = [body[name] for name in (*f.metadata["aliases"], f.name) if body.get(name) is not None]
        if given:
            options[f.name] = given[0]
    if body.get("weight") is not None:
        if "weights" in options:
            raise APIError(400, "give weight or weights, not both", param="weight")
        options["weights"] = [body["weight"], *eft.weights[1:]]
    return options


def create_app(eft: EFT, *, model: str, queue: int = 16, api_key: str | None = None,
               max_body: int = MAX_BODY, parallel: int = 1, defaults: SamplingParams | None = None) -> FastAPI:
    """The app serving ``eft`` under the model id ``model``: ``parallel`` generations at once
    (the EFT's slots), ``queue`` more waiting; ``defaults`` for what a request leaves out (the
    server's own options, as llama-server's)."""
    workers = ThreadPoolExecutor(max_workers=parallel + queue, thread_name_prefix="eft-serve")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="eft-local", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    admission = Admission(parallel, queue)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            raise APIError(413, f"the request body is larger than {max_body} bytes", code="body_too_large")
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > max_body:
                raise APIError(413, f"the request body is larger than {max_body} bytes", code="body_too_large")
            parts.append(part)
        try:
            body = json.loads(b"".join(parts))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model):
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server has {model!r}",
                           code="model_not_found", param="model")
        return body

    async def run(body: dict[str, Any], start: Callable[[], Any]) -> Response:
        """Start a generation in a worker thread; answer with its whole result or its chunks."""
        admission.enter()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(workers, start)
        except BaseException:
            admission.leave()
            raise
        if not body.get("stream"):
            admission.leave()
            return JSONResponse(result)

        def give_back() -> None:
            try:
                result.close()
            finally:
                admission.leave()

        release = Once(give_back)
        started = threading.Event()
        body_iterator = sse(result, release, started)
        # A client gone before the response starts never runs the generator: its place in the
        # admission count and its stream are given back when the generator is collected. Once
        # started, the worker thread gives them back itself (the stream may still be running).
        weakref.finalize(body_iterator, lambda: None if started.is_set() else release())
        return StreamingResponse(body_iterator, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse(events: Iterator[dict[str, Any]], release: Callable[[], None],
                  started: threading.Event) -> AsyncIterator[bytes]:
        """Server-sent events from a chunk iterator that a worker thread advances."""
        started.set()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for event in events:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except EFTError as e:
                loop.call_soon_threadsafe(queue.put_nowait, api_error_of(e))
            except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                loop.call_soon_threadsafe(queue.put_nowait, APIError(500, f"{type(e).__name__}: {e}", kind="server_error"))
            finally:
                release()  # lets go of the models and the admission place, finished or stopped
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(workers, produce)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, APIError):
                    item = {"error": {"message": str(item), "type": item.kind, "param": None, "code": item.code}}
                yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            # The client went away (or the stream ended): the worker stops at its next token.
            stop.set()
            await asyncio.shield(worker)

    def include_usage(body: dict[str, Any]) -> bool:
        options = body.get("stream_options") or {}
        return bool(options.get("include_usage")) if isinstance(options, dict) else False

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        messages = [{"role": m.get("role"), "content": text_content(m.get("content"))} if isinstance(m, dict) else m
                    for m in messages]
        options = sampling_options(body, eft)
        logprobs = bool(body.get("logprobs") or False)
        top = body.get("top_logprobs")
        return await run(body, lambda: eft.create_chat_completion(
            messages, stream=bool(body.get("stream")), model=model, logprobs=logprobs, top_logprobs=top,
            include_usage=include_usage(body), params=defaults, **options))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string", param="prompt")
        options = sampling_options(body, eft)
        return await run(body, lambda: eft.create_completion(
            prompt, stream=bool(body.get("stream")), model=model, logprobs=body.get("logprobs"),
            include_usage=include_usage(body), params=defaults, **options))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "eft-local"}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(EFTError)
    async def eft_error(request: Request, e: EFTError) -> Response:
        return api_error_of(e).response()

    return app


def api_error_of(e: EFTError) -> APIError:
    """A library error as the client sees it: 503 when what the models run on is gone for now
    (an RPC server; the same request may work later), else 400."""
    if isinstance(e, UnavailableError):
        return APIError(503, str(e), kind="server_error", code="unavailable", headers={"Retry-After": "5"})
    return APIError(400, str(e))


class Once:
    """A callable that runs ``fn`` the first time it is called, from any thread, and never again."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def text_content(content: Any) -> Any:
    """A message's content: a string, or OpenAI's list of text parts joined."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content
