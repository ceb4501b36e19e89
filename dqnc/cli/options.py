"""Every stage flag, generated from its pydantic config, and the parsers of flag text.

A config field ``foo_bar`` becomes ``--foo-bar``: its help is the field's description, its default
is shown, a ``Literal`` becomes a choice, numeric bounds are the field's ``ge``/``gt``/``le``/``lt``.
Where a flag reads differently from the field (``--hidden 64,64``, repeatable ``--keep-dense``), a
:class:`Flag` says so; nothing else about a field is written twice. A flag left out is ``None`` and
never reaches the config, so the config's default (or train's per-env default) applies.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])
MORE = "More options"
_SCALARS = (int, float, bool, str)
_LAST = ("resume", "logdir", "force", "quiet", "as_json")  # the command's own flags shown after the config's


@dataclass(frozen=True)
class Flag:
    """How one config field's flag differs from the rule (``--name``, the field's type)."""

    decls: tuple[str, ...] = ()  # e.g. ("--env", "-e"), or ("--strip-strings/--keep-strings",)
    cli_type: Any = None  # what the command line holds, when it is not the field's own type
    parse: Callable[[Any], Any] | None = None  # command-line value -> config value
    metavar: str | None = None
    required: bool | None = None  # None: required when the config requires the field


@dataclass(frozen=True)
class Bounds:
    """A number flag's parser holding the config field's bounds (tests read them back)."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __call__(self, text: Any) -> Any:
        try:
            value = text if isinstance(text, self.kind) else self.kind(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a valid {self.kind.__name__}") from None
        # Worded as pydantic words the config's own refusal (scripts match on it).
        for bound, holds, words in ((self.ge, lambda b: value >= b, "greater than or equal to"),
                                    (self.gt, lambda b: value > b, "greater than"),
                                    (self.le, lambda b: value <= b, "less than or equal to"),
                                    (self.lt, lambda b: value < b, "less than")):
            if bound is not None and not holds(bound):
                raise typer.BadParameter(f"Input should be {words} {bound} (got {text})")
        return value

    def text(self) -> str:
        """Typer's notation: x>=64, 0<=x<=1, x>0."""
        low = f"{self.ge}<=" if self.ge is not None else f"{self.gt}<" if self.gt is not None else ""
        high = f"<={self.le}" if self.le is not None else f"<{self.lt}" if self.lt is not None else ""
        if low and not high:  # x>=64 rather than 64<=x
            return "x" + (f">={self.ge}" if self.ge is not None else f">{self.gt}")
        return f"{low}x{high}"


@dataclass(frozen=True)
class Choices:
    """A Literal field's flag parser: one of its values, refused in pydantic's words."""

    values: tuple[Any, ...]

    def __call__(self, text: Any) -> Any:
        for value in self.values:
            if str(value) == str(text):
                return value
        words = [repr(v) for v in self.values]
        raise typer.BadParameter(f"Input should be {' or '.join([', '.join(words[:-1]), words[-1]] if len(words) > 1 else words)}"
                                 f" (got {text!r})")


def bounds_of(field: FieldInfo, kind: type) -> Bounds | None:
    """The field's numeric bounds as a parser, or None when it has none."""
    found = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt")
             if isinstance(m, getattr(annotated_types, name.capitalize()))}
    return Bounds(kind, **found) if found else None


def _scalar(annotation: Any) -> Any:
    """The field's type when the command line can hold it as is (a scalar or a Literal), else None."""
    if annotation in _SCALARS or typing.get_origin(annotation) is typing.Literal:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and (args[0] in _SCALARS or typing.get_origin(args[0]) is typing.Literal):
        return args[0]  # X | None
    return None


def _default_text(field: FieldInfo, flag: str, tuned: bool) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value == {}:
        return None
    if isinstance(value, bool):  # the switch in effect, as Typer shows its own bool flags
        on, _, off = flag.partition("/")
        if value:
            return on[2:]
        return off[2:] if off else "off"
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{text}, or the env's tuned value" if tuned else text


