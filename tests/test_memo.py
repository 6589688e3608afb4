"""The engine's content-keyed memo of the vision tower: a hit is the tower's own output, and
anything that changes the output (the pixels, the tower's weights) changes the key."""

from __future__ import annotations

import pytest
import torch
from conftest import OPTIONS, scene
from latentmed.engine import memo
from latentmed.engine.query import Query
from latentmed.engine.reasoner import LatentReasoner


@pytest.fixture
def clean_memo(monkeypatch):
    m = memo.FeatureMemo(64 * 2**20)
    monkeypatch.setattr(memo, "MEMO", m)
    return m


def _query(seed: int) -> Query:
    return Query(images=[scene(seed=seed)], question="What colour is the square?", options=OPTIONS)


def _direct(r, prompt) -> torch.Tensor:
    """The tower's tokens computed without the memo."""
    with torch.inference_mode():
        return torch.cat(r.model.model.get_image_features(prompt.pixel_values, prompt.image_grid_thw).pooler_output)


def test_two_models_with_one_tower_share_its_output(ckpt, clean_memo):
    a = LatentReasoner.from_pretrained(ckpt, method="monet")
    b = LatentReasoner.from_pretrained(ckpt, method="lvr")
    pa, pb = a.prompt(_query(0)), b.prompt(_query(0))  # fresh prompts: nothing cached on them
    with torch.inference_mode():
        fa, _ = a.image_features([pa], [[]])
        fb, _ = b.image_features([pb], [[]])
    assert (clean_memo.misses, clean_memo.hits) == (1, 1)
    assert torch.equal(fa, _direct(b, pb)) and torch.equal(fa, fb)


def test_other_pixels_or_other_weights_are_computed_again(ckpt, clean_memo):
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    with torch.inference_mode():
        f0, _ = r.image_features([r.prompt(_query(0))], [[]])
        f1, _ = r.image_features([r.prompt(_query(1))], [[]])  # the square elsewhere
        assert clean_memo.misses == 2 and not torch.equal(f0, f1)
        with torch.no_grad():
            r.model.model.visual.merger.mlp[-1].bias.add_(1.0)  # an in-place edit of the tower
        p = r.prompt(_query(0))
        f2, _ = r.image_features([p], [[]])
    assert clean_memo.misses == 3 and clean_memo.hits == 0
    assert torch.equal(f2, _direct(r, p)) and not torch.equal(f2, f0)


def test_a_one_pixel_change_is_another_image(ckpt, clean_memo):
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    im = scene(seed=0)
    other = im.copy()
    other.putpixel((0, 0), (0, 0, 0))
    q0 = Query(images=[im], question="q?", options=OPTIONS)
    q1 = Query(images=[other], question="q?", options=OPTIONS)
    assert r.prompt(q0).pixel_key != r.prompt(q1).pixel_key
    assert r.prompt(q0).pixel_key == r.prompt(Query(images=[im.copy()], question="other?", options=OPTIONS)).pixel_key


def test_least_recently_used_goes_first_and_the_bound_holds():
    m = memo.FeatureMemo(3 * 400)  # room for three 100-float tensors
    for k in "abc":
        m.put(k, torch.zeros(100))
    assert m.get("a") is not None  # a is now the most recently used
    m.put("d", torch.zeros(100))
    assert m.get("b") is None and m.get("a") is not None and len(m) == 3 and m.bytes <= m.max_bytes


def test_a_zero_bound_turns_the_memo_off(ckpt, monkeypatch):
    m = memo.FeatureMemo(0)
    monkeypatch.setattr(memo, "MEMO", m)
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    with torch.inference_mode():
        r.image_features([r.prompt(_query(0))], [[]])
        r.image_features([r.prompt(_query(0))], [[]])
    assert len(m) == 0 and m.hits == 0
