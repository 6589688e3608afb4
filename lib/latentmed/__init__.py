"""latentmed: does latent visual imagination mediate the answer?

A thin library behind the book: the synthetic testbed, tiny real-architecture models, the
latent decode loop with its intervention points, training, perturbations, probes and
statistics. Modules are named after what they do; start with `testbed` and `decode`.
"""

import os
import sys
import warnings

# Busy-waiting OpenMP threads make a shared 2-core machine crawl (measured: a tower forward of
# 32 images took 4.3 s with the default policy next to another job, 0.86 s with PASSIVE). It must
# be set before torch loads its OpenMP runtime, so importing latentmed first is enough.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# tqdm.auto (imported by transformers) warns in a Jupyter kernel without ipywidgets; the
# chapters show no progress bars, and the warning would print the environment's path.
warnings.filterwarnings("ignore", message="IProgress not found")

# jsonschema (imported by nbformat, which runs every chapter, and by altair, which draws its plots)
# imports rfc3987_syntax when it is installed (Jupyter pulls it in) for its "iri" string formats, and
# that module builds a Lark grammar at import: 3.1 s in every chapter's job and again in its kernel.
# Nothing here validates IRIs; marked absent, jsonschema skips those two formats (its own fallback).
sys.modules.setdefault("rfc3987_syntax", None)

__version__ = "0.1.0"
