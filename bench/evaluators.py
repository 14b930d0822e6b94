"""Evaluators for the watch benchmarks: as cheap as possible, so the figures measure Assayer."""


def noop(path: str) -> dict[str, int]:
    return {}
