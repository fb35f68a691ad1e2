"""`gavel serve`: a guarded, OpenAI-compatible chat-completions HTTP server (FastAPI + uvicorn, the `serve` extra).

`create_app(Engine(handle, guard))` builds the app; `gavel serve` loads the model, bank and rules and runs it.
See docs/serve.md.
"""
from gavel.serve.app import create_app
from gavel.serve.engine import Engine

__all__ = ["Engine", "create_app"]
