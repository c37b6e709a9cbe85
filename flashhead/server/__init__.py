"""``flashhead serve``: OpenAI- and Ollama-compatible HTTP serving on llama.cpp + FlashHead (:mod:`.app`)."""

from __future__ import annotations


def serve(config, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn stops taking requests, lets running ones end within 10 s,
    then the decode thread and llama.cpp are closed)."""
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
