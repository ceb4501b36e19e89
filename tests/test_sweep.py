"""`dqnc sweep`: trials on Ray (local, 2 CPUs), the shared stage cache, the journal, the front, the pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dqnc import recipe, sweep
from dqnc.cli import app
from dqnc.errors import UsageError

pytest.importorskip("ray")
runner = CliRunner()

FAST_PRUNE = {"states": 500, "epochs": 2, "dagger_rounds": 0, "check_states": 200}
FAST_QUANT = {"calibration_states": 200, "check_states": 200}
# int8 and int16x8 share the pruned parent (one stage run, one from the cache); "int3" is a bad
# override: that trial fails to load, is recorded as an error, and the sweep goes on.
GRID = ["int8.mode=int8,int16x8,int3"]


def _recipe(tmp: Path, source: Path) -> Path:
    data = {
        "out_dir": "out",
        "source": {"artifact": str(source)},
        "stages": [
            {"name": "pruned", "stage": "prune", "sparsity": 0.5, **FAST_PRUNE},
            {"name": "int8", "stage": "quantize", **FAST_QUANT},
        ],
        "eval": {"episodes": 3, "latency_samples": 20},
        # No model is this small: nothing passes, so --pick writes the closest and exits 1.
        "gates": {"max_size_kb": 0.1},
    }
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def swept(ray_local, trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    p = _recipe(tmp, trained)
    r = runner.invoke(app, ["sweep", str(p), *sum((["--grid", g] for g in GRID), []), "--pick", "smallest-passing",
                            "--out", str(tmp / "sw"), "--quiet"])
    return p, tmp / "sw", r


def test_sweep_records_every_trial_shares_the_cache_and_marks_the_front(swept):
    _, sw, r = swept
    d = json.loads((sw / "sweep.json").read_text())
    status = {" ".join(t["sets"]): t["status"] for t in d["trials"]}
    assert status == {"int8.mode=int8": "failed", "int8.mode=int16x8": "failed", "int8.mode=int3": "error"}
    bad = next(t for t in d["trials"] if t["status"] == "error")
    assert "int3" in bad["error"]
    # Two different worker processes ran the two measured trials (max_calls=1).
    pids = {t["pid"] for t in d["trials"] if t["status"] == "failed"}
    assert len(pids) == 2
    # The pruned parent was computed once and served once from the shared cache.
    assert d["stage_runs"] == {"ran": 3, "cached": 1}
    sizes = {t["metrics"]["precision"]: t["metrics"]["size_bytes"] for t in d["trials"] if t["status"] == "failed"}
    assert sizes["int8"] < sizes["int16x8"]
    assert d["pareto"] and set(d["pareto"]) <= {t["id"] for t in d["trials"] if t["status"] == "failed"}
    md = (sw / "sweep.md").read_text()
    assert "int3" in md and "| * |" in md
    assert (sw / "pareto.png").stat().st_size > 10_000
    assert len((sw / sweep.JOURNAL).read_text().splitlines()) == 3


def test_pick_with_nothing_passing_writes_the_closest_and_exits_1(swept):
    _, sw, r = swept
    assert r.exit_code == 1, r.output
    assert "no trial passes every gate" in r.output and "max_size_kb" in r.output and "misses by" in r.output
    d = json.loads((sw / "sweep.json").read_text())
    smallest = min((t for t in d["trials"] if t["status"] == "failed"), key=lambda t: t["metrics"]["size_bytes"])
    assert d["pick"]["id"] == smallest["id"] and not d["pick"]["passes"]
    best = recipe.load(sw / "best.yaml")
    assert best.recipe.stages[1].mode == "int8" and best.recipe.sweep is None
    assert best.out_dir == sw / "best"


def test_resume_runs_only_trials_missing_from_the_journal(swept):
    p, sw, _ = swept
    journal = sw / sweep.JOURNAL
    lines = journal.read_text().splitlines()
    dropped = json.loads(lines[0])["id"]
    pids = {json.loads(x).get("pid") for x in lines}
    journal.write_text("\n".join(lines[1:]) + "\n" + lines[0][: len(lines[0]) // 2])  # and a line cut mid-write
    r = runner.invoke(app, ["sweep", str(p), "--grid", GRID[0], "--out", str(sw), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["trials_resumed"] == 2
    after = [json.loads(x) for x in journal.read_text().splitlines() if x.startswith("{") and x.endswith("}")]
    assert [e["id"] for e in after].count(dropped) == 1 and len(after) == 3
    # max_calls=1: the same Ray hands the new trial a fresh worker, not an idle earlier one.
    assert next(e for e in after if e["id"] == dropped)["pid"] not in pids


def test_grid_parsing_and_expansion():
    assert sweep.parse_grid(["student.hidden=[8,8],[16,16]", "int8.mode=int8,int16x8"]) == {
        "student.hidden": [[8, 8], [16, 16]], "int8.mode": ["int8", "int16x8"]}
    for bad in ("student.hidden", "=1,2", "x="):
        with pytest.raises(UsageError, match="KEY=V1,V2"):
            sweep.parse_grid([bad])
    data = {"stages": [{"name": "s", "stage": "distill"}, {"name": "q", "stage": "quantize"}]}
    trials = sweep.expand("text", data, {"s.hidden": [[8], [16]], "q.mode": ["int8", "int16x8"]}, seeds=2)
    assert len(trials) == 8 and len({t.id for t in trials}) == 8
    assert all(any(s.startswith("s.seed=") for s in t.sets) for t in trials)
    assert [t.id for t in sweep.expand("text", data, {"q.mode": ["int8"]})] != [t.id for t in sweep.expand("edited", data, {"q.mode": ["int8"]})]
    assert len(sweep.expand("text", data, {"s.hidden": [[8], [16], [32]]}, samples=2)) == 2
    with pytest.raises(UsageError, match=r"--grid 's.hiden.*no option 'hiden'.*did you mean 's.hidden'\?"):
        sweep.expand("text", data, {"s.hiden": [1]})
    with pytest.raises(UsageError, match=r"--grid 'x.mode=...'.*neither a stage name"):
        sweep.expand("text", data, {"x.mode": [1]})
    with pytest.raises(UsageError, match="--seeds needs a prune, distill or quantize stage"):
        sweep.expand("text", {"stages": [{"name": "b", "stage": "export"}]}, {}, seeds=2)


def test_pareto_front_on_numbers():
    pts = [(1000, 400.0), (2000, 500.0), (1500, 300.0), (3000, 500.0), (900, 100.0), (2000, 500.0)]
    assert sweep.pareto(pts) == [0, 1, 4, 5]  # 2 is beaten by 0; 3 by 1; equal points both stay
    assert sweep.pareto([(5, 1.0)]) == [0]
    assert sweep.pareto([]) == []
    # Never empty: some point always has the fewest bytes among those with the most return.
    import random

    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(1, 20), float(rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
        front = sweep.pareto(pts)
        assert front
        for i in front:
            assert not any(b <= pts[i][0] and r >= pts[i][1] and (b, r) != pts[i] for b, r in pts)


def _row(i: str, size: int, status: str, gates: list[tuple[str, float, float, bool]]) -> dict:
    return {"id": i, "sets": [], "status": status, "failures": [] if status == "passed" else ["x"],
            "metrics": {"size_bytes": size, "mean_return": 100.0},
            "gates": [{"gate": g, "threshold": t, "value": v, "passed": ok} for g, t, v, ok in gates]}


def test_pick_smallest_passing_and_closest():
    rows = [_row("a", 3000, "passed", [("max_size_kb", 5, 3.0, True)]),
            _row("b", 2000, "passed", [("max_size_kb", 5, 2.0, True)]),
            _row("c", 1000, "failed", [("min_return", 475, 400, False)]),
            {"id": "d", "sets": [], "status": "error", "error": "boom"}]
    best, passes = sweep.pick_smallest_passing(rows)
    assert best["id"] == "b" and passes
    # Nothing passes: the least total miss (c misses by 5%, e by 50%), whatever its size.
    rows = [_row("c", 1000, "failed", [("min_return", 400, 380, False)]),
            _row("e", 500, "failed", [("max_size_kb", 1, 1.5, False)])]
    best, passes = sweep.pick_smallest_passing(rows)
    assert best["id"] == "c" and not passes
    assert sweep.miss_lines(best) == ["min_return: measured 380, threshold 400, misses by 5.0%"]
    assert sweep.pick_smallest_passing([{"id": "d", "sets": [], "status": "error"}]) == (None, False)


def test_recipe_sweep_section_validates(tmp_path, trained):
    p = _recipe(tmp_path, trained)
    data = yaml.safe_load(p.read_text())
    data["sweep"] = {"grid": {"int8.mode": ["int8"]}, "seeds": 2, "pick": "smallest-passing"}
    p.write_text(yaml.safe_dump(data))
    assert recipe.load(p).recipe.sweep.seeds == 2
    data["sweep"] = {"grid": {"int8.mode": []}}
    p.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["sweep", str(p)])
    assert r.exit_code == 2 and "sweep.grid.int8.mode is empty" in r.output


WRITER = """
import sys, time
from pathlib import Path
from dqnc.recipe.cache import SharedCache
root, key, me = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cache = SharedCache(root)
with cache.writer(key):
    if not (root / key).is_dir():
        src = root.parent / f"work-{me}"
        src.mkdir()
        (src / "a").write_text(me)
        time.sleep(0.5)  # a slow stage: the other process must wait, not compute it again
        (src / "b").write_text(me)
        cache.publish(key, src)
        print("computed")
    else:
        print("reused " + (root / key / "a").read_text() + (root / key / "b").read_text())
