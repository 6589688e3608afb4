"""The testbed model zoo: one shared base model and the methods fine-tuned from it.

These are *testbed* models (1.4 M parameters, trained from scratch on the synthetic testbed in
minutes on CPU), stand-ins for the paper's Qwen2.5-VL-7B checkpoints, never the paper's models.

    base              vision stage (dense per-cell labels) + grounded QA (attention supervision)
    direct            question -> answer
    capimagine        question -> imagination text (the crop's caption between markers) -> answer
    monet-style       SFT with the crop interleaved; latents (K=10) aligned to the teacher's crop
                      states with the crop still there; then the crop removed, latents aligned to
                      the previous stage's latents
    lvr-style         K=8 latents regressed (MSE, standardised targets) onto the tower's tokens
                      of the evidence cells
    mirage-style      K=4 latents: first the helper (crop) tokens fill the slots and the states
                      before them are aligned to them (cosine + 0.1 CE); then the real latent loop
                      with CE only; the model decides when to end (cap 8)
    positive-control  the main image degraded (56 px), the slots hold the tower's tokens of the
                      evidence crop: the evidence reaches the answer only through Z
    negative-control  the slots hold one constant tensor in training and at inference

Every method keeps the base's layout (`latentmed.engine.layouts`): its segment sits after the
question's key words; then the key words are written again and the answer follows, so the
answer is read at a key word as in the base (docs/zoo-notes.md, layouts A and B). `train_zoo` trains the base once, then each
method, and skips any model whose folder already holds a finished checkpoint with the same
settings (hash in zoo.json). CLI: ``python -m latentmed.zoo --help``.

Modules: `recipes` (specs, stages, budgets), `build` (train and skip), `stages` + `loop` (the
vision stage, the QA / fine-tune stage, the resumable loop), `bank`, `batching`, `forward`,
`losses` (what one training step computes), `predict` (the fast batched evaluation used while
training), `evaluate` (chapter 2's evaluation, through the engine), `captioner` and `sft`
(CapImagine data and the 7B SFT path).
"""

from .build import (
           ZOO_FILE,
           Zoo,
           is_trained,
           learning_curves,
           read_info,
           testbed_config,
           train_zoo,
           training_times,
)
from .recipes import (BASE, BUDGETS, DOSE_METHODS, DOSES, FINE_TUNES, KINDS, METHODS, SPECS, method_stages,
                      settings)

__all__ = ["BASE", "BUDGETS", "DOSES", "DOSE_METHODS", "FINE_TUNES", "KINDS", "METHODS", "SPECS", "ZOO_FILE", "Zoo", "is_trained", "learning_curves",
           "method_stages", "read_info", "settings", "testbed_config", "train_zoo", "training_times"]