def _option(name: str, field: FieldInfo, flag: Flag, panel: str | None,
            tuned: bool) -> tuple[inspect.Parameter, Callable[[Any], Any] | None]:
    """One generated keyword parameter (``Annotated[Optional[T], typer.Option(...)]``, None when not
    given) and the parser from its command-line value to the config's."""
    dashed = "--" + name.replace("_", "-")
    kind = flag.cli_type or _scalar(field.annotation) or str
    yaml_text = flag.cli_type is None and flag.parse is None and _scalar(field.annotation) is None  # a list, a mapping
    parse = functools.partial(parse_yaml, name) if yaml_text else flag.parse
    decls = flag.decls or ((f"{dashed}/--no-{name.replace('_', '-')}",) if kind is bool else (dashed,))
    bounds = bounds_of(field, kind) if kind in (int, float) else None
    choices = Choices(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
    default = _default_text(field, decls[0], tuned)
    help_ = (field.description or name.replace("_", " ")) + (" (YAML, e.g. [16, 16])" if yaml_text else "")
    help_ = escape(help_ + (f" [default: {default}]" if default is not None else ""))
    extra: dict[str, Any] = {"parser": bounds, "metavar": f"<{kind.__name__} range> [{bounds.text()}]"} if bounds else {}
    if choices:
        kind = type(choices.values[0])
        extra = {"parser": choices, "metavar": f"<{'|'.join(map(str, choices.values))}>"}
    if flag.metavar:
        extra["metavar"] = flag.metavar
    required = field.is_required() if flag.required is None else flag.required
    option = typer.Option(*decls, help=help_, show_default=False, rich_help_panel=panel, **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[Optional[kind], option],
                             default=inspect.Parameter.empty if required else None), parse


def _fields(config: type[BaseModel]) -> list[tuple[str, FieldInfo, str | None]]:
    """(name, field, nest): a nested model's fields (EvalConfig.gates) become flags of their own."""
    out = []
    for name, field in config.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += [(n, f, name) for n, f, _ in _fields(field.annotation)]
        else:
            out.append((name, field, None))
    return out


def stage_options(config: type[BaseModel], *, main: tuple[str, ...] = (), flags: Mapping[str, Flag] | None = None,
                  tuned: frozenset[str] = frozenset()) -> Callable[[F], F]:
    """Give a command a flag for every field of ``config``; the command receives the values given
    (parsed, nested like the config) as its ``values`` argument. Fields in ``main`` are listed
    under Options, the others under More options; ``tuned`` fields have per-env defaults."""
    flags = flags or {}

    def deco(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "values"]
        made = {name: (*_option(name, field, flags.get(name, Flag()), None if name in main else MORE, name in tuned),
                       nest) for name, field, nest in _fields(config)}
        generated = sorted((p for p, _, _ in made.values()), key=lambda p: p.name not in main)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, Any] = {}
            for name, (_, parse, nest) in made.items():
                value = kwargs.pop(name, None)
                if value is None or value == ():
                    continue
                (values.setdefault(nest, {}) if nest else values)[name] = parse(value) if parse else value
            return fn(*args, values=values, **kwargs)

        # Typer passes every parameter by keyword, so the order is free: it is the order of --help.
        params = [p for p in own if p.name not in _LAST] + generated + [p for p in own if p.name in _LAST]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


# --- parsers of flag text ----------------------------------------------------------------------

def parse_yaml(name: str, text: str) -> Any:
    import yaml

    from dqnc import yamlio
    from dqnc.errors import ConfigError, UsageError
    from dqnc.limits import clip

    try:
        return yamlio.load(text)
    except ConfigError as e:
        raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
    except yaml.YAMLError:
        raise UsageError(f"--{name.replace('_', '-')}: {clip(text)!r} is not valid YAML: pass e.g. '[16, 16]'") from None


def parse_widths(text: str) -> list[int]:
    """``64,64`` (or ``64x64``) -> [64, 64]."""
    try:
        widths = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of widths: use e.g. 64,64") from None
    if not widths:
        raise typer.BadParameter("give at least one width, e.g. 64,64")
    return widths


def parse_widths_or_auto(text: str) -> Any:
    return "auto" if text.strip().lower() == "auto" else parse_widths(text)


def parse_env_kwargs(text: str | None) -> dict[str, Any] | None:
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


def parse_layer_sparsity(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not NAME=SPARSITY, e.g. dense_1=0.9") from None
    return out


def env_arg(env: str | None, env_kwargs: str | None) -> Any:
    """``--env``/``--env-kwargs`` of a command that loads a model: an EnvSpec, or None."""
    if env is None and env_kwargs is not None:
        raise typer.BadParameter("--env-kwargs needs --env")
    return env_spec_of(env, parse_env_kwargs(env_kwargs))


def env_spec_of(env: str | None, kwargs: dict[str, Any] | None) -> Any:
    if env is None:
        if kwargs is not None:
            raise typer.BadParameter("--env-kwargs needs --env")
        return None
    from dqnc.envs import env_spec, trust

    trust(env)  # named on the command line: a 'module:Env' id may be imported
    return env_spec(env, kwargs or {})


# --- the flags of stage configs that read differently from their field -------------------------

ENV = Flag(decls=("--env", "-e"))
ENV_KWARGS = Flag(cli_type=str, parse=parse_env_kwargs, metavar="JSON")
TRAIN_FLAGS = {"env": Flag(decls=("--env", "-e"), required=False), "env_kwargs": ENV_KWARGS,
               "hidden": Flag(cli_type=str, parse=parse_widths, metavar="W1,W2")}
PRUNE_FLAGS = {"keep_dense": Flag(cli_type=list[str], parse=tuple, metavar="NAME"),
               "layer_sparsity": Flag(cli_type=list[str], parse=parse_layer_sparsity, metavar="NAME=SPARSITY")}
QUANTIZE_FLAGS = {"float_io": Flag(decls=("--float-io",)), "strip_strings": Flag(decls=("--strip-strings/--keep-strings",))}
DISTILL_FLAGS = {"hidden": Flag(cli_type=str, parse=parse_widths_or_auto, metavar="W1,W2|auto"),
                 "widths": Flag(cli_type=str, parse=parse_widths, metavar="W1,W2,...")}
IMPORT_FLAGS = {"env": ENV, "env_kwargs": ENV_KWARGS, "obs_norm": Flag(cli_type=Path, parse=str)}
# eval --runtime is a plain string on purpose: EvalConfig validates it against dqnc.runtimes.names() when the
# command runs, so a runtime registered after the app was built is accepted, and a wrong name's error lists them all.

# Options that are not config fields, shared by several commands.
EnvOption = Annotated[Optional[str], typer.Option("--env", "-e", help="Env id, for a model without a dqnc manifest.")]
EnvKwargsOption = Annotated[Optional[str], typer.Option(help="Env kwargs as JSON, with --env.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output artifact.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override an option: STAGE.KEY=VALUE (repeatable).")]


def out_option(default: str, what: str = "Output artifact") -> Any:
    """``--out/-o``, its default (computed by the command) named in the help."""
    return Annotated[Optional[Path], typer.Option("--out", "-o", help=escape(f"{what} [default: {default}]."))]
