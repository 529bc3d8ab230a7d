"""TrainState: where a run stands, everything besides weights and optimizer state that a resumed run
needs to continue exactly. Plain JSON (no torch) so `gridtrain checkpoint inspect` can read it."""
import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    # Optimizer steps completed; the next step to run is step + 1.
    step: int = 0
    # Global samples consumed so far: the data position (the sample order depends only on the seed
    # and this count, so it carries over to any DP size).
    consumed_samples: int = 0
    # Tokens consumed so far (consumed_samples * seq_length for packed data; kept for reporting).
    consumed_tokens: int = 0
    # LR of the last completed step, for reporting: the schedule recomputes it from `step`.
    lr: float = 0.0
    # Running metrics the trainer wants back after a restart (e.g. best validation loss).
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
