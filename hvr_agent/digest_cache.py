"""The digest cache of a disk on the primary: kept in memory, saved beside the image at a clean close.

A compare (resync, verify) hashes only the chunks written since the last pass
(:mod:`hvr_common.pure.digest_cache`, invariant C7 in ``docs/resync.md``);
the initial copy hashes the chunks of the windows it reads, so the cache
exists from the first compare on.  The cache lives on the disk's intent
bitmap file (``intent.digests``), which hands it every region entering the
period.

On disk: ``<log base>.digests`` (the image's own folder for an image file),
written at a clean stop after the image stamp (temp, fsync, rename), read and
deleted at the next open: it is used only if the image stamp found the image
unchanged and the file names this VM, this disk, this geometry and this very
image.  After a crash there is no file (the open deleted it), so nothing of
before the crash is trusted.  Blocking functions run in worker threads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hvr_common.pure import digest_tree as dt
from hvr_common.pure.digest_cache import DigestCache, DigestCacheError, ImageIdentity, Pass
from hvr_common.shell.files import unlink_if_exists, write_file_durably
from hvr_common.shell.logs import event
from hvr_agent.image_stamp import identity
from hvr_agent.tracker import TrackedDisk

log = logging.getLogger("hvr.agent.digest_cache")


def cache_path(log_base: Path) -> Path:
    return log_base.with_name(log_base.name + ".digests")


def _identity(image: Path) -> ImageIdentity:
    return ImageIdentity(**identity(image))


def attach(disk: TrackedDisk, unchanged: bool) -> None:
    """At open, before anything marks the bitmap: give the disk its cache, loaded from the file a clean close
    left if it holds (``unchanged``: the image stamp found no change), else empty; the file is deleted either
    way (blocking)."""
    geometry = dt.Geometry(disk.size)
    cache = DigestCache(geometry, disk.intent.region_bytes)
    path = cache_path(disk.log_base)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = None
    if raw is not None:
        unlink_if_exists(path)
        why = None if unchanged else "the image changed while the agent was not serving it"
        if why is None:
            try:
                cache = DigestCache.decode(raw, geometry, disk.intent.region_bytes, disk.identity.vm_id,
                                           disk.identity.disk_id, _identity(disk.image_path))
            except (DigestCacheError, OSError) as exc:
                why = str(exc)
        if why is None:
            event(log, "digest_cache_loaded", vm=disk.identity.vm, disk=disk.identity.disk,
                  fresh_bytes=cache.fresh_bytes(), bytes=disk.size)
        else:
            event(log, "digest_cache_ignored", logging.WARNING, vm=disk.identity.vm, disk=disk.identity.disk,
                  reason=why)
    disk.intent.digests = cache


def save(disk: TrackedDisk) -> None:
    """After a clean close (the image flushed, closed and stamped): write the cache beside it (blocking)."""
    cache = disk.intent.digests
    if cache is None or disk.untrusted or not any(cache.known):
        return
    data = cache.encode(disk.identity.vm_id, disk.identity.disk_id, _identity(disk.image_path))
    write_file_durably(cache_path(disk.log_base), data)


def remove(log_base: Path) -> None:
    unlink_if_exists(cache_path(log_base))


def begin_pass(disk: TrackedDisk, reuse: bool = True) -> Pass | None:
    """A pass over the disk starting now (None: the disk has no cache).  A disk whose log may not describe
    its image (a failed write not read back) trusts nothing cached."""
    cache = disk.intent.digests
    if cache is None:
        return None
    if disk.untrusted:
        cache.forget()
    return cache.begin(disk.intent.period, reuse=reuse)


def end_pass(disk: TrackedDisk, p: Pass | None, completed: bool) -> None:
    """The pass ended: its digests become the cache if it completed (and nothing made them doubtful)."""
    cache = disk.intent.digests
    if cache is None or p is None:
        return
    if completed and not disk.untrusted:
        cache.finish(p)
    else:
        cache.end(p)
