"""serve.py as its users reach it: a real server process on a free localhost port, driven by the
official `openai` client (and raw HTTP for what a client library would not send). Each greedy
answer is checked against the same prompt's batch-1 greedy output of the engine generate.py runs."""
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from conftest import REPO, assert_varied

KEY = "test-key"


def raw(url, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one request, over the standard library's client
    (for what a client library would not send)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read().decode()
    finally:
        conn.close()
    try:
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw)
    except ValueError:
        return r.status, {k.lower(): v for k, v in r.getheaders()}, raw


class ServerProcess:
    def __init__(self, *flags, env_key=None, launcher=()):
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
        if env_key:
            env["LAYERSKIP_API_KEY"] = env_key
        # Ctrl-C as at a terminal, even where the suite itself runs with SIGINT ignored (nohup, a background job)
        self.proc = subprocess.Popen([sys.executable, *launcher, str(REPO / "serve.py"), "--port", "0", *flags],
                                     cwd=REPO, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.log = []
        deadline = time.time() + 300
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict:
        text = raw(self.url, "GET", "/metrics")[2]
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(layerskip_\S+) (\S+)$", text, re.M)}

    def stop(self, sig=signal.SIGINT):
        """Ctrl-C (or sig); the exit status (None: it had to be killed)."""
        self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout=30)
            self.reader.join(timeout=10)  # the last lines of its stderr
            return status
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def reference(tiny_smol_dir):
    """Batch-1 greedy ids of a prompt (ids) on the engine generate.py uses, without stop tokens' text."""
    from engine import load_engine
    from options import EngineConfig
    engine = load_engine(EngineConfig(checkpoint=str(tiny_smol_dir)))
    engine.setup_caches(512)

    def generate(ids, n):
        tokens, _ = engine.run(torch.tensor(ids), n)
        return tokens[0, len(ids):].tolist()
    generate.tokenizer = engine.tokenizer
    return generate


@pytest.fixture(scope="module")
def server(tiny_smol_dir):
    s = ServerProcess("--checkpoint_path", str(tiny_smol_dir), "--max_batch_size", "4", "--max_seq_length", "512",
                      "--temperature", "0", "--prefill_chunk", "64", env_key=KEY)
    yield s
    assert s.stop() == 130


def text_of(reference, ids):
    tok = reference.tokenizer
    return tok.decode([i for i in ids if i not in tok.stop_ids])


PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "Paris is the capital of",
           "1, 2, 3, 4,", "Dear reader,", "import torch", "The weather today"]
LONG = " ".join(f"item {i} of the list, then" for i in range(40))  # prefilled in chunks (--prefill_chunk 64)


def test_completions_and_chat_equal_batch1_greedy(server, reference, tiny_smol_dir):
    client, tok = server.client(), reference.tokenizer
    name = tiny_smol_dir.name
    assert [m.id for m in client.models.list().data] == [name]
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    want = reference(tok.encode(PROMPTS[0]), 12)
    assert_varied(want)
    assert r.choices[0].text == text_of(reference, want)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(PROMPTS[0])), 12)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    c = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    want = reference(tok.encode_chat(messages), 10)
    assert c.choices[0].message.content == text_of(reference, want)
    assert c.choices[0].message.role == "assistant"
    assert c.usage.prompt_tokens == len(tok.encode_chat(messages))
    # token ids as the prompt, and the server's default temperature (--temperature 0)
    ids = tok.encode(PROMPTS[1])
    r = client.completions.create(model=name, prompt=ids, max_tokens=6)
    assert r.choices[0].text == text_of(reference, reference(ids, 6))


