"""Bad input across the library: every case breaks one input on purpose and expects a clear error
that names the file or argument and the problem, or the correct behaviour; never a silently wrong
result, a raw stack trace from deep inside a library, or a deleted file the project did not write.

Each case carries the class of failure it guards against (issue 14):

    silent      the input used to be accepted and gave a wrong result
    trace       it used to end in a raw stack trace (or an error that does not name the input)
    misleading  it used to give an error that blamed the wrong thing
    loss        it used to delete or overwrite files the project had not written
    ok          a valid input in an unusual form that must work (the boundary of the checks)

`CLASS_COUNTS` sums them; the suite's report in the closing note of issue 14 comes from it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from latentmed import book, files, paths
from latentmed.engine import checkpoint
from latentmed.engine import interventions as I
from latentmed.engine.decode import DecodeConfig
from latentmed.engine.inputs import chat_prompt, encode, pixels
from latentmed.engine.query import Query
from latentmed.engine.reasoner import LatentReasoner
from latentmed.engine.spec import LatentSpec, preset
from latentmed.engine.tiny import image_processor
from latentmed.engine.tokenizer import build_tokenizer, load_tokenizer
from latentmed.engine.trace import Trace
from latentmed.files import DamagedFileError
from latentmed.store import ResultsStore
from latentmed.testbed import VOCABULARY, Item, TestbedConfig, make_item
from latentmed.testbed import dataset as D
from latentmed.testbed import exports as E
from latentmed.zoo import bank as B
from latentmed.zoo import build as Z
from latentmed.zoo import captioner as C
from latentmed.zoo import loop as L
from latentmed.zoo import sft as S
from PIL import Image

from conftest import OPTIONS, scene

TB = TestbedConfig(n_objects=(3, 8), n_train=8, n_val=4, n_test=4)


# ---------------------------------------------------------------- what a case sees

class Ctx:
    """Fresh, damageable copies of the shared fixtures for one case (made on first use)."""

    def __init__(self, tmp: Path, shared: dict, monkeypatch):
        self.tmp, self._shared, self._made, self.monkeypatch = tmp, shared, {}, monkeypatch

    def _copy(self, key: str) -> Path:
        if key not in self._made:
            self._made[key] = Path(shutil.copytree(self._shared[key], self.tmp / key))
        return self._made[key]

    @property
    def ckpt(self) -> Path:
        """A copy of the tiny checkpoint folder (no latent_spec.json: pass method=)."""
        return self._copy("ckpt")

    @property
    def tb(self) -> Path:
        """A copy of a small generated testbed folder."""
        return self._copy("tb")

    @property
    def reasoner(self) -> LatentReasoner:
        return self._shared["load"]("monet-sft", n_latents=2)

    def prompt(self):
        q = Query(images=[scene()], question="What colour is the square?", options=OPTIONS)
        return self.reasoner.prompt(q)

    def trace(self) -> Trace:
        return self.reasoner.generate(self.prompt(), max_new_tokens=6, force_latent=True)

    def file(self, name: str, data: bytes | str = b"user data") -> Path:
        """Write a file (into the copy of a shared folder when `name` starts with ckpt/ or tb/)."""
        if name.split("/")[0] in ("ckpt", "tb"):
            self._copy(name.split("/")[0])
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p


@dataclass
class Case:
    id: str
    cls: str  # silent | trace | misleading | loss | ok
    run: Callable[[Ctx], object]
    exc: type | tuple | None = None  # None: runs without error (then `after` checks the result)
    match: str = ""  # regex; {tmp} {ckpt} {tb} stand for those paths (escaped)
    after: Callable | None = None  # after(ctx, result_or_exception): files kept, result right


def _pattern(case: Case, ctx: Ctx) -> str:
    subs = {"tmp": ctx.tmp, "ckpt": ctx.tmp / "ckpt", "tb": ctx.tmp / "tb"}
    out = case.match
    for k, v in subs.items():
        out = out.replace("{" + k + "}", re.escape(str(v)))
    return out


# ---------------------------------------------------------------- small helpers used by cases

def edit_json(path: Path, fn) -> Path:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))
    return path


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return path


def load_ckpt(ctx: Ctx, method: str = "lvr", **kw):
    return checkpoint.load(ctx.ckpt, method=method, **kw)


def ckpt_json(name: str, fn) -> Callable[[Ctx], object]:
    def run(ctx):
        edit_json(ctx.ckpt / name, fn)
        return load_ckpt(ctx)
    return run


def ckpt_file(name: str, data: bytes | str) -> Callable[[Ctx], object]:
    def run(ctx):
        ctx.ckpt  # noqa: B018  (make the copy)
        ctx.file(f"ckpt/{name}", data)
        return load_ckpt(ctx)
    return run


def ckpt_trunc(name: str, keep: int) -> Callable[[Ctx], object]:
    def run(ctx):
        truncate(ctx.ckpt / name, keep)
        return load_ckpt(ctx)
    return run


def lvr_head(ctx: Ctx, width: int):
    """The checkpoint with LVR head weights of `width` and config.json asking for the head."""
    tensors = files.load_tensors(ctx.ckpt / "model.safetensors")
    tensors.update({f"lvr_head.{k}": v for k, v in checkpoint.LVRHead(width).state_dict().items()})
    files.atomic_save_tensors(tensors, ctx.ckpt / "model.safetensors", metadata={"format": "pt"})
    edit_json(ctx.ckpt / "config.json", lambda d: d.update(lvr_head=True))
    return load_ckpt(ctx, "lvr")


def query(**kw) -> Query:
    return Query(**{**dict(images=[scene()], question="What colour?", options=OPTIONS), **kw})


def png_bytes(size=(32, 32)) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def hr_tsv(ctx: Ctx, rows: list[dict] | None = None, **change) -> Path:
    """An HR-Bench TSV with two good rows, the first changed by `change`."""
    img = base64.b64encode(png_bytes()).decode()
    base = [dict(index=i, question="Q?", A="a", B="b", C="c", D="d", answer="A", category="x",
                 cycle_category="c", image=img) for i in range(2)]
    base[0].update(change)
    p = ctx.tmp / "hr.tsv"
    pd.DataFrame(rows if rows is not None else base, columns=E.HRBENCH_COLUMNS).to_csv(p, sep="\t", index=False)
    return p


def monet_file(ctx: Ctx, edit) -> Path:
    """The testbed's Monet export with sample 0 edited by `edit(sample, folder)`."""
    tb = D.load(ctx.tb)
    path = E.to_monet_sft(tb, "train", ctx.tmp / "monet" / "train.json")
    samples = json.loads(path.read_text())
    edit(samples[0], path.parent)
    path.write_text(json.dumps(samples))
    return path


