"""The distributed runtime: one rank per stage under torchrun (see :mod:`.runtime`)."""
