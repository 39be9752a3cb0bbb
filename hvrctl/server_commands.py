"""``hvrctl server ...`` and ``hvrctl key ...``: the replica server and token keys."""


def register(sub, common) -> None:
    """Filled in with the listener-side commands."""
