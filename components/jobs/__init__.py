"""Multi-node pretraining jobs: a Kubeflow Trainer v2 TrainJob or a Training Operator
PyTorchJob built for one pretraining (``trainjob``, ``pytorchjob``; ``multinode`` finds which
API the cluster has), and the launcher that the launch component runs in its pod to create one
and wait for it. Below ``pipelines``: the DAG imports these, never the other way."""
