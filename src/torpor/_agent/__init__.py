"""The agent: a resident torpor that runs CLI commands in warm, pre-forked workers.

Every ``torpor`` command is a new Python process: ~10 ms of interpreter and ~60 ms of imports
(argparse, protobuf, the engine) before any work. The agent pays them once. It keeps spare
workers forked from a process that has imported everything, each already holding a started
``criu swrk`` child; the ``torpor`` launcher (``bin/torpor``) hands its command to one and only
waits. A worker that runs ``run`` or ``restore`` becomes the keeper of what it started (it is
already a detached session leader), and restores through its warm CRIU.

Contract for the rest of torpor:

- :func:`start` / :func:`stop` / :func:`status` (``torpor agent start|stop|status``);
  :func:`serve` runs one in the foreground (``torpor agent run``, for a supervisor);
- files in the home: ``agent.sock`` (the launcher's protocol is in ``bin/torpor``),
  ``agent.pid`` (JSON: pid, start time), ``agent.lock`` (held while an agent serves),
  ``logs/agent.log``, all private to their owner (:func:`start` runs the agent under umask
  077); :func:`stop` signals only the process ``agent.pid`` names if it is a file torpor could
  have written and that process holds the socket bound at ``agent.sock``;
- a worker declines (the command then runs in the client, before anything ran) a client of
  another uid, another installation of torpor, or another ``TORPOR_CRIU``; the master watches
  torpor's sources and the CRIU binary and re-executes itself when they change.
"""

from .._agent_status import AgentStatus as AgentStatus
from .._agent_status import status as status
from ._control import start as start
from ._control import stop as stop
from ._master import serve as serve

__all__ = ["AgentStatus", "serve", "start", "status", "stop"]
