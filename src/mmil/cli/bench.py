"""(to be written)"""


def add_commands(subparsers) -> None:
    pass
