"""A pruning plan: which units of which kind leave, in the original model's numbering.

Plans are plain data (JSON) so they can be saved with a run and replayed on a fresh copy of the model
(Torch-Pruning's ``pruning_history`` idea).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PLAN_KINDS = ("kv_group", "q_head", "mlp", "hidden")
MODEL_WIDE = -1  # the "layer" key of model-wide kinds (hidden channels)


@dataclass
class PrunePlan:
    remove: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # kind -> layer -> unit ids
    blocks: list[int] = field(default_factory=list)  # decoder layers to delete
    meta: dict = field(default_factory=dict)

    def add(self, kind: str, layer: int | None, units) -> None:
        """Remove ``units`` of ``kind`` in ``layer`` (None or any value for the model-wide kinds, block and hidden)."""
        if kind == "block":
            self.blocks = sorted(set(self.blocks) | {int(u) for u in units})
            return
        if kind == "hidden":
            layer = MODEL_WIDE
        if kind not in PLAN_KINDS:
            raise ValueError(f"unknown plan kind {kind!r}")
        if layer is None:
            raise ValueError(f"{kind} units belong to a decoder layer; got layer None")
        cur = set(self.remove.setdefault(kind, {}).get(layer, []))
        self.remove[kind][layer] = sorted(cur | {int(u) for u in units})

    def units(self, kind: str, layer: int | None) -> list[int]:
        if kind == "hidden":
            layer = MODEL_WIDE
        return self.remove.get(kind, {}).get(layer, []) if layer is not None else []

    def is_empty(self) -> bool:
        return not self.blocks and not any(v for per in self.remove.values() for v in per.values())

    def to_dict(self) -> dict:
        return {
            "remove": {k: {str(l): v for l, v in per.items() if v} for k, per in self.remove.items()},
            "blocks": list(self.blocks),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        remove = {k: {int(l): list(v) for l, v in per.items()} for k, per in d.get("remove", {}).items()}
        return cls(remove=remove, blocks=list(d.get("blocks", [])), meta=dict(d.get("meta", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)
