"""Training a victim with REFINE's adaptive attack: :class:`~lightning_defense.training.VictimTask`
with the loss of :mod:`.torch_model`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_defense.attacks.refine_adaptive.torch_model import RefineSimulation
from lightning_defense.defenses.components import TransformNet
from lightning_defense.errors import ConfigurationError
from lightning_defense.training.victim_task import VictimTask
from lightning_defense.victims.victim_file import VictimMetadata, load_victim


class RefineAdaptiveVictimTask(VictimTask):
    """Trains a victim that knows REFINE is coming (REFINE paper, §5.4): the DataModule's attack
    poisons the data as usual (``BadNets`` in the paper's table), and the loss is
    L_b + γ·L_refine with the attacker's own T_a and M_a (see
    :class:`~lightning_defense.attacks.refine_adaptive.RefineSimulation`).

    The victim file records the DataModule's attack, so a defense evaluates the victim on that
    trigger as on any other; T_a and M_a are the attacker's and are not saved.

    Args:
        gamma: γ, the weight of L_refine.
        attacker_seed: draws T_a's initial weights and M_a. A defender's REFINE draws its M from
            its own ``permutation_seed``: use a different value there (the configs do) for the
            paper's setting, where the attacker cannot know the defender's draw.
        transform_encoder_name, transform_encoder_depth, transform_decoder_channels: T_a, a
            :class:`~lightning_defense.defenses.TransformNet` shaped like REFINE's T (the
            defaults are ``configs/refine.yaml``'s), left at its random initialization.
        backdoored_victim: a victim file to fine-tune (the paper's attacker fine-tunes its
            backdoored model with L_adap); ``None`` trains from scratch. Read as weights only; its
            architecture must be ``arch``.

    The other arguments are :class:`~lightning_defense.training.VictimTask`'s.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        attacker_seed: int = 1,
        transform_encoder_name: str = "resnet18",
        transform_encoder_depth: int = 4,
        transform_decoder_channels: Sequence[int] = (128, 64, 32, 16),
        backdoored_victim: str | None = None,
        **kwargs: Any,
    ) -> None:
        # the network, data and optimizer settings are VictimTask's, with the same defaults
        super().__init__(**kwargs)
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):  # T_a's draw depends on attacker_seed alone
            torch.manual_seed(attacker_seed)
            transform_net = TransformNet(
                transform_encoder_name,
                transform_encoder_depth,
                transform_decoder_channels,
                in_channels=len(self.hparams.mean),
            )
        self.refine_simulation = RefineSimulation(transform_net, self.hparams.num_classes, attacker_seed, gamma)
        if backdoored_victim is not None:
            self.start_from(backdoored_victim)

    def start_from(self, victim_file: str) -> None:
        """Fine-tune the network of ``victim_file`` (weights only) instead of training from scratch."""
        source = load_victim(victim_file, num_classes=self.hparams.num_classes)
        if source.arch != self.hparams.arch:
            raise ConfigurationError(
                f"backdoored_victim {victim_file!r} is a {source.arch} but model.init_args.arch is "
                f"{self.hparams.arch!r}: set arch: {source.arch}."
            )
        for name in ("mean", "std"):  # buffers: loading would replace the configured ones unseen
            stored, configured = getattr(source, name).flatten().tolist(), list(self.hparams[name])
            if not torch.allclose(torch.tensor(stored), torch.tensor(configured, dtype=torch.float32)):
                raise ConfigurationError(
                    f"backdoored_victim {victim_file!r} normalizes with {name} {stored} but model.init_args.{name} "
                    f"is {configured}: set {name}: {stored}."
                )
        self.classifier.load_state_dict(source.state_dict())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.channels_last:
            self.refine_simulation.to(memory_format=torch.channels_last)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        losses = self.refine_simulation.loss(self, images, labels)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return losses["loss"]

    def victim_metadata(self) -> VictimMetadata:
        """The victim file's facts, with a note of the adaptive training (T_a and M_a are not saved)."""
        metadata = super().victim_metadata()
        hp = self.hparams
        metadata.extra = {**metadata.extra, "refine_adaptive": {"gamma": hp.gamma, "attacker_seed": hp.attacker_seed}}
        return metadata
