"""``python -m perc``."""

from perc.cli import main

main()
