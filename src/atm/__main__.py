from atm.cli import main

main()
