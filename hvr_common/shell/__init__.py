"""Thin I/O helpers shared by the daemons' shells: files, sockets, SQLite, logging, processes.

They may import :mod:`hvr_common.pure`, never the daemons or the CLI.
"""
