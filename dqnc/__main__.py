from dqnc.cli import main

main()