def test_streaming_gives_the_same_text_and_usage(server, reference, tiny_smol_dir):
    client, name = server.client(), tiny_smol_dir.name
    whole = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices
    messages = [{"role": "user", "content": PROMPTS[3]}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=9, temperature=0)
    parts = list(client.chat.completions.create(model=name, messages=messages, max_tokens=9, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_and_are_never_sent(server, reference, tiny_smol_dir):
    client, tok, name = server.client(), reference.tokenizer, tiny_smol_dir.name
    full = text_of(reference, reference(tok.encode(PROMPTS[4]), 30))
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a string the greedy text holds
    want = full[:full.index(stop)]
    r = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=30, temperature=0,
                                  stop=["\x00never", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=30, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_each_equal_their_solo_greedy_output(server, reference, tiny_smol_dir):
    client, tok, name = server.client(), reference.tokenizer, tiny_smol_dir.name
    lengths = [20, 7, 33, 12, 25, 9, 40, 16]  # rows end at different steps; 8 clients over 4 rows queue
    prompts = PROMPTS[:7] + [LONG]
    assert len(tok.encode(LONG)) > 3 * 64

    def ask(i):
        if i % 2:
            chunks = client.completions.create(model=name, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=name, prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text
    steps = server.metrics()["layerskip_batch_steps_total"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i, text in enumerate(got):
        assert text == text_of(reference, reference(tok.encode(prompts[i]), lengths[i])), prompts[i]
    m = server.metrics()
    assert m["layerskip_running_rows"] == 0
    # rows shared steps: fewer steps than one client after another would take (a token each, the first from the prefill)
    assert m["layerskip_batch_steps_total"] - steps < sum(lengths) - len(lengths)


@pytest.mark.parametrize("flags", [["--generation_strategy", "self_speculative", "--exit_layer", "2",
                                    "--num_speculations", "3"],
                                   ["--generation_strategy", "self_speculative", "--draft_quantize", "int8",
                                    "--num_speculations", "2"],
                                   ["--generation_strategy", "self_speculative", "--draft_source", "ngram",
                                    "--ngram_tokens", "4"],
                                   ["--generation_strategy", "self_speculative", "--exit_layer", "2",
                                    "--num_speculations", "3", "--draft_source", "auto"]],
                         ids=["layerskip", "int8_self_draft", "ngram", "ngram_or_layerskip"])
def test_speculative_server_gives_each_client_its_greedy_output(tiny_smol_dir, reference, flags):
    s = ServerProcess("--checkpoint_path", str(tiny_smol_dir), "--max_batch_size", "4", "--max_seq_length", "512",
                      "--temperature", "0", *flags)
    try:
        client, tok = s.client(), reference.tokenizer
        lengths = [17, 5, 26, 11, 30, 8]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: client.completions.create(
                model=tiny_smol_dir.name, prompt=PROMPTS[i], max_tokens=lengths[i]), range(6)))
        for i, r in enumerate(got):
            assert r.choices[0].text == text_of(reference, reference(tok.encode(PROMPTS[i]), lengths[i]))
            assert r.usage.completion_tokens == lengths[i]
        m = s.metrics()
        assert m["layerskip_sequence_rounds_total"] > 0 and m["layerskip_drafted_tokens_total"] > 0
        assert got[4].model_extra["layerskip"]["rounds"] > 0
        if "--draft_source" in flags:  # the extension says which source drafted what
            assert all("ngram" in r.model_extra["layerskip"]["draft_sources"] or
                       "plain" in r.model_extra["layerskip"]["draft_sources"] for r in got)
    finally:
        assert s.stop() == 130


def test_greedy_and_sampled_requests_share_the_batch(server, reference, tiny_smol_dir):
    """Requests with different sampling settings run in the same steps; the greedy ones still give
    their batch-1 greedy text."""
    client, tok, name = server.client(), reference.tokenizer, tiny_smol_dir.name
    settings = [{"temperature": 0}, {"temperature": 0.7}, {"temperature": 0}, {"temperature": 1.0, "top_p": 0.9}]
    steps = server.metrics()["layerskip_batch_steps_total"]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: client.completions.create(model=name, prompt=PROMPTS[i], max_tokens=24,
                                                                **settings[i]), range(4)))
    for i in (0, 2):
        assert got[i].choices[0].text == text_of(reference, reference(tok.encode(PROMPTS[i]), 24))
    assert all(r.usage.completion_tokens == 24 for r in got)
    assert server.metrics()["layerskip_batch_steps_total"] - steps < 2 * 23  # one after another: 4 x 23


def test_seeded_sampling_repeats(server, tiny_smol_dir):
    client, name = server.client(), tiny_smol_dir.name
    runs = [client.completions.create(model=name, prompt=PROMPTS[5], max_tokens=20, temperature=1.0, seed=seed)
            .choices[0].text for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_each_seeded_request_gets_a_batch_of_its_own_even_at_a_freed_requests_address():
    """Two seeded requests one after another: the second must start a new Batch (and reseed), also
    where CPython puts it at the first one's freed address (its group was id(self) once: CI saw seed 7
    give two different texts)."""
    from sampling import SamplingParams
    from serving import Request
    sampled = SamplingParams(temperature=1.0)
    groups = []
    for rid in (1, 2):
        req = Request([1, 2], 4, sampled, print, seed=7, rid=rid)
        groups.append(req.group(True))
        del req
    assert groups[0] != groups[1]


def test_bad_requests_get_their_status_and_the_server_still_answers(server, reference, tiny_smol_dir):
    url, name = server.url, tiny_smol_dir.name
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(body, headers=auth, path="/v1/completions"):
        status, _, answer = raw(url, "POST", path, body, headers)
        return status, answer.get("error", {})
    ok = {"model": name, "prompt": "Hello", "max_tokens": 3}
    cases = [
        (b"{not json", 400, None), (b"[1, 2]", 400, None),
        ({**ok, "max_tokens": "three"}, 400, "max_tokens"), ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "model": "gpt-4"}, 404, "model"), ({**ok, "prompt": 5}, 400, "prompt"),
        ({**ok, "prompt": ""}, 400, "prompt"), ({**ok, "prompt": [10 ** 9]}, 400, "prompt"),
        ({**ok, "max_tokens": 600}, 400, "max_tokens"), ({**ok, "prompt": "word " * 600}, 400, "max_tokens"),
        ({**ok, "temperature": 5}, 400, "temperature"), ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"), ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "stop": [""]}, 400, "stop"), ({**ok, "n": 2}, 400, "n"), ({**ok, "logprobs": 3}, 400, "logprobs"),
        ({**ok, "stream": "yes"}, 400, "stream"),
    ]
    for body, status, param in cases:
        got, error = post(body)
        assert got == status, (body, error)
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    chat = {"model": name, "max_tokens": 3}
    assert post({**chat, "messages": []}, path="/v1/chat/completions")[0] == 400
    assert post({**chat, "messages": [{"role": "robot", "content": "x"}]}, path="/v1/chat/completions")[0] == 400
    assert post(ok, headers={})[0] == 401
    assert post(ok, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert raw(url, "GET", "/v1/models")[0] == 401
    assert post(b'{"prompt": "' + b"x" * (2 << 20) + b'"}')[0] == 413
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model=name, prompt="Hi", max_tokens=2)
    # unknown fields are ignored, as OpenAI's server does; the server still answers correctly
    status, _, got = raw(url, "POST", "/v1/completions", {**ok, "prompt": PROMPTS[6], "max_tokens": 8,
                                                           "temperature": 0, "some_future_field": {"x": 1},
                                                           "user": "me"}, auth)
    tok = reference.tokenizer
    assert status == 200
    assert got["choices"][0]["text"] == text_of(reference, reference(tok.encode(PROMPTS[6]), 8))
    assert raw(url, "GET", "/health")[2] == {"status": "ok"}


