"""Every shipped config runs, shortened to one training step and one evaluation batch, on a fresh
clone: the embedded ones on the package's own data, the others on fixture data of the layouts they
read (CIFAR-10, GTSRB, Tiny-ImageNet, the external set) under $LIGHTNING_DEFENSE_DATA.

Where a config defends the result of another run by design (FT+REFINE defends FT's repaired victim,
the papers' settings and the Tiny-ImageNet defense layers defend victims trained by other configs),
that run comes first, shortened too, as its header says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_image_folder
from test_cli import LAYER_BASES, SHIPPED

from lightning_defense.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHORT = [
    "--trainer.max_steps", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "4",
]  # fmt: skip
TEST_TIME = ("ShrinkPad", "BDMAE")  # nothing to train: `lightning validate`
#: runs a config needs first, shortened: (config, its extra arguments, what the config then gets)
FIRST = {
    # the papers' settings defend the ResNet-18 victim of the GPU recipe
    **{
        full: ("victims/cifar10_badnets_resnet18.yaml", [], [])
        for full in ("refine_full.yaml", "btidbf_p_full.yaml", "btidbf_u_full.yaml")
    },
    "refine/after_finetune.yaml": ("finetune.yaml", ["--trainer.logger.init_args.name", "ft_for_refine"], []),
    "tinyimagenet/defense.yaml": (
        "victims/tinyimagenet50_badnets.yaml",
        [],
        ["--model.init_args.victim", "runs/tinyimagenet50_badnets/version_0/victim.safetensors"],
    ),
    "tinyimagenet/defense_224.yaml": (
        "victims/tinyimagenet50_224_badnets_resnet50.yaml",
        [],
        ["--model.init_args.victim", "runs/tinyimagenet50_224_badnets_resnet50/version_0/victim.safetensors"],
    ),
}
#: settings a config needs beyond SHORT
MORE = {"victims/cifar10_iad.yaml": ["--data.init_args.batch_size", "20"]}  # IAD poisons 10% of every batch
#: parsed by test_cli.py::test_every_shipped_config_parses, but not runnable on one CPU
NOT_HERE = {"scaling/multinode.yaml": "2 nodes x 4 GPUs"}


@pytest.fixture(scope="module")
def data_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("data_home")
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_image_folder(home / "cifar10-jpeg" / "train", cifar, 20)
    write_image_folder(home / "cifar10-jpeg" / "test", cifar, 2)
    signs = [f"{k:05d}" for k in range(43)]
    write_image_folder(home / "gtsrb32" / "train", signs, 20)
    write_image_folder(home / "gtsrb32" / "test", signs, 1)
    wnids = [f"n{k:08d}" for k in range(50)]
    write_image_folder(home / "tinyimagenet64" / "train", wnids, 10, size=64)
    write_image_folder(home / "tinyimagenet64" / "val", wnids, 1, size=64)
    write_image_folder(home / "tinyimagenet32" / "train", wnids[:5], 10)
    return home


def command(config: Path, extra: list[str]) -> list[str]:
    """Layers under configs/<defense>/ go on that defense's embedded default (as in test_cli.py)."""
    whole = "class_path" in (yaml.safe_load(config.read_text()).get("data") or {})
    base = None if whole else LAYER_BASES.get(config.parent.name)
    configs = [CONFIGS / base, config] if base else [config]
    model = next(
        yaml.safe_load(c.read_text())["model"]["class_path"]
        for c in configs
        if "class_path" in yaml.safe_load(c.read_text()).get("model", {})
    )
    subcommand = "validate" if model in TEST_TIME else "fit"
    return [subcommand, *(arg for c in configs for arg in ("--config", str(c))), *SHORT, *extra]


def name(config: Path) -> str:
    return config.relative_to(CONFIGS).as_posix()


@pytest.mark.parametrize("config", SHIPPED, ids=name)
def test_every_shipped_config_runs_shortened(config, data_home, tmp_path, monkeypatch):
    if name(config) in NOT_HERE:
        pytest.skip(f"needs {NOT_HERE[name(config)]}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    monkeypatch.setenv("LIGHTNING_DEFENSE_DATA", str(data_home))
    extra = []
    if name(config) in FIRST:
        first, first_args, extra = FIRST[name(config)]
        main(command(CONFIGS / first, first_args))
    main(command(config, [*extra, *MORE.get(name(config), [])]))
    assert list((tmp_path / "runs").rglob("config.yaml")), "no run folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing outside its run folder
