"""Entry point of the traffic manager image."""

from telepresence.manager.process import main

main()
