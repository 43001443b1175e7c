"""Reference processor `copy`: copies each input byte for byte to its mirrored output path.

Why it exists: it is the Python twin of the built-in `pipe processor copy`, an example of the
smallest possible processor on top of pipe_sdk, and an external processor the engine's tests can
start as `python3 stage_copy.py`. Copying is byte-local, so it uses the SDK's chunked fast path
(1 MiB pieces, checkpoints still on line boundaries). It takes no params.
"""

import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pipe_sdk  # noqa: E402 -- found through the sys.path entry above


def same(data: bytes) -> bytes:
    """The copy transform: every piece of input is its own output."""
    return data


def setup(context: pipe_sdk.Context) -> pipe_sdk.Transform:
    """Refuse params (copy has none), so a typo in the Pipefile is not silently ignored."""
    if context.params:
        raise pipe_sdk.UsageError(f"copy takes no params, got {sorted(context.params)}")
    return pipe_sdk.Transform(same, chunked=True)


def main(env: Mapping[str, str] | None = None) -> int:
    return pipe_sdk.run(setup, env)


if __name__ == "__main__":
    sys.exit(main())
