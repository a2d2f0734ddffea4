"""Region selection: which visual regions the model attends to for a query.

A query's probe-layer queries q ([heads, T, 64], RoPE'd; the probe layer is the middle one)
score every region by the attention they would pay it at that layer: per head h and query token
t, a softmax of q_{h,t} · k_j / √64 over the probe-layer keys k_j of all region tokens (head h
reads KV head h // (heads / kv_heads), as grouped-query attention pairs them), summed over each
region's tokens. A region's relevance is its largest such mass over heads and query tokens.

Relevances are z-normalised across the regions in memory (their spread differs from query to
query), then the gaze prior is added: score_r = z_r + gaze_prior_weight · prior_r, with prior_r in
0..1 from perception (1 = under the gaze point). The top k regions are attended, with the context
and the local group; k = None, or k at least the number of regions, attends to all (dense).

Why token keys and not one mean key per region (q · mean_j k_j): that is the MEAN logit over
the region's tokens, which the wording all region lines share ("- text '...', 120 px from the
gaze point") dominates. SmolLM2-135M, 12 regions, 8 questions each about one of them: the mean
key ranks that region 7.6th on average (chance: 6.5th) and has it in its top 4 for 2 of 8
questions; the attention mass ranks it 2.5th, top 4 for 7 of 8.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]


def relevance(query: F32, keys: F32, sizes: NDArray[np.int64]) -> NDArray[np.float64]:
    """Probe-layer attention mass per region, maximised over heads and query tokens.

    query [heads, T, dim]; keys [kv_heads, N, dim]: the N region tokens, region by region, of
    the given sizes [R] (each at least 1). Returns [R].
    """
    heads, steps, dim = query.shape
    kv_heads = keys.shape[0]
    # Head h reads KV head h // (H / Hk): the query's heads grouped [Hk, H / Hk, T, dim], so
    # the keys are not copied per head. einsum, not matmul: BLAS threads would fight ONNX
    # Runtime's for the same cores.
    grouped = query.reshape(kv_heads, heads // kv_heads, steps, dim)
    logits = np.einsum("gqtd,gnd->gqtn", grouped, keys).reshape(heads, steps, -1)  # [H, T, N]
    logits /= math.sqrt(dim)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mass = np.add.reduceat(weights, starts, axis=2)  # [H, T, R]
    best: NDArray[np.float64] = mass.max(axis=(0, 1)).astype(np.float64)
    return best


def region_scores(
    query: F32,
    keys: F32,
    sizes: NDArray[np.int64],
    priors: NDArray[np.float64],
    prior_weight: float,
) -> NDArray[np.float64]:
    """Selection scores [R]: z-normalised relevance + prior_weight × gaze prior."""
    if sizes.size == 0:
        return np.zeros(0)
    r = relevance(query, keys, sizes)
    spread = float(r.std())
    z = (r - r.mean()) / spread if spread > 1e-9 else np.zeros_like(r)
    return z + prior_weight * priors


def select(scores: NDArray[np.float64], k: int | None) -> NDArray[np.int64]:
    """Indices of the k best scores in ascending order (the regions' memory order); all of
    them when k is None or at least their number."""
    count = scores.shape[0]
    if k is None or k >= count:
        return np.arange(count)
    if k <= 0:
        return np.zeros(0, np.int64)
    best = np.argpartition(-scores, k - 1)[:k]
    return np.sort(best).astype(np.int64)
