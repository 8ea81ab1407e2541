"""Errors caused by the user's input. The CLI prints their message alone (no traceback), so each
message must say what is wrong and how to fix it. Set LIGHTNING_DEFENSE_TRACEBACK=1 to see the
traceback anyway."""


class UserInputError(Exception):
    """Bad input from the user: data, checkpoint or configuration."""

    latest: "UserInputError | None" = None
    """The last one made: older jsonargparse (4.39) keeps only the text of an error raised while it
    instantiates a class of a union (``model: LightningModule | None``), not the error itself."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        UserInputError.latest = self


class ConfigurationError(UserInputError, ValueError):
    """A setting that cannot work (wrong class count, trigger too large, rate out of range...)."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A data folder or file that is not where the configuration says."""


class DataError(UserInputError, ValueError):
    """A data file that is not what its name says (a damaged or non-image file in an image folder)."""


class UntrustedCheckpointError(UserInputError, ValueError):
    """A checkpoint that is not a plain weights file, or is damaged (contract 3)."""


class TrainingDivergedError(UserInputError):
    """The training loss or the trained weights stopped being finite."""


def check_class_count(datamodule: object, num_classes: int, owner: str, fix: str) -> None:
    """Fail before training when the model's and the data's class counts differ.

    ``fix`` may name ``{declared}``, the data's class count.
    """
    declared = getattr(datamodule, "num_classes", None)
    if declared is not None and declared != num_classes:
        raise ConfigurationError(
            f"Class-count mismatch: {owner} has {num_classes} classes but {type(datamodule).__name__} "
            f"has {declared}. {fix.format(declared=declared)}"
        )


def check_non_negative(owner: str, fix: str = "", **values: float | None) -> None:
    """Refuse settings that cannot be below zero (distances, weights, noise levels), naming each."""
    bad = [f"{name} = {value}" for name, value in values.items() if value is not None and not value >= 0]
    if bad:
        raise ConfigurationError(f"{owner}: {', '.join(bad)} must be >= 0. {fix}".rstrip())


def check_probability(owner: str, **values: float) -> None:
    """Refuse probabilities outside [0, 1], naming each."""
    bad = [f"{name} = {value}" for name, value in values.items() if not 0 <= value <= 1]
    if bad:
        raise ConfigurationError(f"{owner}: {', '.join(bad)} must be in [0, 1].")


def check_image_size(size: object, option: str = "image_size") -> tuple[int, int]:
    """``(height, width)``, both positive integers, from a setting."""
    values = tuple(size) if isinstance(size, list | tuple) else ()
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigurationError(f"{option} must be two positive integers (height, width), got {size!r}.")
    return values
