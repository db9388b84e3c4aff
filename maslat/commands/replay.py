"""maslat replay: replay a measured vLLM run through the simulator and compare (``traces.commands``)."""

from traces.commands import REPLAY_DESCRIPTION as DESCRIPTION
from traces.commands import REPLAY_HELP as HELP
from traces.commands import configure_replay as configure
from traces.commands import run_replay as run

__all__ = ["DESCRIPTION", "HELP", "configure", "run"]
