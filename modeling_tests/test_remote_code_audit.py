"""Static audit of the modules that travel as remote code (`trust_remote_code=True` runs them on users' machines).

Every `.py` file that `save_pretrained` writes next to a model, its processor and the region-qa pipeline, as saved, is
parsed with
`ast` and must not reach the network, start processes, evaluate strings, unpickle, or call `torch.load` without
`weights_only=True`. Transformers' own `from_pretrained` (SAM checkpoints named by the user) is the one way to load
files and is allowed: it reads safetensors and refuses unsafe pickles itself.
"""

import ast
import tempfile
from pathlib import Path

import pytest

from pixelrefer_hf.pipeline_region_qa import save_with_pipeline
from pixelrefer_hf.testing import tiny_model_and_processor


def _saved_remote_code() -> dict[str, str]:
    """What travels: the modules the pipeline's `save_pretrained` writes with a model and its processor (a superset of
    what the model and processor alone write), both variants."""
    sources = {}
    for variant in ("pixelrefer", "pixelrefer-lite"):
        model, processor = tiny_model_and_processor(variant)
        with tempfile.TemporaryDirectory() as folder:
            save_with_pipeline(model, processor, folder)
            sources |= {path.name: path.read_text(encoding="utf-8") for path in Path(folder).glob("*.py")}
    return sources


REMOTE_CODE = _saved_remote_code()
REMOTE_CODE_NAMES = sorted(REMOTE_CODE)

# Top-level modules whose import alone means network, processes or code loading.
FORBIDDEN_MODULES = {
    "socket",
    "ssl",
    "urllib",
    "urllib2",
    "urllib3",
    "http",
    "requests",
    "httpx",
    "aiohttp",
    "ftplib",
    "smtplib",
    "telnetlib",
    "xmlrpc",
    "websocket",
    "websockets",
    "subprocess",
    "multiprocessing",
    "pty",
    "pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "ctypes",
    "importlib",
    "runpy",
    "code",
    "codeop",
}
# Builtins whose call (as a bare name, or `builtins.eval`) is forbidden; `model.eval()` and `re.compile` are fine.
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
# Names whose call or import is forbidden wherever they come from.
FORBIDDEN_CALLS = {
    "system",
    "popen",
    "spawnl",
    "spawnv",
    "execv",
    "execve",
    "fork",
    "hf_hub_download",
    "snapshot_download",
    "cached_file",
    "cached_files",
    "urlopen",
    "urlretrieve",
}
# Reviewed exceptions, `(module, what)`: sam_utils reads the JSON preprocessing file of the SAM2 checkpoint the user
# names (`sam2_model=`) with transformers' `cached_file`, as `from_pretrained` would (no code, no pickle).
ALLOWED = {("sam_utils.py", "imports cached_file"), ("sam_utils.py", "calls cached_file()")}
FORBIDDEN_ATTRIBUTES = {("os", "system"), ("os", "popen"), ("os", "fork"), ("os", "exec"), ("pickle", "load")}
# `huggingface_hub` may be imported for nothing (its download helpers are the forbidden calls above); the remote
# modules need none of it today, so any import of it is reported to keep it that way.
FORBIDDEN_FROM_IMPORTS = {"huggingface_hub"}


def _top(name: str | None) -> str:
    return (name or "").split(".")[0]


def audit_source(source: str, filename: str) -> list[str]:
    """Every forbidden construct in `source`, as `"file:line: what"`."""
    tree = ast.parse(source, filename=filename)
    problems = []

    def report(node: ast.AST, what: str) -> None:
        if (Path(filename).name, what) not in ALLOWED:
            problems.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in FORBIDDEN_MODULES | FORBIDDEN_FROM_IMPORTS:
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _top(node.module) in FORBIDDEN_MODULES | FORBIDDEN_FROM_IMPORTS:
                report(node, f"from {node.module} import ...")
            for alias in node.names:
                if alias.name in FORBIDDEN_CALLS | FORBIDDEN_BUILTINS:
                    report(node, f"imports {alias.name}")
        elif isinstance(node, ast.Call):
            function = node.func
            name = getattr(function, "id", None) or getattr(function, "attr", None)
            is_builtin = isinstance(function, ast.Name) or (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and function.value.id in {"builtins", "__builtins__"}
            )
            if name in FORBIDDEN_CALLS or (name in FORBIDDEN_BUILTINS and is_builtin):
                report(node, f"calls {name}()")
            if (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and (function.value.id, function.attr) in FORBIDDEN_ATTRIBUTES
            ):
                report(node, f"calls {function.value.id}.{function.attr}()")
            is_torch_load = name == "load" and getattr(function, "value", None) is not None
            if is_torch_load and isinstance(function.value, ast.Name) and function.value.id == "torch":
                safe = any(
                    keyword.arg == "weights_only"
                    and isinstance(keyword.value, ast.Constant)
                    and keyword.value.value is True
                    for keyword in node.keywords
                )
                if not safe:
                    report(node, "torch.load without weights_only=True")
        elif isinstance(node, ast.Name) and node.id in {"eval", "exec", "__import__"}:
            report(node, f"refers to {node.id}")
    return problems


def test_remote_code_names_are_the_expected_modules():
    assert "modeling_pixelrefer.py" in REMOTE_CODE_NAMES and "pipeline_region_qa.py" in REMOTE_CODE_NAMES
    assert len(REMOTE_CODE_NAMES) >= 8


@pytest.mark.parametrize("name", REMOTE_CODE_NAMES)
def test_remote_code_module_has_no_network_process_eval_or_unsafe_loading(name):
    problems = audit_source(REMOTE_CODE[name], name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import socket", "import socket"),
        ("import urllib.request", "import urllib.request"),
        ("from http.client import HTTPConnection", "from http.client"),
        ("import requests", "import requests"),
        ("from huggingface_hub import hf_hub_download", "from huggingface_hub"),
        ("import subprocess", "import subprocess"),
        ("os.system('ls')", "calls system()"),
        ("eval('1')", "calls eval()"),
        ("exec('x = 1')", "calls exec()"),
        ("f = eval", "refers to eval"),
        ("import builtins\nbuiltins.exec('x = 1')", "calls exec()"),
        ("from transformers.utils import cached_file", "imports cached_file"),
        ("import pickle", "import pickle"),
        ("torch.load('w.bin')", "torch.load without weights_only=True"),
        ("torch.load('w.bin', weights_only=False)", "torch.load without weights_only=True"),
    ],
)
def test_audit_catches_each_forbidden_construct(snippet, expected):
    problems = audit_source(snippet, "snippet.py")
    assert any(expected in problem for problem in problems), problems


def test_audit_accepts_safe_loading():
    assert audit_source("torch.load('w.bin', map_location='cpu', weights_only=True)", "ok.py") == []
    assert audit_source("import os\nos.path.join('a', 'b')", "ok.py") == []
    assert audit_source("import re\nmodel.eval()\nre.compile('a')", "ok.py") == []


def test_the_model_and_processor_carry_only_what_running_them_needs(tmp_path):
    """The pipeline's helpers (SAM, video decoding) travel only with a folder the pipeline saves."""
    model, processor = tiny_model_and_processor("pixelrefer-lite")
    model.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("*.py")) == [
        "configuration_pixelrefer.py",
        "modeling_pixelrefer.py",
    ]
    processor.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("*.py")) == [
        "configuration_pixelrefer.py",
        "image_processing_pixelrefer.py",
        "modeling_pixelrefer.py",
        "processing_pixelrefer.py",
        "region_utils.py",
    ]
