"""What both daemons share.

* :mod:`hvr_common.pure`: the sans-I/O core (formats, protocol state machines,
  rules, wire schemas), tested without sockets.
* :mod:`hvr_common.shell`: thin I/O helpers (files, SQLite, logging, sockets).
* :mod:`hvr_common.block`: the block layer (block devices, export catalogue,
  NBD server) either daemon serves disks with.
"""
