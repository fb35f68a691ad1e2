"""`gavel serve`: a guarded, OpenAI-compatible chat-completions server (needs the `serve` extra)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gavel.cli.common import ModelOpt, err_console, user_errors
from gavel.errors import GavelError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(bank: Annotated[Path | None, typer.Option("--bank", "-b", help="A CE bank folder (gavel ce fit).")] = None,
          rules: Annotated[list[Path] | None, typer.Option("--rules", "-r", help="Rule files or folders.")] = None,
          model: ModelOpt = "builtin:organism",
          no_rules: Annotated[bool, typer.Option("--no-rules", help="Serve the model unguarded (no bank, no rules): "
                                                 "a baseline.")] = False,
          host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
          api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 and "
                                                         "/metrics.")] = None,
          api_key_env: Annotated[str | None, typer.Option(help="Read the API key from this environment "
                                                             "variable.")] = None,
          max_tokens: Annotated[int, typer.Option(help="Most tokens per reply; a request asking for more gets "
                                                  "400.")] = 256,
          max_prompt_tokens: Annotated[int | None, typer.Option(help="Most prompt tokens (default: the model's "
                                                                   "context length).")] = None,
          max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger gets 413.")] = 1 << 20,
          max_queue: Annotated[int | None, typer.Option(help="Most chat completions waiting or generating; "
                                                           "one more gets 503 (default: no limit).")] = None,
          max_batch: Annotated[int, typer.Option(help="Whole replies waiting together are generated in batches of "
                                                 "up to this many (1: one at a time).")] = 8,
          policy: Annotated[str, typer.Option(help="fail_open or fail_closed: what a monitor failure on a "
                                              "sequence does.")] = "fail_open",
          served_model_name: Annotated[str | None, typer.Option(help="The model id clients send and /v1/models "
                                                                   "lists (default: --model).")] = None,
          device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
          threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).")] = None,
          audit_log: Annotated[Path | None, typer.Option(help="Append every guarded result to this JSONL "
                                                            "log.")] = None,
          log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info") -> None:
    """Serve a guarded model over HTTP with OpenAI's chat-completions API (/v1/chat/completions, streaming too),
    plus /v1/models, /healthz and Prometheus /metrics. Requests queue for one model thread; whole replies waiting
    together are generated in one batch, each row with its own rule state. Every reply carries the rules' verdict
    and events in a `gavel` field (docs/serve.md)."""
    with user_errors():
        key = _api_key(api_key, api_key_env)
        if no_rules and (rules or bank is not None):
            raise GavelError("--no-rules serves the model unguarded: drop --rules and --bank")
        if not no_rules and (not rules or bank is None):
            raise GavelError("give --bank DIR and --rules FILE (or --no-rules to serve the model unguarded)")
        if policy not in ("fail_open", "fail_closed"):
            raise GavelError(f"--policy must be fail_open or fail_closed, not {policy!r}")
        for name, value in (("--max-tokens", max_tokens), ("--max-body-bytes", max_body_bytes),
                            ("--max-prompt-tokens", max_prompt_tokens), ("--max-queue", max_queue),
                            ("--max-batch", max_batch)):
            if value is not None and value < 1:
                raise GavelError(f"{name} must be at least 1")
        try:
            import uvicorn

            from gavel.serve import Engine, create_app
        except ImportError as e:
            raise GavelError(f"gavel serve needs the serve extra: pip install 'gavelkit[serve]' ({e})") from None
        import torch

        from gavel.models.loading import load_model
        from gavel.runtime.guard import Guard
        from gavel.runtime.monitor import failure_policy

        if threads is not None:
            torch.set_num_threads(threads)
        handle = load_model(model, device=device)
        guard = (Guard(handle, bank, [str(r) for r in rules], policy=failure_policy(policy), audit=audit_log)
                 if bank is not None and rules else None)   # both given, or neither with --no-rules (checked above)
        engine = Engine(handle, guard, name=served_model_name or model, max_tokens=max_tokens,
                        max_prompt_tokens=max_prompt_tokens)
        app = create_app(engine, api_key=key, max_body_bytes=max_body_bytes, max_queue=max_queue, max_batch=max_batch)
    if key is None and host not in LOOPBACK:
        err_console.print(f"[yellow]warning:[/] serving on {host} without an API key (--api-key / --api-key-env)")
    err_console.print(f"serving {engine.name} ({'guarded' if guard else 'unguarded'}) on http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _api_key(value: str | None, env: str | None) -> str | None:
    if value is not None and env is not None:
        raise GavelError("give --api-key or --api-key-env, not both")
    if env is None:
        return value or None
    key = os.environ.get(env)
    if not key:
        raise GavelError(f"--api-key-env {env}: the environment variable is not set")
    return key
