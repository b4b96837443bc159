"""`munet bench quality`'s settings: the tasks, the split caps, the budget every method gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_TASKS = ["mnist", "fashion_mnist", "animal_shapes", "uci_digits", "emoji_noto"]
OPTIONAL_TASKS = ["emoji_subgroups"]  # added to the default list when load_builtin knows it
QUICK_TASKS = ["uci_digits", "animal_shapes"]
METHODS = ("probe", "finetune", "munet")
METHOD_NAMES = {"probe": "linear probe", "finetune": "full fine-tune", "munet": "munet-serve"}
# splits for data sets without their own (fractions of the whole set), stratified by label
VAL_FRACTION, TEST_FRACTION = 0.15, 0.2
LONG_BUDGET_S = 3600.0  # per candidate: the step cap, not the clock, ends training


@dataclass
class Settings:
    tasks: list[str] = field(default_factory=list)  # empty: the default list (+ optional ones present)
    max_train: int = 4000
    max_val: int = 1000
    max_test: int = 2000
    seed: int = 0
    budget: int = 24000  # examples processed per task and method (fine-tuning: all learning rates together)
    ft_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-4])
    ft_batch: int = 64
    ft_weight_decay: float = 0.05
    ft_evals: int = 3  # validation evaluations per fine-tuning run (the best one is kept, as munet does)
    # two generations of one candidate: each candidate trains as long as one fine-tuning run (the
    # budget / 2 each, as fine-tuning's two learning rates), and the second builds on the first.
    # Measured (README, quality): 3 x 2 candidates of 31 steps -3.56 points against fine-tuning on
    # animal_shapes + uci_digits, 1 x 2 of 94 steps -1.66, 2 x 1 of 94 steps (with clone_span) -1.11.
    generations: int = 2
    candidates: int = 1
    train_batch: int = 64  # munet's train_batch_size
    head_epochs: int = 30  # munet's head_train_epochs, also the probe's
    identity_inputs: int = 64  # fixed inputs per task for the bit-identity check (<= max_batch_size)
    threads: int = 2
    root: str = "mobilenet_v2_imagenet"  # a built-in root, or one imported into MUNET_HOME
    image_size: int = 0  # 0: the root's CPU input size
    out_dir: str | None = "bench-results"
    keep: bool = False
    verbose: bool = False
    json_out: bool = False  # print JSON instead of markdown
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"tasks": list(QUICK_TASKS), "max_train": 200, "max_val": 100, "max_test": 200,
                                  "budget": 640, "generations": 1, "candidates": 2, "head_epochs": 10,
                                  "identity_inputs": 32, "ft_evals": 2, "quick": True}
        values.update(overrides)
        return cls(**values)

    @property
    def ft_steps(self) -> int:
        """Steps per fine-tuning run: the budget split evenly over the learning rates."""
        return max(1, round(self.budget / len(self.ft_lrs) / self.ft_batch))

    @property
    def munet_steps(self) -> int:
        """munet's candidate_max_steps: generations x candidates x steps x batch ~= budget."""
        return max(5, round(self.budget / (self.generations * self.candidates * self.train_batch)))
