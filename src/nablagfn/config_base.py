"""The base of every config class: pydantic, unknown keys refused, values checked on assignment too, finite numbers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Unknown keys are refused, assignments validated, and every number finite (inf and NaN refused, in vectors too)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
