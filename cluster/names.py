"""Names shared by the processes of one fleet (Ray namespace, actor names)."""

NAMESPACE = "forward-fleet"
CONTROLLER_NAME = "fleet-controller"
SERVE_APP_NAME = "forward-fleet"
NODE_LABEL = "fleet.node"  # label on simulated Ray nodes; workers select on it
GPU_LABEL = "fleet.gpu"


def is_wildcard(host: str) -> bool:
    """A bind-to-every-interface address, which nobody can connect to as such."""
    return host in ("0.0.0.0", "::")


def local_address(host: str) -> str:
    """Where a process on the same host reaches a server bound to ``host``."""
    return "127.0.0.1" if is_wildcard(host) else host

# The control plane (controller, HTTP ingress) stays on the head node: worker nodes come and
# go, and an actor with num_cpus=0 could otherwise land on one. Ray gives only the head node
# this resource (Serve pins its own controller with it).
HEAD_NODE_RESOURCE = {"node:__internal_head__": 0.001}
