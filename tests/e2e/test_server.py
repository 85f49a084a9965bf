"""The OpenAI-compatible server, live: uvicorn on a loopback port in a thread,
talked to with the openai client and raw httpx requests."""
import json
import threading
import time

import httpx
import openai
import psutil
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings, strategies as st

from kevlarflow import LLM, SamplingParams
from kevlarflow.deploy.controller import DeploymentConfig
from kevlarflow.engine.async_engine import AsyncEngine
from kevlarflow.engine.llm_engine import EngineConfig
from kevlarflow.deploy.router import NoInstanceServing
from kevlarflow.server import build_app
from helpers.models import tiny_model
from helpers.net import free_port

KEY = "sk-test"
MAX_MODEL_LEN = 64


class LiveServer:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(tiny_model(), EngineConfig(kv_cache_memory=1 << 22, max_model_len=MAX_MODEL_LEN,
                                                 block_size=8, load_progress=False))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(build_app(engine, "tiny", api_key=KEY, shutdown_engine=False))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_streams_the_same_text(client):
    full = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=12,
                                     **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", prompt="the quick brown fox",
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_return_token_ids_streamed_and_not(http):
    """Each chunk carries its own tokens' ids; together they are the whole
    answer, the same as the in-process engine's, and as a plain answer's."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    streamed = []
    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[len("data: "):])["choices"][0]["token_ids"]
    with LLM(tiny_model()) as llm:
        want = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=9, temperature=0,
                                                        ignore_eos=True))[0].token_ids
    assert streamed == plain["token_ids"] == want
    without = http.post("/v1/completions", json=dict(body, return_token_ids=False)).json()
    assert "token_ids" not in without["choices"][0]


def test_prompt_as_token_ids(client):
    out = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=4, **GREEDY)
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 4


def test_chat_and_chat_stream(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_default_and_tokenizer_chat_templates(engine):
    from kevlarflow.server.chat import chat_prompt
    from kevlarflow.server.protocol import ChatMessage

    msgs = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="yo")]
    assert chat_prompt(engine.engine.tokenizer, msgs) == "user: hi\nassistant: yo\nassistant:"

    class Templated:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<go>"

        def apply_chat_template(self, conversation, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<go>"

        def __call__(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return type("Encoding", (), {"input_ids": [ord(c) for c in text]})

    assert chat_prompt(Templated(), msgs) == [ord(c) for c in "<user>hi<assistant>yo<go>"]


def test_stop_string(client):
    text = client.completions.create(model="tiny", prompt="numbers 1 2 3", max_tokens=16,
                                     **GREEDY).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    out = client.completions.create(model="tiny", prompt="numbers 1 2 3", max_tokens=16,
                                    stop=[stop], **GREEDY).choices[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]


def test_n_choices_and_seeds(client):
    args = dict(model="tiny", prompt="hello world", max_tokens=8, temperature=1.0,
                extra_body={"ignore_eos": True})
    two = client.completions.create(n=2, seed=7, **args)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.completions.create(n=2, seed=7, **args)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    # choice i is the request with seed + i
    second = client.completions.create(seed=8, **args).choices[0].text
    assert second == two.choices[1].text
    assert two.usage.completion_tokens == 16
    streamed = list(client.completions.create(n=2, seed=7, stream=True, **args))
    for i in range(2):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) \
            == two.choices[i].text


def test_logprobs(client):
    out = client.completions.create(model="tiny", prompt="hi there", max_tokens=5, logprobs=2,
                                    **GREEDY).choices[0]
    # The engine's own logprobs of the same request, token for token.
    with LLM(tiny_model(), kv_cache_memory=1 << 22, max_model_len=MAX_MODEL_LEN,
             block_size=8, load_progress=False) as llm:
        want = llm.generate(["hi there"], SamplingParams(max_tokens=5, logprobs=2, temperature=0,
                                                         ignore_eos=True))[0]
        text = lambda t: llm.tokenizer.decode([t])  # noqa: E731
    assert out.logprobs.tokens == [text(e.token_id) for e in want.logprobs]
    assert out.logprobs.token_logprobs == pytest.approx([e.logprob for e in want.logprobs])
    for top, e in zip(out.logprobs.top_logprobs, want.logprobs, strict=True):
        assert len(e.top) == 2 and e.top[0] == (e.token_id, pytest.approx(e.logprob))  # greedy
        assert top == pytest.approx({text(t): lp for t, lp in e.top})
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 for c in content)


def test_common_neutral_fields_are_accepted(http):
    r = http.post("/v1/completions", json={
        "model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 1, "ignore_eos": True,
        "user": "u1", "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None,
        "logit_bias": {}, "echo": False, "some_future_field": [1, 2]})
    assert r.status_code == 200, r.text


BAD_BODIES = [
    (b"{not json", None),
    (b"", None),
    (b"[]", None),
    (b'{"model": "tiny"}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": true}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 0}', None),
    (b'{"prompt": "hi", "temperature": -1}', None),
    (b'{"prompt": "hi", "top_p": 2}', None),
    (b'{"prompt": "hi", "top_p": NaN}', None),
    (b'{"prompt": "hi", "n": 0}', "n"),
    (b'{"prompt": "hi", "n": 1000}', "n"),
    (b'{"prompt": "hi", "best_of": 3}', "best_of"),
    (b'{"prompt": "hi", "presence_penalty": 0.5}', "presence_penalty"),
    (b'{"prompt": ["a", "b"]}', "prompt"),
    (b'{"prompt": ""}', "prompt"),
    (b'{"prompt": [1, 99999999]}', None),
    (b'{"prompt": "hi", "seed": 100000000000000000000000000}', None),
    (b'{"prompt": "hi", "stop": [""]}', None),
    (b'{"prompt": "hi", "logprobs": 100}', "logprobs"),
    (b'{"prompt": "hi", "echo": true}', "echo"),
    (json.dumps({"prompt": "word " * 200}).encode(), None),  # longer than max_model_len
    (json.dumps({"prompt": list(range(1, MAX_MODEL_LEN + 5))}).encode(), None),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_completion_bodies_are_400(http, body, param):
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (body, r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param, error


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1},
    {"messages": "hello"},
])
def test_bad_chat_bodies_are_400(http, body):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, (body, r.text)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_bad_request_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # open: for load balancers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_body_size_limit(http):
    r = http.post("/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and r.json()["error"]["message"]

    def chunked():  # no Content-Length
        for _ in range(40):
            yield b"x" * 65536
    r = http.post("/v1/completions", content=chunked())
    assert r.status_code == 413


def test_fault_route_needs_the_flag(http):
    assert http.post("/v1/fault", json={"instance": 0, "stage": 0}).status_code == 404


def test_health_and_status_in_process(http):
    assert http.get("/health").json() == {"status": "ok"}
    status = http.get("/status").json()
    assert status["engine"] == "in-process" and status["engine_alive"]


def test_client_disconnect_aborts_the_request(http, engine):
    body = {"model": "tiny", "prompt": "go on", "max_tokens": MAX_MODEL_LEN - 8, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished() or b'outcome="aborted"' not in http.get("/metrics").content:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)


def test_a_client_that_leaves_a_plain_request_aborts_it(server, http, engine):
    def aborted() -> float:
        label = 'kevlarflow_requests_total{endpoint="/v1/completions",outcome="aborted"}'
        return next((float(line.split()[-1]) for line in http.get("/metrics").text.splitlines()
                     if line.startswith(label)), 0.0)

    before = aborted()
    body = {"model": "tiny", "prompt": "go on", "max_tokens": MAX_MODEL_LEN - 8, "n": 16,
            "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.05,
                   headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished() or aborted() <= before:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)


def test_metrics(http, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=2, **GREEDY)
    assert http.post("/v1/completions", json={"prompt": 3}).status_code == 400
    text = http.get("/metrics").text
    assert 'kevlarflow_requests_total{endpoint="/v1/completions",outcome="ok"}' in text
    assert 'kevlarflow_requests_total{endpoint="/v1/completions",outcome="invalid"}' in text
    assert "kevlarflow_time_to_first_token_seconds_count" in text
    assert "kevlarflow_e2e_request_latency_seconds_bucket" in text
    assert "kevlarflow_time_per_output_token_seconds_count" in text
    assert "kevlarflow_requests_running 0.0" in text and "kevlarflow_requests_waiting" in text
    assert "kevlarflow_http_requests_in_progress 0.0" in text


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
          "seed", "stop", "n", "logprobs", "top_logprobs", "stream", "stream_options", "best_of",
          "ignore_eos", "user", "presence_penalty", "frequency_penalty", "echo", "logit_bias"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["role", "content", "type",
                                                                  "include_usage"]), inner,
                                                 max_size=3)), max_leaves=8)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
       max_tokens=st.one_of(st.integers(-2, 4), st.just("3")))
def test_fuzzed_bodies_never_get_a_5xx(http, path, body, max_tokens):
    body["max_tokens"] = max_tokens  # keeps generation short
    r = http.post(path, json=body)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_async_engine_survives_a_refused_request():
    """A deployment with no serving instance refuses in add_request: that
    request fails, the engine loop goes on."""
    import asyncio

    class Refusing:
        tokenizer = None

        def prepare_prompt(self, prompt):
            return [1, 2]

        def add_request(self, *args, **kwargs):
            raise NoInstanceServing("no pipeline instance is serving")

        def abort(self, request_id):
            return None

        def has_unfinished(self):
            return False

        def step(self):
            return []

    eng = AsyncEngine(Refusing())

    async def one():
        async for _ in eng.generate("x"):
            pass

    with pytest.raises(NoInstanceServing):
        asyncio.run(one())
    assert eng.alive
    eng.shutdown()
    assert not eng.alive


def test_deployment_health_follows_a_hung_worker():
    """/health is "ok"; 503 as soon as a worker's heartbeats are late, before
    its hang is declared; 200 "degraded" while its instance borrows a worker;
    "ok" again once the replacement joined."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    hang_timeout_s = 4.0  # far past the heartbeats' lateness (0.3 s)
    config = DeploymentConfig(num_instances=2, pp_size=1, hang_timeout_s=hang_timeout_s, block_size=4,
                              kv_cache_memory=1 << 20, max_num_batched_tokens=32,
                              load_progress=False)
    live = LiveServer(build_app(AsyncEngine(tiny_model(), config), "tiny",
                                enable_fault_injection=True))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            status = http.get("/status").json()
            assert all(w["live"] for w in status["workers"].values())
            assert [i["workers"] for i in status["instances"]] == [["w0.0"], ["w1.0"]]
            r = http.post("/v1/fault", json={"instance": 0, "stage": 0, "kind": "hang"})
            assert r.status_code == 200, r.text
            hung = time.monotonic()
            # Red as soon as its heartbeats are late, while the controller
            # still counts the worker as live (its hang not yet declared).
            while (r := http.get("/health")).status_code == 200:
                assert time.monotonic() - hung < hang_timeout_s, "a hung worker went unnoticed"
                time.sleep(0.02)
            events = [e["kind"] for e in http.get("/status").json()["recent_events"]]
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "unhealthy" and body["workers_silent"] == ["w0.0"], body
            assert body["instances_down"] == [] and body["workers_down"] == [], body
            assert "detected" not in events, events
            # Once it is declared hung, the instance borrows w1.0: every
            # request is served, so 200, but "degraded" until the replacement.
            deadline = time.monotonic() + 30
            while (r := http.get("/health")).status_code != 200:
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, "never served again"
                time.sleep(0.05)
            # (A read between the worker's discard and the reroute, taken by
            # the engine thread in one step, may not show the borrowing yet.)
            while "borrowing" not in (body := r.json())["reason"]:
                assert body["status"] == "degraded", body
                assert time.monotonic() < deadline, body
                r = http.get("/health")
            assert body["status"] == "degraded", body
            assert "0 borrowing ['w1.0']" in body["reason"] and body["workers_down"] == ["w0.0"]
            r = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 3,
                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
            status = http.get("/status").json()
            assert not status["workers"]["w0.0"]["live"] or status["workers"]["w0.0"]["replacements"]
            deadline = time.monotonic() + 90
            while (body := http.get("/health").json())["status"] != "ok":
                assert body["status"] == "degraded", body
                assert time.monotonic() < deadline, "the replacement never joined"
                time.sleep(0.2)
            status = http.get("/status").json()
            assert all(w["live"] for w in status["workers"].values())
            assert all(i["workers"] == i["home"] and not i["borrowed"] for i in status["instances"])
            metrics = http.get("/metrics").text
            assert "kevlarflow_worker_failures_total 1.0" in metrics
            assert 'kevlarflow_fault_events_total{kind="rejoined"} 1.0' in metrics
            for family in ("kevlarflow_last_mttr_seconds", "kevlarflow_replicated_bytes_total",
                           "kevlarflow_recomputed_tokens_total", "kevlarflow_replication_lag_tokens"):
                assert family in metrics, family
            assert http.post("/v1/fault", json={"instance": 5, "stage": 0}).status_code == 400
    finally:
        live.stop()  # the lifespan shuts the engine down and reaps its workers
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]


