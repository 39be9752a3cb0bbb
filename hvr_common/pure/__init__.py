"""The pure core shared by both daemons: codecs, protocol state machines, rules, schemas.

Every module in this folder takes bytes and values and returns bytes, values
or events.  None imports asyncio, aiohttp, aiofiles, socket, sqlite3,
subprocess or threading, nor anything outside this folder but the standard
library and the pure third-party libraries (zstandard, blake3):
``tests/unit/test_layering.py`` checks it.
"""
