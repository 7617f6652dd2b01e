"""The user-facing error of raydetect.

:class:`RaydetectError` is raised for mistakes and conditions a user can act on (a bad
setting, a model raydetect cannot run, an engine that cannot run here, a dataset it cannot
read, no room on the cluster, storage that does not answer). Its message is written for the
user; the command line prints it and exits with :attr:`RaydetectError.exit_code` (2; 3 for
storage that did not answer, where re-running the same command resumes). Problems with one
input image or video stay rows (``ImageResult.error``) and never raise.

This module is the lowest floor of the package: it imports nothing from raydetect.
"""

from __future__ import annotations


class RaydetectError(Exception):
    """A user-facing error: the CLI prints ``raydetect CMD: error: <message>`` and exits
    with ``exit_code``."""

    exit_code: int = 2
