from pgfeed_cli.main import main

main()
