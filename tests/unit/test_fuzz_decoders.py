"""Fuzzing the decoders of hostile bytes: HRL and undo logs, bundles, the NBD handshake and transmission.

Each target (``tests/support/fuzz_targets.py``) gets a valid seed mutated
(bytes flipped, ranges overwritten, cut short, bytes inserted) or plain random
bytes, arriving in random pieces: it must finish or raise an ``HvrError``,
never anything else, and never spin without asking for more data.  The
default run takes a few hundred examples per target (a few seconds in all);
the ``slow`` suite takes many more.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_targets
from hvr_common.pure.bundle_decoder import BundleDecoder, BundleDone
from hvr_common.pure.nbd_events import Phase
from hvr_common.pure.stream_decoder import NEED_DATA

QUICK = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEEP = settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("put"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
)


def mutate(seed: bytes, mutations) -> bytes:
    data = bytearray(seed)
    for kind, where, arg in mutations:
        if not data:
            break
        at = where % len(data)
        if kind == "flip":
            data[at] ^= arg
        elif kind == "put":
            data[at:at + len(arg)] = arg
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = arg
    return bytes(data)


def hostile_inputs(seed: bytes):
    mutated = st.builds(mutate, st.just(seed), st.lists(_mutation, min_size=1, max_size=6))
    return st.tuples(st.one_of(mutated, st.binary(max_size=2048)), st.lists(st.integers(0, 4096), max_size=8))


def _check(name: str, case) -> None:
    data, cuts = case
    target, _ = fuzz_targets.TARGETS[name]
    target(data, cuts)


NAMES = sorted(fuzz_targets.TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_the_seeds_are_valid_inputs(name):
    seed = fuzz_targets.TARGETS[name][1]()
    if name == "bundle":
        dec = BundleDecoder()
        dec.receive_data(seed)
        for _ in range(1000):
            ev = dec.next_event()
            assert ev is not NEED_DATA
            if isinstance(ev, BundleDone):
                break
    elif name == "nbd_handshake":
        conn = fuzz_targets._nbd(b"", seed, [])
        assert conn.phase is Phase.TRANSMISSION and conn.export == fuzz_targets.EXPORT
    elif name == "nbd_transmission":  # every request taken, up to the closing DISC
        conn = fuzz_targets._nbd(fuzz_targets.TRANSMISSION_PREFIX, seed, [])
        assert conn.phase is Phase.CLOSED
    else:
        fuzz_targets.TARGETS[name][0](seed)


def _fuzz_test(name: str, profile: settings):
    @profile
    @given(case=hostile_inputs(fuzz_targets.TARGETS[name][1]()))
    def run(case):
        _check(name, case)
    return run


@pytest.mark.parametrize("name", NAMES)
def test_hostile_bytes_end_in_an_hvr_error_or_nothing(name):
    _fuzz_test(name, QUICK)()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_hostile_bytes_deep(name):
    _fuzz_test(name, DEEP)()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_coverage_guided_fuzzing_with_atheris(name, tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed here (pip install atheris; it has no wheel "
                                          "for every platform)")
    import subprocess
    import sys
    from pathlib import Path
    runner = Path(fuzz_targets.__file__).with_name("atheris_fuzz.py")
    done = subprocess.run([sys.executable, str(runner), name, str(tmp_path / "corpus"), "-max_total_time=30",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, (crashes, done.stderr[-3000:])
