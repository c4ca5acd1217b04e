"""Reference Files API server (``syncd serve``), installed with the ``[server]`` extra."""

from syncd.server.runner import RunningServer, running_server, serve
from syncd.server.settings import ServerSettings
from syncd.server.stats import ServerStats

__all__ = ["RunningServer", "ServerSettings", "ServerStats", "running_server", "serve"]
