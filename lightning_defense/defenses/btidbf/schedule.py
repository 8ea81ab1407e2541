"""BTI-DBF's schedule: which phase of which round an epoch belongs to, what trains in it, and with
which optimizer (plain Python, so that the LightningModule's hooks only ask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_defense.errors import ConfigurationError

PhaseName = Literal["pretrain", "mask", "generator", "detect", "defense"]


@dataclass(frozen=True)
class Phase:
    """Where an epoch falls in the schedule: its round (-1 for the pretraining before round 1), its
    phase, and its epoch within the phase."""

    round: int
    name: PhaseName
    epoch: int
    epochs: int

    @property
    def first_epoch(self) -> bool:
        return self.epoch == 0

    @property
    def last_epoch(self) -> bool:
        return self.epoch == self.epochs - 1


class RoundSchedule:
    """The epochs of BTI-DBF's rounds: mask, backdoor generator, one epoch of target detection,
    then the defense (purifier or unlearning), after ``pretrain_epochs`` of pretraining the UNet
    (none by default); the phase of any epoch follows from its number, so an interrupted run
    resumes in the right phase and round."""

    def __init__(
        self, rounds: int, mask_epochs: int, generator_epochs: int, defense_epochs: int, pretrain_epochs: int = 0
    ) -> None:
        counts = {"rounds": rounds, "mask_epochs": mask_epochs, "generator_epochs": generator_epochs}
        for name, value in {**counts, "defense_epochs": defense_epochs}.items():
            if value < 1:
                raise ConfigurationError(f"BTI-DBF's {name} must be >= 1, got {value}.")
        if pretrain_epochs < 0:
            raise ConfigurationError(f"BTI-DBF's pretrain_epochs must be >= 0, got {pretrain_epochs}.")
        self.rounds = rounds
        self.pretrain_epochs = pretrain_epochs
        self.phases: tuple[tuple[PhaseName, int], ...] = (
            ("mask", mask_epochs),
            ("generator", generator_epochs),
            ("detect", 1),
            ("defense", defense_epochs),
        )
        self.round_epochs = sum(epochs for _, epochs in self.phases)
        self.total_epochs = pretrain_epochs + rounds * self.round_epochs

    def at(self, epoch: int) -> Phase:
        if 0 <= epoch < self.pretrain_epochs:
            return Phase(-1, "pretrain", epoch, self.pretrain_epochs)
        round_index, rest = divmod(epoch - self.pretrain_epochs, self.round_epochs)
        if round_index >= self.rounds:
            raise ConfigurationError(f"Epoch {epoch} is past BTI-DBF's {self.total_epochs} epochs.")
        for name, epochs in self.phases:
            if rest < epochs:
                return Phase(round_index, name, rest, epochs)
            rest -= epochs
        raise AssertionError("unreachable")

    def ends_block(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last of the pretraining or of a round: validation follows it."""
        if epoch < self.pretrain_epochs:
            return epoch == self.pretrain_epochs - 1
        return (epoch - self.pretrain_epochs + 1) % self.round_epochs == 0

    def trained_parts(self, phase: PhaseName, pretrain_generator: bool) -> dict[str, bool]:
        """Which of ``mask``, ``generator`` and ``defense`` (purifier or repaired copy) train in
        ``phase``; the pretraining trains the generator's or the defense's UNet."""
        return {
            "mask": phase == "mask",
            "generator": phase == "generator" or (phase == "pretrain" and pretrain_generator),
            "defense": phase == "defense" or (phase == "pretrain" and not pretrain_generator),
        }

    def optimizer_index(self, phase: PhaseName, pretrain_generator: bool) -> int:
        """The optimizer of ``phase``: 0 the mask's, 1 the generator's, 2 the defense's."""
        parts = self.trained_parts(phase, pretrain_generator)
        trained = [i for i, part in enumerate(("mask", "generator", "defense")) if parts[part]]
        if not trained:
            raise ValueError(f"BTI-DBF's {phase!r} phase trains nothing: it has no optimizer.")
        return trained[0]

    def check_resumed(self, saved: tuple[int, str, int], epoch: int) -> None:
        """Refuse a checkpoint whose ``(round, phase, epoch in phase)`` is not where this schedule
        puts its ``epoch``: it was written by a run with other rounds or epochs per phase."""
        phase = self.at(min(epoch, self.total_epochs - 1))
        if tuple(saved) != (phase.round, phase.name, phase.epoch):
            raise ConfigurationError(
                f"The checkpoint was saved in round {saved[0] + 1}, phase {saved[1]!r}, but this "
                f"schedule puts its epoch in round {phase.round + 1}, phase {phase.name!r}: resume "
                "with the rounds and epochs per phase of the run that wrote it."
            )


#: ``train/phase`` in the logs
PHASE_INDEX = {"pretrain": -1, "mask": 0, "generator": 1, "detect": 2, "defense": 3}
