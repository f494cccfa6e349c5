"""``python -m nlmerge`` (and ``torchrun -m nlmerge``): the ``nlmerge`` command."""
from nlmerge.cli import console

console()
