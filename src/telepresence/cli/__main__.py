from telepresence.cli.main import main

main()