def test_a_stream_and_new_requests_wait_out_a_stage_with_no_live_worker():
    """Both workers of the only stage are killed while a stream is open: the
    stream pauses until a replacement joins, then goes on with the text of a
    failure-free run; a plain request sent meanwhile is taken and answered,
    not refused."""
    config = DeploymentConfig(num_instances=2, pp_size=1, hang_timeout_s=1.0, block_size=4,
                              kv_cache_memory=1 << 20, max_num_batched_tokens=32,
                              load_progress=False)
    live = LiveServer(build_app(AsyncEngine(tiny_model(), config), "tiny",
                                enable_fault_injection=True))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
        ask = dict(model="tiny", prompt="the quick brown fox", max_tokens=100, **GREEDY)
        want = client.completions.create(**ask).choices[0].text
        pieces = []
        for chunk in client.completions.create(stream=True, **ask):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if len(pieces) == 5:
                for instance in (0, 1):
                    r = httpx.post(live.url + "/v1/fault", json={"instance": instance, "stage": 0})
                    assert r.status_code == 200, r.text
                deadline = time.monotonic() + 5  # until both deaths are seen
                while httpx.get(live.url + "/health").json().get("instances_down") != [0, 1]:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert client.completions.create(**ask).choices[0].text == want
        assert "".join(pieces) == want
        events = httpx.get(live.url + "/status").json()["recent_events"]
        assert any(e["kind"] == "requests_held" for e in events), events
        assert not any(e["kind"] == "requests_failed" for e in events), events
    finally:
        live.stop()


