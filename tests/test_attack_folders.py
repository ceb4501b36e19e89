"""Nothing of the user's is touched: outputs, --force and recipe out_dirs that point at folders dqnc
did not make are refused (exit 2, one line, naming the first foreign file) before any work, and
every byte under them stays as it was.

Each test says what the code did before dqnc marked what it makes (git HEAD before this file).
Cheap by design: every refusal happens before training or quantizing; the one real run is an
eval-only recipe over the shipped CartPole sample (a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc.cli import app
from dqnc.errors import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "cartpole"
runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    """Every file's sha256 and every folder under ``root`` (the folder itself included)."""
    out = {".": "dir"} if root.is_dir() else {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_exit_2(r, *needles: str) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    text = r.output.strip()
    assert len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text
    return text


def web_app(folder: Path) -> Path:
    """A web app's folder: a PWA manifest.json (not dqnc's), index.html, icons/."""
    (folder / "icons").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "icons": []}))
    (folder / "index.html").write_text("<!doctype html><title>My App</title>")
    (folder / "icons" / "icon-192.png").write_bytes(b"\x89PNG fake icon")
    return folder


def write_recipe(tmp_path: Path, out_dir: str, stages: list | None = None, name: str = "r.yaml") -> Path:
    data = {"out_dir": out_dir, "source": {"artifact": str(SAMPLE)},
            "stages": stages or [{"name": "check", "stage": "eval", "episodes": 2, "latency_samples": 0}],
            "eval": {"episodes": 2, "latency_samples": 0}}
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# --- --force on stage outputs ----------------------------------------------------------------------

def test_force_quantize_never_deletes_a_web_app_folder(tmp_path):
    # Before: a folder holding any manifest.json counted as an artifact; --force quantized the sample
    # and replaced the folder whole (index.html and icons/ gone), exit 0.
    web = web_app(tmp_path / "site")
    before = snapshot(web)
    r = runner.invoke(app, ["quantize", str(SAMPLE), "-o", str(web), "--force"])
    one_line_exit_2(r, f"{web / 'index.html'}", "dqnc did not write", "--force only replaces folders dqnc made")
    assert snapshot(web) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # no temporary sibling either


def test_atomic_output_refuses_a_web_app_folder(tmp_path):
    # Before: atomic_output(force=True) renamed the finished temporary folder over the web app.
    web = web_app(tmp_path / "site")
    before = snapshot(web)
    with pytest.raises(OutputExistsError, match="index.html', which dqnc did not write") as e:
        with art.atomic_output(web, force=True) as tmp:
            (tmp / art.TFLITE).write_bytes(b"model")
    assert "\n" not in str(e.value)
    assert snapshot(web) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    # without --force the refusal is the same: "pass --force" would invite the deletion
    with pytest.raises(OutputExistsError, match="dqnc did not write"):
        art.check_output(web, force=False)


@pytest.mark.parametrize("extra", ["notes.txt", "model/variables/my-notes.txt", "CHANGED mlp.npz"])
def test_force_keeps_a_dqnc_artifact_holding_a_user_file(tmp_path, extra):
    # Before: the manifest was enough; --force replaced the artifact and the user's file with it.
    a = tmp_path / "policy"
    shutil.copytree(SAMPLE, a)
    original = (a / "mlp.npz").read_bytes()
    if extra.startswith("CHANGED "):
        rel, why = extra.split(" ", 1)[1], "which changed since dqnc wrote it"
        (a / rel).write_bytes(b"the user's own weights")
    else:
        rel, why = extra, "which dqnc did not write"
        (a / rel).write_text("mine")
    before = snapshot(a)
    r = runner.invoke(app, ["quantize", str(SAMPLE), "-o", str(a), "--force"])
    one_line_exit_2(r, f"{a / rel}', {why}")
    assert snapshot(a) == before
    with pytest.raises(OutputExistsError, match=why):
        with art.atomic_output(a, force=True) as tmp:
            (tmp / art.TFLITE).write_bytes(b"model")
    assert snapshot(a) == before
    # Once it is dqnc's again, it is an ordinary existing output: "pass --force", and --force works.
    if extra.startswith("CHANGED "):
        (a / rel).write_bytes(original)
    else:
        (a / rel).unlink()
    assert art.owned_by_dqnc(a)
    with pytest.raises(OutputExistsError, match="already exists: pass --force to replace it"):
        art.check_output(a, force=False)
    with art.atomic_output(a, force=True) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "saved_model.pb").write_bytes(b"new")
        art.write_manifest(tmp, stage="train", env=art.load(SAMPLE).env, network={}, config={}, metrics={})
    assert (a / "model" / "saved_model.pb").read_bytes() == b"new" and not (a / "mlp.npz").exists()


def test_train_never_deletes_a_user_folder_named_like_its_checkpoint(tmp_path):
    # Before: `dqnc train -o pol` trained, then deleted pol.ckpt/ (its checkpoint path) whatever it held.
    ckpt = tmp_path / "pol.ckpt"
    ckpt.mkdir()
    (ckpt / "thesis.tex").write_text("three years of work")
    before = snapshot(ckpt)
    r = runner.invoke(app, ["train", "--env", "CartPole-v1", "-o", str(tmp_path / "pol"), "--total-steps", "400",
                            "--learning-starts", "100", "--eval-freq", "400", "--hidden", "8", "-q"])
    one_line_exit_2(r, f"{ckpt / 'thesis.tex'}", "dqnc did not write")
    assert snapshot(ckpt) == before and not (tmp_path / "pol").exists()


