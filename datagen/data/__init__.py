"""The data plane: row schema, video I/O, styles, the dataset on disk.

No torch, Prefect or Ray here (tests/test_layers.py): `datagen filter` stays fast.
"""
