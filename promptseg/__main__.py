"""``python -m promptseg`` (and ``torchrun ... -m promptseg train cam ...``)."""

from .cli import main

main()
