"""The hsissl Kubeflow pipeline: DAG, compile, local run, submit/rerun, PyTorchJob manifests.

With ``components``, the only code that imports kfp (the library in ``src/hsissl`` never does).
"""
