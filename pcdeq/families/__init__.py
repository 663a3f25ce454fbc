"""The model families, one subpackage each: pcDEQ (:mod:`.pcdeq`), monDEQ (:mod:`.mondeq`), Neural ODE (:mod:`.node`).

Each family builds on the core only (:mod:`pcdeq.family`, :mod:`pcdeq.solver`, the shape facts), never on another
family, and registers itself with :func:`pcdeq.family.register_family` when imported.
"""
