"""The HTTP API through the official `openai` client (tiny model): shapes, streaming, admin, and every 4xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from specialize.config import ConfigError
from specialize.serve.api import Limits
from specialize.serve.server import ServeConfig, resolve_token, running

TOKEN = "s3cret"


@pytest.fixture(params=["hf", "vllm"])
def engine_name(request) -> str:
    """Every test of the served API runs on both engines; the vLLM runs where vLLM is installed (`make test`
    runs them in the vLLM environment: `-k vllm`)."""
    if request.param == "vllm":
        pytest.importorskip("vllm", reason="the vLLM engine is not installed here (make vllm)")
    return request.param


@pytest.fixture
def served(engine_name, request):
    """(model directory, adapters) the server runs: vLLM's CPU attention needs head sizes of 32 or more, so it
    serves a tiny model of that shape (the transformers engine keeps the suite's 8-wide heads)."""
    prefix = "" if engine_name == "hf" else "vllm_"
    return request.getfixturevalue(f"{prefix}tiny_model_dir"), request.getfixturevalue(f"{prefix}tiny_adapters")


@pytest.fixture
def served_adapters(served) -> dict:
    return served[1]


@pytest.fixture
def server(engine_name, served):
    model_dir, adapters = served
    model = {"spec": str(model_dir), "threads": 1, "dtype": "float32", "engine": engine_name}
    if engine_name == "vllm":
        model |= {"threads": 2, "vllm": {"max_lora_rank": 32}}
    cfg = ServeConfig(model=model, port=0, token=TOKEN, adapters={k: str(v) for k, v in adapters.items()},
                      limits=Limits(max_request_bytes=4096, max_tokens=32, max_prompt_tokens=64))  # fmt: skip
    with running(cfg) as url:
        yield url


def client(url: str, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, path: str, data: bytes, token: str | None = TOKEN, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_completions_chat_and_streaming(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["base", "alpha", "beta"]
    texts = {}
    for name in ("base", "alpha", "beta"):
        r = c.completions.create(model=name, prompt="The cat sat on", max_tokens=8, temperature=0)
        assert r.model == name and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
        texts[name] = r.choices[0].text
        streamed = c.completions.create(model=name, prompt="The cat sat on", max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed) == texts[name]
    assert len(set(texts.values())) == 3  # each model answers with its own weights

    chat = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6,
                                     temperature=0)  # fmt: skip
    assert chat.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    many = c.completions.create(model="beta", prompt=["A B C", "1 2 3"], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gamma", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="base", prompt="x", max_tokens=33)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|tokens, over"):
        c.completions.create(model="base", prompt="word " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="system messages need the chat template"):
        system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        c.chat.completions.create(model="base", max_tokens=2, messages=system)
    assert post(server, "/v1/completions", b'{"model": "base", "prompt": ')[0] == 400  # malformed JSON
    status, err = post(server, "/v1/completions", b'{"model": "base", "prompt": "x", "temperature": 9}')
    assert status == 400 and err["error"]["param"] == "temperature"
    big = json.dumps({"model": "base", "prompt": "x" * 5000}).encode()
    assert post(server, "/v1/completions", big)[0] == 413
    assert post(server, "/v1/completions", b'{"model": "base", "prompt": "x"}', token=None)[0] == 401
    # still serving
    assert c.completions.create(model="alpha", prompt="The cat", max_tokens=3).usage.completion_tokens >= 1


def test_admin_registers_mixes_and_removes_adapters_at_run_time(server, served_adapters):
    c = client(server)
    copy = {"name": "alpha-copy", "path": str(served_adapters["alpha"])}
    status, body = post(server, "/admin/adapters", json.dumps(copy).encode())
    assert status == 200 and body["sha256"]
    blend = {"name": "blend", "mix": {"alpha": 0.7, "beta": 0.3}}
    status, _ = post(server, "/admin/adapters", json.dumps(blend).encode())
    assert status == 200
    assert {"alpha-copy", "blend"} <= {m.id for m in c.models.list().data}
    same = [c.completions.create(model=m, prompt="The cat sat on", max_tokens=6, temperature=0).choices[0].text
            for m in ("alpha", "alpha-copy")]  # fmt: skip
    assert same[0] == same[1]
    assert post(server, "/admin/adapters/alpha-copy", b"", method="DELETE")[0] == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="alpha-copy", prompt="x", max_tokens=2)
    assert post(server, "/admin/adapters", b'{"name": "x", "path": "/nonexistent"}')[0] == 400
    assert post(server, "/admin/adapters/nope", b"", method="DELETE")[0] == 404
    assert post(server, "/admin/adapters", b'{"name": "x", "path": "/tmp"}', token="wrong")[0] == 401


def test_admin_is_disabled_without_a_token_and_exposed_hosts_need_one(tiny_model_dir):
    with pytest.raises(ConfigError, match="set a token"):
        resolve_token(ServeConfig(host="0.0.0.0"))
    assert resolve_token(ServeConfig(host="0.0.0.0", token="t")) == "t"
    assert resolve_token(ServeConfig(host="::1")) is None
    cfg = ServeConfig(model={"spec": str(tiny_model_dir), "threads": 1}, port=0)
    with running(cfg) as url:
        status, err = post(url, "/admin/adapters", b'{"name": "x", "path": "/tmp"}', token=None)
        assert status == 403 and "disabled" in err["error"]["message"]
        assert client(url, key="anything").models.list().data[0].id == "base"


def test_defects_found_by_a_new_user_are_400s_not_500s(server, served_adapters):
    """A lone surrogate, an empty stop string, a NaN mix weight: OpenAI-shaped 400s, and nothing changes."""
    status, err = post(server, "/v1/completions", b'{"model": "base", "prompt": "\\ud800 hi", "max_tokens": 2}')
    assert status == 400 and err["error"]["param"] == "prompt" and "Unicode" in err["error"]["message"]
    status, err = post(server, "/v1/completions", b'{"model": "base", "prompt": "hi", "stop": [""], "max_tokens": 2}')
    assert status == 400 and "non-empty" in err["error"]["message"]
    status, err = post(server, "/admin/adapters", b'{"name": "nan", "mix": {"alpha": NaN, "beta": 0.5}}')
    assert status == 400 and "nan" not in {m.id for m in client(server).models.list().data}
    # a corrupt adapter: 400, and the name can be registered afterwards
    bad = served_adapters["alpha"].parent / "corrupt"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((served_adapters["alpha"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert post(server, "/admin/adapters", json.dumps({"name": "g", "path": str(bad)}).encode())[0] == 400
    good = {"name": "g", "path": str(served_adapters["alpha"])}
    assert post(server, "/admin/adapters", json.dumps(good).encode())[0] == 200


def test_health_is_open_liveness_only(server):
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}  # no adapter names without the token
    status, _ = post(server, "/stats", None, token=None, method="GET")
    assert status == 401
    status, stats = post(server, "/stats", None, method="GET")
    assert status == 200 and stats["models"] == ["base", "alpha", "beta"] and "mixed_steps" in stats


def test_a_short_request_finishes_while_a_long_one_decodes(server):
    """Continuous batching: the short request joins the running batch instead of waiting for its wave."""
    import threading
    import time

    c = client(server)
    done: dict[str, float] = {}
    decoding = threading.Event()

    def long() -> None:
        # streamed, so the short request is sent once the long one is decoding (not before it was admitted: a
        # fixed sleep raced a tiny model's whole 32 tokens on a busy machine); 32 tokens whatever it samples
        for _ in c.completions.create(model="alpha", prompt="Once upon a time", max_tokens=32, temperature=0.9,
                                      seed=1, stop=None, stream=True, extra_body={"ignore_eos": True}):  # fmt: skip
            decoding.set()
        done["long"] = time.monotonic()

    t = threading.Thread(target=long)
    t.start()
    assert decoding.wait(60)
    c.completions.create(model="beta", prompt="Hi", max_tokens=1)
    done["short"] = time.monotonic()
    t.join(60)
    assert done["short"] <= done["long"]
