"""Reading a TOML configuration file, with errors an operator can act on."""

from __future__ import annotations

import tomllib
from pathlib import Path

from hvr_common.pure.errors import ConfigError


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist",
                          hint="pass --config FILE or create the default file") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path} is not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
