"""The models on backbone features, one module each.

- :mod:`.grad`: GRAD; :mod:`.bigrid`: Bi-Grid GRAD;
- :mod:`.fusion`: the fusion networks; :mod:`.fbp`: Feature Block Paste;
- :mod:`.factory`: the model a config names, its feature size and its epoch plan.

The package imports none of them: :mod:`gradad.config` reads the choices of fusion and fbp
(which do not depend on it), while grad, bigrid and factory are built from it.
"""
