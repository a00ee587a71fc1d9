"""``python -m zimage_client``: the ``zimage`` command."""

from .cli import main

main()
