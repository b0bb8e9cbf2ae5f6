"""A local Ray cluster for the Serve and Data tests: 2 CPUs, no dashboard, nothing beyond 127.0.0.1, started and
stopped by the test module that uses it."""

import contextlib
import os
import socket

# Before Ray is imported: no usage statistics, no metrics exporter, no log deduplication noise.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_enable_open_telemetry", "0")

import ray  # noqa: E402

OBJECT_STORE_BYTES = 200 * 1024 * 1024


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_cluster():
    """A fresh in-process Ray cluster for one test module; shut down even when the tests fail."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield
    finally:
        ray.shutdown()
