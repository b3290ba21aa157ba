from ava.cli import main

main()
