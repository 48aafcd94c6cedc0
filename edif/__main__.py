"""`python -m edif` is the `edif` CLI (used to start children with this interpreter)."""

from edif.cli import main

main()
