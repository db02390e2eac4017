"""`jaxpaged serve`: build the engine, wrap it in the app, run uvicorn until SIGINT/SIGTERM.

On a signal the server stops admitting requests and aborts those in flight (their clients get a
503 or a final SSE error event), so uvicorn's own graceful shutdown finishes at once; the app's
lifespan then joins the engine thread.

While it runs, XLA compilations are counted (`jaxpaged:compiles_after_warmup` in /metrics): the
engine compiled every program at start-up, so serving should add none.
"""

import logging

import uvicorn

from jaxpaged.server.app import build_app
from jaxpaged.server.async_engine import AsyncEngine

logger = logging.getLogger("jaxpaged.server")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, compiles):
        super().__init__(config)
        self.async_engine = async_engine
        self.compiles = compiles

    def run(self, sockets=None) -> None:
        with self.compiles:
            super().run(sockets)

    def handle_exit(self, sig, frame) -> None:
        self.async_engine.begin_shutdown()
        super().handle_exit(sig, frame)


def build_server(engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 served_model_names: list[str] | None = None,
                 max_waiting_requests: int | None = None, log_level: str = "info") -> Server:
    from jaxpaged.runner import CompileCounter  # the engine is built: JAX is loaded already

    async_engine = AsyncEngine(engine, max_waiting_requests=max_waiting_requests)
    compiles = CompileCounter()
    app = build_app(async_engine, served_model_names=served_model_names, api_key=api_key,
                    compile_count=lambda: compiles.count)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, lifespan="on")
    return Server(config, async_engine, compiles)


def serve(engine_kwargs: dict, **server_options) -> None:
    from jaxpaged.config import EngineConfig
    from jaxpaged.engine import Engine, enable_compilation_cache

    enable_compilation_cache()
    engine = Engine(EngineConfig(**engine_kwargs))
    server = build_server(engine, **server_options)
    logger.info("serving %s on http://%s:%d", engine.source.name, server.config.host,
                server.config.port)
    server.run()
