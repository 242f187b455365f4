"""Serving a model across the mesh: plans, model distribution, activation pipeline."""
