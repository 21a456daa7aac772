"""Launcher: ``python perc.py kmf ...`` runs the same CLI as the ``perc`` console script."""

from perc.cli import main

if __name__ == "__main__":
    main()
