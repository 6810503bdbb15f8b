"""Entry point of the traffic manager image."""

from telepresence.manager.server import main

main()
