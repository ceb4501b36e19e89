"""The C policy on an emulated Cortex-M4: build bare-metal with arm-none-eabi-gcc, run on QEMU.

:func:`verify_bundle` compiles a bundle's ``policy.c`` for ``-mcpu=cortex-m4 -mthumb -Os`` with a
tiny startup (vector table, .data/.bss set-up, semihosting for output: no C library), runs it on
QEMU's ``mps2-an386`` board (a Cortex-M4) on test vectors whose expected actions come from LiteRT,
and reports:

- ``arm-none-eabi-size`` of ``policy.o`` alone (flash = .text + .rodata + .data, RAM = .data + .bss;
  the stack is extra, a few dozen bytes);
- how many test-vector actions equal TFLM's arithmetic (required: all) and LiteRT's (which
  rounds once where TFLM rounds twice, see :func:`dqnc.export.verify_tflm`);
- instructions per action. QEMU runs with ``-icount shift=0``, which advances its virtual clock by
  1 ns per guest instruction; the harness reads SysTick around each action and converts ticks to
  instructions with a calibration loop of known length. It counts instructions, not cycles: a
  real M4's cycles per instruction (wait states, multi-cycle loads, the multiply-accumulate
  pipeline) are not modelled. A proxy.

A conv policy (:class:`dqnc.cpolicy.IntegerConvNet`) on byte pixels (bool or uint8 observations)
is run as it is deployed, through ``dqnc_policy_act_u8`` (no floating point);
``build_and_run(..., pixels=False)`` measures its float entry instead (soft-float quantization
under these CFLAGS: hundreds of instructions per pixel).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

BOARD = "mps2-an386"
CFLAGS = ["-mcpu=cortex-m4", "-mthumb", "-Os", "-std=c99", "-ffreestanding", "-Wall", "-Wextra", "-Werror"]
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
CALIBRATION_LOOPS = 1_000_000  # two instructions each (subs, bne)
# The test vectors sit in flash: at most this many bytes of them (float observations, or byte pixels
# for a conv policy's dqnc_policy_act_u8: 5,242 MinAtar frames, 74 Atari stacks).
VECTOR_BYTES = 1 << 21

LINKER = """MEMORY {
  FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M
  RAM (rwx)  : ORIGIN = 0x20000000, LENGTH = 256K
}
ENTRY(reset_handler)
SECTIONS {
  .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) } > FLASH
  .data : { _sdata = .; *(.data*) _edata = .; } > RAM AT > FLASH
  _sidata = LOADADDR(.data);
  .bss (NOLOAD) : { _sbss = .; *(.bss*) *(COMMON) _ebss = .; } > RAM
  _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""

STARTUP = r"""/* Bare-metal start for QEMU mps2-an386: vectors, .data/.bss, semihosting output. */
#include <stdint.h>
#include <stddef.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int main(void);

static int semihost(int op, const void *arg) {
  register int r0 __asm__("r0") = op;
  register const void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

void dqnc_puts(const char *s) { semihost(0x04, s); } /* SYS_WRITE0 */

void dqnc_exit(void) {
  semihost(0x18, (const void *)0x20026); /* SYS_EXIT, ADP_Stopped_ApplicationExit */
  for (;;) {}
}

/* The compiler may emit calls to these for copies and clears. */
void *memset(void *d, int c, size_t n) { unsigned char *p = d; while (n--) *p++ = (unsigned char)c; return d; }
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *p = d; const unsigned char *q = s; while (n--) *p++ = *q++; return d;
}

void reset_handler(void) {
  uint32_t *src = &_sidata, *dst = &_sdata;
  while (dst < &_edata) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  main();
  dqnc_exit();
}

static void fault_handler(void) { dqnc_puts("DQNC FAULT\n"); dqnc_exit(); }

__attribute__((section(".vectors"), used)) static const void *const vectors[16] = {
  &_estack, (void *)reset_handler, (void *)fault_handler, (void *)fault_handler, (void *)fault_handler,
  (void *)fault_handler, (void *)fault_handler, 0, 0, 0, 0, (void *)fault_handler, (void *)fault_handler, 0,
  (void *)fault_handler, (void *)fault_handler,
};
"""

