"""Coverage-guided fuzzing of one target of :mod:`fuzz_targets` with atheris (when it is installed).

Run as ``python tests/support/atheris_fuzz.py TARGET CORPUS_DIR [libFuzzer flags]``,
e.g. ``-max_total_time=60``.  The corpus folder starts with the target's seed;
libFuzzer adds what it finds there.  The input's first byte picks how it is cut
into pieces, so arrival in pieces is fuzzed too.  A crash is any exception
other than an ``HvrError``; libFuzzer then exits non-zero and writes the input
to ``crash-*``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

import atheris  # noqa: E402

with atheris.instrument_imports():
    import fuzz_targets  # noqa: E402


def main() -> None:
    name, corpus = sys.argv[1], Path(sys.argv[2])
    target, seed = fuzz_targets.TARGETS[name]
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "seed").write_bytes(bytes([0]) + seed())

    def one_input(data: bytes) -> None:
        if not data:
            return
        step = data[0] or len(data)
        target(data[1:], list(range(step, len(data), step)))

    atheris.Setup([sys.argv[0], *sys.argv[3:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
