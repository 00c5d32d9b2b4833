from archscope.apps.cli import main

main()
