from fuckbase.cli import main

main()