HARNESS = r"""/* Runs the test vectors through dqnc_policy_act and reports matches and SysTick ticks. */
#include <stdint.h>
#include "policy.h"
#include "vectors.h"

void dqnc_puts(const char *s);

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

static void put_u(const char *label, uint32_t v) {
  char buf[16];
  int i = 15;
  buf[i] = 0;
  do { buf[--i] = (char)('0' + v % 10u); v /= 10u; } while (v && i > 0);
  dqnc_puts(label);
  dqnc_puts(&buf[i]);
}

static void spin(uint32_t n) { __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n) : : "cc"); }

int main(void) {
  uint32_t n, t0, t1, matches = 0, litert = 0, ticks = 0, overhead = 0, calib;
  SYST_RVR = 0x00FFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 5u; /* enable, processor clock, no interrupt */
  t0 = SYST_CVR;
  spin(DQNC_CALIBRATION_LOOPS);
  t1 = SYST_CVR;
  calib = (t0 - t1) & 0x00FFFFFFu;
  for (n = 0; n < DQNC_N_VECTORS; ++n) {
    int action;
    t0 = SYST_CVR;
    action = DQNC_ACT(k_obs[n]);
    t1 = SYST_CVR;
    ticks += (t0 - t1) & 0x00FFFFFFu;
    t0 = SYST_CVR;
    t1 = SYST_CVR;
    overhead += (t0 - t1) & 0x00FFFFFFu;
    if (action == k_expected[n]) ++matches;
    if (action == k_litert[n]) ++litert;
  }
  put_u("DQNC matches ", matches);
  put_u(" litert ", litert);
  put_u(" vectors ", DQNC_N_VECTORS);
  put_u(" ticks ", ticks);
  put_u(" overhead ", overhead);
  put_u(" calibration_ticks ", calib);
  dqnc_puts("\n");
  return 0;
}
"""


