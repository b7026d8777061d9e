"""The `genattr` command. Each subcommand parses options and calls one library function; the
commands live by job in this package's modules and register on one `app`, in the order
`genattr --help` lists them."""

# isort: skip_file
from genattr.cli._app import app
from genattr.cli import evaluation  # noqa: F401 (registers its commands)
from genattr.cli import benchmarks  # noqa: F401
from genattr.cli import service  # noqa: F401
from genattr.cli import world  # noqa: F401
from genattr.cli import counterfactual  # noqa: F401

__all__ = ["app"]
