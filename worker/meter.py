"""What one run uses, phase by phase: the runner's timing points (worker/runner.py) and the usage they add up to.

The runner names the phase it enters; the meter keeps the seconds of each, the denoising steps done, and hands the
usage so far to every record write, so a run that fails or is cancelled midway leaves what it used until then.
The pipeline's own figures for text encoding, denoising and decoding (timed between device synchronisations)
replace the meter's once a generation returns them.
"""

from __future__ import annotations

import time

from service.contract.record import JobRecord
from service.contract.schemas import VideoUsage
from service.contract.usage import PHASES, combined
from worker.stats import GenerationStats


class Meter:
    def __init__(self, rec: JobRecord) -> None:
        self.earlier = rec.usage  # what earlier runs of the video used (one lost with its worker)
        self.megavoxels = rec.megavoxels
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.steps_resumed = 0
        self._phase: str | None = None
        self._since = 0.0

    def enter(self, phase: str | None) -> None:
        """End the phase running now, and start `phase` (None: the run's work is over)."""
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] += now - self._since
        self._phase, self._since = phase, now

    def measured(self, stats: GenerationStats) -> None:
        """The pipeline's synchronised figures of the generation that just returned."""
        self.seconds.update(text_encode=stats.text_encode_s, denoise=stats.denoise_s, decode=stats.decode_s)
        self.steps = stats.steps
        self.steps_resumed = stats.resumed_from_step
        self._phase = None  # the decode that was open is in the figures now

    def usage(self) -> VideoUsage:
        """The video's usage now: earlier runs' plus this run's, the phase in progress counted until now."""
        seconds = dict(self.seconds)
        if self._phase is not None:
            seconds[self._phase] += time.perf_counter() - self._since
        run = VideoUsage(
            steps=self.steps,
            steps_resumed=self.steps_resumed,
            megavoxels=self.megavoxels,
            **{f"{phase}_seconds": round(s, 6) for phase, s in seconds.items()},
        )
        return combined(self.earlier, run)
