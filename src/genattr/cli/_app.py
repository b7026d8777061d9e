"""The `genattr` application: option parsing shared by every command, one-line errors, the
library's log on the console, the batch allocator setting."""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from genattr.atomic import DISK_ERRNOS
from genattr.errors import GenattrError, check_count, missing_extra


class _ListOptionsCommand(TyperCommand):
    """Options that take several values take them one way everywhere: `--ks 5 10 100` and
    `--ks 5 --ks 10 --ks 100` alike. Values after such an option, up to the next option, are
    rewritten to repeated options before click parses them. Commands with positional
    arguments keep the repeated form only, so no positional argument is swallowed."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # typer ships its own copy of click: tell parameters apart by their type name
        if any(p.param_type_name == "argument" for p in self.params):
            return super().parse_args(ctx, args)
        lists = {
            name
            for p in self.params
            if p.param_type_name == "option" and getattr(p, "multiple", False)
            for name in p.opts
        }
        out: list[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            out.append(token)
            i += 1
            if token not in lists:
                continue
            if i < len(args):  # the option's first value, whatever it looks like
                out.append(args[i])
                i += 1
            while i < len(args) and not args[i].startswith("-"):
                out += [token, args[i]]
                i += 1
        return super().parse_args(ctx, out)


class _Typer(typer.Typer):
    """typer.Typer whose commands accept several values after a list option."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _ListOptionsCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    help="Data attribution for text-to-image models: which training images made this image?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class _ConsoleLog(logging.Handler):
    """The library's `logging` messages (INFO and up) on stderr, as plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(self.format(record), highlight=False, soft_wrap=True, markup=False)


def _console_logging() -> None:
    root = logging.getLogger("genattr")
    if not any(isinstance(h, _ConsoleLog) for h in root.handlers):
        root.addHandler(_ConsoleLog())
        root.setLevel(logging.INFO)


# the environment's refusals, not genattr's bugs: said in one line like bad input
_ENVIRONMENT_ERRNOS = {*DISK_ERRNOS, errno.EROFS, errno.EACCES, errno.EPERM}
_debug = {"on": False}


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Data attribution for text-to-image models: which training images made this image?"""
    _debug["on"] = debug or os.environ.get("GENATTR_DEBUG", "") not in ("", "0")


def _friendly_errors(fn):
    """GenattrError (bad input) and a full disk or read-only folder -> one line on stderr and
    exit code 2. Anything else is a bug in genattr: one line saying so and exit code 1, the
    traceback with --debug. The library's log messages go to the console meanwhile."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _console_logging()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except GenattrError as e:
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except Exception as e:
            if _debug["on"]:
                raise
            extra = missing_extra(e) if isinstance(e, ImportError) else None
            if extra is not None:
                err_console.print(
                    f"[bold red]error:[/] {escape(extra)}", highlight=False, soft_wrap=True
                )
                raise typer.Exit(2) from None
            if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
                where = f"{e.filename}: " if e.filename else ""
                err_console.print(
                    f"[bold red]error:[/] {escape(where + str(e.strerror))}",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
            first = str(e).splitlines()[0] if str(e) else ""
            err_console.print(
                f"[bold red]internal error[/] (a bug in genattr, please report it): "
                f"{type(e).__name__}: {escape(first)}\nrerun with --debug for the traceback",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _batch_work(fn):
    """A batch command: the C allocator keeps freed memory for the next batch instead of
    mapping and faulting it in again (`genattr.alloc`). Not for `serve`, whose memory must
    go back after a burst."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from genattr.alloc import tune_for_batch_work

        tune_for_batch_work()
        return fn(*args, **kwargs)

    return wrapper


# the model-based methods' settings, the same options on `evaluate` and `attribute`
KernelOption = Annotated[str, typer.Option(help="gradient: cosine or trak.")]
ProjDimOption = Annotated[int, typer.Option(help="gradient: projected dimensions.")]
UnlearningStepsOption = Annotated[
    int | None, typer.Option(help="unlearning: ascent steps (default AbU-like, see docs).")
]
FlipOption = Annotated[bool, typer.Option(help="unlearning: AbU's max over a horizontal flip.")]


def _method_options(
    method: str,
    kernel: str,
    proj_dim: int,
    params: str,
    output: str,
    steps: int | None,
    flip: bool,
) -> dict[str, Any]:
    """The settings of a model-based method from the command's options (each method its own)."""
    if method == "unlearning":
        return {"params": params, "flip": flip, **({"steps": steps} if steps is not None else {})}
    return {"kernel": kernel, "proj_dim": proj_dim, "params": params, "output": output}


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this command, when `--threads` is given."""
    import torch

    if threads is not None:
        check_count(threads, "--threads", minimum=1)
        torch.set_num_threads(threads)


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, soft_wrap=True)
