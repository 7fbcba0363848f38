"""`specialize serve`: load the base once, register the adapters, serve the OpenAI-compatible API.

specialize serve --adapter biomed-v1=runs/biomed/adapter --adapter sst2=runs/sst2/adapter
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from specialize import models
from specialize.config import BASE, ConfigError, ModelConfig, TemplateName
from specialize.generation.loop import Policy
from specialize.serve.api import Limits, build_app
from specialize.serve.engine import Engine

TOKEN_ENV = "SPECIALIZE_API_TOKEN"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    base_name: str = BASE
    adapters: dict[str, str] = Field(default_factory=dict, description="name -> adapter directory")
    template: TemplateName | None = Field(
        None,
        description="how chat messages become a prompt; None: each adapter's own (stored by training), "
        "Alpaca for a plain base model",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, description=f"bearer token (default: ${TOKEN_ENV}); required off loopback")
    max_batch_size: int = Field(16, ge=1, description="rows decoded together (requests join as others finish)")
    max_tokens_in_flight: int | None = Field(None, ge=1, description="bound on prompt + generated tokens in flight")
    prefill_tokens: int = Field(256, ge=1, description="prompt tokens prefilled per step; longer prompts in chunks")
    batch_wait_ms: float = Field(5.0, ge=0)
    max_pending: int = Field(256, ge=1)
    policy: Policy = Field("continuous", description="static and per_adapter waves: comparison points only")
    limits: Limits = Limits()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(cfg: ServeConfig) -> str | None:
    token = cfg.token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(cfg.host):
        raise ConfigError(f"binding {cfg.host} exposes the server: set a token (--token or ${TOKEN_ENV})")
    return token


def build_vllm_engine(cfg: ServeConfig) -> Engine:
    """The same server on vLLM: its engine decodes (vllm_engine.VLLMLoop), adapters are registered with it at run
    time, and the base model's modules (without weights) validate adapters before they are."""
    from specialize.generation.vllm_engine import VLLMEngine, VLLMLoop

    m = cfg.model
    precision = models.select_precision(m.dtype, m.device)
    src = models.resolve(m.spec)
    vllm = VLLMEngine(models.weights_dir(m.spec) if src.kind != "hub" else m.spec, serving=True,
                      dtype=str(precision.param_dtype).removeprefix("torch."), device=m.device, settings=m.vllm,
                      threads=m.threads, trust_remote_code=m.trust_remote_code)  # fmt: skip
    loop = VLLMLoop(vllm, models.meta_model(m.spec, trust_remote_code=m.trust_remote_code))
    base_template = models.resolve_template(cfg.template, src.location if src.kind == "local" else None,
                                            f"model {m.spec}")  # fmt: skip
    engine = Engine(None, models.load_tokenizer(m.spec, trust_remote_code=m.trust_remote_code),
                    base_name=cfg.base_name, batch_wait_ms=cfg.batch_wait_ms, max_pending=cfg.max_pending,
                    base_template=base_template, template_override=cfg.template, loop=loop)  # fmt: skip
    for name, path in cfg.adapters.items():
        engine.add_adapter(name, path)
    return engine


def build_engine(cfg: ServeConfig) -> Engine:
    if cfg.model.engine == "vllm":
        return build_vllm_engine(cfg)
    rt = models.load_runtime(cfg.model, template=cfg.template)
    engine = Engine(rt.model, rt.tokenizer, base_name=cfg.base_name, max_batch_size=cfg.max_batch_size,
                    max_tokens=cfg.max_tokens_in_flight, prefill_tokens=cfg.prefill_tokens,
                    batch_wait_ms=cfg.batch_wait_ms, max_pending=cfg.max_pending, policy=cfg.policy,
                    precision=rt.precision, base_template=rt.template, template_override=cfg.template,
                    compile_decode=cfg.model.compile)  # fmt: skip
    for name, path in cfg.adapters.items():
        engine.add_adapter(name, path)
    return engine


def build(cfg: ServeConfig, engine: Engine | None = None) -> tuple[Any, Engine]:
    """The ASGI app and its started engine (the token check runs before any model is loaded)."""
    token = resolve_token(cfg)
    engine = engine or build_engine(cfg)
    return build_app(engine.start(), token=token, limits=cfg.limits), engine


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app, engine = build(cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        engine.stop()


@contextlib.contextmanager
def running(cfg: ServeConfig, engine: Engine | None = None) -> Iterator[str]:
    """Serve in a background thread (port 0 picks a free one); yields the base URL. For tests and benchmarks."""
    import uvicorn

    app, engine = build(cfg, engine)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start")
            threading.Event().wait(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{cfg.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
