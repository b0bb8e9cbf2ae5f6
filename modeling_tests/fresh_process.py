"""Run test code in a fresh, offline Python process, optionally one where `pixelrefer_hf` cannot be imported.

Remote-code tests use it to prove that a saved folder carries everything it needs: the child blocks the package's
import, so every class must come from the code files next to the weights. The child prints one line
`RESULT<json>`, which `run_python` parses and returns.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pixelrefer_hf":
                raise ImportError("pixelrefer_hf is deliberately not importable in this process")
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import pixelrefer_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker did not work")
    """
)


def offline_env(hf_home: Path | None = None) -> dict[str, str]:
    """The current environment without Python/HF overrides, offline, single-threaded."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return env


def run_python(code: str, *args: str, cwd: Path, block_package: bool = True, timeout: int = 300):
    """Run `code` with `args` as `sys.argv[1:]` in a fresh process with its own empty HF_HOME under `cwd`; return the
    decoded `RESULT` payload (None when the child prints none). Fails the test with the child's stderr on error."""
    source = (BLOCK_PACKAGE if block_package else "") + textwrap.dedent(code)
    run = subprocess.run(
        [sys.executable, "-c", source, *args],
        cwd=cwd,
        env=offline_env(Path(cwd) / "hf_home"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if "RESULT" not in run.stdout:
        return None
    return json.loads(run.stdout.split("RESULT", 1)[1])
