"""The ``dqnc`` command line: parse options, build a config, call one stage, render the result.

Nothing at module level imports TensorFlow, so ``--help`` and config errors are instant. Every
command goes through :func:`_guard`, the one place where outcomes become exit codes.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dqnc import __version__
from dqnc.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, DqncError, GateFailed
from dqnc import config as _cfg
from dqnc.seeds import EVAL_SEED

app = typer.Typer(
    name="dqnc",
    help="Train a DQN policy and compress it into an edge-deployable TFLite file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)
_debug = {"on": os.environ.get("DQNC_DEBUG", "") not in ("", "0")}
_ui: dict[str, Any] = {"quiet": False}  # --quiet, on every command: no progress bars, spinners or progress lines

F = TypeVar("F", bound=Callable[..., Any])
_ENV_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _guard(fn: F) -> F:
    """Map DqncError / Ctrl-C / SIGTERM / a bug to one stderr line and the documented exit code,
    and give every command ``--quiet`` (one definition, here)."""
    import inspect as _inspect

    sig = _inspect.signature(fn, eval_str=True)
    own_quiet = "quiet" in sig.parameters

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _ui["quiet"] = bool(kwargs.get("quiet") if own_quiet else kwargs.pop("quiet", False))
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return fn(*args, **kwargs)
        except GateFailed as e:
            stderr.print(f"[bold red]gate failed:[/] {e}", markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except DqncError as e:
            if _debug["on"]:
                raise
            stderr.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if _debug["on"]:
                raise
            stderr.print("[bold red]interrupted[/]: nothing partial was left at the output path", markup=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:
            # The environment, not dqnc: a full disk, a read-only or forbidden path.
            if _debug["on"] or e.errno not in _ENV_ERRNOS:
                raise
            where = f" {e.filename!r}" if e.filename else ""
            stderr.print(f"[bold red]error:[/] cannot write{where}: {e.strerror}; free space or choose a writable "
                         "output path (nothing partial was left behind)", markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise
        except Exception as e:
            # Anything else is a bug in dqnc: exit 3, one line, the traceback behind --debug.
            if _debug["on"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            stderr.print(f"[bold red]internal error:[/] {type(e).__name__}: {first} (a bug in dqnc: re-run with "
                         "--debug for the traceback and report it)", markup=True, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    if not own_quiet:
        quiet = _inspect.Parameter("quiet", _inspect.Parameter.KEYWORD_ONLY, default=False,
                                   annotation=Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")])
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), quiet])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


_SCALARS = (int, float, bool, str)


def _option_type(annotation: Any) -> tuple[type, bool]:
    """The CLI type of a config field, and whether its text is YAML (lists, mappings)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _SCALARS:
        return annotation, False
    if typing.get_origin(annotation) is typing.Literal:
        return (int if all(type(a) is int for a in typing.get_args(annotation)) else str), False
    if len(args) == 1 and args[0] in _SCALARS:  # X | None
        return args[0], False
    return str, True


def _config_options(*classes: Any) -> Callable[[F], F]:
    """Give a command a ``--flag`` for every field of its stage config(s) that it does not declare
    itself, so a new config option reaches the CLI without being written twice. The values given
    reach the command through :func:`_config_extra`; pydantic validates them with the rest."""
    import inspect as _inspect

    def deco(fn: F) -> F:
        sig = _inspect.signature(fn, eval_str=True)
        declared = {d for p in sig.parameters.values() for meta in getattr(p.annotation, "__metadata__", ())
                    for d in (getattr(meta, "param_decls", None) or ()) + (getattr(meta, "default", None),)
                    if isinstance(d, str) and d.startswith("-")}  # Annotated options: the first decl is `default`
        added: dict[str, tuple[Any, bool]] = {}
        for cls in classes:
            for name, field in cls.model_fields.items():
                if (name in sig.parameters or name in added or name in ("gates", "env")
                        or f"--{name.replace('_', '-')}" in declared):  # declared by the command itself
                    continue
                typ, yaml_text = _option_type(field.annotation)
                help_ = (field.description or name.replace("_", " ")) + (" (YAML, e.g. [16, 16])" if yaml_text else "")
                flag = f"--{name.replace('_', '-')}"
                decl = (f"{flag}/--no-{name.replace('_', '-')}",) if typ is bool else (flag,)
                added[name] = (_inspect.Parameter(
                    name, _inspect.Parameter.KEYWORD_ONLY, default=None,
                    annotation=Annotated[Optional[typ], typer.Option(*decl, help=help_, show_default=False,
                                                                     rich_help_panel="More options")]), yaml_text)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extra = {}
            for name, (_, yaml_text) in added.items():
                value = kwargs.pop(name, None)
                if value is not None:
                    extra[name] = _parse_yaml_option(name, value) if yaml_text else value
            _ui["config_extra"] = extra
            return fn(*args, **kwargs)

        params = list(sig.parameters.values()) + [p for p, _ in added.values()]
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


def _parse_yaml_option(name: str, text: str) -> Any:
    import yaml

    from dqnc.errors import UsageError

    from dqnc import yamlio
    from dqnc.errors import ConfigError
    from dqnc.limits import clip

    try:
        return yamlio.load(text)
    except ConfigError as e:
        raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
    except yaml.YAMLError:
        raise UsageError(f"--{name.replace('_', '-')}: {clip(text)!r} is not valid YAML: pass e.g. '[16, 16]'") from None


def _config_extra() -> dict[str, Any]:
    """Config options given through the flags that :func:`_config_options` added."""
    return dict(_ui.get("config_extra") or {})


# Options shared by several commands, written once.
EnvOption = Annotated[Optional[str], typer.Option("--env", "-e", help="Env id, for a model without a dqnc manifest.")]
EnvKwargsOption = Annotated[Optional[str], typer.Option(help="Env kwargs as JSON, with --env.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output artifact.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dqnc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (also DQNC_DEBUG=1).")] = False,
) -> None:
    """dqnc: train -> prune -> quantize -> export -> eval, one artifact per stage."""
    if debug:
        _debug["on"] = True