def missing_tools() -> list[str]:
    """The cross tools this needs that are not on PATH (empty when all are there)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(cmd: list[str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


def vectors_header(obs: np.ndarray, expected: np.ndarray, litert: np.ndarray, pixels: bool = False) -> str:
    """The test vectors: float observations for ``dqnc_policy_act``, or bytes for ``dqnc_policy_act_u8``."""
    from dqnc.cpolicy import c_float

    text = (lambda v: str(int(v))) if pixels else c_float
    rows = ",\n".join("  {" + ", ".join(text(v) for v in row) + "}" for row in obs)
    kind, act = ("uint8_t", "dqnc_policy_act_u8") if pixels else ("float", "dqnc_policy_act")
    return (f"#define DQNC_N_VECTORS {len(obs)}u\n#define DQNC_CALIBRATION_LOOPS {CALIBRATION_LOOPS}u\n"
            f"#define DQNC_ACT(obs) {act}(obs, 0)\n"
            f"static const {kind} k_obs[DQNC_N_VECTORS][DQNC_OBS_DIM] = {{\n{rows}\n}};\n"
            f"static const int k_expected[DQNC_N_VECTORS] = {{{', '.join(str(int(a)) for a in expected)}}};\n"
            f"static const int k_litert[DQNC_N_VECTORS] = {{{', '.join(str(int(a)) for a in litert)}}};\n")


def section_sizes(obj: Path) -> dict[str, int]:
    """Bytes of .text, .rodata, .data and .bss in an object file (``arm-none-eabi-size -A``)."""
    out = _run(["arm-none-eabi-size", "-A", str(obj)])
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    for line in out.splitlines():
        m = re.match(r"\.(text|rodata|data|bss)\S*\s+(\d+)", line.strip())
        if m:
            sizes[m.group(1)] += int(m.group(2))
    return sizes


def build_and_run(source_dir: Path, obs: np.ndarray, expected: np.ndarray, litert: np.ndarray,
                  work: Path | None = None, pixels: bool = False) -> dict[str, Any]:
    """Cross-compile policy.c in ``source_dir`` with the harness, run ``obs`` on QEMU; count the
    actions equal to ``expected`` (TFLM's arithmetic) and to ``litert``. ``pixels``: ``obs`` are
    byte pixels fed to ``dqnc_policy_act_u8`` (a conv policy's float-free entry), else floats."""
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi "
                                "qemu-system-arm")
    work = Path(work or tempfile.mkdtemp(prefix="dqnc-m4-"))
    for name in ("policy.c", "policy.h"):
        shutil.copy(Path(source_dir) / name, work / name)
    (work / "startup.c").write_text(STARTUP, encoding="utf-8")
    (work / "harness.c").write_text(HARNESS, encoding="utf-8")
    (work / "vectors.h").write_text(vectors_header(np.asarray(obs, np.float32), np.asarray(expected), np.asarray(litert),
                                                                 pixels), encoding="utf-8")
    (work / "link.ld").write_text(LINKER, encoding="utf-8")
    _run(["arm-none-eabi-gcc", *CFLAGS, "-c", "-o", str(work / "policy.o"), str(work / "policy.c")])
    sizes = section_sizes(work / "policy.o")
    elf = work / "policy.elf"
    _run(["arm-none-eabi-gcc", *CFLAGS, "-nostdlib", "-nostartfiles", "-T", str(work / "link.ld"), "-o", str(elf),
          str(work / "startup.c"), str(work / "harness.c"), str(work / "policy.o"), "-lgcc"])
    out = _run(["qemu-system-arm", "-M", BOARD, "-display", "none", "-monitor", "none", "-serial", "none",
                "-chardev", "stdio,id=semihosting", "-semihosting-config", "enable=on,target=native,chardev=semihosting",
                "-icount", "shift=0", "-kernel", str(elf)])
    m = re.search(r"DQNC matches (\d+) litert (\d+) vectors (\d+) ticks (\d+) overhead (\d+) calibration_ticks (\d+)", out)
    if not m:
        raise RuntimeError(f"the Cortex-M4 run printed no result: {out.strip()[:300]!r}")
    matches, litert_matches, vectors, ticks, overhead, calib = (int(g) for g in m.groups())
    per_tick = 2 * CALIBRATION_LOOPS / calib if calib else float("nan")
    return {
        "board": BOARD, "cflags": " ".join(CFLAGS), "vectors": vectors, "actions_equal": matches,
        "entry": "dqnc_policy_act_u8 (byte pixels)" if pixels else "dqnc_policy_act (float observations)",
        "actions_equal_litert": litert_matches,
        "sections": sizes, "flash_bytes": sizes["text"] + sizes["rodata"] + sizes["data"],
        "ram_bytes": sizes["data"] + sizes["bss"],
        "instructions_per_action": (ticks - overhead) * per_tick / max(vectors, 1),
        "instructions_per_tick": per_tick,
        "proxy_note": "QEMU -icount instructions, not cycles: wait states and multi-cycle instructions are not modelled",
    }


def verify_bundle(bundle: Path, n_vectors: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Run a bundle's policy.c (fully connected or conv) on the emulated Cortex-M4 against TFLM's
    arithmetic and LiteRT's actions on held-out states (rollouts of the bundle's own policy, episode
    seeds of purpose ``export_check``; at most :data:`VECTOR_BYTES` of observations)."""
    from dqnc import artifact as art
    from dqnc.envs import collect_states
    from dqnc.errors import UsageError
    from dqnc.policy import tflite_policy
    from dqnc.seeds import episode_seed

    source = art.load(bundle)
    if not (source.path / "policy.c").is_file():
        raise UsageError(f"{str(bundle)!r} has no policy.c: export an int8 model with --target mcu")
    missing = missing_tools()
    if missing:
        raise UsageError(f"--verify-mcu needs {', '.join(missing)}: apt-get install gcc-arm-none-eabi "
                         "libnewlib-arm-none-eabi qemu-system-arm")
    from dqnc.cpolicy import extract

    litert = tflite_policy(source.model_path, source.manifest)
    # Pixel policies are run as they are deployed: bytes in, no floating point.
    pixels = source.env.obs_dtype in ("bool", "uint8") and "dqnc_policy_act_u8" in (source.path / "policy.h").read_text()
    n_vectors = min(n_vectors, max(1, VECTOR_BYTES // ((1 if pixels else 4) * source.env.obs_dim)))
    obs = collect_states(litert, source.env, n_vectors, episode_seed("export_check", seed) + 50_000, 0.1)
    obs = obs.reshape(len(obs), -1)
    xq = litert.quantize_input(obs.astype(np.float32))
    net = extract(source.model_path.read_bytes(), conv=True)
    assert not isinstance(net, str)  # export wrote policy.c, so the model is an int8 FC chain or conv net
    expected = net.forward(xq).argmax(axis=1)  # TFLM's arithmetic, first maximum
    lite = np.stack([np.array(litert.invoke_quantized(x.reshape(litert.input_shape)), copy=True).reshape(-1)
                     for x in xq]).argmax(axis=1)
    result = build_and_run(source.path, obs, expected, lite, pixels=pixels)
    if result["actions_equal"] != result["vectors"]:
        from dqnc.errors import GateFailed

        raise GateFailed(f"on the emulated Cortex-M4, policy.c chose TFLM's action on {result['actions_equal']} and "
                         f"LiteRT's on {result['actions_equal_litert']} of {result['vectors']} test vectors", {"mcu": result})
    return result
