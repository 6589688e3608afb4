"""The README's "Run on real checkpoints" section works as written (tiny files in place of the
downloads)."""

from __future__ import annotations

import re
import shlex

import pytest
from latentmed.engine.spec import METHODS
from latentmed.paths import ROOT
from latentmed.real import fixtures, report
from latentmed.real.cli import COMMANDS
from latentmed.real.cli import main as cli


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Run on real checkpoints")
    return text[start:text.index("\n## ", start + 1)]


def test_the_sections_commands_run_on_tiny_stand_ins(tmp_path, capsys):
    block = re.search(r"```bash\n(.*?)```", section(), re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if "-m latentmed.real" in ln]
    assert len(lines) >= 6
    data = fixtures.write_vstar(tmp_path / "vstar_bench", n=3)
    ckpt = fixtures.method_checkpoint(tmp_path / "Monet-7B", "monet")
    for line in lines:
        line = (line.replace("/data/vstar_bench", str(data)).replace("/models/Monet-7B", str(ckpt))
                .replace("results/real", str(tmp_path / "results")))
        argv = shlex.split(line)
        assert argv[:3] == [".venv/bin/python", "-m", "latentmed.real"], line
        argv = argv[3:]
        if argv[0] == "eval":  # small enough for a CPU
            argv += ["--max-new-tokens", "8", "--min-pixels", "784", "--max-pixels", "12544", "--no-progress"]
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as exc:
                cli(argv)
            assert exc.value.code == 0
        else:
            assert cli(argv) == 0, line
    table = report.summary(tmp_path / "results")
    assert sorted(table["force_latent"]) == [False, True] and set(table["n"]) == {3}
    assert "0.833" in capsys.readouterr().out


def test_the_section_names_every_subcommand_method_and_benchmark_file():
    text = section()
    for name in COMMANDS:
        assert f"**{name}**" in text or f"latentmed.real {name}" in text, name
    for m in METHODS:
        assert f"`--method {m}`" in text, m
    for f in ("test_questions.jsonl", "hr_bench_4k.tsv", "hr_bench_8k.tsv", "MME-RealWorld-Lite.json", "data/imgs/"):
        assert f in text
