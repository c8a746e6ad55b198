"""``python -m tlbench`` = the ``tlbench`` command (also what ``torchrun -m tlbench`` runs)."""

from .cli import main_exit

main_exit()
