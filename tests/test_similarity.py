"""Chapter 3's similarity measures against values computed another way."""

from __future__ import annotations

import numpy as np
import torch

from latentmed.analysis import similarity as S


def brute_inter(Z, M, k):
    u = [Z[i, k] / np.linalg.norm(Z[i, k]) for i in range(len(Z)) if M[i, k]]
    return np.mean([u[i] @ u[j] for i in range(len(u)) for j in range(len(u)) if i != j])


def test_inter_and_intra_match_brute_force_with_a_mask():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(7, 4, 5))
    M = np.ones((7, 4), bool)
    M[2, 3] = M[5, 2:] = False  # model-decided ends
    inter = S.inter(Z, M)
    for k in range(4):
        assert np.isclose(inter[k], brute_inter(Z, M, k))
    M[6, 1:] = False  # an instance with one latent has no other latents to compare with
    i2 = S.intra(Z, M)
    u = Z / np.linalg.norm(Z, axis=-1, keepdims=True)
    for k in range(4):
        want = np.mean([np.mean([u[i, l] @ u[i, k] for l in range(4) if l != k and M[i, l]])
                        for i in range(7) if M[i, k] and M[i].sum() > 1])
        assert np.isclose(i2[k], want, rtol=0, atol=1e-12)
    assert np.isnan(S.intra(Z, np.eye(7, 4, dtype=bool))).all()  # no instance has two latents


def test_collapse_and_constant_latents():
    base = np.random.default_rng(1).normal(size=(1, 1, 6))
    Z = np.repeat(np.repeat(base, 5, 0), 3, 1) + 0.0
    M = np.ones((5, 3), bool)
    prof = S.profile(Z, M)
    assert np.allclose(prof["inter"], 1) and np.allclose(prof["intra"], 1) and S.collapse_step(prof) == 1
    rng = np.random.default_rng(2)
    spread = rng.normal(size=(50, 3, 64))
    assert S.collapse_step(S.profile(spread, np.ones((50, 3), bool))) is None
    assert abs(S.inter(spread, np.ones((50, 3), bool))).max() < 0.05


def test_permutation_test_finds_a_planted_difference_and_only_then():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 1, 16))
    Z = centres + 0.3 * rng.normal(size=(30, 4, 16))  # each instance's latents share a centre
    M = np.ones((30, 4), bool)
    planted = S.permutation_test(Z, M, n_perm=200)
    assert planted["intra_minus_inter"] > 0.5 and planted["p_value"] < 0.01
    noise = S.permutation_test(rng.normal(size=(30, 4, 16)), M, n_perm=200)
    assert noise["p_value"] > 0.05 and abs(noise["intra_minus_inter"]) < 0.1


def test_movement_and_stack():
    Z, M = S.stack([torch.ones(3, 4), torch.ones(2, 4), None])
    assert Z.shape == (3, 3, 4) and M.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    Zp = Z.copy()
    Zp[0, 0] = [1, -1, 1, -1]  # orthogonal to (1, 1, 1, 1), same norm
    mv = S.movement(Z, M, Zp * 2, M)
    assert np.isclose(mv.loc[0, "distance"], 0.5) and np.isclose(mv.loc[0, "norm_ratio"], 2)
    assert np.isclose(mv.loc[1, "distance"], 0)
