"""The README's example runs as written (on a tiny checkpoint instead of a 7B one)."""

import re

from latentmed.engine.tiny import make_tiny_checkpoint
from latentmed.paths import ROOT
from PIL import Image


def test_readme_latent_reasoner_example_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "LatentReasoner" in b)
    ckpt = make_tiny_checkpoint(tmp_path / "Monet-7B")
    code = block.replace('"/models/Monet-7B"', repr(str(ckpt))).replace('device="cuda"', 'device="cpu"')
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (224, 224), (90, 120, 160)).save("scene.png")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["trace"].triggered is False  # forced, not triggered by the model
    assert "<latent>" in capsys.readouterr().out
    assert scope["noisy"].answer_logprobs is not None
