"""An LLM judge behind any OpenAI-compatible endpoint, for the judged benchmarks of `pixelrefer eval`.

The official scripts call the OpenAI client with `API_KEY` / `BASE_URL` from the environment; DAM serves
Llama-3.1-8B-Instruct with vLLM as the same kind of endpoint. [`Judge`] talks to either through the `openai` package
(`pip install "pixelrefer-hf[eval]"`) with `base_url=`:

* **Key.** Read from the environment variable named by `ScoreOptions.judge_api_key_env` (default `OPENAI_API_KEY`).
  A local server (vLLM, SGLang) checks no key, so a missing variable means the placeholder `"EMPTY"`; that is only
  worth a warning (logged once) when the base URL is not on this machine.
* **Cache.** Every reply is kept under `ScoreOptions.run_dir / "judge_cache"`, one JSON file per request, named by a
  SHA-256 of the model, the messages and the sampling settings (not the base URL: the same model behind another
  address gives the same reply at temperature 0). Files are written atomically (temporary file + rename), so a run
  killed mid-write never leaves a half file, and a rerun or a second scoring pays nothing twice.
* **Retries.** Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff up to
  `ScoreOptions.judge_max_attempts` attempts in all; then, or at once for other HTTP errors (a wrong key, an unknown
  model), a [`JudgeError`] names the URL and what went wrong.
* **Settings.** Temperature 0 unless a benchmark says otherwise; requests run on a small bounded thread pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transformers.utils import logging

from .base import ScoreOptions

logger = logging.get_logger(__name__)

# The files of the reply cache carry this version; a change of the cache layout changes it so that old files are not
# misread (they are then simply asked again).
CACHE_FORMAT = 1
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
PLACEHOLDER_API_KEY = "EMPTY"
# HTTP statuses worth another attempt: rate limits and server-side failures. Others (401, 404, 400 ...) will not
# change by asking again.
RETRYABLE_STATUS = {408, 409, 429}


class JudgeError(ValueError):
    """The judge endpoint cannot be used (unreachable, refusing, misconfigured); the message names the URL.

    A `ValueError` because, seen from the command line, it is a bad `--judge-base-url` / `--judge-model` / key, and
    `pixelrefer` reports ValueErrors as one line without a traceback.
    """


@dataclass(frozen=True)
class JudgeRequest:
    """One chat request: the messages plus per-benchmark settings (`max_tokens`, ...) on top of the judge's."""

    messages: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)


