"""The I/O shell of perc: the only trio code (KMF, MDD, tunnel I/O, demo, runner)."""
