"""The block layer shared by both daemons: block devices and the NBD server that serves them.

:mod:`~hvr_common.block.blockdev` defines the :class:`BlockDevice` interface
and the raw image; :mod:`~hvr_common.block.catalogue` the export catalogue a
daemon hands the server; :mod:`~hvr_common.block.nbd_server` the asyncio
shell around :mod:`hvr_common.pure.nbd_protocol`.  These modules do I/O; they
may import :mod:`hvr_common.pure` and :mod:`hvr_common.shell`, never the
daemons or the CLI (``tests/unit/test_layering.py``).
"""
