"""What a covidct job's output says about a failure: the CLI's exit status and its one ``error:`` line.

``covidct`` (and so each spark-submitted job) prints ``error: <message>`` and exits with
``USER_ERROR_EXIT`` for a user error; the operators and ``make run`` show that message instead of
a traceback.
"""

from __future__ import annotations

#: ``covidct`` exits with 2 for user errors (bad input, undecodable image, missing weights)
#: and when the cluster grants no executor within the bound.
USER_ERROR_EXIT = 2


def job_error_line(lines) -> str | None:
    """The message of the last ``error: ...`` line the job printed (the CLI's one-line message), if any."""
    found = None
    for line in lines or ():
        text = str(line).strip()
        if text.startswith("error: "):
            found = text.removeprefix("error: ").strip()
    return found
