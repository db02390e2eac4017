"""The OpenAI-compatible server: `jaxpaged serve` (see `serve.py`), built on `app.build_app`."""
