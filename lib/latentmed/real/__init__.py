"""The real track: released 7B checkpoints on the real benchmarks, from local files.

The same engine that runs the testbed's tiny models loads Qwen2.5-VL-7B-Instruct, Monet-7B,
Monet-SFT-7B, LVR-7B, Mirage and CapImagine-7B from local folders (`presets`) and asks them the
questions of V* Bench, HR-Bench 4K/8K and MME-RealWorld-Lite read from their published files
(`benchmarks`), as the standard harnesses ask and score them (`harness`), with Qwen2.5-VL's image
preprocessing stated and checked (`preprocess`). `evaluate.evaluate` writes one row per instance to the
results store (resumable, sharded with `accelerate launch`, merged); `report` scores the runs
beside the paper's numbers (chapter 8); `cli` is `python -m latentmed.real` (`--help`);
`fixtures` writes tiny stand-ins of every file for tests.
"""

from .benchmarks import BENCHMARKS, BenchmarkFormatError, Example, load_benchmark
from .evaluate import Settings, merge
from .harness import HARNESSES, HarnessSpec, extract, user_text
from .presets import PRESETS, load_model

__all__ = [
           "BENCHMARKS",
           "HARNESSES",
           "PRESETS",
           "BenchmarkFormatError",
           "Example",
           "HarnessSpec",
           "Settings",
           "extract",
           "load_benchmark",
           "load_model",
           "merge",
           "user_text",
]
