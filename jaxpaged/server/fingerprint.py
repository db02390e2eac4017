"""`system_fingerprint`: a short hash of everything that decides what the server answers.

Weights (file names and sizes: hashing gigabytes at start-up would be too slow, and a changed
checkpoint changes its size or name in practice), tokenizer, chat template, engine version,
dtype and every EngineConfig field. Two servers with the same fingerprint produce the same
tokens for the same seeded request.
"""

import dataclasses
import hashlib
import json

import jaxpaged


def system_fingerprint(engine) -> str:
    tokenizer = engine.tokenizer
    description = {
        "version": jaxpaged.__version__,
        "files": [(path.name, path.stat().st_size) for path in engine.source.files()],
        "model": engine.source.name,
        "tokenizer": [type(tokenizer).__name__, len(tokenizer) if tokenizer is not None else 0],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "dtype": str(engine.dtype),
        "engine_config": dataclasses.asdict(engine.config),
        "max_model_len": engine.max_model_len,
        "num_pages": engine.pages.num_pages,
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    return "fp_" + digest.hexdigest()[:12]