def _is_local(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


def _import_openai():
    try:
        import openai
    except ImportError as error:
        raise ImportError(
            'LLM-judged benchmarks need the `openai` package: pip install "pixelrefer-hf[eval]"'
        ) from error
    return openai


class Judge:
    """Chat completions from one judge model, cached on disk, retried, in parallel.

    Args:
        base_url: the OpenAI-compatible endpoint, e.g. `http://localhost:8000/v1` or `https://api.openai.com/v1`.
        model: the judge model's name on that endpoint.
        api_key_env: the environment variable holding the key (missing: the placeholder "EMPTY").
        cache_dir: where replies are kept; None keeps nothing.
        timeout: seconds per request.
        max_attempts: attempts per request, the first included.
        temperature: sampling temperature of every request (0 reproduces best).
        max_workers: requests in flight at once.
        backoff: seconds before the second attempt, doubled for each next one.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        cache_dir: str | Path | None = None,
        timeout: float = 60.0,
        max_attempts: int = 3,
        temperature: float = 0.0,
        max_workers: int = 8,
        backoff: float = 1.0,
    ):
        if not base_url:
            raise JudgeError("no judge endpoint: give the base URL of an OpenAI-compatible server (--judge-base-url)")
        if urlparse(base_url).scheme not in ("http", "https") or not urlparse(base_url).hostname:
            raise JudgeError(f"judge base URL {base_url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
        if not model:
            raise JudgeError(f"no judge model for {base_url}: give the model name it serves (--judge-model)")
        if max_attempts < 1:
            raise JudgeError(f"judge max_attempts must be at least 1, got {max_attempts}")
        openai = _import_openai()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.temperature = temperature
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_workers = max(1, max_workers)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        api_key = os.environ.get(api_key_env)
        if not api_key:
            api_key = PLACEHOLDER_API_KEY
            if not _is_local(self.base_url):
                logger.warning_once(
                    f"{api_key_env} is not set: calling the judge at {self.base_url} without a key ('{api_key}')."
                )
        # The client's own retries are off: attempts, backoff and the final message are ours.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self._openai = openai
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.cache_hits = 0

    @classmethod
    def from_options(cls, options: ScoreOptions, **kwargs) -> Judge:
        """The judge that `options` describe, caching under `options.run_dir / "judge_cache"` when a run folder is set."""
        cache_dir = None if options.run_dir is None else Path(options.run_dir) / "judge_cache"
        return cls(
            options.judge_base_url or "",
            options.judge_model or "",
            api_key_env=options.judge_api_key_env,
            cache_dir=cache_dir,
            timeout=options.judge_timeout,
            max_attempts=options.judge_max_attempts,
            **kwargs,
        )

    def describe(self) -> dict[str, Any]:
        """What results.json records about the judge: who scored, and how many requests this scoring sent."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "temperature": self.temperature,
            "requests_sent": self.requests_sent,
            "cache_hits": self.cache_hits,
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Cache
    # ----------------------------------------------------------------------------------------------------------------

    def _settings(self, request: JudgeRequest) -> dict[str, Any]:
        return {"temperature": self.temperature, **request.settings}

    def cache_key(self, request: JudgeRequest) -> str:
        payload = {"model": self.model, "messages": request.messages, "settings": self._settings(request)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.json"

    def _read_cache(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning(f"ignoring unreadable judge cache file {path} ({error}); asking again")
            return None
        if (
            not isinstance(entry, dict)
            or entry.get("format") != CACHE_FORMAT
            or not isinstance(entry.get("reply"), str)
        ):
            return None
        return entry["reply"]

    def _write_cache(self, key: str, request: JudgeRequest, reply: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "format": CACHE_FORMAT,
            "base_url": self.base_url,
            "model": self.model,
            "settings": self._settings(request),
            "messages": request.messages,
            "reply": reply,
        }
        # A temporary file in the same folder, renamed over the target: readers see the old file or the whole new one.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(entry, stream, ensure_ascii=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------------------------

    def _retryable(self, error: Exception) -> bool:
        openai = self._openai
        if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):  # timeouts subclass the first
            return True
        if isinstance(error, openai.APIStatusError):
            return error.status_code >= 500 or error.status_code in RETRYABLE_STATUS
        return False

    def _send(self, request: JudgeRequest) -> str:
        last_error: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._lock:
                self.requests_sent += 1
            try:
                completion = self._client.chat.completions.create(
                    model=self.model, messages=request.messages, **self._settings(request)
                )
            except self._openai.APIError as error:
                if not self._retryable(error):
                    status = getattr(error, "status_code", None)
                    raise JudgeError(
                        f"the judge at {self.base_url} refused the request"
                        + (f" (HTTP {status})" if status is not None else "")
                        + f": {error}"
                    ) from None
                last_error = error
                continue
            choices = getattr(completion, "choices", None)
            content = choices[0].message.content if choices else None
            # An empty or missing content is returned as "" and left to the benchmark's parser to count as unparsed.
            return content if isinstance(content, str) else ""
        raise JudgeError(
            f"the judge at {self.base_url} did not answer after {self.max_attempts} attempt(s): "
            f"{type(last_error).__name__}: {last_error}"
        ) from None

    def chat(self, request: JudgeRequest) -> str:
        """The reply to one request, from the cache when it was asked before."""
        key = self.cache_key(request)
        cached = self._read_cache(key)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        reply = self._send(request)
        self._write_cache(key, request, reply)
        return reply

    def chat_many(self, requests: Sequence[JudgeRequest]) -> list[str]:
        """Replies to many requests in their order; the first failure stops the rest and is raised."""
        if not requests:
            return []
        if self.max_workers == 1 or len(requests) == 1:
            return [self.chat(request) for request in requests]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(self.chat, request) for request in requests]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def user_message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def system_message(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


__all__ = ["Judge", "JudgeError", "JudgeRequest", "system_message", "user_message"]