def test_an_outage_past_its_timeout_is_a_503_over_http():
    """Both workers of the only stage are killed while a stream is open, and
    their replacements (delayed here, as a cluster provisions nodes) take
    longer than the deployment waits: the stream ends with an error event
    once the outage timeout passed, a plain request gets a 503 with an
    OpenAI-style body and /health says why, until the replacements join;
    then requests succeed."""
    config = DeploymentConfig(num_instances=2, pp_size=1, hang_timeout_s=1.0, block_size=4,
                              kv_cache_memory=1 << 20, max_num_batched_tokens=32,
                              replacement_delay_s=5.0, outage_timeout_s=0.5,
                              load_progress=False)
    live = LiveServer(build_app(AsyncEngine(tiny_model(), config), "tiny",
                                enable_fault_injection=True))
    ask = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 100, "temperature": 0,
           "ignore_eos": True}
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            events = []
            with http.stream("POST", "/v1/completions", json=dict(ask, stream=True)) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: "):])
                    if len(events) == 3:
                        for instance in (0, 1):
                            f = http.post("/v1/fault", json={"instance": instance, "stage": 0})
                            assert f.status_code == 200, f.text
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert last["error"]["code"] == "engine_error", last
            assert len(events) < 100, "the stream outlived its workers"
            deadline = time.monotonic() + 5  # until both deaths are seen
            while (health := http.get("/health").json()).get("instances_down") != [0, 1]:
                assert time.monotonic() < deadline, health
                time.sleep(0.02)
            assert health["status"] == "unhealthy" and not health["serving"], health
            r = http.post("/v1/completions", json=ask)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["type"] == "service_unavailable" and "no pipeline instance" in error["message"]
            deadline = time.monotonic() + 90
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the replacements never joined"
                time.sleep(0.1)
            r = http.post("/v1/completions", json=ask)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100
    finally:
        live.stop()


