"""From bundle to board: an MCU bundle's own Makefile builds policy.c with arm-none-eabi-gcc and
its firmware runs on the emulated Cortex-M4, printing TFLM's actions; the Arduino library compiles."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app

runner = CliRunner()
CROSS = ("arm-none-eabi-gcc", "arm-none-eabi-g++", "qemu-system-arm", "make")


def _needs_toolchain() -> None:
    missing = [t for t in CROSS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install gcc-arm-none-eabi qemu-system-arm make")


@pytest.fixture(scope="module")
def mcu_bundle(tmp_path_factory) -> Path:
    """An int8 CartPole MLP (random weights) exported for target mcu."""
    from dqnc.keras import keras
    from dqnc.quantize import convert

    k = keras()
    rng = np.random.default_rng(1)
    model = k.Sequential([k.layers.Input((4,)), k.layers.Dense(16, activation="relu"),
                          k.layers.Dense(16, activation="relu"), k.layers.Dense(2)])
    model.set_weights([rng.normal(scale=0.7, size=w.shape).astype(np.float32) for w in model.get_weights()])
    work = tmp_path_factory.mktemp("board")
    (work / "policy.tflite").write_bytes(convert(model, "int8", rng.normal(size=(300, 4)).astype(np.float32)))
    r = runner.invoke(app, ["export", str(work / "policy.tflite"), "--env", "CartPole-v1", "-o", str(work / "bundle"),
                            "--check-states", "500", "--json"])
    assert r.exit_code == 0, r.output
    return work / "bundle"


def _vectors(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    text = (bundle / "firmware" / "vectors.h").read_text()
    body = text.split("k_obs[DQNC_N_VECTORS][DQNC_OBS_DIM] = {", 1)[1].split("};", 1)[0]
    obs = np.array([[float(v.rstrip("f")) for v in row.split(",")] for row in re.findall(r"\{([^{}]*)\}", body)],
                   np.float32)
    expected = np.array([int(v) for v in re.search(r"k_expected\[DQNC_N_VECTORS\] = \{([^}]*)\}", text)[1].split(",")])
    return obs, expected


def _make_check(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "check"], cwd=bundle, capture_output=True, text=True, timeout=300)


def test_the_mcu_bundle_carries_its_board_files_checksummed(mcu_bundle):
    sums = (mcu_bundle / "SHA256SUMS").read_text()
    for name in ("Makefile", "README.md", "firmware/startup.c", "firmware/link.ld", "firmware/main.c",
                 "firmware/vectors.h", "arduino/DqncPolicy/library.properties", "arduino/DqncPolicy/src/policy.c",
                 "arduino/DqncPolicy/src/policy.h", "arduino/DqncPolicy/src/DqncPolicy.h",
                 "arduino/DqncPolicy/examples/CheckPolicy/CheckPolicy.ino"):
        assert (mcu_bundle / name).is_file() and f"  {name}\n" in sums, name
    assert (mcu_bundle / "arduino/DqncPolicy/src/policy.c").read_text() == (mcu_bundle / "policy.c").read_text()
    props = dict(line.split("=", 1) for line in (mcu_bundle / "arduino/DqncPolicy/library.properties").read_text().splitlines())
    assert props["name"] == "DqncPolicy" and props["architectures"] == "*" and props["includes"] == "DqncPolicy.h"
    obs, expected = _vectors(mcu_bundle)
    readme = (mcu_bundle / "README.md").read_text()
    assert "make check" in readme and f"vectors {len(obs)}" in " ".join(readme.split())
    assert all(len(line) <= 80 for line in readme.splitlines())


def test_the_test_vectors_hold_tflm_actions_on_held_out_observations(mcu_bundle):
    from dqnc import tflm

    obs, expected = _vectors(mcu_bundle)
    assert len(obs) >= 1000 and obs.shape[1] == 4
    micro = tflm.policy((mcu_bundle / "model.tflite").read_bytes())
    assert (micro.q_values(obs).argmax(axis=1) == expected).all()
    assert len(set(expected.tolist())) == 2  # both actions occur: the check can tell a wrong policy


def test_the_bundles_own_makefile_builds_the_firmware_and_qemu_prints_tflms_actions(mcu_bundle, tmp_path):
    _needs_toolchain()
    bundle = tmp_path / "bundle"
    shutil.copytree(mcu_bundle, bundle)
    run = _make_check(bundle)
    assert run.returncode == 0, run.stdout + run.stderr
    n = len(_vectors(bundle)[0])
    m = re.search(r"DQNC matches (\d+) litert (\d+) vectors (\d+)", run.stdout)
    assert m and int(m[1]) == int(m[3]) == n and int(m[2]) >= 0.99 * n
    assert "arm-none-eabi-gcc -mcpu=cortex-m4" in run.stdout and "qemu-system-arm -M mps2-an386" in run.stdout
    # A firmware whose vectors expect another action fails the check: the Makefile's verdict can fail.
    vectors = bundle / "firmware" / "vectors.h"
    text = vectors.read_text()
    first = re.search(r"k_expected\[DQNC_N_VECTORS\] = \{(\d)", text)
    vectors.write_text(text[:first.start(1)] + str(1 - int(first[1])) + text[first.end(1):])
    bad = _make_check(bundle)
    assert bad.returncode != 0 and f"DQNC matches {n - 1} " in bad.stdout and "check FAILED" in bad.stderr


def test_the_arduino_library_compiles_for_a_cortex_m4(mcu_bundle, tmp_path):
    _needs_toolchain()
    lib = mcu_bundle / "arduino" / "DqncPolicy"
    flags = ["-mcpu=cortex-m4", "-mthumb", "-Os", "-Wall", "-Wextra", "-Werror"]
    c = subprocess.run(["arm-none-eabi-gcc", *flags, "-std=gnu11", "-c", str(lib / "src" / "policy.c"), "-o",
                        str(tmp_path / "policy.o")], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    # The example sketch as the Arduino builder compiles it (C++ with Arduino.h), against a minimal Arduino.h.
    (tmp_path / "Arduino.h").write_text(
        "struct SerialStub { void begin(long) {} explicit operator bool() const { return true; }\n"
        "  template <class T> void print(T) {} template <class T> void println(T) {} };\nextern SerialStub Serial;\n")
    sketch = tmp_path / "sketch.cpp"
    sketch.write_text('#include "Arduino.h"\n' + (lib / "examples/CheckPolicy/CheckPolicy.ino").read_text())
    cc = subprocess.run(["arm-none-eabi-g++", *flags, "-std=gnu++17", "-fsyntax-only", "-I", str(tmp_path), "-I",
                         str(lib / "src"), str(sketch)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr


def test_without_policy_c_the_bundle_gets_the_readme_only(mcu_bundle):
    from dqnc import artifact as art
    from dqnc.boards import board_files
    from dqnc.policy import tflite_policy

    a = art.load(mcu_bundle)
    files = board_files({}, a.model_path.read_bytes(), tflite_policy(a.model_path, a.manifest), a.env)
    assert list(files) == ["README.md"] and "no dependency-free C form" in files["README.md"]
