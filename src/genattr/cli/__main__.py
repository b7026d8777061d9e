"""`python -m genattr.cli`."""

from genattr.cli import app

app()
