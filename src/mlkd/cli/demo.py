"""`mlkd demo` (placeholder until implemented)."""


def register(sub) -> None:
    pass
