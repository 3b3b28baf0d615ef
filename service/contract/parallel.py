"""How one worker spreads a video over the GPUs of its node: `K5_PARALLEL`, e.g. `cfg=2`, `sp=4`, `cfg=2,sp=4`.

- `cfg=2`: the conditional and the unconditional forward of each step on two GPUs (classifier-free guidance).
- `sp=N`: the visual tokens of every forward split over N GPUs (sequence parallelism, Ulysses all-to-all on the
  attention heads; `ring=R` makes R of the N a ring instead, which needs a kernel that returns its log-sum-exp).

The world size is cfg x sp: one process per GPU. Parsed here, in the shared contract, because the gateway shows a
pool's layout in /v1/models and the settings validate it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

_KEYS = ("cfg", "sp", "ring")


@dataclass(frozen=True)
class Layout:
    cfg: int = 1
    sp: int = 1
    ring: int = 1  # of the sp ranks, how many form a ring (the rest is Ulysses)

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    @property
    def ulysses(self) -> int:
        return self.sp // self.ring

    def describe(self) -> str:
        """The canonical form, as K5_PARALLEL takes it ("none" for one GPU)."""
        parts = [f"{k}={v}" for k, v in (("cfg", self.cfg), ("sp", self.sp), ("ring", self.ring)) if v > 1]
        return ",".join(parts) or "none"


def parse(text: str) -> Layout:
    """`cfg=C,sp=N[,ring=R]` (any order, each at most once); "" or "none" is one GPU. Raises ValueError naming the
    fix."""
    text = text.strip()
    if text in ("", "none", "off"):
        return Layout()
    values: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"K5_PARALLEL: {part.strip()!r} is not one of cfg=N, sp=N, ring=N (e.g. 'cfg=2,sp=4')")
        if key in values:
            raise ValueError(f"K5_PARALLEL: {key} is given twice")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"K5_PARALLEL: {key} must be a positive integer, got {value.strip()!r}")
        values[key] = int(value)
    layout = Layout(**values)
    if layout.cfg > 2:
        raise ValueError("K5_PARALLEL: cfg is 1 or 2 (a guided step has two forwards: conditional, unconditional)")
    if layout.sp % layout.ring:
        raise ValueError(f"K5_PARALLEL: ring={layout.ring} must divide sp={layout.sp}")
    if layout.world > 8:
        raise ValueError(f"K5_PARALLEL: cfg x sp = {layout.world} GPUs; one worker spans one node (at most 8)")
    return layout
