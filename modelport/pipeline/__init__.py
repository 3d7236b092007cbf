"""Composition: pipelines of models (cascade, chain, ensemble) served like one model.

``config`` reads and checks ``pipeline.toml``; ``service`` runs a pipeline through its steps' own
services; ``evaluate`` measures a cascade's thresholds on a folder of images. See docs/pipelines.md.
"""
