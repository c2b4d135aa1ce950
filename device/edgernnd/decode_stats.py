"""Counters shared by the wire-format decoders (binary and csv)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class DecoderStats:
    """What a decoder has seen since it was created.

    Every frame (binary) or non-blank line (csv) the decoder delimits is counted
    exactly once: as accepted, as rejected under one reason, or as ignored (csv
    comments). ``frames_in`` therefore equals ``accepted + sum(rejected.values())``.

    Attributes:
        accepted: Frames decoded and returned by ``feed``.
        rejected: Frames dropped, keyed by reason (for example ``'crc'``).
        ignored: Lines deliberately skipped, keyed by kind (``'comment'``); these
            are not errors and are not part of ``frames_in``.
        bytes_in: Bytes passed to ``feed``, including discarded ones.
    """

    accepted: int = 0
    rejected: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    ignored: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    bytes_in: int = 0

    @property
    def frames_in(self) -> int:
        """Frames delimited so far: accepted plus rejected for any reason."""
        return self.accepted + sum(self.rejected.values())
