"""Wait until a Ray cluster has the expected nodes (and GPUs) alive; used by examples/lib/ray_cluster.sh.

    python examples/lib/wait_for_ray.py --address 10.0.0.1:6379 --nodes 4 --gpus 32 --timeout 300

First waits until the head's GCS port accepts TCP connections (a plain socket probe: `ray.init` against an address
where nothing listens retries internally for minutes and would ignore --timeout), then connects as a Ray driver and
polls `ray.nodes()` until at least `--nodes` nodes are alive and together offer at least `--gpus` GPUs.
Exit status: 0 ready, 1 timed out (what was there is printed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time


def parse_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port"; ValueError naming the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address must be host:port (e.g. 10.0.0.1:6379), got {address!r}")
    return host.strip("[]"), int(port)


def cluster_summary(nodes: list[dict]) -> tuple[int, float, float]:
    """(alive nodes, their CPUs, their GPUs) from `ray.nodes()` records."""
    alive = [n for n in nodes if n.get("Alive")]
    cpus = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in alive)
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0)) for n in alive)
    return len(alive), cpus, gpus


def wait_for_port(host: str, port: int, deadline: float, poll_s: float) -> bool:
    """True once host:port accepts a TCP connection, False when the monotonic `deadline` passes first."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)


def wait_for_cluster(address: str, nodes: int, gpus: int, timeout_s: float, poll_s: float = 2.0) -> bool:
    import ray

    deadline = time.monotonic() + timeout_s
    if not wait_for_port(*parse_address(address), deadline, poll_s):
        print(f"[wait_for_ray] no Ray head listens at {address} after {timeout_s:g}s; see the job's ray-head.log",
              file=sys.stderr)
        return False
    while not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as e:  # the head is still starting
            if time.monotonic() > deadline:
                print(f"[wait_for_ray] cannot connect to the Ray head at {address} after {timeout_s:g}s: {e}",
                      file=sys.stderr)
                return False
            time.sleep(poll_s)
    try:
        while True:
            alive, cpu_count, gpu_count = cluster_summary(ray.nodes())
            if alive >= nodes and gpu_count >= gpus:
                print(f"[wait_for_ray] ready: {alive} node(s), {cpu_count:g} CPUs, {gpu_count:g} GPUs", flush=True)
                return True
            if time.monotonic() > deadline:
                print(f"[wait_for_ray] timed out after {timeout_s:g}s: {alive}/{nodes} node(s) and "
                      f"{gpu_count:g}/{gpus} GPUs joined; see the ray-*.log files of the job", file=sys.stderr)
                return False
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", required=True, help="the Ray head's host:port")
    p.add_argument("--nodes", type=int, required=True, help="nodes that must be alive")
    p.add_argument("--gpus", type=int, default=0, help="GPUs the alive nodes must offer together")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus < 0 or args.timeout <= 0:
        p.error("--nodes must be >= 1, --gpus >= 0, --timeout > 0")
    try:
        parse_address(args.address)
    except ValueError as e:
        p.error(str(e))
    return 0 if wait_for_cluster(args.address, args.nodes, args.gpus, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
