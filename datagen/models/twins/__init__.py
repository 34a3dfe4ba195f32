"""Tiny random-weight twins of the production models, built offline from configs.

Each `build_<key>(target)` writes one model directory in the same layout as its hub repository
(see datagen/models/registry.py SOURCES), through the same library classes, seeded so that
builds are reproducible. The production loading code then loads the twin unchanged.
"""