def test_cli_serves_and_stops_on_sigterm():
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kevlarflow", "serve", tiny_model(),
                             "--port", str(port), "--max-model-len", "64",
                             "--kv-cache-memory", str(1 << 22), "--served-model-name", "tiny",
                             "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                      "max_tokens": 2, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "shutting the engine down" in log and "Finished server process" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stream_survives_the_kill_of_its_worker():
    """A greedy stream in flight while the last-stage worker of its pipeline
    is SIGKILLed goes on, through the borrowed worker, with no token missing
    and none twice: its text is that of a failure-free run."""
    config = DeploymentConfig(num_instances=2, pp_size=2, hang_timeout_s=1.0, block_size=4,
                              kv_cache_memory=1 << 20, max_num_batched_tokens=32,
                              replication_interval_s=0.05, load_progress=False)
    live = LiveServer(build_app(AsyncEngine(tiny_model(), config), "tiny",
                                enable_fault_injection=True))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
        ask = dict(model="tiny", prompt="the quick brown fox", max_tokens=100, **GREEDY)
        want = client.completions.create(**ask).choices[0].text
        pieces, victim = [], None
        for chunk in client.completions.create(stream=True, **ask):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if len(pieces) == 5 and victim is None:
                status = httpx.get(live.url + "/status").json()
                victim = next(i["index"] for i in status["instances"] if i["requests"])
                r = httpx.post(live.url + "/v1/fault",
                               json={"instance": victim, "stage": 1, "kind": "kill"})
                assert r.status_code == 200, r.text
        assert "".join(pieces) == want
        events = httpx.get(live.url + "/status").json()["recent_events"]
        # The request's own instance stepped again after the kill: it was in flight.
        assert any(e["kind"] == "first_step_after_failure" and e["instance"] == victim
                   for e in events), events
    finally:
        live.stop()


def test_the_load_generator_against_a_live_server(server, capsys):
    from kevlarflow.bench.serve import main

    main(["--url", server.url, "--api-key", KEY, "--rate", "50", "--num-prompts", "6",
          "--prompt-len", "8", "--output-len", "4", "--vocab", "500"])
    out = capsys.readouterr().out
    assert "6/6 requests ok" in out, out
    for metric in ("TTFT ms", "TPOT ms", "ITL ms", "latency ms"):
        assert metric in out and "p99" in out.split(metric)[1].splitlines()[0], out
    main(["--url", server.url, "--api-key", "wrong", "--rate", "50", "--num-prompts", "2",
          "--output-len", "2", "--vocab", "500", "--model", "tiny"])
    out = capsys.readouterr().out
    assert "0/2 requests ok" in out and "HTTP 401" in out, out
