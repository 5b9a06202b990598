"""KFP v2 components: one thin lightweight Python component per hsissl stage.

Each component body imports ``components.runtime`` (no kfp there) and calls one function that
calls ``hsissl.stages.<stage>.run(cfg)``. Only this package and ``pipelines`` import kfp.
"""
