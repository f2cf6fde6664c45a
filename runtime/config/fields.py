"""The value types the config sections share, and the base every section derives from."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

Pos = Annotated[int, Meta(ge=1)]
NonNeg = Annotated[int, Meta(ge=0)]
PosF = Annotated[float, Meta(gt=0)]
NonNegF = Annotated[float, Meta(ge=0)]
Prob = Annotated[float, Meta(gt=0, le=1)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass
