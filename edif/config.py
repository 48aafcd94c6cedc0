"""Process-wide settings shared by every eDIF component, read once from `EDIF_*` variables.

Components read their own settings classes (broker, agent) built the same way; this module
holds what all of them share, chiefly `EDIF_HOME`, the folder for keys, demo models and state.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDIF_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".edif")

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def edif_home() -> Path:
    """The resolved `$EDIF_HOME` (default `~/.edif`)."""
    return CommonSettings().home.expanduser()
