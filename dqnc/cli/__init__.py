"""The ``dqnc`` command line: parse options, build a config, call one stage, render the result.

``commands`` holds the commands, ``options`` generates every stage flag from its pydantic config,
``render`` prints, ``guard`` maps outcomes to exit codes. Nothing at import time loads TensorFlow,
so ``--help`` and config errors are instant.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dqnc import __version__
from dqnc.cli import commands, render
from dqnc.cli.helptext import Command, Group
from dqnc.cli.guard import debug, exit_interrupted, guard
from dqnc.cli.render import fidelity_line, stderr, stdout
from dqnc.errors import EXIT_INTERRUPTED

__all__ = ["app", "main", "recipe_app", "guard", "fidelity_line", "stdout", "stderr"]

app = typer.Typer(
    name="dqnc",
    cls=Group,  # --help: Rich panels on a wide terminal, plain text that cuts nothing elsewhere
    help="Train a DQN policy and compress it into an edge-deployable TFLite file.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # help texts are escaped (rich.markup.escape) where they hold brackets
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Validate recipes and print their JSON Schema.", no_args_is_help=True,
                         rich_markup_mode="rich", cls=Group)

for _name, _fn in (("train", commands.train), ("prune", commands.prune), ("quantize", commands.quantize),
                   ("export", commands.export), ("import", commands.import_cmd), ("distill", commands.distill),
                   ("run", commands.run_cmd), ("sweep", commands.sweep_cmd), ("eval", commands.eval_cmd),
                   ("inspect", commands.inspect), ("plot", commands.plot), ("schema", commands.schema),
                   ("version", commands.version)):
    app.command(_name, cls=Command)(_fn)
recipe_app.command("validate", cls=Command)(commands.recipe_validate)
recipe_app.command("schema", cls=Command)(commands.recipe_schema)
app.add_typer(recipe_app, name="recipe")


def _version(value: bool) -> None:
    if value:
        render.echo(f"dqnc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug_: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (also DQNC_DEBUG=1).")] = False,
) -> None:
    """dqnc: train -> prune -> quantize -> export -> eval, one artifact per stage."""
    if debug_:
        debug["on"] = True


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        exit_interrupted()
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:
            exit_interrupted()
        raise
