"""``python -m prefixgen`` (and ``torchrun -m prefixgen``) runs the CLI."""

from prefixgen.cli import main

main()
