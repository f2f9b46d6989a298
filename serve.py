"""Serve a model over the OpenAI API, with continuous batching and every decoding strategy.

    python serve.py                                              # the default model on 127.0.0.1:8000
    python serve.py --quantize int8 --compile --max_batch_size 8
    python serve.py --generation_strategy self_speculative --exit_layer 8 --num_speculations 4 --compile
    python serve.py --port 0                                     # any free port (printed)
    LAYERSKIP_API_KEY=secret python serve.py --host 0.0.0.0      # clients then send the key
    torchrun --standalone --nproc_per_node=2 serve.py --compile  # tensor parallel: rank 0 serves

Endpoints: POST /v1/completions and /v1/chat/completions (stream, max_tokens, temperature, top_p,
seed, stop, usage, finish_reason; the chat template is the checkpoint's), GET /v1/models,
GET /health and GET /metrics (Prometheus text). Errors come in OpenAI's JSON shape. The model,
decoding and sampling options are shared with every command (options.py); the sampling options
are the defaults of a request that does not set them. Rows run together share their sampling
settings (serving.py says how requests are grouped).
"""
import asyncio
import hmac
import json
import os
import signal
import sys
import threading
import time
import uuid

import cli

cli.start(__name__)  # first: a Ctrl-C during the imports below is `interrupted` too (cli.py)

import torch  # noqa: E402
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

import batching  # noqa: E402
from engine import init_distributed, load_engine  # noqa: E402
import options  # noqa: E402
from sampling import SamplingParams  # noqa: E402
from serving import EngineLoop, QueueFull, Request  # noqa: E402
import tp  # noqa: E402

API_KEY_ENV = "LAYERSKIP_API_KEY"
MAX_BODY_BYTES = 1 << 20
MAX_STOPS = 4
DEFAULT_PREFILL_CHUNK = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Fields a client may send that this server cannot honour, with the value that asks for nothing.
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None,
               "tool_choice": None, "response_format": None}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers=None) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=headers)


# --- reading a request ---------------------------------------------------------------------------
def number(body: dict, name: str, low: float, high: float, default, low_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if not (low < v if low_open else low <= v) or v > high:
        raise ApiError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {v}", name,
                       "invalid_value")
    return v


def integer(body: dict, name: str, low: int, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v < low:
        raise ApiError(400, f"{name} must be >= {low}, got {v}", name, "invalid_value")
    return v


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop", "invalid_value")
    return stops


def refuse_unsupported(body: dict):
    for name, nothing in UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != nothing and not (name == "logit_bias" and v == {}) and \
                not (name == "response_format" and v == {"type": "text"}) and not (name == "logprobs" and v is False):
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"{where} must be an object whose role is system, user or assistant", where,
                           "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content",
                               "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """The prompt of /v1/completions: a string or token ids (one prompt; a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab_size})", "prompt", "invalid_value")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "prompt: several prompts in one request are not supported; send one request each",
                       "prompt", "unsupported_parameter")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids", "prompt", "invalid_type")
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
    return ids