def test_disconnect_frees_the_row_and_a_full_queue_gives_429(tiny_smol_dir):
    s = ServerProcess("--checkpoint_path", str(tiny_smol_dir), "--max_batch_size", "1", "--max_queue", "1",
                      "--max_seq_length", "4096", "--temperature", "0")
    try:
        name = tiny_smol_dir.name
        body = {"model": name, "prompt": "Hello", "max_tokens": 4000, "stream": True}
        host, port = s.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")  # the row is taken and streaming

            def queue_length_becomes(n):
                deadline = time.time() + 30
                while s.metrics()["layerskip_queue_length"] != n and time.time() < deadline:
                    time.sleep(0.05)
                return s.metrics()["layerskip_queue_length"] == n
            # a client that leaves while its request waits gives its place in the queue back at once
            queued = http.client.HTTPConnection(host, int(port), timeout=60)
            queued.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            assert queue_length_becomes(1)
            queued.close()
            assert queue_length_becomes(0)
            waiting = ThreadPoolExecutor(1).submit(lambda: s.client().completions.create(
                model=name, prompt="Hi", max_tokens=3, temperature=0))
            assert queue_length_becomes(1)
            status, headers, full = raw(s.url, "POST", "/v1/completions", {**body, "stream": False})
            assert status == 429 and headers["retry-after"]
            assert full["error"]["code"] == "rate_limit_exceeded"
            assert s.metrics()["layerskip_running_rows"] == 1
        finally:
            conn.close()
        # the client went away mid-stream: its row is freed and the waiting request runs
        assert waiting.result(timeout=60).choices[0].finish_reason == "length"
        m = s.metrics()
        assert m['layerskip_requests_total{outcome="cancelled"}'] == 2 and m["layerskip_running_rows"] == 0
        assert m["layerskip_generation_tokens_total"] < 4000
    finally:
        assert s.stop(signal.SIGTERM) == 0  # a service manager's stop: between two steps, exit status 0
    assert any("stopped (SIGTERM)" in line for line in s.log)


