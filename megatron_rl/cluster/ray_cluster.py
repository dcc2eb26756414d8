"""Start and stop a single-node Ray cluster inside this process (tests, the CPU quickstart, one-node runs).

    from megatron_rl.cluster.ray_cluster import local_ray_cluster
    with local_ray_cluster(num_cpus=4):
        pool = RolloutPool(config)
        ...

`start_local_ray_cluster` always starts a new cluster (`address="local"`, never joins one found through
RAY_ADDRESS) whose processes listen and talk on 127.0.0.1 only, without the dashboard and with usage statistics
off. The object store size is set explicitly (Ray would otherwise take 30% of the machine's memory). On a
multi-node Slurm allocation the trainer joins the cluster the launch script started instead
(`ray.init(address="auto")`); nothing here is for that case.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

_CLUSTER_MODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved_loopback_settings: list[tuple[str | None, bool]] = []


def start_local_ray_cluster(
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    object_store_bytes: int = 1 << 30,
    log_to_driver: bool = False,
) -> dict:
    """Start a fresh local Ray cluster; raises if this process is already connected to one.

    num_cpus / num_gpus: resources Ray may hand out (None: what the machine has). Each CPU engine reserves
    `EngineConfig.cpus_per_engine` of them. log_to_driver: forward the actors' stdout/stderr (vLLM logs) here.
    Returns Ray's context address info.
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; call stop_local_ray_cluster() first")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Loopback only. Ray 2.60 turns _node_ip_address="127.0.0.1" into the machine's routable address
    # (services.resolve_ip_for_localhost) unless its "cluster mode" is off: ray_constants.ENABLE_RAY_CLUSTER, read
    # from this variable when Ray is imported. Set both: the variable for the processes started below, the constant
    # for this one (Ray is already imported here). stop_local_ray_cluster() puts both back.
    _saved_loopback_settings.append((os.environ.get(_CLUSTER_MODE_VAR), ray_constants.ENABLE_RAY_CLUSTER))
    os.environ[_CLUSTER_MODE_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    context = ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=object_store_bytes,
        log_to_driver=log_to_driver,
    )
    return dict(context.address_info)


def stop_local_ray_cluster() -> None:
    """Disconnect and stop the cluster this process started (a no-op when none is running)."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        ray.shutdown()
    while _saved_loopback_settings:
        variable, constant = _saved_loopback_settings.pop()
        if variable is None:
            os.environ.pop(_CLUSTER_MODE_VAR, None)
        else:
            os.environ[_CLUSTER_MODE_VAR] = variable
        ray_constants.ENABLE_RAY_CLUSTER = constant


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int | None = None, **kwargs) -> Iterator[dict]:
    """Context manager around start/stop_local_ray_cluster."""
    info = start_local_ray_cluster(num_cpus, **kwargs)
    try:
        yield info
    finally:
        stop_local_ray_cluster()


def require_ray() -> None:
    """Raise a clear error when no Ray cluster is connected."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "no Ray cluster: start one with megatron_rl.cluster.ray_cluster.start_local_ray_cluster() "
            "(single node) or ray.init(address='auto') (a cluster started by the launch script)"
        )
