"""Names shared by the processes of one fleet (Ray namespace, actor names)."""

NAMESPACE = "forward-fleet"
CONTROLLER_NAME = "fleet-controller"
SERVE_APP_NAME = "forward-fleet"
NODE_LABEL = "fleet.node"  # label on simulated Ray nodes; workers select on it
GPU_LABEL = "fleet.gpu"  # a host's GPU type ("T4"): its workers start in that type's environment
CC_LABEL = "fleet.cc"  # and its compute capability, for gpu_types keyed by one ("6.1")
FRONT_DOOR_NAME = "fleet-front-door"


# The control plane (controller, HTTP ingress) stays on the head node: worker nodes come and
# go, and an actor with num_cpus=0 could otherwise land on one. Ray gives only the head node
# this resource (Serve pins its own controller with it).
HEAD_NODE_RESOURCE = {"node:__internal_head__": 0.001}