"""


def test_shared_cache_has_one_writer_per_entry(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "cache"), "k" * 64, str(i)], env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    outs = sorted(p.communicate(timeout=30)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == "computed" and len(outs) == 3
    # The two others waited and saw the whole entry (both files from the one writer), never half.
    winner = (tmp_path / "cache" / ("k" * 64) / "a").read_text()
    assert outs[1:] == [f"reused {winner}{winner}"] * 2
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_a_trial_over_its_timeout_is_stopped_and_recorded(ray_local, trained, tmp_path):
    p = _recipe(tmp_path, trained)
    data = yaml.safe_load(p.read_text())
    trials = sweep.expand(p.read_text(), data, {"int8.mode": ["int8"]})
    t0 = __import__("time").perf_counter()
    res = sweep.run_sweep(p, trials, tmp_path / "sw", trial_timeout=2)
    assert __import__("time").perf_counter() - t0 < 15  # stopped, not waited for
    assert [t["status"] for t in res.trials] == ["timeout"] and "2 s" in res.trials[0]["error"]
    assert res.front == [] and json.loads((tmp_path / "sw" / sweep.JOURNAL).read_text())["status"] == "timeout"


def test_help_and_bad_grids_never_import_tensorflow_or_ray(tmp_path, trained):
    import subprocess
    import sys

    p = _recipe(tmp_path, trained)
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom dqnc.cli import app\n"
        "r = CliRunner().invoke(app, ['sweep', '--help'])\nassert r.exit_code == 0 and '--grid' in r.output, r.output\n"
        f"r = CliRunner().invoke(app, ['sweep', {str(p)!r}, '--grid', 'int8.bogus=1,2'])\n"
        "assert r.exit_code == 2 and \"has no option 'bogus'\" in r.output, r.output\n"
        f"r = CliRunner().invoke(app, ['sweep', {str(p)!r}, '--grid', 'int8.mode'])\n"
        "assert r.exit_code == 2 and 'KEY=V1,V2' in r.output, r.output\n"
        "assert not {'tensorflow', 'ray'} & set(sys.modules), 'tensorflow or ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
