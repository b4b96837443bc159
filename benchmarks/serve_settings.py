"""`munet bench serve`'s settings: the measurement windows, the load, the tasks, the promotion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Settings:
    duration_s: float = 8.0  # measurement window per row
    warmup: int = 5  # requests (or runs) per client before the window
    client_procs: int = 2  # processes generating concurrent load
    inflight: int = 8  # requests each of them keeps in flight (procs x inflight = concurrency)
    tasks: int = 10
    max_examples: int = 300  # per registered task (uci_digits)
    big_batch: int = 64
    promotion_rate: float = 100.0  # requests/s, all clients together, during the promotion
    promotion_budget_s: float = 4.0  # seconds of training for the one candidate
    promotion_pre_s: float = 6.0  # steady load before the trigger: the "evolution idle" latencies
    promotion_post_s: float = 2.0  # and after the promotion returned
    restart_memory: bool = True  # also restart the server on its 10-task store and measure RSS once more
    request_timeout_s: float = 30.0
    root: str = "mobilenet_v2_imagenet"  # the root every task grows from (`munet roots list`)
    out_dir: str | None = "bench-results"  # None: write nothing
    keep: bool = False  # keep the temporary folder (store, logs, merged model)
    server_env: dict[str, str] = field(default_factory=dict)  # extra MUNET_* for the munet server
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        values = {"duration_s": 1.0, "warmup": 3, "max_examples": 120, "promotion_rate": 60.0,
                  "promotion_budget_s": 1.0, "promotion_pre_s": 0.7, "promotion_post_s": 0.7,
                  "restart_memory": False, "quick": True}
        values.update(overrides)
        return cls(**values)

    @property
    def concurrency(self) -> int:
        return self.client_procs * self.inflight

