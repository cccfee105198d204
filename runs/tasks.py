"""Which tasks a run learns from its train split: a task whose train labels are all one value (every grade 0,
or one position class only) teaches nothing and its validation numbers only add noise to the monitor.

`plan_tasks` decides once, at the first start, from the train labels: such a task is named, its loss weight
is 0 unless the user set `loss_weights`, and the combined monitor follows the other task alone. The plan
goes into config.json and every checkpoint's data block ("tasks"), and a resumed run keeps its plan, so
its later epochs are judged like the earlier ones and the report says what was decided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cornpipe.runs.config import DEFAULT_LOSS_WEIGHTS, TrainConfig
from cornpipe.shards.discover import format_number

TASKS: tuple[str, ...] = ("position", "grade")  # in loss_weights order


@dataclass(frozen=True)
class TaskPlan:
    constant: tuple[str, ...]  # tasks whose train labels take one value
    loss_weights: tuple[float, float]  # what the loss uses
    weights_from: str  # "default" | "data" (a constant task's weight dropped) | "user"
    monitor_ignores: tuple[str, ...]  # tasks the combined monitor leaves out

    def to_dict(self) -> dict[str, Any]:
        return {"constant": list(self.constant), "loss_weights": list(self.loss_weights),
                "weights_from": self.weights_from, "monitor_ignores": list(self.monitor_ignores)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskPlan:
        return cls(tuple(d["constant"]), tuple(d["loss_weights"]), d["weights_from"],  # type: ignore[arg-type]
                   tuple(d["monitor_ignores"]))


def plan_tasks(loss_weights: tuple[float, float] | None, position: Sequence[int], grade: Sequence[float],
               positions: Sequence[str]) -> tuple[TaskPlan, list[str]]:
    """The plan for train labels `position`/`grade` and the config's `loss_weights` (None: not set by the
    user), and the lines that say what was decided (none when both tasks vary)."""
    values = {"position": sorted(set(int(p) for p in position)), "grade": sorted(set(float(g) for g in grade))}
    constant = tuple(t for t in TASKS if len(values[t]) == 1)
    weights = DEFAULT_LOSS_WEIGHTS if loss_weights is None else tuple(loss_weights)
    weights_from = "default" if loss_weights is None else "user"
    if len(constant) != 1:  # both constant: nothing left to follow; say so and change nothing
        lines = [f"both tasks are constant in the train split ({_describe(values, positions)}): "
                 "the model can learn nothing from it"] if constant else []
        return TaskPlan(constant, weights, weights_from, ()), lines  # type: ignore[arg-type]
    (task,) = constant
    other = TASKS[1 - TASKS.index(task)]
    line = f"{task} is constant in the train split ({_describe(values, positions)}): "
    if loss_weights is None:
        i = TASKS.index(task)
        line += f"its loss weight is 0 (was {format_number(weights[i])})"
        weights = tuple(0.0 if j == i else w for j, w in enumerate(weights))
        weights_from = "data"
    else:
        line += f"loss weights {','.join(format_number(w) for w in weights)} as given"
    line += ("; the combined monitor uses position macro-F1 alone" if other == "position"
             else "; the combined monitor uses the grade MAE alone (negated)")
    return TaskPlan(constant, weights, weights_from, (task,)), [line]  # type: ignore[arg-type]


def _describe(values: dict[str, list], positions: Sequence[str]) -> str:
    parts = []
    if len(values["grade"]) == 1:
        parts.append(f"every grade is {format_number(values['grade'][0])}")
    if len(values["position"]) == 1:
        parts.append(f"every image is {positions[values['position'][0]]}")
    return ", ".join(parts)


def run_tasks(cfg: TrainConfig, samples: Sequence[dict], train_ids: Sequence[int] | None,
              saved: dict[str, Any] | None, positions: Sequence[str]) -> tuple[TrainConfig, TaskPlan, list[str]]:
    """(the config with the loss weights used, the plan, lines to print) of a run over manifest `samples`,
    trained on `train_ids` (None: the convert-time train split). A resumed run (`saved`: its checkpoint's
    data block) keeps its plan; one from before plans existed ignores nothing, as it did."""
    if saved is not None:
        # `cornpipe cv` resumes with its own config, where loss_weights may still be None
        plan = (TaskPlan.from_dict(saved["tasks"]) if "tasks" in saved
                else TaskPlan((), cfg.loss_weights or DEFAULT_LOSS_WEIGHTS, "user", ()))
        return dataclasses.replace(cfg, loss_weights=plan.loss_weights), plan, []
    wanted = None if train_ids is None else set(int(i) for i in train_ids)
    train = [s for s in samples if (s["split"] == "train" if wanted is None else int(s["id"]) in wanted)]
    plan, lines = plan_tasks(cfg.loss_weights, [s["position"] for s in train], [s["grade"] for s in train],
                             positions)
    return dataclasses.replace(cfg, loss_weights=plan.loss_weights), plan, lines
