from topology.cli import main

main()
