"""The engine: load a latent reasoner, build prompts, decode with intervention points, re-run traces.

Every measurement of the study goes through this package (chapters 3-8). `LatentReasoner`
loads a checkpoint folder (testbed or real 7B); `reasoner.prompt(query)` builds its prompt;
`generate` decodes (our own loop: `decode`); `replay`, `continue_from` and `regenerate` re-run a
trace with edits (`replay` explains how they differ); `shared_sweep` runs many interventions on
one instance with shared work; `interventions` lists every edit and `hooks` the named points
inside the model.
"""

from .decode import DecodeConfig
from .query import Query
from .reasoner import LatentReasoner
from .spec import LatentSpec, preset
from .sweep import naive_sweep, shared_sweep, sweep_many
from .trace import Segment, Trace

__all__ = ["DecodeConfig", "LatentReasoner", "LatentSpec", "Query", "Segment", "Trace", "naive_sweep", "preset",
           "shared_sweep", "sweep_many"]
