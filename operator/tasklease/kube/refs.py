"""References to API objects, free of any client library (the reconciler uses them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """What an Event needs of the Task it is about: a few strings, not the whole body (Events
    wait for their own budget, and a burst of them must not hold a burst of Tasks)."""

    namespace: str
    name: str
    uid: str | None = None
    resource_version: str | None = None

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> ObjectRef:
        return cls(
            namespace=str(metadata.get("namespace", "default")),
            name=str(metadata.get("name", "")),
            uid=metadata.get("uid"),
            resource_version=metadata.get("resourceVersion"),
        )
