"""Gradient compression on the wire (`--compress`).

- `none`: gradients travel in their own dtype.
- `fp16`, `bf16`: cast before sending (half the bytes of fp32); servers apply in fp32.
- `topk:R` (0 < R <= 1): per slice, only the R fraction of entries largest in magnitude travel, as
  (int32 position, fp32 value) pairs, with error feedback: what was not sent is kept on the worker
  and added to the next gradient of that slice, so every gradient entry reaches the servers
  eventually (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Lin et al., "Deep Gradient
  Compression", ICLR 2018). What a push sent to a shard that did not take it (DROPPED, EVICTED,
  refused) goes back into the residual too (`restore`), so nothing is lost.

fp16's largest finite value is 65504: a slice holding a finite gradient entry beyond it travels
in bf16 instead (fp32's range in the same 2 bytes, so requests keep their size; the servers take
any float dtype per tensor), rather than as inf, which the servers would refuse.
"""

from __future__ import annotations

import math

import torch

from ps.errors import InvalidArgument

CASTS = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WIDE = torch.bfloat16  # what a slice that overflows fp16 travels in: fp32's range in the same 2 bytes
RULE = "none, fp16, bf16 or topk:R with 0 < R <= 1"


def parse(spec: str) -> tuple[str, float]:
    """("none" | "fp16" | "bf16", 0.0) or ("topk", R); InvalidArgument names the rule."""
    if spec in CASTS:
        return spec, 0.0
    kind, _, ratio = spec.partition(":")
    if kind == "topk":
        try:
            r = float(ratio)
        except ValueError:
            r = math.nan
        if 0 < r <= 1:
            return "topk", r
    raise InvalidArgument(f"compress ({spec!r}) must be {RULE}")


def check(spec: str) -> str:
    """argparse `type=` and config validation: the spec itself, if valid."""
    parse(spec)
    return spec


class Compressor:
    """Encodes one worker's gradient slices; keeps the top-k residuals between steps."""

    def __init__(self, spec: str = "none"):
        self.kind, self.ratio = parse(spec)
        self.cast = CASTS.get(self.kind)
        self.residual: dict[str, torch.Tensor] = {}
        self.sent: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the current push's (positions, values)

    @property
    def sparse(self) -> bool:
        return self.kind == "topk"

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype slices are split in before encoding (top-k accumulates in fp32)."""
        return torch.float32 if self.sparse else (self.cast or dtype)

    def wire_bytes(self, length: int, itemsize: int) -> int:
        """Bytes a slice of `length` elements takes on the wire (for batching requests)."""
        return 8 * self.keep(length) if self.sparse else length * itemsize

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """A slice (on the CPU) in the dtype it travels in: the cast, unless the cast turns a
        finite entry into inf (fp16 beyond 65504), then bf16."""
        want = self.wire_dtype(t.dtype)
        out = t.to(want)
        if want != t.dtype and want == torch.float16 and bool(torch.isinf(out).any()) and bool(torch.isfinite(t).all()):
            return t.to(WIDE)
        return out

    def keep(self, length: int) -> int:
        return min(length, max(1, math.ceil(self.ratio * length)))

    def sparsify(self, key: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 positions, fp32 values) of the largest entries of grad + residual; the rest
        becomes the new residual of `key`."""
        flat = grad.reshape(-1).to(torch.float32)
        acc = self.residual.get(key)
        acc = flat.clone() if acc is None else acc.add_(flat)
        idx = acc.abs().topk(self.keep(acc.numel()), sorted=False).indices
        values = acc[idx]
        acc[idx] = 0
        self.residual[key] = acc
        self.sent[key] = (idx, values)
        return idx.to(torch.int32), values

    def restore(self, keys) -> None:
        """The values last sent for these slice keys were not applied: owe them again."""
        for key in keys:
            if key in self.sent:
                idx, values = self.sent.pop(key)
                acc = self.residual[key].index_add_(0, idx, values)
                if not bool(torch.isfinite(acc).all()):  # a refused NaN/Inf gradient: owe nothing of it
                    acc.zero_()

    def settled(self) -> None:
        """The current push is over: what it sent stays sent."""
        self.sent.clear()
