"""`python -m tritium.cli`: the `tritium` command."""

from tritium.cli import main

main()
