"""``hvrctl vm enable/get/measure/...`` and ``hvrctl initial ...``: replication on the primary."""


def register(sub, common) -> None:
    """Filled in with the agent-side replication commands."""
