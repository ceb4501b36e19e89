"""Ape-X (dqnc.apex) on real multi-node Ray clusters started on this machine: Ray's own test cluster
(``ray.cluster_utils.Cluster``: a head and two worker nodes of one CPU each), where the two actors
must land on two nodes and the actor on a worker node that is removed mid-run starts again on
another node while the run goes on to its planned env steps; and a ``ray start --head`` cluster
that ``dqnc train --actors 2 --address`` joins from the command line."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from dqnc import apex  # noqa: E402
from dqnc.config import build_train_config  # noqa: E402

# A removed node is declared dead in ~2 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_failure_threshold": 4}
TOTAL_STEPS = 3000
TASK_STEPS = 256  # train_freq 256 on one env: each task steps 256 env steps


def _cfg():
    return build_train_config("CartPole-v1", {}, {"total_steps": TOTAL_STEPS, "learning_starts": 500,
                                                  "train_freq": TASK_STEPS, "gradient_steps": 16,
                                                  "eval_freq": TOTAL_STEPS, "eval_episodes": 2,
                                                  "confirm_episodes": 0, "hidden": [16, 16], "buffer_size": 5000,
                                                  "replay": "prioritized", "n_step": 3, "actors": 2})


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": FAST_HEALTH_CHECK})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _index(name: str) -> int:
    return int(name[len(apex.ACTOR_PREFIX):].split("-")[0])


def test_actors_spread_over_nodes_and_one_on_a_removed_node_restarts_elsewhere(cluster, tmp_path):
    from dqnc import train

    workers = {n.node_id: n for n in cluster.worker_nodes}
    where: dict[str, str] = {}  # actor name (index, run, start) -> the node Ray placed it on
    removed: list[tuple[int, str]] = []  # (actor index, node id)

    def locate() -> None:
        for name in ray.util.list_named_actors():
            if name.startswith(apex.ACTOR_PREFIX) and name not in where:
                try:
                    where[name] = ray.get(ray.get_actor(name).node_id.remote(), timeout=60)
                except (ray.exceptions.RayActorError, ValueError):
                    pass  # on the removed node, not yet reported dead

    def chaos(p) -> None:
        if removed:
            locate()  # the restarted actor's node
        elif p.step >= 1000:
            locate()
            assert len(set(where.values())) == 2, f"two actors on one node: {where}"
            name = next(n for n, node in where.items() if node in workers)
            removed.append((_index(name), where[name]))
            cluster.remove_node(workers[where[name]])

    a = train.run(_cfg(), tmp_path / "m", progress=chaos, address=cluster.address)
    m = a.manifest["metrics"]
    assert removed, "the run ended before a node could be removed"
    i, gone = removed[0]
    assert TOTAL_STEPS <= m["env_steps"] < TOTAL_STEPS + 2 * TASK_STEPS and m["gradient_steps"] > 0
    assert 0 < m["train_seconds"] and m["steps_per_second"] > 0  # the Ape-X loop's wall time is counted
    assert m["actor_starts"][i] == 2 and m["actor_starts"][1 - i] == 1, m["actor_starts"]
    restarted = [node for name, node in where.items() if _index(name) == i and name.endswith("-1")]
    assert restarted and restarted[0] != gone, f"actor {i} restarted on the removed node: {where}"


def _ray_start_head(temp_dir: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` in its own process group; the address it prints."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    log = open(Path(temp_dir) / "ray_start.txt", "w+")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--port", "0", "--num-cpus", "2", "--block",
                             "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        found = re.search(r"ray start --address='([^']+)'", log.read())
        if found:
            return proc, found.group(1)
        time.sleep(0.5)
    log.seek(0)
    _stop(proc)
    pytest.fail(f"`ray start --head` printed no address:\n{log.read()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the Ray that ``proc`` started: its process group (not `ray stop`, which ends every Ray
    on the machine, other users' too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_cli_trains_with_actors_on_a_ray_start_head_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="dqnc-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray 2.5x clusters authenticate by token when one exists; a client joining by address must be told
    # (RAY_AUTH_MODE=token), so both sides get one token here, whatever ~/.ray holds.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    proc, address = _ray_start_head(temp_dir, env)
    try:
        out = subprocess.run(
            [str(Path(sys.executable).with_name("dqnc")), "train", "-e", "CartPole-v1", "--actors", "2",
             "--address", address, "--total-steps", "2000", "--learning-starts", "500", "--train-freq", "256",
             "--gradient-steps", "16", "--hidden", "16,16", "--eval-freq", "2000", "--eval-episodes", "2",
             "--confirm-episodes", "0", "-o", str(tmp_path / "m"), "--json", "-q"],
            capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        logs = list(Path(temp_dir).glob("session_*/logs/python-core-driver-*"))
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
    json.loads(out.stdout)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert 2000 <= manifest["metrics"]["env_steps"] < 2000 + 2 * 256
    assert manifest["metrics"]["actor_starts"] == [1, 1]
    assert logs, "the dqnc driver did not join the `ray start` cluster (no driver log in its session)"
