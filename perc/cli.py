"""The ``perc`` command line: one click group, one subcommand per role. No protocol logic."""

from __future__ import annotations

import click

from perc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="perc")
def main() -> None:
    """Privacy Enhanced RTP Conferencing: kmf | mdd | endpoint | demo | identity."""
