"""Chapter 3's runs: what is kept per run, and a whole-instance replacement equals the donor's own run."""

from __future__ import annotations

import numpy as np
import torch
from conftest import OPTIONS, scene

from latentmed.analysis import conditions as C
from latentmed.analysis import input_latent as IL
from latentmed.analysis.measure import measure
from latentmed.engine.decode import DecodeConfig
from latentmed.engine.query import Query
from latentmed.store import ResultsStore

CFG = DecodeConfig(max_new_tokens=8, force_latent=True, force_suffix=True, stop_after_answer=True)


def queries(n=8):
    colours = [(220, 30, 30), (30, 70, 220), (30, 160, 50), (200, 200, 30)]
    return [Query(images=[scene(colours[i % 4], seed=i)], question=["What colour is the square?", "Which colour?"][i % 2],
                  options=OPTIONS, answer=i % 4, id=f"q{i}", family="attr" if i % 2 else "glyph",
                  evidence_boxes=[[10 + 4 * i, 10, 34 + 4 * i, 34]]) for i in range(n)]


def test_another_item_entirely_is_the_donors_own_run(load, tmp_path):
    r = load("monet-sft", n_latents=4)
    qs = queries()
    run = ResultsStore(tmp_path).run("m", "h", {})
    conds = [c for c in IL.input_conditions(qs) if c.name in ("other_item", "mask_evidence", "blank")]
    measure(r, qs, conds, run, CFG, record=[IL.RECORD], keep=IL.summaries(r.ids.image))
    rows = run.frame().assign(run_key=run.key)
    vec = IL.tensors_of(tmp_path, rows)
    z = vec["z"]
    don = C.donors([q.family for q in qs])
    for i, q in enumerate(qs):
        d = qs[don[i]].id
        torch.testing.assert_close(z[("m", q.id, "other_item/generate")], z[("m", d, "clean")], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vec["image"][("m", q.id, "other_item/generate")], vec["image"][("m", d, "clean")],
                                   atol=1e-5, rtol=1e-5)
    mv = IL.movement_table(rows, z, vec, [q.id for q in qs], conditions=("other_item", "mask_evidence", "blank"))
    assert (mv["z_distance"] > 0).all() and (mv["image_distance"] > 0).all()
    sim = IL.similarity_table(rows, z, [q.id for q in qs])
    assert list(sim["step"]) == [1, 2, 3, 4] and (sim["n"] == len(qs)).all()
    assert np.isclose(sim["inter"].iloc[0], IL.S.inter(*IL.latents_by(rows, z, "m", "clean", [q.id for q in qs]))[0])
