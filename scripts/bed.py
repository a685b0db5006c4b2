"""A bed of separate hosts on this machine, with a fleet on it (root; see docs/multihost.md).

    sudo .venv/bin/python scripts/bed.py up [--config configs/hetero-sim.yaml] [--work /tmp/ff-bed]
    sudo .venv/bin/python scripts/bed.py down

``up``: a bridge, a Ray head on it (this namespace), one host per declared node of the config
(network, mount, PID and UTS namespaces), each running ``fleet join --block`` as that node,
then the fleet (``deploy``), and prints its URL and how to cut a host's link. ``down`` ends
every process of the bed and removes its namespaces and links. The bed's state is kept in
``<work>/bed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.env import apply_ray_env, auth_token_path, ray_env  # noqa: E402

STATE = "bed.json"


def up(args) -> int:
    apply_ray_env()
    import ray

    from cluster import deploy
    from cluster.config import load_config
    from cluster.names import NAMESPACE, NODE_LABEL
    from cluster.net import free_port
    from tests.integration.hostbed import FleetBed, namespaces_permitted

    permitted, why = namespaces_permitted()
    if not permitted:
        sys.exit(f"bed: {why}")
    if not auth_token_path().exists():
        sys.exit(f"bed: Ray's auth token ({auth_token_path()}) is missing: run `ray get-auth-token --generate`")
    work = Path(args.work)
    fleet = FleetBed(work, args.config, hidden=[auth_token_path().parent])
    config = load_config(args.config, repository=str(work / "repo"))
    fleet.up({**ray_env(), "RAY_AUTH_TOKEN": auth_token_path().read_text().strip()})
    (work / STATE).write_text(json.dumps({"bed_id": fleet.bed.bed_id, "bridge": fleet.bed.bridge}))
    ray.init(address=fleet.address, namespace=NAMESPACE, log_to_driver=False)
    for node in config.nodes:
        host = node.name.replace("-node", "") + "-host"
        fleet.join(host, node.name)
        print(f"{host} ({fleet.bed.hosts[host].address}) joining as {node.name} ...", flush=True)
        deadline = time.monotonic() + 120
        while not any(n.get("Alive") and (n.get("Labels") or {}).get(NODE_LABEL) == node.name for n in ray.nodes()):
            if time.monotonic() > deadline:
                sys.exit(f"bed: {host} did not join; see {work / (host + '.log')}")
            time.sleep(0.5)
    (work / STATE).write_text(json.dumps({"bed_id": fleet.bed.bed_id, "bridge": fleet.bed.bridge,
                                          "hosts": {h.name: {"address": h.address, "veth": h.veth, "netns": h.netns}
                                                    for h in fleet.bed.hosts.values()}}))
    head = fleet.bed.head_address
    config = config.model_copy(update={"host": head, "port": free_port(head), "grpc_port": None})
    deploy.deploy(config)
    ray.shutdown()
    print(f"\nthe fleet serves on http://{head}:{config.port} (Ray at {fleet.address}); logs in {work}")
    for h in fleet.bed.hosts.values():
        print(f"  {h.name}: {h.address}; cut its link: ip link set {h.veth} down (up again: ... up)")
    print("take it down: scripts/bed.py down")
    return 0


def down(args) -> int:
    from tests.integration.hostbed import HostBed, Host

    state = json.loads((Path(args.work) / STATE).read_text())
    bed = HostBed(Path(args.work), bed_id=state["bed_id"], bridge=state["bridge"])
    for name, h in state.get("hosts", {}).items():
        bed.hosts[name] = Host(name, h["netns"], h["veth"], h["address"])
    leftovers = bed.down()
    print(f"the bed is down{' (killed: ' + ', '.join(leftovers) + ')' if leftovers else ''}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--config", default="configs/hetero-sim.yaml")
    parser.add_argument("--work", default="/tmp/ff-bed", help="logs, the repository and the bed's state")
    args = parser.parse_args()
    return up(args) if args.action == "up" else down(args)


if __name__ == "__main__":
    sys.exit(main())
