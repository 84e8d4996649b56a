"""Start and stop a local vLLM OpenAI-compatible server with runtime LoRA loading.

One place knows how vLLM must be launched on this project's machines: `python -m
vllm.entrypoints.openai.api_server` (the CPU build's console script is broken), runtime LoRA updating
on, a KV-cache size for CPU and no hub access. Used by `overnight serve`, the demo and the integration
tests; the pipeline itself only talks to servers over HTTP.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from storage.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSpec:
    model: str  # local path or Hugging Face id of the base model
    served_name: str = "base"  # name clients use for the base model
    host: str = "127.0.0.1"
    port: int = 8000
    # Adapters are served beside the base. Off for a server that only scores (a distillation
    # teacher): vLLM 0.32's CPU engine fails on batched prompt log-probabilities with LoRA enabled.
    enable_lora: bool = True
    max_loras: int = 4  # adapters resident at once
    max_lora_rank: int = 8
    max_model_len: int = 512
    dtype: str = "auto"
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    prefix_caching: bool = True
    extra_args: tuple[str, ...] = ()
    log_file: Path | None = None  # server output goes here (default: discarded after start-up)
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None  # clients must send it as a Bearer token (`--api-key`); None: open

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def server_command(spec: ServerSpec) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model,
        "--served-model-name", spec.served_name,
        "--host", spec.host,
        "--port", str(spec.port),
        "--max-model-len", str(spec.max_model_len),
        "--dtype", spec.dtype,
    ]  # fmt: skip
    if spec.enable_lora:
        command += [
            "--enable-lora",
            "--max-loras",
            str(spec.max_loras),
            "--max-lora-rank",
            str(spec.max_lora_rank),
        ]
    command.append("--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching")
    # Constrained JSON without free whitespace: a judge cannot pad an answer until max_tokens cuts it.
    command += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    if spec.api_key:
        command += ["--api-key", spec.api_key]
    return [*command, *spec.extra_args]


def server_env(spec: ServerSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(spec.kv_cache_gib),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env.update(spec.env)
    return env


class VllmServer:
    """A vLLM server process: `with VllmServer(spec) as server: ...` starts it and waits until ready."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def pid(self) -> int | None:
        """The server's pid, also its process group's (its engine and workers); None when not started."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_seconds: float = 300.0) -> VllmServer:
        if not vllm_installed():
            raise UserError(
                "vLLM is not installed here: install the extra `overnight[cpu]` or `overnight[gpu]`"
            )
        if not Path(self.spec.model).exists() and "/" not in self.spec.model:
            raise UserError(
                f"serving.base_model: {self.spec.model!r} is neither a local directory nor a model id"
            )
        log_path = self.spec.log_file
        self._log_handle = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            server_command(self.spec),
            env=server_env(self.spec),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() can end vLLM's worker processes too
        )
        logger.info("starting vLLM on %s (pid %d)", self.base_url, self._process.pid)
        try:
            self._wait_ready(timeout_seconds)
        except BaseException:  # a failed start, Ctrl-C or SIGTERM: leave no server behind
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                where = f"; see {self.spec.log_file}" if self.spec.log_file else ""
                raise UserError(f"vLLM exited with code {self._process.returncode} during start-up{where}")
            if server_ready(self.base_url, self.spec.served_name, api_key=self.spec.api_key):
                return
            time.sleep(1.0)
        raise UserError(f"vLLM did not become ready on {self.base_url} within {timeout_seconds:.0f}s")

    def stop(self, grace_seconds: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log_handle not in (None, subprocess.DEVNULL):
            self._log_handle.close()  # type: ignore[union-attr]
        self._log_handle = None

    def wait(self, timeout_seconds: float | None = None) -> int | None:
        """Block until the server process exits (its exit code) or `timeout_seconds` pass (None)."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> VllmServer:
        return self.start() if self._process is None else self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def server_ready(base_url: str, served_name: str, *, api_key: str | None = None) -> bool:
    """True when the server answers /v1/models and lists the base model."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", timeout=2.0, headers=headers)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    return any(model.get("id") == served_name for model in response.json().get("data", []))
