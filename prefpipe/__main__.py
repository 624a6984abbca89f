from prefpipe.cli import main

main()