class Server:
    """The HTTP side: reads and checks a request, submits it to the engine loop and answers with its
    tokens as text, streamed (server-sent events) or whole."""

    def __init__(self, loop: EngineLoop, tokenizer, model_ids: list[str], defaults: SamplingParams,
                 api_key: str | None, strategy: str, max_body: int = MAX_BODY_BYTES):
        self.loop, self.tokenizer, self.model_ids, self.defaults = loop, tokenizer, model_ids, defaults
        self.api_key, self.strategy, self.max_body = api_key, strategy, max_body
        self.metrics = loop.metrics
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.health), Route("/metrics", self.render_metrics),
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def render_metrics(self, request):
        return PlainTextResponse(self.metrics.render(self.loop.queue_length(), self.loop.running_rows(),
                                                     self.loop.rows), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        try:
            self.authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": self.model_ids[0], "object": "model",
                                                         "created": self.created, "owned_by": "layerskip"}]})

    def authorize(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key")

    async def read_body(self, request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body exceeds {self.max_body} bytes", None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the request body exceeds {self.max_body} bytes", None, "request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", None, "invalid_type")
        return body

    def parse(self, body: dict, chat: bool):
        """(prompt ids, max_tokens, sampling, seed, stop strings, stream, include usage in the stream)."""
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", "model", "invalid_type")
        if model not in self.model_ids:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_ids[0]!r}",
                           "model", "model_not_found")
        refuse_unsupported(body)
        if chat:
            if self.tokenizer.chat_format is None:
                raise ApiError(400, "this model's tokenizer has no chat format; use /v1/completions", "messages",
                               "unsupported_parameter")
            try:
                prompt = self.tokenizer.encode_chat(chat_messages(body))
            except ValueError as e:  # the template's own rules (llama2: alternating roles)
                raise ApiError(400, str(e), "messages", "invalid_value") from None
        else:
            prompt = completion_prompt(body, self.tokenizer, self.loop.engine.model.args.vocab_size)
        room = self.loop.room(len(prompt))
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = integer(body, name, 1, None)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ApiError(400, f"this server's context is {self.loop.context} tokens (--max_seq_length), but the "
                                f"prompt ({len(prompt)} tokens) plus {name} ({asked})"
                                f"{f' and {self.loop.lookahead} of speculation lookahead' if self.loop.lookahead else ''} needs "
                                f"{len(prompt) + asked + self.loop.lookahead}", name, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
        d = self.defaults
        temperature = number(body, "temperature", 0, 2, d.temperature)
        top_p = number(body, "top_p", 0, 1, d.top_p, low_open=True)
        top_k = integer(body, "top_k", 0, d.top_k)  # an extension, as vLLM and llama-server take it
        seed = integer(body, "seed", -(1 << 63), None)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream", "invalid_type")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options",
                           "invalid_type")
        return (prompt, max_tokens, SamplingParams(temperature, top_k or None, top_p), seed, stop_strings(body),
                stream, opts.get("include_usage", False))

    async def completions(self, request):
        return await self.handle(request, chat=False)

    async def chat(self, request):
        return await self.handle(request, chat=True)

    async def handle(self, request, chat: bool):
        try:
            self.authorize(request)
            prompt, max_tokens, sampling, seed, stops, stream, include_usage = self.parse(
                await self.read_body(request), chat)
        except ApiError as e:
            self.metrics.count(str(e.status))
            return e.response()
        events, aloop = asyncio.Queue(), asyncio.get_running_loop()

        def deliver(ids, finish, error):  # from the engine loop's thread
            try:
                aloop.call_soon_threadsafe(events.put_nowait, (ids, finish, error))
            except RuntimeError:  # the event loop has closed: the server is going down
                pass
        req = Request(prompt, max_tokens, sampling, deliver, seed)
        try:
            self.loop.submit(req)
        except QueueFull as e:
            self.metrics.count("429")
            return ApiError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error").response(
                {"Retry-After": "1"})
        reply = Reply(self, req, events, stops, chat, include_usage)
        if stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await reply.whole(request)


