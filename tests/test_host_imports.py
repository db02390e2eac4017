"""Host modules (requests, pages, scheduler, step inputs, configs) must import without JAX."""

import subprocess
import sys
import textwrap

HOST_MODULES = [
    "jaxpaged.pages",
    "jaxpaged.request",
    "jaxpaged.scheduler",
    "jaxpaged.step_inputs",
    "jaxpaged.sampling_params",
    "jaxpaged.config",
    "jaxpaged.detokenizer",
    "jaxpaged.model_source",
    "jaxpaged.prompts",
    "jaxpaged.server.protocol",
    "jaxpaged",
]

# Runs in a fresh interpreter: this test process may already hold jax (conftest imports it).
SCRIPT = textwrap.dedent("""
    import importlib
    import sys

    class NoJax:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib"):
                raise ImportError(f"host code imported {name}")
            return None

    sys.meta_path.insert(0, NoJax())

    for name in sys.argv[1:]:
        importlib.import_module(name)
        print("ok", name)

    # The finder really blocks JAX: modules that need it fail.
    for name in ("jaxpaged.engine",):
        try:
            importlib.import_module(name)
        except ImportError as error:
            assert "host code imported jax" in str(error), error
            print("blocked", name)
        else:
            raise SystemExit(f"{name} imported although jax is blocked")
    try:
        from jaxpaged import LLM  # noqa: F401
    except ImportError:
        print("blocked LLM")
    else:
        raise SystemExit("jaxpaged.LLM imported although jax is blocked")

    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib"))
    assert not leaked, leaked
""")


def test_host_modules_import_without_jax():
    result = subprocess.run([sys.executable, "-c", SCRIPT, *HOST_MODULES],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"ok {name}" for name in HOST_MODULES] + ["blocked jaxpaged.engine", "blocked LLM"]
