"""Run test code in a fresh, offline Python process, optionally one where `pixelrefer_hf` cannot be imported.

Remote-code tests use it to prove that a saved folder carries everything it needs: the child blocks the package's
import, so every class must come from the code files next to the weights. The child prints one line
`RESULT<json>`, which `run_python` parses and returns.

Multi-process tests use `run_process_tree`, which leaves no process behind: `accelerate launch` (torch elastic) starts
every rank in a session of its own, out of reach of the launcher's process group.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

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


RUN_MARKER = "PIXELREFER_TEST_RUN"  # environment variable that every process of a `run_process_tree` call inherits


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds `RUN_MARKER=marker` (read from Linux's /proc; none elsewhere)."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def describe_processes(pids: list[int]) -> str:
    """Command line of each process and, where py-spy is installed, its Python and native stacks."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    parts = []
    for pid in pids:
        with contextlib.suppress(OSError):
            parts.append(f"pid {pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        if py_spy:
            with contextlib.suppress(subprocess.SubprocessError):
                command = [py_spy, "dump", "--native", "--pid", str(pid)]
                dump = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
                parts.append(dump.stdout + dump.stderr)
    return "\n".join(parts)


def kill_processes(group: int, pids: list[int]) -> None:
    """SIGKILL process group `group` and the processes `pids` (those that already exited are skipped)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_process_tree(command: list[str], env: dict[str, str], timeout: float):
    """Run `command` (output captured) and make sure that no process it started outlives the call.

    The command gets a session and process group of its own, and every process under it an environment marker, which
    also finds the ones that start new sessions or lose their parent. On timeout everything is killed and the test
    fails with the stacks of the stuck processes. Returns the completed process and a description of the processes
    that were still alive once the command had exited (killed since): empty after a clean run.
    """
    marker = uuid.uuid4().hex
    process = subprocess.Popen(command, env={**env, RUN_MARKER: marker}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    stuck = None
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stuck = describe_processes(marked_processes(marker))
            kill_processes(process.pid, marked_processes(marker))
            stdout, stderr = process.communicate()
        alive = marked_processes(marker)
        leftover = describe_processes(alive) if alive else ""
    finally:  # on every way out, an interrupt included
        kill_processes(process.pid, marked_processes(marker))
        process.wait()
    if stuck is not None:
        pytest.fail(f"timed out after {timeout} s; the processes left:\n{stuck}\n\nstderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), leftover
