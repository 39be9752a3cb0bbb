"""The replication protocol's one definition (``docs/replication-protocol.md``).

* :mod:`.routes`: the ``/v1`` paths, header names and content types;
* :mod:`.messages`: the JSON request and answer bodies, as frozen dataclasses
  that validate themselves;
* :mod:`.error_catalogue`: every error code hvr emits, with its HTTP status,
  transient flag and exit code, and the mapping between errors and answers;
* :mod:`.status_views`: the status snapshots of the admin APIs.

Both the agent (client) and the listener (server) use these, so the two
sides cannot drift apart.  Pure: no I/O.
"""