def _emit_json(obj: Any) -> None:
    from dqnc.artifact import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _parse_hidden(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        widths = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of widths: use e.g. 64,64") from None
    if not widths:
        raise typer.BadParameter("give at least one width, e.g. 64,64")
    return widths


# --- train -------------------------------------------------------------------------------------

@app.command()
@_guard
@_config_options(_cfg.TrainConfig)
def train(
    env: Annotated[Optional[str], typer.Option("--env", "-e", help="gymnasium env id, or 'module:Env-v0'.")] = None,
    env_kwargs: Annotated[Optional[str], typer.Option(help="Env kwargs as JSON, e.g. '{\"continuous\": false}'.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output artifact directory [default: runs/ENV-seedSEED].")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of training options (flags override it).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; a run is reproducible on CPU for a given seed. [default: 0]")] = None,
    total_steps: Annotated[Optional[int], typer.Option(help="Env steps to train for (per-env default).")] = None,
    num_envs: Annotated[Optional[int], typer.Option(help="Vectorized envs stepped together.")] = None,
    hidden: Annotated[Optional[str], typer.Option(help="Hidden layer widths, e.g. 64,64.")] = None,
    dueling: Annotated[Optional[bool], typer.Option("--dueling/--no-dueling", help="Dueling head (folded into a plain MLP on save).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size.")] = None,
    buffer_size: Annotated[Optional[int], typer.Option(help="Replay buffer capacity.")] = None,
    learning_starts: Annotated[Optional[int], typer.Option(help="Random-action steps before training starts.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Discount factor.")] = None,
    train_freq: Annotated[Optional[int], typer.Option(help="Env steps between training calls.")] = None,
    gradient_steps: Annotated[Optional[int], typer.Option(help="Gradient steps per training call.")] = None,
    target_update_interval: Annotated[Optional[int], typer.Option(help="Gradient steps between target-network updates.")] = None,
    tau: Annotated[Optional[float], typer.Option(help="Target update: 1 = hard copy, <1 = Polyak.")] = None,
    eps_end: Annotated[Optional[float], typer.Option(help="Final exploration epsilon.")] = None,
    eps_fraction: Annotated[Optional[float], typer.Option(help="Share of the run over which epsilon decays.")] = None,
    eval_freq: Annotated[Optional[int], typer.Option(help="Env steps between greedy evaluations.")] = None,
    eval_episodes: Annotated[Optional[int], typer.Option(help="Episodes per greedy evaluation.")] = None,
    confirm_episodes: Annotated[Optional[int], typer.Option(help="Episodes (a second, disjoint seed range) that confirm a new best evaluation before its weights are kept or training stops (0 = off).")] = None,
    early_stop: Annotated[Optional[bool], typer.Option("--early-stop/--no-early-stop", help="Stop once every episode of an evaluation and its confirmation reaches the env's reward threshold.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint an interrupted run left at OUT.ckpt.")] = False,
    logdir: Annotated[Optional[Path], typer.Option(help="Write TensorBoard scalars here.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output artifact.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
) -> None:
    """Train a DQN policy on ENV and save it as an fp32 SavedModel artifact."""
    from dqnc.config import build_train_config, load_yaml_mapping

    file_values = load_yaml_mapping(config) if config is not None else {}
    overrides = dict(
        seed=seed, total_steps=total_steps, num_envs=num_envs, hidden=_parse_hidden(hidden), dueling=dueling, lr=lr,
        batch_size=batch_size, buffer_size=buffer_size, learning_starts=learning_starts, gamma=gamma,
        train_freq=train_freq, gradient_steps=gradient_steps, target_update_interval=target_update_interval,
        tau=tau, eps_end=eps_end, eps_fraction=eps_fraction, eval_freq=eval_freq, eval_episodes=eval_episodes,
        confirm_episodes=confirm_episodes, early_stop=early_stop, env=env,
        env_kwargs=_parse_env_kwargs(env_kwargs), **_config_extra(),
    )
    cfg = build_train_config(env, file_values, overrides, source=str(config) if config else "options")
    out = out if out is not None else Path("runs") / f"{cfg.env.replace(':', '_').replace('/', '_')}-seed{cfg.seed}"
    from dqnc import train as train_stage

    with _progress_bar(quiet, f"train {cfg.env}") as on_progress:
        result = train_stage.run(cfg, out, force=force, checkpoint_dir=out.with_name(out.name + ".ckpt"),
                                 resume=resume, logdir=logdir, progress=on_progress, command=_argv())
    m = result.manifest["metrics"]
    if as_json:
        _emit_json({"path": str(result.path), "env": cfg.env, "seed": cfg.seed, "metrics": m})
        return
    stdout.print(
        f"trained {cfg.env} (seed {cfg.seed}): {m['env_steps']:,} steps in {m['train_seconds']:.1f} s "
        f"({m['steps_per_second']:,.0f} steps/s); best greedy eval {m['best_eval_mean_return']:.1f} "
        f"over {m['eval_episodes']} episodes{' (stopped early: threshold reached)' if m['stopped_early'] else ''}"
    )
    stdout.print(f"saved {result.path}")


def _argv() -> list[str]:
    return ["dqnc", *sys.argv[1:]]


class _progress_bar:
    """A Rich progress bar on stderr; silent when stderr is not a terminal or with --quiet."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.enabled = not quiet and not _ui["quiet"] and stderr.is_terminal
        self.label = label
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Callable[[Any], None] | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=stderr, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=None, info="")
        return self.update

    def update(self, p: Any) -> None:
        info = f"ep {p.episodes}"
        if p.eval_mean is not None:
            info += f" | eval {p.eval_mean:.1f} (best {p.best_mean:.1f})"
        info += f" | eps {p.epsilon:.2f}"
        self.bar.update(self.task, completed=p.step, total=p.total, info=info)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --- prune / quantize / export ------------------------------------------------------------

def _default_out(source: Path, suffix: str) -> Path:
    base = source.name if source.name not in ("", ".", "model") else source.resolve().parent.name
    return source.resolve().parent / f"{base}-{suffix}"


def _parse_layer_sparsity(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not NAME=SPARSITY, e.g. dense_1=0.9") from None
    return out


@app.command()
@_guard
@_config_options(_cfg.PruneConfig)
def prune(
    path: Annotated[Path, typer.Argument(help="SavedModel artifact (or Keras SavedModel with --env) to prune.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output artifact [default: PATH-prunedNN].")] = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    sparsity: Annotated[float, typer.Option(help="Target sparsity of the pruned kernels, in [0, 1).")] = 0.8,
    schedule: Annotated[str, typer.Option(help="polynomial (masks tighten gradually) or constant.")] = "polynomial",
    distribution: Annotated[str, typer.Option(help="uniform, or erk (small layers stay denser).")] = "uniform",
    finetune: Annotated[str, typer.Option(help="distill (default), rl (DQN in the env) or none (one-shot).")] = "distill",
    keep_dense: Annotated[Optional[list[str]], typer.Option(help="Layer to leave dense, by name or first/last (repeatable) [default: first and last].")] = None,
    layer_sparsity: Annotated[Optional[list[str]], typer.Option(help="Per-layer target, NAME=SPARSITY (repeatable).")] = None,
    states: Annotated[int, typer.Option(min=64, help="Rollout states to distill on.")] = 20_000,
    epochs: Annotated[int, typer.Option(min=1, help="Distillation epochs.")] = 100,
    dagger_rounds: Annotated[int, typer.Option(min=0, max=10, help="Extra rounds on states the student visits.")] = 6,
    distill_loss: Annotated[str, typer.Option(help="policy (softmax cross-entropy) or hinge (teacher's action leads by a margin).")] = "policy",
    temperature: Annotated[float, typer.Option(min=1e-6, help="Teacher softmax temperature (advantage-spread units).")] = 0.01,
    score_gain: Annotated[float, typer.Option(min=1.0, help="How much steeper the student's scores are near ties (int8 robustness).")] = 20.0,
    rl_steps: Annotated[int, typer.Option(min=1000, help="Env steps of RL fine-tuning (--finetune rl).")] = 20_000,
    structure: Annotated[str, typer.Option(help="weights (zero single weights, same shape), units (remove whole hidden units: a narrower dense network; --sparsity = share of units removed) or 2by4 (two zeros in every four consecutive input weights, 50%).")] = "weights",
    importance: Annotated[str, typer.Option(help="--structure units: taylor (first-order loss change, Molchanov et al. 2017) or magnitude.")] = "taylor",
    unit_rounds: Annotated[int, typer.Option(min=1, max=20, help="--structure units: removal rounds, each fine-tuned by distillation.")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Magnitude-prune a policy (TFMOT) while fine-tuning it to act like its parent."""
    from dqnc import sources
    from dqnc.config import PruneConfig, validate
    from dqnc.prune import run as run_prune

    values: dict[str, Any] = dict(sparsity=sparsity, schedule=schedule, distribution=distribution, finetune=finetune,
                                  layer_sparsity=_parse_layer_sparsity(layer_sparsity), states=states, epochs=epochs,
                                  dagger_rounds=dagger_rounds, distill_loss=distill_loss, temperature=temperature,
                                  score_gain=score_gain,
                                  rl_steps=rl_steps, structure=structure, importance=importance,
                                  unit_rounds=unit_rounds, seed=seed)
    if keep_dense is not None:
        values["keep_dense"] = tuple(keep_dense)
    cfg = validate(PruneConfig, {**values, **_config_extra()}, "options")
    source = sources.load(path, env=_env_arg(env, env_kwargs))
    if structure == "2by4":
        sparsity = 0.5
    out = out or _default_out(path, {"units": f"units{round(100 * sparsity)}", "2by4": "pruned2by4"}.get(
        structure, f"pruned{round(100 * sparsity)}"))
    with _spinner(f"pruning to {'2:4' if structure == '2by4' else f'{100 * sparsity:.0f}%'} ({finetune})", as_json):
        result = run_prune(cfg, source, out, force=force, command=_argv())
    m = result.manifest["metrics"]
    if as_json:
        _emit_json({"path": str(result.path), "metrics": m})
        return
    table = Table("layer", "shape", "target", "sparsity")
    for layer in m["layers"]:
        table.add_row(layer["name"], str(tuple(layer["shape"])), f"{100 * layer['target']:.1f}%", f"{100 * layer['sparsity']:.2f}%")
    stdout.print(table)
    c = m["check"]
    if m.get("structure") == "units":
        stdout.print(f"hidden widths {m['widths_before']} -> {m['widths_after']} ({m['importance']} importance): "
                     f"{m['params_before']:,} -> {m['params']:,} parameters; greedy agreement with the parent on "
                     f"{c['states']:,} held-out states {100 * c['agreement']:.1f}% (decisive states "
                     f"{100 * c['decisive_agreement']:.1f}%)")
        stdout.print(f"saved {result.path}")
        return
    if m.get("pattern"):
        stdout.print(f"pattern {m['pattern']} holds in every pruned layer")
    stdout.print(f"overall sparsity {100 * m['sparsity']:.1f}% (pruned layers {100 * m['prunable_sparsity']:.1f}%); "
                 f"against the parent on {c['states']:,} held-out states: {fidelity_line(c)}")
    stdout.print(f"saved {result.path}")


def fidelity_line(c: dict[str, Any]) -> str:
    """One line of dqnc.fidelity's vocabulary, every count shown."""
    return (f"regret {c['regret']:.4f} (p99 {c['regret_p99']:.3f}) of the action spread; agreement "
            f"{100 * c['agreement']:.2f}% of {c['states']:,}; decisive {100 * c['decisive_agreement']:.2f}% of "
            f"{c['decisive_states']:,} ({100 * c['decisive_share']:.1f}% of states)")


@app.command()
@_guard
@_config_options(_cfg.QuantizeConfig)
def quantize(
    path: Annotated[Path, typer.Argument(help="SavedModel artifact to convert.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output artifact [default: PATH-MODE].")] = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    mode: Annotated[str, typer.Option(help="int8 (full integer), int16x8, float16, dynamic or fp32.")] = "int8",
    float_io: Annotated[bool, typer.Option("--float-io", help="Keep float32 input/output (int8/int16x8 inside).")] = False,
    target: Annotated[str, typer.Option(help="mcu (TFLite Micro too: dense encoding) or linux (sparse encoding allowed).")] = "mcu",
    sparse_encoding: Annotated[str, typer.Option(help="auto (dense for mcu; sparse for linux when >=30% zeros and the file is smaller), on (linux only) or off.")] = "auto",
    output_range: Annotated[str, typer.Option(help="ranking (int8 output narrowed so near-tied actions stay apart) or full.")] = "ranking",
    calibration_states: Annotated[int, typer.Option(min=16, help="Rollout states to calibrate on.")] = 2000,
    check_states: Annotated[int, typer.Option(min=16, help="Held-out states the result is checked on.")] = 2000,
    max_regret: Annotated[float, typer.Option(min=0, help="Refuse (exit 1) above this mean regret on the check states (fraction of the parent's action spread).")] = 0.05,
    max_return_drop: Annotated[float, typer.Option(min=0, help="Refuse (exit 1) a significant return drop above this fraction over the check episodes.")] = 0.05,
    check_episodes: Annotated[int, typer.Option(min=0, help="Closed-loop check episodes, paired with the parent's (0 = off).")] = 20,
    min_agreement: Annotated[Optional[float], typer.Option(min=0, max=1, help="Also refuse below this greedy agreement on all check states.")] = None,
    min_decisive_agreement: Annotated[Optional[float], typer.Option(min=0, max=1, help="Also refuse below this agreement on decisive states.")] = None,
    max_q_rel_error: Annotated[Optional[float], typer.Option(min=0, help="Also refuse above this p99 Q error (fraction of the Q range).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=999, help="Seed of the calibration, selection and check rollouts.")] = 0,
    strip_strings: Annotated[bool, typer.Option("--strip-strings/--keep-strings", help="Drop tensor names and signatures from the .tflite (smaller; runtimes address tensors by index).")] = True,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a policy to TFLite (int8 by default), calibrated on its own rollouts and checked against it."""
    from dqnc import sources
    from dqnc.config import QuantizeConfig, validate
    from dqnc.quantize import run as run_quantize

    cfg = validate(QuantizeConfig, dict(mode=mode, float_io=float_io, target=target, sparse_encoding=sparse_encoding,
                                        output_range=output_range, calibration_states=calibration_states,
                                        check_states=check_states, seed=seed, max_regret=max_regret,
                                        max_return_drop=max_return_drop, check_episodes=check_episodes,
                                        min_agreement=min_agreement, min_decisive_agreement=min_decisive_agreement,
                                        max_q_rel_error=max_q_rel_error, strip_strings=strip_strings,
                                        **_config_extra()), "options")
    source = sources.load(path, env=_env_arg(env, env_kwargs))
    out = out or _default_out(path, mode)
    with _spinner(f"quantizing ({mode})", as_json):
        result = run_quantize(cfg, source, out, force=force, command=_argv())
    m, qz = result.manifest["metrics"], result.manifest["quantization"]
    if as_json:
        _emit_json({"path": str(result.path), "metrics": m, "quantization": qz})
        return
    c = m["check"]
    stdout.print(f"{mode}: {m['size_bytes']:,} bytes; input {qz['input']['dtype']} (scale {qz['input']['scale']:.4g}, "
                 f"zero point {qz['input']['zero_point']}), output {qz['output']['dtype']}; encoding {m['sparsity_encoding']}")
    stdout.print(f"checked on {c['states']:,} held-out states: {fidelity_line(c)}")
    if "check_episodes" in c:
        stdout.print(f"closed loop, {c['check_episodes']} check episodes: mean return {c['mean_return']:.2f} vs parent "
                     f"{c['parent_mean_return']:.2f} (drop {c['return_drop']:+.2f}, 95% CI "
                     f"{c['return_drop_ci95'][0]:+.2f}..{c['return_drop_ci95'][1]:+.2f})")
    if m.get("weight_bits"):
        wb = m["weight_bits"]
        stdout.print(f"{wb['weight_bits']}-bit weights: {wb['clusters']} clusters per Dense kernel, distinct int8 values per "
                     f"layer {wb['distinct_int8_weights']}; fine-tuned {wb['finetune_steps']:,} steps on {wb['finetune_states']:,} states")
    if "saturated_share" in c:
        stdout.print(f"int8 rewrite: {m['equalization_sweeps']} equalization sweep(s), output range x{m['output_range_factor']:g} "
                     f"of the calibrated one ({100 * c['saturated_share']:.1f}% of checked states saturate)")
    for note in m.get("notes", []):
        stdout.print(f"note: {note}")
    stdout.print(f"saved {result.path}")


@app.command()
@_guard
@_config_options(_cfg.ExportConfig)
def export(
    path: Annotated[Path, typer.Argument(help="Artifact to bundle (.tflite artifact, or SavedModel -> fp32 TFLite).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle directory [default: PATH-bundle].")] = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    target: Annotated[str, typer.Option(help="mcu (verified on TensorFlow Lite Micro; C deliverables) or linux (LiteRT/tflite-runtime only).")] = "mcu",
    check_states: Annotated[int, typer.Option(min=1, help="Held-out states run through TFLM and LiteRT (target mcu).")] = 10_000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the verification rollouts.")] = 0,
    c_name: Annotated[str, typer.Option(help="Name of the C array in model_data.cc.")] = "g_dqnc_model",
    verify_mcu: Annotated[bool, typer.Option("--verify-mcu", help="Also build policy.c for a Cortex-M4 and run it on QEMU (needs arm-none-eabi-gcc, qemu-system-arm).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
) -> None:
    """Write the edge bundle: model.tflite, C array, manifest, SHA256SUMS and a TF-free runner (+ TFLM/C files for mcu)."""
    from dqnc import sources
    from dqnc.config import ExportConfig, validate
    from dqnc.export import run as run_export

    cfg = validate(ExportConfig, {"c_name": c_name, "target": target, "check_states": check_states, "seed": seed,
                                  **_config_extra()}, "options")
    source = sources.load(path, env=_env_arg(env, env_kwargs))
    out = out or _default_out(path, "bundle")
    with _spinner(f"exporting for {target}", as_json):
        result = run_export(cfg, source, out, force=force, command=_argv())
    m = result.manifest["metrics"]
    mcu = None
    if verify_mcu:
        from dqnc import mcu as mcu_mod

        with _spinner("Cortex-M4 on QEMU", as_json):
            mcu = mcu_mod.verify_bundle(result.path)
    if as_json:
        _emit_json({"path": str(result.path), "metrics": m, "io": result.manifest["io"],
                    **({"mcu": mcu} if mcu is not None else {})})
        return
    files = sorted(p.name for p in result.path.iterdir())
    stdout.print(f"bundle {result.path} (target {m['target']}): {', '.join(files)}")
    if m["tflm_compatible"]:
        c = m["tflm_check"]
        stdout.print(f"TFLM verified: {c['actions_equal']:,} of {c['states']:,} actions equal LiteRT's "
                     f"({c.get('int_output_differences', 0):,} int outputs differ: LiteRT rounds once, TFLM twice); arena {m['tflm_arena_bytes']['total']:,} "
                     f"bytes measured ({m['tflm_arena_shipped_bytes']:,} shipped); flash {m['tflm_flash_bytes']:,} bytes; "
                     f"ops {', '.join(m['ops'])}")
        cp = m.get("c_policy") or {}
        if cp.get("written"):
            verified = (f"bit-identical to TFLM on {cp['states']:,} states" if cp.get("host_verified")
                        else f"not compiled here: {cp.get('reason')}")
            packed = f" ({cp['weight_bytes']:,} of weights as {cp['weight_bits']}-bit indices + tables)" if cp.get("weight_bits", 8) < 8 else ""
            stdout.print(f"policy.c: {cp['const_data_bytes']:,} bytes of constants{packed}, {cp['activation_ram_bytes']} bytes of "
                         f"activations; {verified}")
        elif cp:
            stdout.print(f"no policy.c: {cp.get('reason')}")
        if m.get("lut"):
            lut = m["lut"]
            stdout.print(f"{lut['file']}: {lut['bytes']:,} bytes ({lut['weight_bits']}-bit LUT compression; arena "
                         f"{lut['tflm_arena_bytes']['total']:,} bytes); runs on: "
                         + ", ".join(k for k, v in lut["runtimes"].items() if v.startswith("ran")))
    else:
        stdout.print("target linux: not for TensorFlow Lite Micro (export with --target mcu for a microcontroller)")
    if mcu is not None:
        stdout.print(f"Cortex-M4 (QEMU {mcu['board']}): {mcu['actions_equal']} of {mcu['vectors']} actions equal TFLM's, {mcu['actions_equal_litert']} LiteRT's; "
                     f"flash {mcu['flash_bytes']:,} bytes, RAM {mcu['ram_bytes']:,} bytes; "
                     f"~{mcu['instructions_per_action']:,.0f} instructions per action (QEMU -icount: a proxy, not cycles)")
    stdout.print(f"model.tflite {m['size_bytes']:,} bytes ({m['gzip_bytes']:,} gzipped); try: "
                 f"python {result.path / 'run_policy.py'} --obs {_obs_example(source.env)}")


def _obs_example(env: Any) -> str:
    # Images are hundreds of numbers: name their count and order instead of printing them.
    if env.obs_dim <= 16:
        return ",".join(["0"] * env.obs_dim)
    return f"V1,...,V{env.obs_dim} ({env.obs_dim} numbers, {env.obs_layout} order)"


# --- import ------------------------------------------------------------------------------------

@app.command("import")
@_guard
@_config_options(_cfg.ImportConfig)
def import_cmd(
    model: Annotated[Path, typer.Argument(help="Keras 3 .keras/.h5, tf_keras SavedModel/.h5, Keras 3 export() SavedModel, .onnx, SB3 DQN .zip, or CleanRL .cleanrl_model / state_dict.")],
    env: Annotated[str, typer.Option("--env", "-e", help="gymnasium env id the network acts in.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output artifact directory [default: MODEL-imported].")] = None,
    env_kwargs: Annotated[Optional[str], typer.Option(help="Env kwargs as JSON.")] = None,
    obs_norm: Annotated[Optional[Path], typer.Option("--obs-norm", help="SB3 VecNormalize .pkl: its observation statistics (and clip) are folded into the network.")] = None,
    activation: Annotated[Optional[str], typer.Option(help="Hidden activation of a bare state_dict (CleanRL records none) [default: relu].")] = None,
    check_states: Annotated[int, typer.Option(min=16, help="Rollout states the import is checked on.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the check rollouts.")] = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Import a Q-network made elsewhere as an fp32 artifact, checked against the source to 1e-5 of its Q range."""
    from dqnc.config import ImportConfig, validate
    from dqnc.importers import run as run_import

    spec = _env_arg(env, env_kwargs)
    cfg = validate(ImportConfig, dict(env=env, env_kwargs=spec.kwargs, obs_norm=str(obs_norm) if obs_norm else None,
                                      activation=activation, check_states=check_states, seed=seed,
                                      **_config_extra()), "options")
    out = out or _default_out(model, "imported")
    with _spinner(f"importing {model}", as_json):
        result = run_import(cfg, model, out, force=force, command=_argv(), spec=spec)
    m, origin = result.manifest["metrics"], result.manifest["origin"]
    if as_json:
        _emit_json({"path": str(result.path), "origin": origin, "network": result.manifest["network"], "metrics": m})
        return
    c = m["check"]
    net = result.manifest["network"]
    stdout.print(f"{origin['format']} {model} -> MLP {net['obs_dim']}-{'-'.join(map(str, net['hidden']))}-{net['n_actions']} "
                 f"({', '.join(net['activations']) or 'no hidden layers'})")
    for p in origin.get("preprocessing", []):
        stdout.print(f"preprocessing {p['kind']}: folded {p.get('folded', '')}" + (f"; clip {p['clip']}" if p.get("clip") else ""))
    stdout.print(f"checked on {c['states']:,} rollout states: max |dQ| {c['max_abs_dq']:.3g} = {c['rel_error']:.2g} of the Q range; "
                 f"greedy actions identical ({c['tied_mismatches']} exact ties)" if not c["action_mismatches"] else "")
    stdout.print(f"mean return over {m['return_episodes']} episodes: source {m['source_mean_return']:.1f}, "
                 f"imported {m['imported_mean_return']:.1f}")
    stdout.print(f"saved {result.path}")


class _spinner:
    """A status spinner on stderr for steps without a step count (quiet when not a TTY or with --json)."""

    def __init__(self, text: str, quiet: bool) -> None:
        self.status = stderr.status(text) if stderr.is_terminal and not quiet and not _ui["quiet"] else None

    def __enter__(self) -> None:
        if self.status is not None:
            self.status.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


# --- distill -----------------------------------------------------------------------------------

@app.command()
@_guard
@_config_options(_cfg.DistillConfig)
def distill(
    path: Annotated[Path, typer.Argument(help="Parent policy artifact (any stage), or a Keras SavedModel with --env.")],
    hidden: Annotated[str, typer.Option(help="Student hidden widths, e.g. 16,16; or 'auto': the narrowest of --widths meeting --max-return-drop.")] = "16,16",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output artifact [default: PATH-student-WIDTHS].")] = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    max_return_drop: Annotated[float, typer.Option(min=0, help="--hidden auto: allowed validation return drop, a fraction of the parent's (0.01 = 1%).")] = 0.01,
    widths: Annotated[str, typer.Option(help="--hidden auto: the widths to try, narrowest first.")] = "4,6,8,12,16,24,32,48,64",
    depth: Annotated[int, typer.Option(min=1, max=8, help="--hidden auto: hidden layers of the searched students.")] = 2,
    states: Annotated[int, typer.Option(min=64, help="Teacher rollout states to distill on.")] = 20_000,
    steps: Annotated[int, typer.Option(min=1, help="Minibatch steps on the teacher's states.")] = 3000,
    dagger_rounds: Annotated[int, typer.Option(min=0, max=10, help="Extra rounds on states the student visits.")] = 4,
    dagger_steps: Annotated[int, typer.Option(min=1, help="Minibatch steps per DAgger round.")] = 1500,
    seed: Annotated[int, typer.Option(min=0, max=999, help="Random seed (weights, minibatches, rollout episodes).")] = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Teach a small dense student MLP the parent's policy (policy distillation + DAgger)."""
    from dqnc import sources
    from dqnc.config import DistillConfig, validate
    from dqnc.distill import run as run_distill

    shape: Any = "auto" if hidden.strip().lower() == "auto" else _parse_hidden(hidden)
    cfg = validate(DistillConfig, dict(hidden=shape, widths=_parse_hidden(widths), depth=depth,
                                       max_return_drop=max_return_drop, states=states, steps=steps,
                                       dagger_rounds=dagger_rounds, dagger_steps=dagger_steps, seed=seed,
                                       **_config_extra()), "options")
    source = sources.load(path, env=_env_arg(env, env_kwargs))
    out = out or _default_out(path, "student-" + ("auto" if shape == "auto" else "x".join(map(str, shape))))
    log = None if as_json else (lambda msg: stderr.print(msg, highlight=False, markup=False))
    with _spinner(f"distilling ({hidden})", as_json):
        result = run_distill(cfg, source, out, force=force, command=_argv(), log=log)
    m = result.manifest["metrics"]
    if as_json:
        _emit_json({"path": str(result.path), "metrics": m})
        return
    c = m["check"]
    parent = f" ({m['parent_params'] / m['params']:.1f}x fewer than the parent's {m['parent_params']:,})" if m.get("parent_params") else ""
    stdout.print(f"student {'x'.join(map(str, m['hidden']))}: {m['params']:,} parameters{parent}; "
                 f"{m['gradient_steps']:,} steps on {m['distill_states']:,} states in {m['distill_seconds']:.1f} s")
    stdout.print(f"greedy agreement with the parent on {c['states']:,} held-out states {100 * c['agreement']:.1f}% "
                 f"(decisive states {100 * c['decisive_agreement']:.1f}%)")
    stdout.print(f"saved {result.path}")


# --- recipes -----------------------------------------------------------------------------------

recipe_app = typer.Typer(help="Validate recipes and print their JSON Schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("validate")
@_guard
def recipe_validate(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an option: STAGE.KEY=VALUE (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Check a recipe completely (schema, stage order, env ids, paths) without running anything."""
    from dqnc import recipe

    loaded = recipe.load(path, set_ or [])
    stages = [f"{s.name} ({s.stage})" for s in loaded.recipe.stages]
    if as_json:
        _emit_json({"valid": True, "path": str(path), "out_dir": str(loaded.out_dir), "stages": stages})
        return
    stdout.print(f"{path}: valid; {len(stages)} stages: {' -> '.join(stages)}; outputs in {loaded.out_dir}")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema (for editor completion and validation)."""
    from dqnc.recipe import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command("run")
@_guard
def run_cmd(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an option: STAGE.KEY=VALUE (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run every stage, cached or not.")] = False,
    force_stage: Annotated[Optional[list[str]], typer.Option("--force-stage", help="Re-run this stage even if cached (repeatable).")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Start at this stage (earlier outputs must exist).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Run a recipe: each stage cached by content hash, a report at the end, exit 1 if a gate fails."""
    from dqnc import recipe

    loaded = recipe.load(path, set_ or [])

    def log(msg: str) -> None:
        if not quiet:
            stderr.print(msg, highlight=False, markup=False)

    forced: bool | set[str] = True if force else set(force_stage or [])
    try:
        report = recipe.run(loaded, force=forced, from_stage=from_stage, until=until, log=log)
    except GateFailed as e:
        _render_report(e.result, loaded, as_json)
        raise
    _render_report(report.to_dict(), loaded, as_json)


def _render_report(d: dict[str, Any], loaded: Any, as_json: bool) -> None:
    from dqnc import recipe

    if as_json:
        _emit_json(d)
        return
    rows = [recipe.StageRow(**r) for r in d["stages"]]
    report = recipe.RunReport(d["recipe"], d["out_dir"], rows, d["failures"], d["wall_seconds"],
                              gates_checked=d.get("gates_checked", True), fp32_tflite_bytes=d.get("fp32_tflite_bytes"))
    from rich import box

    # Cells never wrap or get cut: COLUMNS is sized for an 80-column CI log (Rich's width when
    # stdout is not a terminal); a row wider than the console overflows instead of folding.
    heads = ["name"] + [c[0] for c in recipe.COLUMNS] + ["status"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False,
                  title=f"dqnc run {d['recipe']} ({d['wall_seconds']:.1f} s)", title_justify="left")
    for i, h in enumerate(heads):
        table.add_column(h, no_wrap=True, overflow="ignore", justify="left" if i in (0, 1) else "right")
    for cells in recipe.table_rows(report):
        table.add_row(*cells)
    stdout.print(table, crop=False)
    size = report.size_line()
    if size:
        stdout.print(size, soft_wrap=True)
    for passed, line in recipe.gate_lines(report):
        stdout.print(("[green]" if passed else "[red]") + line + "[/]", soft_wrap=True)
    for failure in d["failures"]:
        if "gate " not in failure:
            stdout.print(f"[red]{failure}[/]", soft_wrap=True)
    color = {"PASSED": "green", "FAILED": "red"}.get(report.verdict, "yellow")
    extra = "" if report.gates_checked else " (--until stopped early: the recipe's gates were not checked)"
    stdout.print(f"[{color}]{report.verdict}[/]{extra}; report: {loaded.out_dir / 'report.md'} and report.json",
                 soft_wrap=True)


# --- sweep -------------------------------------------------------------------------------------

@app.command("sweep")
@_guard
def sweep_cmd(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file (its optional sweep: section sets the defaults).")],
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=V1,V2,... searched over (repeatable; values "
                                                      "are YAML: student.hidden=[8,8],[16,16]).")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Repeat each combination with seeds 0..N-1 "
                                                 "on every prune/distill stage.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="A running Ray cluster (also RAY_ADDRESS) "
                                                   "[default: a local one with this machine's cores].")] = None,
    pick: Annotated[Optional[str], typer.Option("--pick", help="smallest-passing: write best.yaml, the recipe of the "
                                                "smallest trial that passes every gate (else the closest; exit 1).")] = None,
    max_parallel: Annotated[Optional[int], typer.Option("--max-parallel", min=1, help="Trials in flight at once "
                                                        "[default: the cluster's CPUs].")] = None,
    trial_timeout: Annotated[Optional[float], typer.Option("--trial-timeout", min=1, help="Stop a trial after this "
                                                           "many seconds and record it as timed out.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Sweep folder [default: the recipe's out_dir "
                                                "+ '-sweep'].")] = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Re-run trials the journal holds as errors "
                                               "or timeouts.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print sweep.json's summary as one JSON object.")] = False,
) -> None:
    """Search a recipe's compression space on Ray: one trial per combination, a journal to resume, the Pareto front."""
    from dqnc import recipe, sweep

    loaded = recipe.load(path, [])
    from dqnc.recipe.schema import Sweep

    spec = loaded.recipe.sweep or Sweep()
    space = {**spec.grid, **sweep.parse_grid(grid or [])}
    if pick not in (None, "smallest-passing"):
        raise typer.BadParameter(f"{pick!r}: the only rule is smallest-passing", param_hint="--pick")
    trials = sweep.expand(path.read_text(encoding="utf-8"), loaded.data, space, seeds or spec.seeds, spec.samples,
                          spec.sample_seed)
    sweep_dir = out if out is not None else loaded.out_dir.with_name(loaded.out_dir.name + "-sweep")
    progress = sweep.Progress(stderr, live=stderr.is_terminal, quiet=quiet)
    try:
        result = sweep.run_sweep(path, trials, sweep_dir, address=address, max_parallel=max_parallel or spec.max_parallel,
                                 trial_timeout=trial_timeout or spec.trial_timeout, retry_errors=retry_errors,
                                 on_event=progress)
    except KeyboardInterrupt:
        from dqnc.errors import Interrupted

        raise Interrupted(f"interrupted: {progress.finished} of {len(trials)} trials are in "
                          f"{sweep_dir / sweep.JOURNAL}; run the same command again to resume") from None
    finally:
        progress.stop()
    sweep.write_outputs(result, path, pick or spec.pick)
    d = result.to_dict()
    if as_json:
        _emit_json({k: v for k, v in d.items() if k != "trials"})
    else:
        from rich import box

        head, rows = sweep.table(result)
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False,
                  title=f"dqnc sweep {path} ({result.wall_seconds:.1f} s, {d['stage_runs']['cached']} stages from the "
                  "shared cache)", title_justify="left")
        for h in head:
            t.add_column(h, no_wrap=h != "overrides", overflow="fold")
        for r in rows:
            t.add_row(*r)
        stdout.print(t, crop=False)
        stdout.print(f"front (*): most return for fewest bytes; sweep.md, sweep.json, pareto.png in {sweep_dir}",
                     soft_wrap=True)
    if d["pick"] is not None:
        msg = f"best.yaml: trial {d['pick']['id']} ({' '.join(result.pick['sets'])})"
        if d["pick"]["passes"]:
            stderr.print(f"{msg}, the smallest that passes every gate: dqnc run {sweep_dir / 'best.yaml'}", soft_wrap=True)
        else:
            raise GateFailed(f"no trial passes every gate; {msg} is the closest and misses: " + "; ".join(d["pick"]["misses"]))
    elif (pick or spec.pick) and result.pick is None:
        raise GateFailed("no trial produced a measured model (every one errored): see sweep.md; nothing to pick")


# --- eval --------------------------------------------------------------------------------------

@app.command("eval")
@_guard
def eval_cmd(
    path: Annotated[Path, typer.Argument(help="Artifact directory, bundle, SavedModel or .tflite file.")],
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1, help="Greedy episodes to run.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Episode i is reset with seed SEED+i; the default starts dqnc's held-out range (no stage rolls out from it).")] = EVAL_SEED,
    reference: Annotated[Optional[Path], typer.Option("--reference", "-r", help="Parent policy: report action agreement, Q error and return drop against it.")] = None,
    latency_samples: Annotated[int, typer.Option(min=0, help="Single-observation calls timed for the latency figures (0 = skip).")] = 2000,
    runtime: Annotated[str, typer.Option(help="auto, litert, tflite-runtime, tflm (TensorFlow Lite Micro) or c (the bundle's policy.c, host-compiled).")] = "auto",
    min_return: Annotated[Optional[float], typer.Option(help="Gate: exit 1 if the mean return is below this.")] = None,
    max_return_drop: Annotated[Optional[float], typer.Option(help="Gate: exit 1 if the mean return is more than this fraction below the reference's (0.01 = 1%).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(min=0, max=1, help="Gate: exit 1 if greedy agreement with the reference over every visited state is below this (0.95 = 95%).")] = None,
    min_decisive_agreement: Annotated[Optional[float], typer.Option(min=0, max=1, help="Gate: the same on decisive states only (their count is reported).")] = None,
    max_regret: Annotated[Optional[float], typer.Option(min=0, help="Gate: exit 1 if the mean regret (fraction of the reference's action spread) exceeds this.")] = None,
    max_size_kb: Annotated[Optional[float], typer.Option(min=0, help="Gate: exit 1 if the model file is larger than this many kB (1,000 bytes).")] = None,
    max_size_kib: Annotated[Optional[float], typer.Option(min=0, help="Gate: the same in KiB (1,024 bytes).")] = None,
    max_latency_us: Annotated[Optional[float], typer.Option(min=0, help="Gate: exit 1 if the p50 latency per action exceeds this many microseconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
) -> None:
    """Run greedy episodes of a policy and report returns, agreement, size and latency (exit 1 when a gate fails)."""
    from dqnc import sources
    from dqnc.config import EvalConfig, validate
    from dqnc.evaluate import run as run_eval

    env_spec_arg = _env_arg(env, env_kwargs)
    source = sources.load(path, env=env_spec_arg)
    parent = sources.load(reference, env=env_spec_arg or source.env) if reference is not None else None
    gates = dict(min_return=min_return, max_return_drop=max_return_drop, min_agreement=min_agreement,
                 min_decisive_agreement=min_decisive_agreement, max_regret=max_regret, max_size_kb=max_size_kb,
                 max_size_kib=max_size_kib, max_latency_us=max_latency_us)
    cfg = validate(EvalConfig, dict(episodes=episodes, seed=seed, latency_samples=latency_samples, runtime=runtime,
                                    gates=gates), "options")
    try:
        result = run_eval(cfg, source, parent)
    except GateFailed as e:
        _render_eval(e.result, as_json)
        raise
    _render_eval(result, as_json)


def _parse_env_kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    from dqnc.errors import UsageError

    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--env-kwargs is not valid JSON ({e}): pass e.g. '{{\"continuous\": false}}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--env-kwargs must be a JSON object, e.g. '{\"continuous\": false}'")
    return kwargs


def _env_arg(env: str | None, env_kwargs: str | None) -> Any:
    if env is None:
        if env_kwargs is not None:
            raise typer.BadParameter("--env-kwargs needs --env")
        return None
    from dqnc.envs import env_spec, trust

    trust(env)  # named on the command line: a 'module:Env' id may be imported
    return env_spec(env, _parse_env_kwargs(env_kwargs) or {})


def _render_eval(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _emit_json(r)
        return
    table = Table(title=f"{r['path']}  ({r['stage']}, {r['kind']}, {r['env']})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("episodes", f"{r['episodes']} (seeds {r['seed']}..{r['seed'] + r['episodes'] - 1}, "
                  f"{r['seed_range']} range)")
    lo, hi = r["return_ci95"]
    table.add_row("mean return (95% CI)", f"{r['mean_return']:.2f} ({lo:.2f}..{hi:.2f})")
    table.add_row("min / max", f"{r['min_return']:.2f} / {r['max_return']:.2f}")
    table.add_row("mean length", f"{r['mean_length']:.1f}")
    if r["solved_share"] is not None:
        table.add_row(f"episodes >= {r['reward_threshold']:g}", f"{100 * r['solved_share']:.0f}%")
    ref = r.get("reference")
    if ref:
        dlo, dhi = ref["return_drop_ci95"]
        table.add_row("reference mean return", f"{ref['mean_return']:.2f}")
        table.add_row("return drop (95% CI)", f"{ref['return_drop']:+.2f} ({dlo:+.2f}..{dhi:+.2f}), "
                      f"{100 * ref['return_drop_frac']:.2f}%")
        table.add_row("regret (mean / p99)", f"{ref['regret']:.4f} / {ref['regret_p99']:.4f} of the action spread")
        table.add_row("greedy agreement", f"{100 * ref['agreement']:.2f}% of {ref['states']:,} states")
        table.add_row("  on decisive states", f"{100 * ref['decisive_agreement']:.2f}% of {ref['decisive_states']:,} "
                      f"({100 * ref['decisive_share']:.1f}%)")
        if "q_range" in ref:
            table.add_row("Q error (max / range)", f"{ref['q_max_abs_error']:.4g} / {ref['q_range']:.4g}")
    table.add_row("size", f"{r['size_bytes']:,} bytes ({r['gzip_bytes']:,} gzipped)")
    lat = r.get("latency_us")
    if lat:
        a = lat["action"]
        table.add_row(f"latency per action ({r['runtime']})", f"p50 {a['p50']:.1f} us, p99 {a['p99']:.1f} us")
        if "invoke" in lat:
            table.add_row("  interpreter invoke only", f"p50 {lat['invoke']['p50']:.1f} us, p99 {lat['invoke']['p99']:.1f} us")
    table.add_row("wall time", f"{r['eval_seconds']:.2f} s")
    for g in r["gates"]:
        table.add_row(f"gate {g['gate']} ({g['threshold']:g})", "[green]pass[/]" if g["passed"] else "[red]FAIL[/]")
    stdout.print(table)


# --- inspect -----------------------------------------------------------------------------------

@app.command()
@_guard
def inspect(
    path: Annotated[Path, typer.Argument(help="Artifact directory, SavedModel or .tflite file.")],
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Summarize an artifact: stage, env, layers, parameters, sparsity, sizes."""
    from dqnc import sources
    from dqnc.inspection import summarize

    info = summarize(sources.load(path, env=_env_arg(env, env_kwargs)))
    if as_json:
        _emit_json(info)
        return
    stdout.print(f"[bold]{info['path']}[/]  stage [bold]{info['stage']}[/], env [bold]{info['env']['id']}[/] "
                 f"(obs {tuple(info['env']['obs_shape'])}, {info['env']['n_actions']} actions)")
    if info.get("parent"):
        stdout.print(f"parent: {info['parent']['path']} ({info['parent']['stage']}, sha256 {info['parent']['sha256'][:12]})")
    stdout.print(f"outputs: {info['outputs']}" + (f"; precision {info['quantization']['mode']}"
                                                  if info.get("quantization") else ""))
    if info.get("ops") is not None:
        stdout.print(f"ops: {', '.join(info['ops'])}")
    table = Table("layer", "op", "shape", "params", "nonzero", "sparsity")
    for layer in info["layers"]:
        name = layer["name"] if len(layer["name"]) <= 24 else "…" + layer["name"][-23:]
        table.add_row(name, layer["op"], str(tuple(layer["shape"])), f"{layer['params']:,}", f"{layer['nonzero']:,}",
                      f"{100 * layer['sparsity']:.1f}%")
    table.add_row("[bold]total", "", "", f"{info['params']:,}", f"{info['nonzero']:,}", f"{100 * info['sparsity']:.1f}%")
    stdout.print(table, crop=False)
    stdout.print(f"size: {info['size_bytes']:,} bytes on disk, {info['gzip_bytes']:,} gzipped (model files); "
                 "sparsity = zero kernel weights / kernel weights")
    m = info.get("metrics") or {}
    if m.get("best_eval_mean_return") is not None:
        stdout.print(f"training: best greedy eval {m['best_eval_mean_return']:.1f} at step {m['best_eval_step']:,}; "
                     f"{m['env_steps']:,} steps in {m['train_seconds']:.1f} s")
    if info.get("command"):
        stdout.print(f"made by: {info['command']}")


@app.command()
@_guard
def version(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Print dqnc's version and the versions of the libraries it uses (for bug reports)."""
    from dqnc.artifact import library_versions

    versions = library_versions()
    if as_json:
        _emit_json(versions)
        return
    for name, v in versions.items():
        typer.echo(f"{name:32s}{v}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        _exit_interrupted()
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Exit 130 after an interrupt. Outputs are already cleaned up (atomic writes) and the message
    printed; with TensorFlow loaded, the interpreter's own shutdown can abort (SIGABRT, "PyThreadState_Get:
    the GIL is released") while TF's worker threads are still inside an interrupted op, so the
    process skips it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "tensorflow" in sys.modules:
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)
