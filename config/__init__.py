"""Settings for the server: CLI flags > environment variables > a TOML file > defaults."""

from trickle.config.settings import ENV_PREFIX, Settings, SettingsError, load_settings

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "load_settings"]
