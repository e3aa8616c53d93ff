from shiplane.cli import main

main()
