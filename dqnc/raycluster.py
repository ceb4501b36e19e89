"""Ray, joined or started once for dqnc's scale-out (``sweep`` trials and ``train --actors``)."""

from __future__ import annotations

import logging
import os
from typing import Any

from dqnc.errors import UsageError


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray of
    ``num_cpus`` CPUs (default: this machine's); True when this call started it (and so shuts it
    down). An unreachable address is a one-line UsageError."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a fresh instance even when a `ray start` cluster runs here (use --address for that one)
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    except ConnectionError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}; start it with "
                         "`ray start --head` or drop --address (a cluster with token authentication also needs "
                         "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    return True