def cap_file(ctx: Ctx, edit) -> Path:
    tb = D.load(ctx.tb)
    path = E.to_capimagine_sft(tb, "train", ctx.tmp / "cap" / "train.json")
    samples = json.loads(path.read_text())
    edit(samples[0], path.parent)
    path.write_text(json.dumps(samples))
    return path


def kept(path_rel: str, content: bytes = b"user data"):
    """`after` check: the user's file is still there with its content."""
    def after(ctx, _):
        assert (ctx.tmp / path_rel).read_bytes() == content, f"{path_rel} was deleted or changed"
    return after


def tb_manifest(fn) -> Callable[[Ctx], object]:
    def run(ctx):
        edit_json(ctx.tb / "manifest.json", fn)
        return D.load(ctx.tb)
    return run


def tb_items(fn) -> Callable[[Ctx], object]:
    """Rewrite items.jsonl with `fn(list of dicts)`, then load."""
    def run(ctx):
        p = ctx.tb / "items.jsonl"
        items = [json.loads(line) for line in p.read_text().splitlines()]
        fn(items)
        p.write_text("".join(json.dumps(it) + "\n" for it in items))
        return D.load(ctx.tb)
    return run


def cli(main, argv: list[str]) -> tuple[int, str]:
    """Run a command line's main(); its exit code and what it wrote to stderr (no stack trace)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            return exc.code, err.getvalue()
    return 0, err.getvalue()


def toy_loop(ctx: Ctx, cfg: L.StageConfig, loss=None):
    lin = torch.nn.Linear(3, 1)
    step = (lambda s, g: (loss(s), {})) if loss else (lambda s, g: ((lin(torch.ones(3)) ** 2).sum(), {}))
    return L.run_loop({"lin": lin}, list(lin.parameters()), step, cfg, ctx.tmp / "run", progress=False)


def cfg(**kw) -> L.StageConfig:
    return L.StageConfig(**{**dict(name="s", steps=4, batch_size=1, warmup=1, eval_every=2, save_every=2), **kw})


# ---------------------------------------------------------------- the cases

CASES: list[Case] = []


def case(id_, cls, run, exc=None, match="", after=None):
    CASES.append(Case(id_, cls, run, exc, match, after))


# -- interventions and decode settings (validated when made)
case("noise-mode-typo", "silent", lambda c: I.NoiseLatent(mode="replcae"), ValueError, r"NoiseLatent\.mode: must be one of 'add', 'replace'")
case("noise-negative-scale", "silent", lambda c: I.NoiseLatent(scale=-1.0), ValueError, r"NoiseLatent\.scale")
case("noise-nan-scale", "silent", lambda c: I.NoiseLatent(scale=float("nan")), ValueError, r"NoiseLatent\.scale: must be a finite number")
case("changek-negative", "silent", lambda c: I.ChangeK(k=-3), ValueError, r"ChangeK\.k: must be an integer >= 0")
case("changek-float", "silent", lambda c: I.ChangeK(k=2.5), ValueError, r"ChangeK\.k")
case("extreme-mode-typo", "silent", lambda c: I.ExtremeLatent(mode="scaled"), ValueError, r"ExtremeLatent\.mode")
case("latent-steps-negative", "silent", lambda c: I.ZeroLatent(steps=[-1]), ValueError, r"ZeroLatent\.steps")
case("fixed-latent-empty", "trace", lambda c: I.FixedLatent(vector=[]), ValueError, r"FixedLatent\.vector")
case("intervention-unknown-kind", "trace", lambda c: I.from_dict({"kind": "NoiseLatnet"}), ValueError, r"unknown intervention kind 'NoiseLatnet'")
case("intervention-unknown-field", "silent", lambda c: I.from_dict({"kind": "NoiseLatent", "scal": 1}), ValueError, r"NoiseLatent: unknown field\(s\) \['scal'\]")
case("intervention-not-an-object", "trace", lambda c: I.as_interventions(["zero"]), TypeError, r"not an intervention: str 'zero'")
case("decode-max-new-tokens-negative", "silent", lambda c: DecodeConfig(max_new_tokens=-5), ValueError, r"DecodeConfig\.max_new_tokens")
case("decode-temperature-negative", "silent", lambda c: DecodeConfig(temperature=-1), ValueError, r"DecodeConfig\.temperature")
case("decode-temperature-nan", "silent", lambda c: DecodeConfig(temperature=float("nan")), ValueError, r"DecodeConfig\.temperature")
case("decode-top-p-above-one", "silent", lambda c: DecodeConfig(top_p=1.5), ValueError, r"DecodeConfig\.top_p")
case("decode-top-p-zero", "trace", lambda c: DecodeConfig(top_p=0), ValueError, r"DecodeConfig\.top_p")
case("decode-do-sample-string", "silent", lambda c: DecodeConfig(do_sample="yes"), ValueError, r"DecodeConfig\.do_sample")
case("decode-option-ids-negative", "trace", lambda c: DecodeConfig(option_ids=[-1]), ValueError, r"DecodeConfig\.option_ids")
case("decode-unknown-keyword", "silent", lambda c: c.reasoner.generate(c.prompt(), max_new_tokes=4), ValueError, r"unknown decode setting")

# -- queries and images
case("options-as-a-string", "silent", lambda c: query(options="red"), TypeError, r"options must be a list of strings, got str 'red'")
case("options-duplicated", "silent", lambda c: query(options=["red", "red", "blue"]), ValueError, r"duplicate options")
case("options-nine", "trace", lambda c: query(options=[f"o{i}" for i in range(9)]), ValueError, r"9 options; between 2 and 8")
case("options-one", "silent", lambda c: query(options=["red"]), ValueError, r"1 options; between 2 and 8")
case("options-empty-word", "silent", lambda c: query(options=["red", " "]), ValueError, r"options must be non-empty strings")
case("question-empty", "silent", lambda c: query(question="  "), ValueError, r"the question is empty")
case("answer-out-of-range", "silent", lambda c: query(answer=7), ValueError, r"answer index 7 is not one of the 4 options")
case("image-0x0", "trace", lambda c: query(images=[Image.new("RGB", (0, 0))]), ValueError, r"image 0: empty image \(0x0\)")
case("image-extreme-aspect", "trace", lambda c: query(images=[Image.new("RGB", (2000, 4))]), ValueError, r"image 0: aspect ratio 500:1")
case("image-truncated-png", "trace", lambda c: query(images=[truncate(c.file("t.png", png_bytes((64, 64))), 60)]), ValueError, r"{tmp}/t\.png: cannot read image")
case("image-missing-path", "trace", lambda c: query(images=[c.tmp / "none.png"]), ValueError, r"{tmp}/none\.png: cannot read image")
case("image-not-an-image", "trace", lambda c: query(images=[c.file("x.png", "text")]), ValueError, r"{tmp}/x\.png: cannot read image")
case("image-float-array", "trace", lambda c: query(images=[np.zeros((8, 8, 3), np.float32)]), ValueError, r"a numpy image must be uint8")
case("image-an-int", "trace", lambda c: query(images=[42]), TypeError, r"expected a PIL image, a file path or a numpy array, got int")
case("image-as-path-works", "ok", lambda c: c.reasoner.prompt(query(images=[c.file("s.png", png_bytes((112, 112)))])), None, "",
     lambda c, p: p.image_grid_thw.tolist() == [[1, 8, 8]] or pytest.fail(str(p.image_grid_thw)))
case("image-as-array-works", "ok", lambda c: c.reasoner.prompt(query(images=[np.asarray(scene())])), None, "",
     lambda c, p: p.pixel_values is not None or pytest.fail("no pixels"))
case("query-evidence-box-inverted", "silent", lambda c: query(evidence_boxes=[[30, 10, 20, 40]]), ValueError,
     r"query: evidence box \[30, 10, 20, 40\] is not \[x0, y0, x1, y1\] with x0 < x1")
case("query-evidence-box-short", "trace", lambda c: query(evidence_boxes=[[1, 2]]), ValueError, r"query: evidence box \[1, 2\] is not")
case("query-evidence-boxes-a-string", "trace", lambda c: query(evidence_boxes="0,0,5,5"), TypeError,
     r"query: evidence_boxes must be a list of \[x0, y0, x1, y1\] boxes, got str")
case("query-of-object-without-question", "trace", lambda c: Query.of(object()), TypeError, r"cannot make a query from object: it has no 'question'")
case("query-of-item-dict-works", "ok", lambda c: Query.of(dict(make_item(TB, "val", "attr", 0).to_dict(), image=scene())),
     None, "", lambda c, q: q.answer is not None or pytest.fail("answer lost"))
case("chat-prompt-negative-images", "silent", lambda c: chat_prompt(c.reasoner.tokenizer, "Q?", n_images=-1), ValueError, r"n_images: must be an integer >= 0, got -1")
case("encode-image-count-mismatch", "trace", lambda c: encode(c.reasoner.tokenizer, image_processor(), "no image here", [scene()]),
     ValueError, r"prompt has 0 <\|image_pad\|> markers but 1 images")
case("pixels-0x0", "trace", lambda c: pixels(image_processor(), [Image.new("RGB", (5, 0))]), ValueError, r"image 0: empty image")
case("pixels-one-image-not-a-list", "trace", lambda c: pixels(image_processor(), scene()), TypeError, r"images: expected a list of images")
case("pixels-array-works", "ok", lambda c: pixels(image_processor(), [np.zeros((56, 56, 3), np.uint8)]), None, "",
     lambda c, out: out[1].tolist() == [[1, 4, 4]] or pytest.fail(str(out[1])))


# -- traces and replays
def _trace_saved(c: Ctx) -> Path:
    t = c.trace()
    return t.save(c.tmp / "t.json")


def _sidecar_from_other(c: Ctx):
    a = _trace_saved(c)
    other = c.reasoner.generate(c.prompt(), [I.ZeroLatent()], max_new_tokens=6, force_latent=True)
    b = other.save(c.tmp / "o.json")
    shutil.copyfile(f"{b}.safetensors", f"{a}.safetensors")
    return Trace.load(a)


def _replay_nan(c: Ctx):
    return c.reasoner.replay(c.trace(), [I.FixedLatent(vector=[float("nan")] * c.reasoner.hidden_size)])


case("trace-sidecar-missing", "silent", lambda c: (Path(f"{_trace_saved(c)}.safetensors").unlink(), Trace.load(c.tmp / "t.json")),
     FileNotFoundError, r"{tmp}/t\.json\.safetensors: missing")
case("trace-sidecar-from-another-trace", "silent", _sidecar_from_other, DamagedFileError, r"t\.json\.safetensors: its tensors do not belong to")
case("trace-sidecar-truncated", "trace", lambda c: (truncate(Path(f"{_trace_saved(c)}.safetensors"), -10), Trace.load(c.tmp / "t.json")),
     DamagedFileError, r"{tmp}/t\.json\.safetensors: unreadable safetensors file, truncated or corrupt")
case("trace-json-truncated", "trace", lambda c: (truncate(_trace_saved(c), 50), Trace.load(c.tmp / "t.json")),
     ValueError, r"{tmp}/t\.json: not a saved trace")
case("replay-nan-latent-flagged", "silent", _replay_nan, None, "",
     lambda c, res: (res.nan and res.answer_index is None) or pytest.fail("NaN replay not flagged"))

# -- checkpoint folders
case("preprocessor-patch-size-0", "trace", ckpt_json("preprocessor_config.json", lambda d: d.update(patch_size=0)),
     ValueError, r"{ckpt}/preprocessor_config\.json: patch_size must be a positive integer, got 0")
case("preprocessor-min-above-max", "silent", ckpt_json("preprocessor_config.json", lambda d: d.update(min_pixels=10**7, max_pixels=100)),
     ValueError, r"{ckpt}/preprocessor_config\.json: pixel bounds min 10000000 / max 100")
case("preprocessor-max-pixels-0", "trace", ckpt_json("preprocessor_config.json", lambda d: d.update(max_pixels=0)),
     ValueError, r"{ckpt}/preprocessor_config\.json: pixel bounds")
case("preprocessor-negative-size", "silent", ckpt_json("preprocessor_config.json", lambda d: d.update(size={"shortest_edge": -5, "longest_edge": 10})),
     ValueError, r"{ckpt}/preprocessor_config\.json: pixel bounds min -5")
case("preprocessor-mean-one-channel", "trace", ckpt_json("preprocessor_config.json", lambda d: d.update(image_mean=[0.5])),
     ValueError, r"{ckpt}/preprocessor_config\.json: image_mean must be 3 numbers")
case("preprocessor-std-zero", "silent", ckpt_json("preprocessor_config.json", lambda d: d.update(image_std=[0, 1, 1])),
     ValueError, r"{ckpt}/preprocessor_config\.json: image_std must be > 0")
case("preprocessor-not-an-object", "trace", ckpt_file("preprocessor_config.json", "[1, 2]"),
     ValueError, r"{ckpt}/preprocessor_config\.json: patch_size must be a positive integer")
case("preprocessor-missing", "trace", lambda c: ((c.ckpt / "preprocessor_config.json").unlink(), load_ckpt(c)),
     FileNotFoundError, r"{ckpt}/preprocessor_config\.json: missing")
case("config-sizes-disagree-with-weights", "trace", ckpt_json("config.json", lambda d: d["text_config"].update(hidden_size=32)),
     ValueError, r"{ckpt}: weights disagree with config\.json in shape")
case("config-vision-patch-0", "trace", ckpt_json("config.json", lambda d: d["vision_config"].update(patch_size=0)),
     ValueError, r"{ckpt}/config\.json: vision_config\.patch_size must be a positive integer")
case("config-without-text-sizes", "trace", ckpt_json("config.json", lambda d: d.pop("text_config")),
     ValueError, r"{ckpt}/config\.json: text_config lacks hidden_size.*refusing to fill in the default \(7B\) sizes")
case("config-layers-a-string", "misleading", ckpt_json("config.json", lambda d: d["text_config"].update(num_hidden_layers="two")),
     ValueError, r"{ckpt}/config\.json: text_config\.num_hidden_layers must be a positive integer, got 'two'")
case("config-heads-do-not-divide", "trace", ckpt_json("config.json", lambda d: d["text_config"].update(num_attention_heads=3)),
     ValueError, r"{ckpt}/config\.json: text_config\.hidden_size 64 is not divisible by num_attention_heads 3")
case("config-not-json", "trace", ckpt_file("config.json", "{not json"), ValueError, r"{ckpt}/config\.json: invalid JSON")
case("config-other-model-type", "trace", ckpt_json("config.json", lambda d: d.update(model_type="llava")),
     ValueError, r"{ckpt}/config\.json: model_type 'llava'.*is not Qwen2\.5-VL")
case("config-vocab-smaller-than-tokenizer", "silent", ckpt_json("config.json", lambda d: d["text_config"].update(vocab_size=100)),
     ValueError, r"{ckpt}: tokenizer/config mismatch: tokenizer has \d+ tokens but config\.json vocab_size is 100")
case("spec-n-latents-a-word", "trace", lambda c: (preset("lvr").save(c.ckpt), edit_json(c.ckpt / "latent_spec.json", lambda d: d.update(n_latents="ten")),
                                                    checkpoint.load(c.ckpt)),
     ValueError, r"{ckpt}/latent_spec\.json: invalid latent spec \(LatentSpec\('lvr'\)\.n_latents: must be an integer >= 0, got 'ten'\)")
case("spec-a-list", "trace", lambda c: (c.file("ckpt/latent_spec.json", "[]"), checkpoint.load(c.ckpt)),
     ValueError, r"{ckpt}/latent_spec\.json: invalid latent spec \(expected a JSON object\)")
case("spec-unknown-field", "silent", lambda c: (preset("lvr").save(c.ckpt), edit_json(c.ckpt / "latent_spec.json", lambda d: d.update(n_latent=3)),
                                                  checkpoint.load(c.ckpt)),
     ValueError, r"{ckpt}/latent_spec\.json: invalid latent spec \(LatentSpec: unknown fields \['n_latent'\]\)")
case("spec-missing-and-no-method", "trace", lambda c: checkpoint.load(c.ckpt), ValueError, r"{ckpt}: no latent_spec\.json in the folder; pass method=")
case("spec-head-misspelt", "silent", lambda c: preset("lvr", head="lvr_haed"), ValueError, r"LatentSpec\('lvr'\)\.head: must be one of None, 'lvr_head'")
case("spec-max-segments-bool", "silent", lambda c: preset("mirage", max_segments=True), ValueError, r"LatentSpec\('mirage'\)\.max_segments")
case("spec-unknown-method", "trace", lambda c: preset("coconut"), ValueError, r"unknown method 'coconut'; known: monet")
case("tokenizer-lacks-method-token", "trace", lambda c: load_ckpt(c, "lvr", start_token="<|nope|>"), ValueError,
     r"tokenizer has no start token '<\|nope\|>' needed by method 'lvr'")
case("weights-truncated", "trace", ckpt_trunc("model.safetensors", -100), DamagedFileError,
     r"{ckpt}/model\.safetensors: unreadable weights, truncated or corrupt")
case("weights-empty", "trace", ckpt_trunc("model.safetensors", 0), DamagedFileError, r"{ckpt}/model\.safetensors: unreadable weights")
case("weights-pickle-only", "trace", lambda c: ((c.ckpt / "model.safetensors").rename(c.ckpt / "pytorch_model.bin"), load_ckpt(c)),
     ValueError, r"{ckpt}: only pickle weights \(pytorch_model\.bin\); refusing to unpickle")
case("weights-missing", "trace", lambda c: ((c.ckpt / "model.safetensors").unlink(), load_ckpt(c)),
     FileNotFoundError, r"{ckpt}: no model weights")
case("shard-index-lists-missing-shard", "trace", ckpt_file("model.safetensors.index.json", '{"weight_map": {"a": "model-00002.safetensors"}}'),
     FileNotFoundError, r"{ckpt}/model\.safetensors\.index\.json: lists shard\(s\) model-00002\.safetensors that are missing")
case("shard-index-malformed", "trace", ckpt_file("model.safetensors.index.json", '{"weight_map": ["x"]}'),
     ValueError, r"{ckpt}/model\.safetensors\.index\.json: invalid shard index")
case("shard-index-lists-pickle", "misleading", ckpt_file("model.safetensors.index.json", '{"weight_map": {"a": "pytorch_model-00001.bin"}}'),
     ValueError, r"{ckpt}/model\.safetensors\.index\.json: lists pickle shard\(s\) pytorch_model-00001\.bin; refusing to unpickle")
case("lvr-head-wrong-width", "trace", lambda c: lvr_head(c, 32), ValueError, r"{ckpt}: lvr_head\.\* weights do not fit an LVR head of width 64")
case("lvr-head-right-width-works", "ok", lambda c: lvr_head(c, 64), None, "",
     lambda c, x: (x.head is not None and x.spec.head == "lvr_head") or pytest.fail("no head"))
case("tokenizer-truncated", "trace", ckpt_trunc("tokenizer.json", 100), ValueError, r"{ckpt}: cannot load tokenizer")
case("tokenizer-missing", "trace", lambda c: ([(c.ckpt / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], load_ckpt(c)),
     FileNotFoundError, r"{ckpt}: no tokenizer\.json or tokenizer_config\.json")
case("checkpoint-folder-missing", "trace", lambda c: checkpoint.load(c.tmp / "nope", method="lvr"), FileNotFoundError, r"{tmp}/nope: checkpoint folder not found")
case("constant-latents-truncated", "trace", lambda c: (files.atomic_save_tensors({"latent": torch.randn(4, 64)}, c.ckpt / checkpoint.CONSTANT_FILE),
                                                        truncate(c.ckpt / checkpoint.CONSTANT_FILE, -8),
                                                        load_ckpt(c, "mirage", n_latents=4, max_latents=0, end_rule="force_after_k",
                                                                  latent_source="constant")),
     DamagedFileError, r"{ckpt}/latent_constant\.safetensors: unreadable safetensors file")
case("constant-latents-wrong-width", "trace", lambda c: (files.atomic_save_tensors({"latent": torch.randn(4, 7)}, c.ckpt / checkpoint.CONSTANT_FILE),
                                                          load_ckpt(c, "mirage", n_latents=4, max_latents=0, end_rule="force_after_k",
                                                                    latent_source="constant")),
     ValueError, r"{ckpt}/latent_constant\.safetensors: expected a tensor 'latent' of shape \[>= 4, 64\], got \(4, 7\)")

# -- testbed settings and items
case("testbed-n-objects-an-int", "trace", lambda c: TestbedConfig(n_objects=5), ValueError, r"TestbedConfig\.n_objects: must be a list or tuple, got int 5")
case("testbed-families-a-string", "misleading", lambda c: TestbedConfig(families="attr"), ValueError, r"TestbedConfig\.families: must be a list or tuple, got str 'attr'")
case("testbed-config-unknown-field", "trace", lambda c: TestbedConfig.from_dict({"n_trian": 5}), ValueError, r"TestbedConfig: unknown field\(s\) n_trian")
case("testbed-config-not-a-dict", "trace", lambda c: TestbedConfig.from_dict([1]), TypeError, r"TestbedConfig: expected a dict of settings, got list")
case("testbed-image-size-not-cells", "silent", lambda c: TestbedConfig(image_size=100), ValueError, r"TestbedConfig\.image_size: must be a multiple of 28")
case("testbed-negative-split", "silent", lambda c: TestbedConfig(n_train=-1), ValueError, r"TestbedConfig\.n_train: must be an integer >= 0")
case("testbed-unknown-family", "trace", lambda c: make_item(TB, "train", "colour", 0), ValueError, r"unknown task family 'colour'")
case("testbed-unknown-split", "trace", lambda c: make_item(TB, "dev", "attr", 0), ValueError, r"unknown split 'dev'")
case("testbed-negative-index", "silent", lambda c: make_item(TB, "train", "attr", -1), ValueError, r"item index must be an integer >= 0, got -1")
case("item-answer-not-a-letter", "silent", lambda c: Item.from_dict(dict(make_item(TB, "val", "attr", 0).to_dict(), answer="E")),
     ValueError, r"item 'val-attr-00000': answer 'E' is not one of the letters")
case("item-answer-word-disagrees", "silent", lambda c: Item.from_dict(dict(make_item(TB, "val", "attr", 0).to_dict(), answer_word="pink")),
     ValueError, r"item 'val-attr-00000': answer_word 'pink' is not option")
case("item-not-an-object", "trace", lambda c: Item.from_dict(["x"]), TypeError, r"an item must be a JSON object, got list")

# -- testbed folders: never delete what the project did not write
case("ensure-on-a-folder-of-user-files", "loss", lambda c: (c.file("mine/notes.txt"), D.ensure(TB, c.tmp / "mine", progress=False)),
     FileExistsError, r"{tmp}/mine: holds files but is not a testbed written by latentmed.*refusing to delete it",
     kept("mine/notes.txt"))
case("ensure-on-the-data-parent", "loss", lambda c: (c.tb, c.file("user.txt"), D.ensure(TB, c.tmp, progress=False)),
     FileExistsError, r"{tmp}: holds files but is not a testbed written by latentmed", kept("user.txt"))
case("ensure-on-a-file", "loss", lambda c: (c.file("tbfile"), D.ensure(TB, c.tmp / "tbfile", progress=False)),
     FileExistsError, r"{tmp}/tbfile: exists and is not a testbed folder", kept("tbfile"))
case("ensure-with-foreign-partial", "loss", lambda c: (c.file("x.partial/keep.txt"), D.ensure(TB, c.tmp / "x", progress=False)),
     FileExistsError, r"{tmp}/x\.partial: exists but is not a testbed folder written by latentmed", kept("x.partial/keep.txt"))
case("regenerate-keeps-user-files-in-a-testbed", "loss", lambda c: (c.tb, c.file("tb/my_notes.txt"), D.ensure(TestbedConfig(**{**TB.to_dict(), "seed": 5}), c.tb, progress=False)),
     FileExistsError, r"{tb}: a latentmed testbed, but it also holds my_notes\.txt", kept("tb/my_notes.txt"))
case("generate-into-an-empty-folder-works", "ok", lambda c: ((c.tmp / "empty").mkdir(), D.ensure(TB, c.tmp / "empty", progress=False)), None, "",
     lambda c, r: len(r[1]) == 16 or pytest.fail(str(len(r[1]))))
case("testbed-items-misspelt-split", "silent", lambda c: D.load(c.tb).items("tets"), ValueError, r"split 'tets': not one of train, val, test")
case("testbed-items-unknown-family", "silent", lambda c: D.load(c.tb).items(family="colour"), ValueError,
     r"family 'colour': not a task family of the testbed at {tb}")
case("generate-config-a-dict", "trace", lambda c: D.generate(TB.to_dict(), c.tmp / "g", progress=False), TypeError, r"config: expected a TestbedConfig, got dict")
case("manifest-counts-disagree", "silent", tb_manifest(lambda d: d["counts"]["train"].update(attr=9)), D.TestbedFormatError,
     r"{tb}/manifest\.json: counts .* disagree with its config")
case("manifest-n-items-disagrees", "silent", tb_manifest(lambda d: d.update(n_items=15)), D.TestbedFormatError, r"{tb}/manifest\.json: counts")
case("manifest-config-not-an-object", "trace", tb_manifest(lambda d: d.update(config=[1])), D.TestbedFormatError,
     r"{tb}/manifest\.json: invalid manifest, 'config' and 'counts' must be JSON objects")
case("manifest-old-format", "trace", tb_manifest(lambda d: d.update(format_version=0)), D.TestbedFormatError, r"{tb}/manifest\.json: format version 0")
case("manifest-not-json", "trace", lambda c: (c.file("tb/manifest.json", "{"), D.load(c.tb)), D.TestbedFormatError, r"{tb}/manifest\.json: invalid manifest JSON")
case("items-duplicated-line", "silent", tb_items(lambda its: its.__setitem__(1, its[0])), D.TestbedFormatError,
     r"{tb}/items\.jsonl: items disagree with manifest\.json's counts")
case("items-answer-changed", "silent", tb_items(lambda its: its[0].update(answer="E")), D.TestbedFormatError,
     r"{tb}/items\.jsonl line 1: malformed item \(item 'train-attr-00000': answer 'E'")
case("items-line-truncated", "trace", lambda c: (truncate(c.tb / "items.jsonl", -30), D.load(c.tb)), D.TestbedFormatError,
     r"{tb}/items\.jsonl line 16: malformed item")
case("files-list-misses-an-image", "silent", lambda c: (edit_json(c.tb / "files.json", lambda d: d.pop("crops/test-glyph-00000.png")), D.load(c.tb)),
     D.TestbedFormatError, r"{tb}/files\.json: does not list exactly the items' images")
case("png-truncated", "silent", lambda c: (truncate(c.tb / "images" / "val-count-00000.png", 100), D.load(c.tb)), D.TestbedFormatError,
     r"{tb}/images/val-count-00000\.png: 100 bytes, expected")
case("png-corrupt-same-size", "silent", lambda c: (c.file("tb/crops/val-attr-00000.png", b"x" * (c.tb / "crops/val-attr-00000.png").stat().st_size),
                                                    D.load(c.tb, verify=True)),
     D.TestbedFormatError, r"{tb}/crops/val-attr-00000\.png: unreadable or corrupt PNG")

# -- exports and benchmark readers
case("hrbench-answer-empty", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, answer="")), E.ExportFormatError,
     r"{tmp}/hr\.tsv: row index=0: answer '' is not exactly one of A, B, C, D")
case("hrbench-answer-two-letters", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, answer="BC")), E.ExportFormatError, r"answer 'BC' is not exactly one of")
case("hrbench-answer-lowercase", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, answer="a")), E.ExportFormatError, r"answer 'a' is not exactly one of")
case("hrbench-duplicated-index", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, index=1)), E.ExportFormatError,
     r"{tmp}/hr\.tsv: index 1 occurs more than once")
case("hrbench-reference-to-a-reference", "trace", lambda c: E.read_hrbench_tsv(hr_tsv(c, rows=[
    dict(index=0, question="Q", A="a", B="b", C="c", D="d", answer="A", image="1"),
    dict(index=1, question="Q", A="a", B="b", C="c", D="d", answer="A", image="0")])), E.ExportFormatError,
     r"row index=0: 'image' refers to row 1, whose image is not base64 data either")
case("hrbench-reference-resolves-works", "ok", lambda c: E.read_hrbench_tsv(hr_tsv(c, image="1")), None, "",
     lambda c, df: df["image"][0] == df["image"][1] or pytest.fail("reference not resolved"))
case("hrbench-empty-option", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, C="")), E.ExportFormatError, r"row index=0: option\(s\) C are empty")
case("hrbench-empty-question", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, question=" ")), E.ExportFormatError, r"row index=0: the question is empty")
case("hrbench-header-only", "silent", lambda c: E.read_hrbench_tsv(hr_tsv(c, rows=[])), E.ExportFormatError, r"{tmp}/hr\.tsv: no rows")
case("hrbench-index-not-integer", "trace", lambda c: E.read_hrbench_tsv(hr_tsv(c, index="x1")), E.ExportFormatError, r"column 'index' is not all integers")
case("hrbench-image-not-base64", "trace", lambda c: E.read_hrbench_tsv(hr_tsv(c, image="!" * 80)), E.ExportFormatError, r"row index=0: 'image' is not valid base64")
case("monet-image-not-an-image", "silent", lambda c: E.read_monet_sft(monet_file(c, lambda s, d: (d / s["data"][2]["content"][1]["image_file_name"]).write_text("x"))),
     E.ExportFormatError, r"sample 0: image file .*crops/train-attr-00000\.png is not a PNG/JPEG")
case("monet-image-item-without-file", "trace", lambda c: E.read_monet_sft(monet_file(c, lambda s, d: s["data"][1]["content"][0].pop("image_file_name"))),
     E.ExportFormatError, r"sample 0 turn 1 item 0: expected a text item with 'text' or an image item")
case("monet-not-a-list", "trace", lambda c: E.read_monet_sft(c.file("m.json", '{"data": []}')), E.ExportFormatError, r"{tmp}/m\.json: expected a JSON list of samples")
case("capimagine-without-imagination", "silent", lambda c: E.read_capimagine_sft(cap_file(c, lambda s, d: s["data"][2]["content"][0].update(text="no span"))),
     E.ExportFormatError, r"sample 0: no <imagine>\.\.\.</imagine> span")
case("export-unknown-split", "trace", lambda c: E.to_monet_sft(D.load(c.tb), "dev", c.tmp / "m.json"), ValueError, r"split 'dev': not one of train, val, test")
case("export-empty-split", "silent", lambda c: E.to_hrbench_tsv(D.generate(TestbedConfig(**{**TB.to_dict(), "n_val": 0}), c.tmp / "nv", progress=False), "val", c.tmp / "h.tsv"),
     ValueError, r"split 'val' of the testbed at .*nv has no items")

# -- CapImagine data: captioner and 7B SFT path
def _gt(c):
    return C.GroundTruthCaptioner.from_samples(E.read_monet_sft(c.tmp / "monet" / "train.json", check_images=False))


case("captioner-aux-image-truncated", "trace", lambda c: C.convert_file(monet_file(c, lambda s, d: truncate(d / "crops" / "train-attr-00000.png", 40)),
                                                                        c.tmp / "o.json", _gt(c)),
     ValueError, r"train\.json sample 0 auxiliary image: cannot use image .*crops/train-attr-00000\.png")
case("captioner-image-without-path", "trace", lambda c: C.convert_file(monet_file(c, lambda s, d: s["data"][2]["content"][1].pop("image_file_name")),
                                                                       c.tmp / "o.json", C.GroundTruthCaptioner({})),
     ValueError, r"train\.json sample 0: image item without a path")
case("captioner-text-item-without-text", "trace", lambda c: C.convert_file(monet_file(c, lambda s, d: s["data"][2]["content"][0].pop("text")),
                                                                           c.tmp / "o.json", C.GroundTruthCaptioner({})),
     ValueError, r"train\.json sample 0: text item without a 'text' string")
case("imagination-never-closed", "trace", lambda c: C.imagination({"data": [{"role": "assistant", "content": [
    {"type": "text", "text": "look <imagine> a red star"}]}]}), ValueError, r"sample: <imagine> at character 5 is never closed by </imagine>")
case("captioner-empty-file", "silent", lambda c: C.load_interleaved(c.file("e.json", "[]")), ValueError, r"{tmp}/e\.json: expected a non-empty list of samples")
case("captioner-no-ground-truth-caption", "trace", lambda c: C.GroundTruthCaptioner({}).caption(None, "", key="crops/x.png"), ValueError,
     r"no ground-truth caption for image 'crops/x\.png'")
case("captioner-empty-caption", "silent", lambda c: C.convert_file(monet_file(c, lambda s, d: None), c.tmp / "o.json",
                                                                   C.GroundTruthCaptioner({f"crops/train-{f}-0000{i}.png": "" for f in TB.families for i in range(2)})),
     ValueError, r"sample 0: the captioner gave no caption")
case("model-captioner-truncated-weights", "trace", lambda c: (truncate(c.ckpt / "model.safetensors", -50), C.ModelCaptioner(c.ckpt)),
     DamagedFileError, r"{ckpt}/model\.safetensors: unreadable weights")
case("model-captioner-zero-tokens", "silent", lambda c: C.ModelCaptioner(c.ckpt, max_new_tokens=0), ValueError, r"ModelCaptioner\.max_new_tokens")
case("sft-image-missing", "trace", lambda c: S.sft_examples(C.load_interleaved(cap_file(c, lambda s, d: (d / "images" / "train-attr-00000.png").unlink())),
                                                            load_tokenizer(c.ckpt), image_processor(), c.tmp / "cap"),
     ValueError, r"data sample 0 image: cannot use image .*images/train-attr-00000\.png")
case("sft-last-turn-not-assistant", "trace", lambda c: S.sft_examples(C.load_interleaved(cap_file(c, lambda s, d: s["data"].pop())),
                                                                      load_tokenizer(c.ckpt), image_processor(), c.tmp / "cap"),
     ValueError, r"data sample 0: the last turn must be the assistant's")
case("sft-max-steps-zero", "silent", lambda c: S.sft(c.ckpt, c.tmp / "none.json", c.tmp / "out", max_steps=0), ValueError, r"max_steps: must be -1")
case("sft-negative-lr", "silent", lambda c: S.sft(c.ckpt, c.tmp / "none.json", c.tmp / "out", lr=-1e-5), ValueError, r"lr: must be a finite number > 0")
case("sft-out-holds-user-files", "loss", lambda c: (c.file("out/results.csv"), S.sft(c.ckpt, c.tmp / "none.json", c.tmp / "out", max_steps=1)),
     FileExistsError, r"{tmp}/out: holds files that `latentmed\.zoo\.sft` did not write", kept("out/results.csv"))
case("sft-cli-data-missing", "trace", lambda c: cli(S.main, ["--model", str(c.ckpt), "--data", str(c.tmp / "none.json"), "--out", str(c.tmp / "o")]),
     None, "", lambda c, r: (r[0] == 1 and re.search(re.escape(f"python -m latentmed.zoo.sft: error: {c.tmp / 'none.json'}: no such file"), r[1]))
     or pytest.fail(str(r)))
case("sft-truncated-weights", "trace", lambda c: (truncate(c.ckpt / "model.safetensors", -50),
                                                  S.sft(c.ckpt, cap_file(c, lambda s, d: None), c.tmp / "out", max_steps=1)),
     DamagedFileError, r"{ckpt}/model\.safetensors: unreadable weights")

# -- the zoo: feature banks, training loop, checkpoints
def _bank(c, **kw):
    from latentmed.engine.tiny import tiny_config, tiny_model

    model = c._shared.setdefault("bank_model", tiny_model(tiny_config(build_tokenizer(VOCABULARY), "test"), seed=0))
    return B.build_bank(model, TB, "train", kw.pop("per_family", 1), cache_dir=c.tmp / "feat", progress=False, **kw)


def _bank_damaged(c, damage):
    _bank(c)
    [f] = (c.tmp / "feat").glob("*.safetensors")
    damage(f)
    return _bank(c)


case("bank-cache-truncated", "trace", lambda c: _bank_damaged(c, lambda f: truncate(f, -20)), DamagedFileError,
     r"{tmp}/feat/bank-train-main-\w+\.safetensors: unreadable safetensors file")
case("bank-cache-wrong-shape", "silent", lambda c: _bank_damaged(c, lambda f: files.atomic_save_tensors({"tokens": torch.zeros(2, 3)}, f)),
     DamagedFileError, r"{tmp}/feat/bank-train-main-\w+\.safetensors: expected 'tokens' of shape \[4, T, H\], got \(2, 3\)")
case("bank-unknown-family", "silent", lambda c: _bank(c, per_family={"colour": 2}), ValueError, r"per_family: unknown task famil\(ies\) 'colour'")
case("bank-negative-count", "trace", lambda c: _bank(c, per_family=-1), ValueError, r"per_family\['attr'\]: must be an integer >= 0, got -1")
case("stage-save-every-zero", "trace", lambda c: cfg(save_every=0), ValueError, r"StageConfig\('s'\)\.save_every: must be an integer >= 1")
case("stage-eval-every-zero", "trace", lambda c: cfg(eval_every=0), ValueError, r"StageConfig\('s'\)\.eval_every")
case("stage-lr-nan", "silent", lambda c: cfg(lr=float("nan")), ValueError, r"StageConfig\('s'\)\.lr: must be a finite number")
case("stage-steps-zero", "silent", lambda c: cfg(steps=0), ValueError, r"StageConfig\('s'\)\.steps: must be an integer >= 1")
case("loop-nan-loss-stops", "silent", lambda c: toy_loop(c, cfg(), loss=lambda s: torch.tensor(float("nan"), requires_grad=True)),
     FloatingPointError, r"stage 's': the loss is nan at step 1; training stopped")
case("loop-resume-with-other-settings", "silent", lambda c: (toy_loop(c, cfg()), toy_loop(c, cfg(steps=6, lr=1e-3))),
     ValueError, r"{tmp}/run/state\.json: written by a run with other settings \(lr: 0\.003 there, 0\.001 now, steps: 4 there, 6 now\)")
def _damaged_checkpoint_restarts(c: Ctx):
    """A checkpoint whose weights no longer match state.json is not trusted: the stage starts over
    (with a warning naming the file) and ends with the weights of an uninterrupted run."""
    first = toy_loop(c, cfg(steps=3, save_every=2))
    truncate(c.tmp / "run" / "weights.safetensors", -10)
    with pytest.warns(UserWarning, match=r"run/weights\.safetensors: does not match the hash state\.json records"):
        again = toy_loop(c, cfg(steps=3, save_every=2))
    assert first["best_val"] == again["best_val"]


case("loop-damaged-weights-restart-from-zero", "silent", _damaged_checkpoint_restarts)
case("zoo-record-damaged", "trace", lambda c: (c.file("m/zoo.json", "{"), Z.read_info(c.tmp / "m")), DamagedFileError, r"{tmp}/m/zoo\.json: invalid zoo checkpoint record")
case("zoo-testbed-manifest-damaged", "trace", lambda c: (c.file("tbm/manifest.json", "{"), Z.testbed_config(c.tmp / "tbm")), DamagedFileError,
     r"{tmp}/tbm/manifest\.json: invalid testbed manifest")
case("zoo-model-folder-of-user-files", "loss", lambda c: (c.file("zoo/direct/weights.csv"), Z.Zoo(c.tmp / "zoo", "ci", config=TB).train_method("direct")),
     FileExistsError, r"{tmp}/zoo/direct: holds files but is not a zoo checkpoint", kept("zoo/direct/weights.csv"))
case("zoo-unknown-budget", "trace", lambda c: Z.Zoo(c.tmp, "huge"), ValueError, r"unknown budget 'huge'")

# -- files, paths, the results store, the tokenizer
case("env-folder-empty", "silent", lambda c: (c.monkeypatch.setenv("LATENTMED_DATA", ""), paths.data_dir()), ValueError,
     r"environment variable LATENTMED_DATA is set but empty")
case("load-tensors-truncated", "trace", lambda c: files.load_tensors(truncate(files.atomic_save_tensors({"a": torch.ones(9)}, c.tmp / "a.safetensors"), -4)),
     DamagedFileError, r"{tmp}/a\.safetensors: unreadable safetensors file, truncated or corrupt")
case("read-json-invalid", "trace", lambda c: files.read_json(c.file("a.json", "{x")), DamagedFileError, r"{tmp}/a\.json: invalid JSON file")
case("remove-owned-refuses-user-folder", "loss", lambda c: (c.file("u/f.txt"), files.remove_owned(c.tmp / "u")), FileExistsError,
     r"{tmp}/u: exists but is not a folder written by latentmed", kept("u/f.txt"))
case("replace-folder-refuses-user-folder", "loss", lambda c: (c.file("u/f.txt"), files.mark_owned(c.tmp / "new", "k"), files.replace_folder(c.tmp / "new", c.tmp / "u", "k")),
     FileExistsError, r"{tmp}/u: exists but is not a k folder written by latentmed", kept("u/f.txt"))
def _no_chapter_runs(c: Ctx) -> None:
    """Stub out chapter execution: a missing check must fail fast, not run the whole book."""
    def ran(*a, **kw):
        raise AssertionError("a chapter was executed with an unknown profile")
    c.monkeypatch.setattr(book, "execute", ran)


case("book-unknown-profile", "silent", lambda c: (_no_chapter_runs(c), book.execute_all(profile="CI")), ValueError,
     r"profile 'CI': not one of default, ci")
case("stage-book-over-a-user-folder", "loss", lambda c: (c.file("site/index.html"), book.stage_book(book.NBVAL_OUT, c.tmp / "site")),
     FileExistsError, r"{tmp}/site: exists but is not a staged-book folder written by latentmed", kept("site/index.html"))
case("unwritable-output-folder", "trace", lambda c: paths.ensure_writable(c.file("f") / "sub"), OSError, r"output folder {tmp}/f/sub is not writable")
case("store-row-without-item", "trace", lambda c: ResultsStore(c.tmp / "st").run("m", "h", {}).add([{"condition": "x"}]), ValueError,
     r"{tmp}/st/m-\w+/rows\.jsonl: a row needs item")
case("store-malformed-middle-line", "trace", lambda c: _store_damaged(c, lambda p: p.write_text('{"item": 1, "condition": "a"}\nnot json\n{"item": 2, "condition": "a"}\n')),
     DamagedFileError, r"{tmp}/st/m-\w+/rows\.jsonl line 2: not a JSON row")
case("store-sidecar-truncated", "trace", lambda c: _store_damaged(c, lambda p: [truncate(f, -8) for f in p.parent.glob("t-*.safetensors")]),
     DamagedFileError, r"{tmp}/st/m-\w+/t-\w+\.safetensors: unreadable safetensors file")
case("store-run-record-damaged", "trace", lambda c: (ResultsStore(c.tmp / "st").run("m", "h", {}), [f.write_text("{") for f in (c.tmp / "st").glob("*/run.json")],
                                                     ResultsStore(c.tmp / "st").runs()),
     DamagedFileError, r"{tmp}/st/m-\w+/run\.json: invalid run description")
case("tokenizer-vocab-too-small", "silent", lambda c: build_tokenizer(VOCABULARY, vocab_size=300), ValueError,
     r"vocab_size=300: too small to make 'red', 'green'")
case("tokenizer-words-a-string", "silent", lambda c: build_tokenizer("red"), ValueError, r"words: expected a list of non-empty words")
case("tokenizer-folder-empty", "trace", lambda c: load_tokenizer(c.tmp), FileNotFoundError, r"{tmp}: no tokenizer\.json or tokenizer_config\.json")
case("spec-from-dict-unknown", "trace", lambda c: LatentSpec.from_dict({"method": "x", "n_latentz": 1}), ValueError, r"LatentSpec: unknown fields \['n_latentz'\]")


def _store_damaged(c: Ctx, damage):
    run = ResultsStore(c.tmp / "st").run("m", "h", {})
    run.add([{"item": 1, "condition": "a"}], tensors={0: {"z": torch.ones(3)}})
    damage(run.path)
    run = ResultsStore(c.tmp / "st").run("m", "h", {})
    return [run.tensors(r) for r in run.rows()]


CLASS_COUNTS = Counter(c.cls for c in CASES)


# ---------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def shared(ckpt, load, tmp_path_factory):
    """What cases copy or use: the tiny checkpoint, a small testbed, the reasoner loader."""
    tb = D.generate(TB, tmp_path_factory.mktemp("rel") / "tb", progress=False)
    return {"ckpt": ckpt, "tb": tb.root, "load": load}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, shared, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, shared, monkeypatch)
    if case.exc is None:
        result = case.run(ctx)
        if case.after:
            case.after(ctx, result)
        return
    with pytest.raises(case.exc) as info:
        case.run(ctx)
    assert re.search(_pattern(case, ctx), str(info.value)), f"message does not match {case.match!r}:\n{info.value}"
    if case.after:
        case.after(ctx, info.value)


def test_the_suite_covers_every_class():
    assert len(CASES) == len({c.id for c in CASES}), "case ids must be unique"
    assert set(CLASS_COUNTS) == {"silent", "trace", "misleading", "loss", "ok"}
    assert len(CASES) >= 100
