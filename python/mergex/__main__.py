"""``python -m mergex`` runs the CLI."""

from .cli import main

main()
