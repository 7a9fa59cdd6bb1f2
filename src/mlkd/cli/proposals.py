"""`mlkd proposals` (placeholder until implemented)."""


def register(sub) -> None:
    pass