# --- recipe out_dirs -------------------------------------------------------------------------------

@pytest.mark.parametrize("force", [[], ["--force"]])
def test_recipe_into_a_user_folder_with_a_report_md(tmp_path, force):
    # Before: the run went ahead and replaced the user's report.md (and wrote report.json,
    # recipe.effective.yaml and .dqnc/ into the folder), exit 0.
    mine = tmp_path / "thesis"
    (mine / "sections").mkdir(parents=True)
    (mine / "report.md").write_text("# My report\n\nweeks of writing\n")
    (mine / "sections" / "intro.tex").write_text("\\section{Intro}")
    before = snapshot(mine)
    p = write_recipe(tmp_path, "thesis")
    r = runner.invoke(app, ["run", str(p), *force])
    one_line_exit_2(r, f"{mine / 'report.md'}", "dqnc did not write")
    assert snapshot(mine) == before


@pytest.mark.parametrize("out_dir", ["~", "~/..", "~/../.."])
def test_recipe_out_dir_home_or_above_is_refused(tmp_path, monkeypatch, out_dir):
    # Before: `out_dir: "~"` overwrote ~/report.md and wrote report.json, recipe.effective.yaml and
    # .dqnc/ into the home folder (here a fake one: HOME points into tmp_path).
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (home / "report.md").write_text("my own report")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path / "users")
    p = write_recipe(tmp_path, out_dir)
    r = runner.invoke(app, ["run", str(p)])
    what = {"~": "your home folder"}.get(out_dir, "a parent of your home folder")
    one_line_exit_2(r, what)
    assert snapshot(tmp_path / "users") == before


@pytest.mark.parametrize("out_dir", ["/", "/tmp"])
def test_recipe_out_dir_root_or_system_folder_is_refused_before_writing(tmp_path, monkeypatch, out_dir):
    # Before: `out_dir: /` wrote report.md, report.json, recipe.effective.yaml and .dqnc/ into /.
    # Here nothing may reach the writes: the first writing steps fail the test if they are called.
    from dqnc.recipe import runner as recipe_runner

    def must_not_write(*a, **k):
        raise AssertionError(f"dqnc started writing into out_dir {out_dir!r}")

    monkeypatch.setattr(art, "ensure_writable_dir", must_not_write)
    monkeypatch.setattr(recipe_runner, "Lock", must_not_write)
    monkeypatch.setattr(recipe_runner, "_save_effective", must_not_write)
    listing = sorted(os.listdir(out_dir))
    p = write_recipe(tmp_path, out_dir)
    r = runner.invoke(app, ["run", str(p), "--force"])
    text = one_line_exit_2(r)
    # '/' is the root; '/tmp' a system folder (or, where HOME lies under /tmp, a parent of home).
    wanted = ("the filesystem root",) if out_dir == "/" else ("a system folder", "a parent of your home folder")
    assert any(w in text for w in wanted), text
    assert sorted(os.listdir(out_dir)) == listing


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("only_manifest", [True, False])
def test_stage_folder_holding_a_user_manifest_is_refused(tmp_path, marked, only_manifest):
    # Before: the export stage ran with force=True inside the runner; its folder held a
    # manifest.json, so it was replaced whole by the bundle (the user's files gone), exit 0.
    out = tmp_path / "out"
    stage = out / "bundle"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text(json.dumps({"name": "bundle notes", "files": ["a", "b"]}))
    if not only_manifest:
        (stage / "measurements.csv").write_text("x,y\n1,2\n")
    if marked:  # an out_dir dqnc made: the marker records no report files yet
        (out / ".dqnc-out").write_text(json.dumps({"dqnc_out_dir": 1, "files": {}}))
    before = snapshot(out)
    p = write_recipe(tmp_path, "out", stages=[{"name": "bundle", "stage": "export"}])
    r = runner.invoke(app, ["run", str(p), "--force"])
    first = stage / ("manifest.json" if only_manifest else "measurements.csv")
    one_line_exit_2(r, f"{first}'", "dqnc did not write")
    assert snapshot(out) == before


def test_reports_dqnc_wrote_are_replaced_but_a_user_edit_is_refused_and_old_dirs_are_adopted(tmp_path):
    # Before: the rerun replaced the user's edited report.md (exit 0).
    p = write_recipe(tmp_path, "out")
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(p), "-q"]).exit_code == 0
    assert runner.invoke(app, ["run", str(p), "-q"]).exit_code == 0  # a rerun replaces dqnc's own reports
    ours = (out / "report.md").read_bytes()
    with open(out / "report.md", "a") as f:
        f.write("\nMy conclusions: ship it.\n")
    before = snapshot(out)
    r = runner.invoke(app, ["run", str(p), "--force"])
    one_line_exit_2(r, f"{out / 'report.md'}', which changed since dqnc wrote it")
    assert snapshot(out) == before
    (out / "report.md").write_bytes(ours)  # the user undoes the edit: the report is dqnc's again
    assert runner.invoke(app, ["run", str(p), "-q"]).exit_code == 0
    marker = json.loads((out / ".dqnc-out").read_text())
    assert set(marker["files"]) == {"report.md", "report.json", "recipe.effective.yaml"}
    assert "adopted_utc" not in marker
    # An out_dir an earlier dqnc made (no marker, everything in it dqnc's) is adopted.
    (out / ".dqnc-out").unlink()
    assert runner.invoke(app, ["run", str(p), "-q"]).exit_code == 0
    assert "adopted_utc" in json.loads((out / ".dqnc-out").read_text())
