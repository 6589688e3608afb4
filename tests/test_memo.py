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


def _count_processor_runs(monkeypatch) -> list:
    """Patch the image processor's entry point (`inputs.pixels`) to record each run."""
    from latentmed.engine import inputs

    runs, real = [], inputs.pixels
    monkeypatch.setattr(inputs, "pixels", lambda processor, images: runs.append(len(images)) or real(processor, images))
    return runs


def test_a_memoised_image_never_runs_the_processor(ckpt, clean_memo, monkeypatch):
    a = LatentReasoner.from_pretrained(ckpt, method="monet")
    b = LatentReasoner.from_pretrained(ckpt, method="lvr")  # the same tower
    a.prompt(_query(5))  # the first image of this size: the processor runs for its grid
    runs = _count_processor_runs(monkeypatch)
    pa, pb = a.prompt(_query(0)), b.prompt(_query(0))
    assert runs == []  # the grid is known, the pixels pending
    with torch.inference_mode():
        fa, _ = a.image_features([pa], [[]])  # a miss: the pixels are computed now
        assert runs == [1]
        fb, _ = b.image_features([pb], [[]])  # a hit: never computed
    assert runs == [1] and (clean_memo.misses, clean_memo.hits) == (1, 1) and torch.equal(fa, fb)
    assert torch.is_tensor(pa.pixel_source()) and not torch.is_tensor(pb.pixel_source())
    assert torch.equal(pb.pixel_values, pa.pixel_values) and runs == [1, 1]  # read: computed, and the same


def test_pending_pixels_are_the_processors_pixels_of_the_encoded_bytes(ckpt):
    from latentmed.engine.inputs import pixels

    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    r.prompt(_query(5))
    im = scene(seed=0)
    want = pixels(r.processor, [im.copy()])
    p = r.prompt(Query(images=[im], question="q?", options=OPTIONS))
    im.putpixel((3, 3), (0, 0, 0))  # the caller edits its image after the prompt was built
    assert not torch.is_tensor(p.pixel_source())
    assert torch.equal(p.pixel_values, want[0]) and torch.equal(p.image_grid_thw, want[1])
    assert not torch.equal(pixels(r.processor, [im])[0], want[0])  # the edit does change the pixels


def test_the_grid_is_the_processors_for_each_size(ckpt):
    from latentmed.engine.inputs import encode, pixels

    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    for size in [(224, 224), (112, 224), (224, 224), (112, 224), (168, 84)]:
        im = scene(seed=1).resize(size)
        enc = encode(r.tokenizer, r.processor, "<|image_pad|> q", [im])
        pix, grid = pixels(r.processor, [im])
        assert torch.equal(enc.image_grid_thw, grid) and torch.equal(enc.pixel_values, pix)
        assert enc.input_ids.shape[1] == 2 + int(grid.prod()) // 4  # one pad per merged token


def test_token_ids_follow_the_vocabulary(ckpt):
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    tok = r.tokenizer
    text = " red <|zz_new|> blue"
    before = memo.token_ids(tok, text)
    assert before == tok.encode(text, add_special_tokens=False) and memo.token_ids(tok, text) == before
    memo.token_ids(tok, text).append(0)  # a caller's list is its own
    assert memo.token_ids(tok, text) == before
    tok.add_tokens(["<|zz_new|>"], special_tokens=True)
    after = memo.token_ids(tok, text)
    assert after == tok.encode(text, add_special_tokens=False) and after != before
    assert tok.convert_tokens_to_ids("<|zz_new|>") in after


