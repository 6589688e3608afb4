"""latentmed: does latent visual imagination mediate the answer?

A thin library behind the book: the synthetic testbed, tiny real-architecture models, the
latent decode loop with its intervention points, training, perturbations, probes and
statistics. Modules are named after what they do; start with `testbed` and `decode`.
"""

__version__ = "0.1.0"
