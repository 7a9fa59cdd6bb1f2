"""`mlkd data` (placeholder until implemented)."""


def register(sub) -> None:
    pass