class Reply:
    """One request's answer: its tokens as text, held back where a stop string may be starting or a
    UTF-8 character is incomplete, cut at the first stop string (which is never sent)."""

    def __init__(self, server: Server, req: Request, events: asyncio.Queue, stops: list[str], chat: bool,
                 include_usage: bool):
        self.server, self.req, self.events, self.stops, self.chat = server, req, events, stops, chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.ids, self.sent = [], 0
        self.tokens, self.finish, self.first_token_s, self.counted = 0, None, None, False

    def add(self, ids: list[int]) -> str:
        """The text that may be sent after these new tokens."""
        stop_ids = self.server.loop.stop_ids
        self.tokens += len(ids)
        self.ids += [i for i in ids if i not in stop_ids]
        text = self.server.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end, self.finish = min(hits), "stop"
        else:
            end = len(text) - text.endswith("\ufffd")
            hold = max((j for s in self.stops for j in range(1, len(s)) if text[:end].endswith(s[:j])), default=0)
            end = max(end - hold, self.sent)
        out, self.sent = text[self.sent:end], max(end, self.sent)
        return out

    def rest(self) -> str:
        """What was held back, once the generation has ended without a stop string."""
        text = self.server.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out

    async def events_text(self):
        """The text to send as the tokens come, until the answer ends (self.finish set); raises
        ApiError if the engine refused or failed the request."""
        while True:
            ids, finish, error = await self.events.get()
            if error is not None:
                status, message = error
                raise ApiError(status, message, None, "engine_error",
                               "server_error" if status >= 500 else "invalid_request_error")
            if self.first_token_s is None and ids:
                self.first_token_s = time.perf_counter() - self.req.arrived
            text = self.add(ids)
            if self.finish == "stop":  # a stop string: the row is not needed any more
                self.server.loop.cancel(self.req)
                yield text
                return
            if finish is not None:
                self.finish = finish
                yield text + self.rest()
                return
            yield text

    def usage(self) -> dict:
        n = len(self.req.prompt)
        return {"prompt_tokens": n, "completion_tokens": self.tokens, "total_tokens": n + self.tokens}

    def speculation(self) -> dict:
        """The extension field: how the tokens were made."""
        out = {"strategy": self.server.strategy}
        st = self.req.seq.stats if self.req.seq is not None else None
        if st is not None and st.rounds:
            # null, not NaN (not JSON), when no round drafted (plain steps only)
            out |= {"rounds": st.rounds, "acceptance_rate": round(st.acceptance_rate, 4) if st.drafted else None,
                    "tokens_per_round": round(st.tokens_per_round, 3)}
            if st.sources:  # n-gram drafts: [rounds, drafts, accepted drafts] per source
                out["draft_sources"] = {name: dict(zip(("rounds", "drafted", "accepted"), counts))
                                        for name, counts in st.by_source.items()}
        return out

    def done(self, outcome: str):
        """Counts the request's outcome (its finish reason, an error status or "cancelled"), once."""
        if self.counted:
            return
        self.counted = True
        self.server.metrics.count(outcome)
        self.server.metrics.finished(self.req, self.first_token_s, time.perf_counter() - self.req.arrived)

    def choice(self, text: str | None, finish, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.server.model_ids[0]}

    async def whole(self, request) -> JSONResponse:
        gone = asyncio.create_task(wait_disconnect(request))
        parts = []
        try:
            async for text in aiter_until(self.events_text(), gone):
                parts.append(text)
        except ApiError as e:
            self.done(str(e.status))
            return e.response()
        finally:
            gone.cancel()
        if self.finish is None:  # the client went away
            self.server.loop.cancel(self.req)
            self.done("cancelled")
            return JSONResponse({}, 499)
        self.done(self.finish)
        return JSONResponse({**self.envelope(False), "choices": [self.choice("".join(parts), self.finish, False)],
                             "usage": self.usage(), "layerskip": self.speculation()})

    async def stream(self):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"
        try:
            if self.chat:
                yield sse({**self.envelope(True), "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                     "content": ""},
                                                               "logprobs": None, "finish_reason": None}]})
            async for text in self.events_text():
                if text:
                    yield sse({**self.envelope(True), "choices": [self.choice(text, None, True)]})
            yield sse({**self.envelope(True), "choices": [self.choice(None, self.finish, True)],
                       "layerskip": self.speculation()})
            if self.include_usage:
                yield sse({**self.envelope(True), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
            self.done(self.finish)
        except ApiError as e:  # the status line has gone: the error goes in the stream, as OpenAI's does
            self.done(str(e.status))
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            if self.finish is None:  # the client disconnected (the response was cancelled) or an error
                self.server.loop.cancel(self.req)
                self.done("cancelled")


async def wait_disconnect(request):
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def aiter_until(gen, stop_task):
    """Items of the async generator gen until stop_task finishes first."""
    while True:
        nxt = asyncio.ensure_future(gen.__anext__())
        finished, _ = await asyncio.wait({nxt, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in finished:
            nxt.cancel()
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


# --- the command ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests generated at once (rows of the KV cache)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests that may wait for a free row; beyond them a request gets 429")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="positions per row: prompt plus max_tokens (default: the model's context, at most 2048)")
    p.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="a longer prompt is prefilled this many tokens at a time, between the running rows' steps, "
                        "so that it does not stall them (0: whole prompts)")
    p.add_argument("--api_key", default=None, help=f"clients must send it as a bearer token (default: ${API_KEY_ENV}; "
                                                   "none: no key)")
    p.add_argument("--served_model_name", default=None, help="the model's id in the API (default: the checkpoint's "
                                                             "folder name)")
    options.add_options(p, sampling_temperature=options.GENERATION_TEMPERATURE)
    args = p.parse_args(argv)
    config = options.check_options(p, args)
    if args.max_batch_size < 1:
        p.error(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        p.error(f"--max_queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        p.error("--max_seq_length must be >= 2")
    if args.prefill_chunk < 0:
        p.error(f"--prefill_chunk must be >= 0 (0: whole prompts), got {args.prefill_chunk}")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return args, config


def warm_up(engine, loop: EngineLoop):
    """With --compile: one short batch at each row count a step can run (Batch.buckets), so that
    compilation happens before the first request, not during it."""
    e = engine
    batch = loop.new_batch(SamplingParams())
    t0 = time.perf_counter()
    for b in batch.buckets:
        print(f"Warming up: compiling the steps for {b} row{'s' if b > 1 else ''} ...", file=sys.stderr, flush=True)
        # a repeated token: n-gram drafts, where on, propose at every length up to the budget's end
        batching.generate_many(e.model, [[1] * 4] * b, 2 + loop.lookahead, SamplingParams(), e.steps,
                               e.strategy.exit_layer, (), None, loop.k, loop.draft, loop.policy,
                               draft_source=e.strategy.draft_source, ngram_tokens=e.strategy.ngram_tokens)
    e.compile_batched(sampling=SamplingParams())  # every round a policy can choose, not only those it chose here
    print(f"Warm-up done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv=None):
    args, config = parse_args(argv)
    # SIGTERM (a service manager, docker, torchrun passing it on): stop between two steps and exit 0
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with tp.command_scope():
        rank, world_size, config = init_distributed(config)
        engine = load_engine(config, rank, world_size)
        if engine.tokenizer is None:
            raise ValueError("serve.py needs a checkpoint with a tokenizer (random weights have none)")
        context = engine.model.args.max_position_embeddings
        size = args.max_seq_length or min(context, 2048)
        if size > context:
            raise ValueError(f"--max_seq_length {size} exceeds this model's context of {context}")
        engine.setup_caches(size, args.max_batch_size)
        torch.manual_seed(args.seed)  # under torchrun every rank draws the same samples
        loop = EngineLoop(engine, args.max_queue, args.prefill_chunk)
        if config.compile:
            warm_up(engine, loop)
        if rank != 0:  # the other ranks step with rank 0, which serves
            loop.serve_forever()
            return
        name = args.served_model_name or engine.path.parent.name
        server = Server(loop, engine.tokenizer, [name, config.checkpoint], config.sampling, args.api_key,
                        config.strategy.describe())
        http = uvicorn.Server(uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning",
                                             timeout_graceful_shutdown=1))
        thread = threading.Thread(target=http.run, name="http", daemon=True)
        thread.start()
        while not http.started and thread.is_alive():
            time.sleep(0.05)
        if not http.started:
            loop.serve_forever(keep_going=lambda: False)  # the other ranks stop too
            raise OSError(f"cannot listen on {args.host}:{args.port} (--host/--port; is the port in use?)")
        port = http.servers[0].sockets[0].getsockname()[1]
        key = ", API key required" if args.api_key else ""
        shards = f", tensor parallel over {world_size} ranks" if world_size > 1 else ""
        print(f"Serving {name} ({config.strategy.describe()}, {args.max_batch_size} rows of {size} positions{key}"
              f"{shards}) on http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
        try:
            loop.serve_forever(keep_going=lambda: thread.is_alive() and not stopping.is_set())
        finally:
            http.should_exit = True
            thread.join(timeout=3)
        if stopping.is_set():
            print("stopped (SIGTERM)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, label=tp.error_label)
