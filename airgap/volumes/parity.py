"""Erasure coding for volume sets (zfec, Reed-Solomon): N recovery volumes rebuild any N damaged volumes.

Layout: codeword i is the i-th stripe of every data volume (a short last volume padded with zeros), and
recovery volume r holds share k+r of codeword i at the same offset. A stripe of any volume therefore
depends only on the same stripe of the others, so repair streams stripe by stripe in about k stripes of
memory, whatever the volume size. This module is the only one that imports zfec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import zfec

from airgap.errors import VolumeError

MAX_SHARES = 256  # zfec works over GF(2^8): at most 256 shares (data + recovery volumes) per codeword
MAX_STRIPE = 1 << 20
MIN_STRIPE = 4 << 10
_STRIPES_MEMORY = 64 << 20  # a decode holds k stripes in memory; keep that bounded for many small volumes
SCHEME = "zfec"


def check_share_count(data_volumes: int, recovery_volumes: int) -> None:
    if recovery_volumes < 0:
        raise VolumeError(f"recovery volumes: expected 0 or more, found {recovery_volumes}")
    if data_volumes < 1 or data_volumes + recovery_volumes > MAX_SHARES:
        raise VolumeError(
            f"too many volumes for recovery data: at most {MAX_SHARES} data and recovery volumes in all, "
            f"found {data_volumes} data + {recovery_volumes} recovery; use larger volumes")


def stripe_size_for(data_volumes: int, segment_size: int) -> int:
    """A power of two that divides the (power-of-two) segment size and keeps k stripes under a bound."""
    stripe = MAX_STRIPE
    while stripe > MIN_STRIPE and stripe * data_volumes > _STRIPES_MEMORY:
        stripe //= 2
    while stripe > segment_size:
        stripe //= 2
    return stripe


class ParityCode:
    """A (k data, n recovery) code; blocks of one codeword must all have the same length."""

    def __init__(self, data_volumes: int, recovery_volumes: int) -> None:
        check_share_count(data_volumes, recovery_volumes)
        self.data_volumes = data_volumes
        self.recovery_volumes = recovery_volumes
        shares = data_volumes + recovery_volumes
        self._encoder = zfec.Encoder(data_volumes, shares)
        self._decoder = zfec.Decoder(data_volumes, shares)
        self._recovery_numbers = tuple(range(data_volumes, shares))

    def encode(self, data_blocks: Sequence[bytes]) -> list[bytes]:
        """The recovery blocks (shares k..k+n-1) of one codeword."""
        if not self.recovery_volumes:
            return []
        self._check_lengths(data_blocks)
        return [bytes(b) for b in self._encoder.encode(tuple(data_blocks), self._recovery_numbers)]

    def decode(self, shares: Mapping[int, bytes]) -> list[bytes]:
        """The k data blocks of one codeword from any k of its shares, keyed by share number."""
        if len(shares) != self.data_volumes:
            raise VolumeError(f"rebuilding needs {self.data_volumes} intact shares, found {len(shares)}")
        numbers = tuple(sorted(shares))
        if numbers[0] < 0 or numbers[-1] >= self.data_volumes + self.recovery_volumes:
            # zfec trusts share numbers: an out-of-range one silently decodes garbage (and duplicates hang)
            raise VolumeError(f"share numbers out of range 0..{self.data_volumes + self.recovery_volumes - 1}: "
                              f"{list(numbers)}")
        blocks = tuple(shares[n] for n in numbers)
        self._check_lengths(blocks)
        try:
            return [bytes(b) for b in self._decoder.decode(blocks, numbers)]
        except (zfec.Error, ValueError) as exc:
            raise VolumeError(f"rebuilding a stripe failed: {exc}") from exc

    @staticmethod
    def _check_lengths(blocks: Sequence[bytes]) -> None:
        if len({len(b) for b in blocks}) > 1:
            raise VolumeError(f"blocks of one stripe differ in length: {sorted({len(b) for b in blocks})}")
