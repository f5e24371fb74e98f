"""The distributed runtime: one rank per device (and its stages) under torchrun (see :mod:`.runtime`)."""
