"""Reference processor `upper`: upper-cases each input into its mirrored output path.

Why it exists: it is the Python twin of the built-in `pipe processor upper`, with the same params
and results, so the two can be compared and the engine's tests can run an external processor.

Params:
- `mode: "unicode"` (default): each line is decoded as UTF-8 and mapped with `str.upper()`, the
  full Unicode case mapping (`straße` -> `STRASSE`). Invalid UTF-8 is bad data: exit 65 with the
  file and the absolute byte offset of the first invalid byte.
- `mode: "ascii"`: only the ASCII letters a-z change (`bytes.upper()`); every other byte passes
  through, so any input is accepted. Byte-local, so it uses the SDK's chunked fast path.
Any other mode or param key is a usage error (exit 64).
"""

import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pipe_sdk  # noqa: E402 -- found through the sys.path entry above


def upper_unicode(line: bytes) -> bytes:
    """Full Unicode upper-casing of one UTF-8 line (raises UnicodeDecodeError on invalid UTF-8)."""
    return line.decode("utf-8").upper().encode("utf-8")


MODES = {
    "unicode": pipe_sdk.Transform(upper_unicode),
    "ascii": pipe_sdk.Transform(bytes.upper, chunked=True),
}


def setup(context: pipe_sdk.Context) -> pipe_sdk.Transform:
    """Pick the transform for the stage's params, refusing anything unknown."""
    unknown = sorted(set(context.params) - {"mode"})
    if unknown:
        raise pipe_sdk.UsageError(f"unknown param {unknown[0]!r} (known: mode)")
    mode = context.params.get("mode", "unicode")
    if not isinstance(mode, str) or mode not in MODES:
        raise pipe_sdk.UsageError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    return MODES[mode]


def main(env: Mapping[str, str] | None = None) -> int:
    return pipe_sdk.run(setup, env)


if __name__ == "__main__":
    sys.exit(main())
