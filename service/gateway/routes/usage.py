"""/v1/usage: what the calling key's videos used, for the operator's billing and the key's own budget."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query

from service.contract import usage
from service.contract.problems import InvalidParameter
from service.contract.schemas import UsageReport
from service.gateway.deps import OwnerDep, SettingsDep, StoreDep
from service.gateway.errors import responses

router = APIRouter(prefix="/v1", tags=["usage"])

# 2099-12-31T23:59:59Z: far enough for any range, and the day after it is still a date Python can name.
LAST_SECOND = 4_102_444_799


@router.get("/usage", response_model=UsageReport, responses=responses(400, 401, 429, 503))
def get_usage(
    owner: OwnerDep,
    store: StoreDep,
    settings: SettingsDep,
    start: Annotated[int, Query(ge=0, le=LAST_SECOND, description="From this unix time (seconds).")],
    end: Annotated[int | None, Query(ge=0, le=LAST_SECOND, description="Until this unix time; now if unset.")] = None,
) -> UsageReport:
    """Your key's totals over the UTC days that [start, end) touches: videos completed and failed, seconds per
    phase (text encoding, denoising and decoding on the GPU; encoding and upload), denoising steps run and
    resumed, megavoxels. A video counts on the day it finished. Another key's videos never count here."""
    stop = int(time.time()) if end is None else end
    if stop <= start:
        raise InvalidParameter(f"end ({stop}) must be after start ({start}).", param="end")
    days = settings.usage_retention_days
    if stop - start > days * 86400:
        raise InvalidParameter(
            f"The range may span at most {days} days, as long as daily totals are kept.", param="start"
        )
    return usage.totals(store.r, owner, start, stop)
