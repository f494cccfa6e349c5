"""``python -m nlmerge`` (and ``torchrun -m nlmerge``): the ``nlmerge`` command."""
import sys

from nlmerge.cli import main

sys.exit(main())
