from lightning_defense.cli import main

main()
