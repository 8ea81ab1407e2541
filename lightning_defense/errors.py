"""Errors caused by the user's input. The CLI prints their message alone (no traceback), so each
message must say what is wrong and how to fix it. Set LIGHTNING_DEFENSE_TRACEBACK=1 to see the
traceback anyway."""


class UserInputError(Exception):
    """Bad input from the user: data, checkpoint or configuration."""


class ConfigurationError(UserInputError, ValueError):
    """A setting that cannot work (wrong class count, trigger too large, rate out of range...)."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A data folder or file that is not where the configuration says."""


class UntrustedCheckpointError(UserInputError, ValueError):
    """A checkpoint that is not a plain weights file, or is damaged (contract 3)."""