@pytest.mark.parametrize("flags, message", [
    (["--max_batch_size", "0"], "--max_batch_size must be >= 1"),
    (["--port", "70000"], "--port must be in"),
    (["--max_queue", "-1"], "--max_queue must be >= 0"),
    (["--prefill_chunk", "-5"], "--prefill_chunk must be >= 0"),
    (["--max_seq_length", "1"], "--max_seq_length must be >= 2"),
])
def test_bad_flags_are_one_line(flags, message):
    r = subprocess.run([sys.executable, str(REPO / "serve.py"), *flags], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_server_compiles_before_listening_and_never_again(tiny_smol_dir, reference):
    """--compile: the warm-up compiles the steps of every row count before the server listens;
    requests joining and leaving at 1 and 2 rows then compile nothing (no line on stderr)."""
    s = ServerProcess("--checkpoint_path", str(tiny_smol_dir), "--max_batch_size", "2", "--max_seq_length", "256",
                      "--temperature", "0", "--compile")
    try:
        assert any("compiling the graph of" in line for line in s.log)
        before = len(s.log)
        client, tok = s.client(), reference.tokenizer
        lengths = [9, 14, 4]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: client.completions.create(
                model=tiny_smol_dir.name, prompt=PROMPTS[i], max_tokens=lengths[i]).choices[0].text, range(3)))
        assert got == [text_of(reference, reference(tok.encode(PROMPTS[i]), n)) for i, n in enumerate(lengths)]
        time.sleep(0.5)
        assert not any("compil" in line for line in s.log[before:]), s.log[before:]
    finally:
        assert s.stop() == 130


@pytest.mark.slow
def test_tensor_parallel_server_answers_from_rank_0_with_single_process_output(tiny_smol_dir, reference):
    """torchrun over 2 gloo ranks: rank 0 serves, both ranks step together on the requests it
    broadcasts; every client's greedy text is the single-process one."""
    s = ServerProcess("--checkpoint_path", str(tiny_smol_dir), "--max_batch_size", "2", "--max_seq_length", "256",
                      "--temperature", "0", "--prefill_chunk", "16",
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    try:
        assert any("tensor parallel over 2 ranks" in line for line in s.log)
        client, tok = s.client(), reference.tokenizer
        lengths = [12, 5, 20]
        prompts = [PROMPTS[0], LONG[:200], PROMPTS[3]]  # three clients over two rows, one prefilled in chunks
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: client.completions.create(
                model=tiny_smol_dir.name, prompt=prompts[i], max_tokens=lengths[i]).choices[0].text, range(3)))
        assert got == [text_of(reference, reference(tok.encode(p), n)) for p, n in zip(prompts, lengths)]
    finally:
        s.stop()
    assert s.proc.returncode is not None


def test_smollm2_chat_streams_its_greedy_reply(smollm2_dir):
    from engine import load_engine
    from options import EngineConfig
    engine = load_engine(EngineConfig(checkpoint=str(smollm2_dir)))
    engine.setup_caches(256)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenizer.encode_chat(messages)
    tokens, _ = engine.run(torch.tensor(ids), 24)
    want = engine.tokenizer.decode([t for t in tokens[0, len(ids):].tolist() if t not in engine.tokenizer.stop_ids])
    assert "Paris" in want
    s = ServerProcess("--max_batch_size", "2", "--max_seq_length", "256", "--temperature", "0")
    try:
        parts = list(s.client().chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                        max_tokens=24, stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == want
        assert parts[-1].choices[0].finish_reason == ("stop" if len(tokens[0]) - len(ids) < 24 else "length")
    finally:
        assert s.stop() == 130


def test_load_script_reports_each_level_and_checks_against_solo(server, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "load.py"), "--url", server.url, "--api_key", KEY,
                        "--concurrency", "1", "3", "--requests", "3", "--max_tokens", "6", "--check",
                        "--pid", str(server.proc.pid), "--output_dir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert [(row["concurrency"], row["requests"], row["failed"]) for row in rows] == [(1, 3, 0), (3, 3, 0)]
    assert all(row["same_as_solo"] == 3 and row["output_tokens"] == 18 and row["tokens_per_s"] > 0 for row in rows)
    assert all(0 < row["itl_p50_ms"] <= row["itl_p99_ms"] and 0 < row["tpot_p50_ms"] for row in rows)
    assert (tmp_path / "load.png").is_file() and "resident memory after the warm-up" in r.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "load.py"), "--url", "http://example.com:80"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "localhost" in bad.stderr
