"""latentmed's speed benchmarks: `python -m benchmarks --help` (run.py) lists them; results are
written to benchmarks/results/ and rendered by chapter 9 (notebooks/09_performance.ipynb)."""
