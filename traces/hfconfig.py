"""A served model's shape: from a Hugging Face ``config.json``, the local Hugging Face cache, or the catalogue.

``resolve_shape`` tries, in this order (the first that knows the model wins, and says so):

1. ``--model-config PATH``: a ``config.json`` or a directory holding one (errors here are the user's and
   raise, naming the file);
2. the model id as a local directory holding ``config.json`` (vLLM serves local directories, and a run's
   ``meta.model`` / ``engine_kwargs.model`` then is that path);
3. the local Hugging Face cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``, at
   ``models--ORG--NAME/snapshots/*/config.json`` (the snapshot ``refs/main`` points at first);
4. the bundled catalogue (``sim.catalog``): exact ids and aliases, then variants by name
   (``/models/Llama-3.1-8B-Instruct``, ``Qwen/Qwen3-30B-A3B-Instruct-2507``: ``sim.catalog.find_model_variant``);

and returns ``None`` when none knows the model: the shape is then unknown (``unknown_shape_message`` says
what was tried and what to pass). A config of an architecture that ``sim.modelshape`` does not know
counts as not found at steps 2-3 (and is reported), and raises at step 1.

The conversion itself (config.json -> ``ModelSpec`` with parameter counts) is ``sim.modelshape``: the
catalogue uses the same rule, so a model's shape does not depend on where it was found.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sim.catalog import find_model_variant
from sim.modelshape import FAMILIES, ModelEntry, count_params, model_entry_from_config

from .errors import TraceFormatError

__all__ = ["ResolvedShape", "find_in_hf_cache", "hf_hub_dir", "model_entry_from_file", "read_config",
           "resolve_shape", "unknown_shape_message"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedShape:
    """A model's shape and where it came from (``source``: one sentence for reports)."""

    entry: ModelEntry
    source: str
    kind: str  # "model_config", "local_dir", "hf_cache" or "catalogue"


def read_config(path: str | Path) -> tuple[dict, Path]:
    """The parsed ``config.json`` at ``path`` (the file or its directory) and the file's path."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no config.json there (pass a Hugging Face config.json or the directory "
                                "that holds it)")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{p}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise TraceFormatError(f"{p}: a config.json must be a JSON object, got {type(data).__name__}")
    return data, p


def _dtype_bytes(config: Mapping) -> int:
    """Bytes per weight from ``torch_dtype``/``dtype`` (2 when absent or not a float type we know)."""
    dt = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(dt, 2)


def model_entry_from_file(path: str | Path, *, name: str | None = None) -> ModelEntry:
    """The ``ModelEntry`` of a ``config.json`` file or directory; errors name the file."""
    config, file = read_config(path)
    model_name = name or config.get("_name_or_path") or file.parent.name
    return model_entry_from_config(config, name=str(model_name), source=f"{file}", where=str(file),
                                   dtype_bytes=_dtype_bytes(config))


def hf_hub_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("HOME", "~")).expanduser() / ".cache" / "huggingface" / "hub"


def find_in_hf_cache(model_id: str, hub: Path) -> Path | None:
    """``config.json`` of ``model_id`` in the hub cache ``hub`` (the ``refs/main`` snapshot first), or ``None``."""
    if "/" not in model_id or model_id.startswith(("/", ".", "~")):
        return None
    repo = hub / ("models--" + model_id.strip("/").replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snaps / ref.read_text(encoding="utf-8").strip() / "config.json"
        if pinned.is_file():
            return pinned
    found = sorted(snaps.glob("*/config.json"))
    return found[0] if found else None


def _candidates(model_ids: str | Iterable[str]) -> list[str]:
    ids = [model_ids] if isinstance(model_ids, str) else list(model_ids)
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))


def _local(model_id: str) -> Path | None:
    p = Path(model_id).expanduser()
    return p / "config.json" if (p / "config.json").is_file() else None


def _supported(config: Mapping) -> bool:
    try:
        count_params(config)
    except (ValueError, TypeError):
        return False
    return True


def resolve_shape(model_ids: str | Iterable[str], *, model_config: str | Path | None = None,
                  env: Mapping[str, str] | None = None) -> ResolvedShape | None:
    """The served model's shape, or ``None`` when unknown (see the module docstring for the order).

    Args:
        model_ids: the names the run gives its model (``engine_kwargs.model``, ``meta.model``): Hugging Face
            ids or local directories.
        model_config: ``--model-config``: a ``config.json`` or its directory (wins over everything).
        env: environment for the cache location (default ``os.environ``).
    """
    ids = _candidates(model_ids)
    name = next((i for i in ids if "/" in i and not _local(i)), ids[0] if ids else "model")
    if model_config is not None:
        entry = model_entry_from_file(model_config, name=name)
        return ResolvedShape(entry=entry, source=f"--model-config {model_config}", kind="model_config")
    hub = hf_hub_dir(env)
    for model_id in ids:
        for kind, path in (("local_dir", _local(model_id)), ("hf_cache", find_in_hf_cache(model_id, hub))):
            if path is not None and _supported(read_config(path)[0]):
                where = ("the served model directory" if kind == "local_dir" else "the local Hugging Face cache")
                return ResolvedShape(entry=model_entry_from_file(path, name=name if kind == "hf_cache" else model_id),
                                     source=f"{path} ({where})", kind=kind)
    for exact in (True, False):  # exact ids and aliases first, then variants by name
        for model_id in ids:
            found = find_model_variant(model_id)
            if found is not None and (found[1] == "exact") == exact:
                entry, how = found
                note = "" if exact else f"; {how}: pass --model-config if its shape differs"
                return ResolvedShape(entry=entry, source=f"catalogue entry {entry.spec.name!r} (sim/data/models.json, "
                                                         f"{entry.sources['model']}){note}", kind="catalogue")
    return None


def unknown_shape_message(model_ids: str | Iterable[str], env: Mapping[str, str] | None = None) -> str:
    """Why ``resolve_shape`` found nothing: what was tried, and what to pass."""
    ids, hub = _candidates(model_ids), hf_hub_dir(env)
    tried = []
    for model_id in ids:
        for path in (_local(model_id), find_in_hf_cache(model_id, hub)):
            if path is not None:
                config = read_config(path)[0]
                tried.append(f"{path} has model_type {config.get('model_type')!r}, not a supported family "
                             f"{sorted(FAMILIES)}")
    tried.append(f"not in the Hugging Face cache {hub} (models--ORG--NAME/snapshots/*/config.json)")
    tried.append("not in the catalogue (sim/data/models.json)")
    return (f"the shape of model {' / '.join(map(repr, ids))} is unknown: " + "; ".join(tried)
            + ". Pass --model-config PATH (its config.json or the directory holding it)")
