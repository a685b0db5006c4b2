"""Names shared by the processes of one fleet (Ray namespace, actor names)."""

NAMESPACE = "forward-fleet"
CONTROLLER_NAME = "fleet-controller"
SERVE_APP_NAME = "forward-fleet"
NODE_LABEL = "fleet.node"  # label on simulated Ray nodes; workers select on it
GPU_LABEL = "fleet.gpu"
