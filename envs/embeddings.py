"""Frozen, deterministic 384-d embeddings standing in for all-MiniLM-L6-v2.

LAMaS and MaAS encode the query text and every operator's description string with the frozen
``sentence-transformers/all-MiniLM-L6-v2`` (384-d, unit norm). No model can be downloaded here, so:

* an **operator** embedding is a unit Gaussian vector seeded by the SHA-256 of its description string
  (``"<i>. <Name>: <description>, with interface <interface>."``, as LAMaS builds it) plus a component
  shared by all descriptions, so that two descriptions have cosine ~0.4 like real sentence embeddings;
* a **query** embedding is ``normalise(c_task + 0.5 * s_q * u_task + n_q)``: a task centroid, a
  difficulty direction scaled by a noisy difficulty signal ``s_q`` (correlation ``difficulty_info`` with the
  latent difficulty), and isotropic noise. Queries of one task then have cosine ~0.5 with each other.

Everything is a pure function of strings and seeds: the same input always gives the same vector.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["EMBED_DIM", "operator_embedding", "query_embeddings", "text_embedding", "text_seed", "unit_vector"]

EMBED_DIM = 384


def text_seed(text: str) -> int:
    """A stable 64-bit seed from a string (SHA-256, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def unit_vector(seed: int, dim: int = EMBED_DIM) -> np.ndarray:
    v = np.random.Generator(np.random.PCG64(seed)).standard_normal(dim)
    return v / np.linalg.norm(v)


_SHARED_OPERATOR = unit_vector(text_seed("maslatency/operator-description/shared"))


def operator_embedding(description: str) -> np.ndarray:
    """The frozen embedding of one operator description string (float32, unit norm)."""
    v = 0.8 * _SHARED_OPERATOR + unit_vector(text_seed(description))
    return (v / np.linalg.norm(v)).astype(np.float32)


def query_embeddings(task: str, z: np.ndarray, difficulty_info: float, rng: np.random.Generator) -> np.ndarray:
    """Embeddings of queries with standardised difficulties ``z`` (one row each, unit norm).

    ``rng`` draws the information noise and the isotropic part; the task's centroid and difficulty
    direction depend on the task name only.
    """
    c = unit_vector(text_seed(f"maslatency/task-centroid/{task}"))
    u = unit_vector(text_seed(f"maslatency/task-difficulty/{task}"))
    u = u - np.dot(u, c) * c
    u /= np.linalg.norm(u)
    n = len(z)
    signal = difficulty_info * z + np.sqrt(1.0 - difficulty_info**2) * rng.standard_normal(n)
    noise = rng.standard_normal((n, EMBED_DIM)) / np.sqrt(EMBED_DIM)
    e = c[None, :] + 0.5 * signal[:, None] * u[None, :] + noise
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def text_embedding(text: str, dim: int = EMBED_DIM) -> np.ndarray:
    """A deterministic embedding of free text (signed feature hashing of lower-cased words and word pairs,
    unit norm): what the estimators read for prompts of a live run, which have no simulated query behind
    them. Texts sharing words are close; it carries no meaning beyond that."""
    words = text.lower().split()
    v = np.zeros(dim)
    for tok in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
        h = text_seed(tok)
        v[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)
