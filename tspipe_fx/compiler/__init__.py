"""The steps of :func:`tspipe_fx.compile` (:mod:`tspipe_fx.api`), each in its own module:
devices and their specs, cut constraints, cost models, the partitioner, refine, the plan written
down."""
