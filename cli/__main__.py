from meshnode.cli.app import main

main()
