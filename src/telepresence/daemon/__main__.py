from telepresence.daemon.main import main

main()
