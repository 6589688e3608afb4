"""Input -> latent (chapter 3): how similar latents are within and across instances, step by step,
and how far they move when the input moves.

Latents are the vectors fed at the slots, Z_in [K, H] per instance (the paper's last-layer
latents: each is the final post-norm state of the position before its slot). Instances with
fewer latents (a model-decided end) are masked, never padded with zeros.

* inter-instance similarity at step k: mean cosine between the step-k latents of different instances;
* intra-instance similarity at step k: mean cosine between an instance's step-k latent and its
  other latents;
* the permutation test reassigns latents to instances at random within each step (which must
  destroy any intra/inter difference) and counts how often the shuffled difference reaches the
  observed one;
* movement under an input perturbation: 1 - cosine between an instance's latent at step k with
  the clean input and with the perturbed one, and the ratio of their norms, next to how far the
  merged image tokens and the prompt's last state move.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def stack(latents: list[torch.Tensor | None], k_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, K, H] latents (zeros where missing) and the [N, K] mask of present ones."""
    ks = [0 if z is None else len(z) for z in latents]
    K = k_max or max(ks, default=0)
    H = next((z.shape[1] for z in latents if z is not None and len(z)), 1)
    Z = np.zeros((len(latents), K, H), dtype=np.float64)
    M = np.zeros((len(latents), K), dtype=bool)
    for i, z in enumerate(latents):
        if z is not None and len(z):
            n = min(len(z), K)
            Z[i, :n], M[i, :n] = z[:n].double().numpy(), True
    return Z, M


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def inter(Z: np.ndarray, M: np.ndarray) -> np.ndarray:
    """[K] mean cosine between different instances' latents at each step (nan with < 2)."""
    return _inter(_unit(Z), M)


def _inter(U: np.ndarray, M: np.ndarray) -> np.ndarray:
    out = np.full(U.shape[1], np.nan)
    for k in range(U.shape[1]):
        u = U[M[:, k], k]
        n = len(u)
        if n > 1:
            s = u.sum(0)
            out[k] = (s @ s - n) / (n * (n - 1))  # mean over ordered pairs i != j of u_i . u_j
    return out


def intra(Z: np.ndarray, M: np.ndarray) -> np.ndarray:
    """[K] mean cosine between an instance's step-k latent and its other latents."""
    return _intra(_unit(Z), M)


def _intra(U: np.ndarray, M: np.ndarray) -> np.ndarray:
    """`intra` of unit vectors, all instances at once: [N, K, K] cosines, masked to the pairs of
    present, different steps, averaged per (instance, step), then over instances."""
    K = U.shape[1]
    pairs = M[:, :, None] & M[:, None, :] & ~np.eye(K, dtype=bool)
    count = pairs.sum(-1)
    per = np.where(pairs, U @ U.transpose(0, 2, 1), 0.0).sum(-1) / np.maximum(count, 1)  # [N, K]
    has = M & (count > 0)
    return np.array([per[has[:, k], k].mean() if has[:, k].any() else np.nan for k in range(K)])


def adjacent(Z: np.ndarray, M: np.ndarray) -> np.ndarray:
    """[K-1] mean cosine between consecutive latents of an instance (collapse over steps)."""
    U = _unit(Z)
    out = np.full(max(Z.shape[1] - 1, 0), np.nan)
    for k in range(Z.shape[1] - 1):
        both = M[:, k] & M[:, k + 1]
        if both.any():
            out[k] = float((U[both, k] * U[both, k + 1]).sum(-1).mean())
    return out


def permutation_test(Z: np.ndarray, M: np.ndarray, n_perm: int = 500, seed: int = 0) -> dict:
    """Intra minus inter (averaged over steps) against instance labels shuffled within each step."""
    def stat(Us, Ms):
        return float(np.nanmean(_intra(Us, Ms) - _inter(Us, Ms)))

    U = _unit(Z)  # a row's unit vector moves with it: normalise once, shuffle the unit vectors
    obs = stat(U, M)
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for b in range(n_perm):
        Up, Mp = U.copy(), M.copy()
        for k in range(Z.shape[1]):
            p = rng.permutation(len(Z))
            Up[:, k], Mp[:, k] = U[p, k], M[p, k]
        null[b] = stat(Up, Mp)
    p = (1 + np.sum(np.abs(null) >= abs(obs))) / (n_perm + 1)
    return dict(intra_minus_inter=obs, null_mean=float(null.mean()), null_sd=float(null.std()), p_value=float(p),
                n_perm=n_perm)


def profile(Z: np.ndarray, M: np.ndarray) -> pd.DataFrame:
    """Per step: inter, intra, adjacent similarity, mean norm and the number of instances."""
    K = Z.shape[1]
    adj = np.append(adjacent(Z, M), np.nan)
    norms = np.array([np.linalg.norm(Z[M[:, k], k], axis=-1).mean() if M[:, k].any() else np.nan for k in range(K)])
    return pd.DataFrame(dict(step=np.arange(1, K + 1), inter=inter(Z, M), intra=intra(Z, M), to_next=adj,
                             norm=norms, n=M.sum(0)))


def collapse_step(prof: pd.DataFrame, threshold: float = 0.9) -> int | None:
    """First step whose inter-instance similarity reaches `threshold` (None: never)."""
    hit = prof.loc[prof["inter"] >= threshold, "step"]
    return int(hit.iloc[0]) if len(hit) else None


def movement(Z: np.ndarray, M: np.ndarray, Zp: np.ndarray, Mp: np.ndarray) -> pd.DataFrame:
    """Per step: mean 1 - cos(z(X), z(X')) and mean ||z(X')|| / ||z(X)|| over instances with both."""
    U, Up = _unit(Z), _unit(Zp)
    K = min(Z.shape[1], Zp.shape[1])
    rows = []
    for k in range(K):
        both = M[:, k] & Mp[:, k]
        if not both.any():
            continue
        d = 1 - (U[both, k] * Up[both, k]).sum(-1)
        r = np.linalg.norm(Zp[both, k], axis=-1) / np.maximum(np.linalg.norm(Z[both, k], axis=-1), 1e-12)
        rows.append(dict(step=k + 1, distance=float(d.mean()), norm_ratio=float(r.mean()), n=int(both.sum())))
    return pd.DataFrame(rows)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean 1 - cosine between paired rows of a and b ([N, H])."""
    return float(1 - (_unit(a) * _unit(b)).sum(-1).mean())
