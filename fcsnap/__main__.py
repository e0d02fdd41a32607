"""`python -m fcsnap` runs the command line."""

from fcsnap.cli import main

main()