def test_decoded_text_equals_the_tokenizers_and_follows_the_vocabulary(ckpt, monkeypatch):
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    tok = r.tokenizer
    ids = tok.encode(" red blue", add_special_tokens=False) + [r.ids.start] + tok.encode(" green", add_special_tokens=False)
    for skip in (True, False):
        assert memo.decoded(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    assert memo.decoded(tok, ids, True) != memo.decoded(tok, ids, False)  # the flag is part of the key
    calls = []
    real = type(tok).decode
    monkeypatch.setattr(type(tok), "decode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    memo.decoded(tok, ids, True)
    assert calls == []  # served from the memo
    tok.add_tokens(["<|zz_other|>"], special_tokens=True)
    new = tok.convert_tokens_to_ids("<|zz_other|>")
    assert memo.decoded(tok, ids, True) == tok.decode(ids, skip_special_tokens=True) and calls  # memo restarted
    assert memo.decoded(tok, [new], False) == "<|zz_other|>"


def test_a_batch_walks_the_towers_weights_once_and_still_sees_an_edit_between_batches(ckpt, clean_memo,
                                                                                     monkeypatch):
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    calls = []
    real = memo.weights_key
    monkeypatch.setattr(memo, "weights_key", lambda m: calls.append(1) or real(m))
    import latentmed.engine.reasoner as R

    monkeypatch.setattr(R, "weights_key", memo.weights_key)
    prompts = [r.prompt(_query(s)) for s in range(4)]
    with torch.inference_mode():
        f, blocks = r.image_features(prompts, [[]] * 4)
        assert len(calls) == 1 and clean_memo.misses == 4  # four images, one walk over the weights
        with torch.no_grad():
            r.model.model.visual.merger.mlp[-1].bias.add_(1.0)
        again = [r.prompt(_query(s)) for s in range(4)]
        f2, _ = r.image_features(again, [[]] * 4)
    assert clean_memo.misses == 8 and clean_memo.hits == 0
    assert all(torch.equal(b, _direct(r, p)) for b, p in zip(r.image_features(again, [[]] * 4)[1], again))


def test_rope_index_memo_equals_transformers_for_every_layout(ckpt):
    """Memoised M-RoPE positions equal transformers' get_rope_index on the whole batch: left
    padding, rows with no image, two images in a row (grids taken in order), no mask; a repeated
    layout is a memo hit, and a changed grid is not."""
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    model, img = r.model, r.ids.image
    gen = torch.Generator().manual_seed(0)

    def row(n_text, images, pad, T):
        text = [int(x) for x in torch.randint(1, 40, (n_text,), generator=gen)]
        ids = text[:2]
        for k in images:  # k merged image tokens, then two text tokens
            ids += [img] * k + text[:2]
        ids += text[2:]
        return [0] * pad + ids + [5] * (T - pad - len(ids))

    grid_a, grid_b = [1, 4, 4], [1, 4, 8]  # 4 and 8 merged tokens (merge 2)
    cases = [  # (rows, grids in order)
        ([row(6, [4], 3, 20), row(9, [4], 0, 20), row(11, [], 1, 20)], [grid_a, grid_a]),
        ([row(5, [4, 8], 2, 24), row(7, [8], 0, 24)], [grid_a, grid_b, grid_b]),
    ]
    model._latentmed_rope = {}
    for rows, grids in cases:
        ids = torch.tensor(rows)
        pads = [next(i for i, t in enumerate(x) if t != 0) for x in rows]
        mask = (torch.arange(ids.shape[1])[None] >= torch.tensor(pads)[:, None]).long()
        grid = torch.tensor(grids)
        is_image = ids == img
        for m in (mask, None):
            want, _ = model.model.get_rope_index(ids, is_image.int(), image_grid_thw=grid, attention_mask=m)
            assert torch.equal(memo.rope_index(model, ids, is_image, grid, m), want)
    n = len(model._latentmed_rope)
    ids = torch.tensor([row(6, [4], 0, 12)])
    memo.rope_index(model, ids, ids == img, torch.tensor([grid_a]), None)
    memo.rope_index(model, ids, ids == img, torch.tensor([grid_a]), None)
    assert len(model._latentmed_rope) == n + 1  # computed once
    other = memo.rope_index(model, ids, ids == img, torch.tensor([[1, 2, 8]]), None)  # same tokens, another grid
    want, _ = model.model.get_rope_index(ids, (ids == img).int(), image_grid_thw=torch.tensor([[1, 2, 8]]))
    assert len(model._latentmed_rope) == n + 2 and torch.equal(other, want)


@pytest.fixture
def disk(clean_memo, monkeypatch, tmp_path):
    monkeypatch.setenv("LATENTMED_RESULTS", str(tmp_path / "results"))
    d = memo.DiskMemo(64 * 2**20)
    monkeypatch.setattr(memo, "DISK", d)
    return d


def _counting(r, monkeypatch) -> list:
    calls = []
    real = r.model.model.get_image_features

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(r.model.model, "get_image_features", counted)
    return calls


def test_a_later_process_reads_the_tower_output_from_disk(ckpt, disk, clean_memo, monkeypatch):
    """Another process (the in-memory memo empty) gets the tower's output from the disk memo,
    bit for bit, without running the tower; a file cut by a kill is computed again."""
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    calls = _counting(r, monkeypatch)
    with torch.inference_mode():
        first, _ = r.image_features([r.prompt(_query(3))], [[]])
        files = list(memo.DiskMemo.folder().glob("*.safetensors"))
        assert len(calls) == 1 and len(files) == 1 and disk.added > 0
        clean_memo.clear()  # a new process: nothing in memory
        again, _ = r.image_features([r.prompt(_query(3))], [[]])
        assert len(calls) == 1 and disk.hits == 1 and torch.equal(again, first)
        assert torch.equal(first, _direct(r, r.prompt(_query(3))))  # the tower itself (counted)
        assert len(calls) == 2
        files[0].write_bytes(files[0].read_bytes()[:30])  # cut by a kill
        clean_memo.clear()
        third, _ = r.image_features([r.prompt(_query(3))], [[]])
        assert len(calls) == 3 and torch.equal(third, first)
        clean_memo.clear()
        r.image_features([r.prompt(_query(3))], [[]])
        assert len(calls) == 3  # rewritten whole
    assert not list(memo.DiskMemo.folder().glob(".*.tmp"))


def test_the_disk_memo_keys_on_what_decides_the_bits(ckpt, disk, clean_memo, monkeypatch):
    """Another thread count, CPU kernel setting or tower weights is another file; the bound 0
    writes nothing."""
    r = LatentReasoner.from_pretrained(ckpt, method="monet")
    with torch.inference_mode():
        r.image_features([r.prompt(_query(4))], [[]])
        names = {p.name for p in memo.DiskMemo.folder().glob("*.safetensors")}
        monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
        clean_memo.clear()
        r.image_features([r.prompt(_query(4))], [[]])
        monkeypatch.delenv("MKL_CBWR")
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            clean_memo.clear()
            r.image_features([r.prompt(_query(4))], [[]])
        finally:
            torch.set_num_threads(threads)
        next(r.model.model.visual.parameters()).add_(1e-3)  # other weights
        clean_memo.clear()
        r.image_features([r.prompt(_query(4))], [[]])
    assert len(list(memo.DiskMemo.folder().glob("*.safetensors"))) == len(names) + 3
    off = memo.DiskMemo(0)
    monkeypatch.setattr(memo, "DISK", off)
    clean_memo.clear()
    with torch.inference_mode():
        r.image_features([r.prompt(_query(5))], [[]])
    assert off.added == 0 and len(list(memo.DiskMemo.folder().glob("*.safetensors"))) == len(names) + 3
