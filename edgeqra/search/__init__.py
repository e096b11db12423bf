"""Search stages: evolution, multi-fidelity, surrogate, Bayesian refinement, journal."""
