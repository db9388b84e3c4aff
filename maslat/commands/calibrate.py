"""maslat calibrate: fit a serving profile to a measured vLLM run (implemented in ``traces.commands``)."""

from traces.commands import CALIBRATE_DESCRIPTION as DESCRIPTION
from traces.commands import CALIBRATE_HELP as HELP
from traces.commands import configure_calibrate as configure
from traces.commands import run_calibrate as run

__all__ = ["DESCRIPTION", "HELP", "configure", "run"]
