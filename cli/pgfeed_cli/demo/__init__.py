"""``pgfeed demo``: one writer and two reader processes on one stream, live.

The parent (:func:`run_demo`) migrates, creates the ``demo`` stream and starts
three real OS processes with ``python -m pgfeed_cli.demo writer|reader``:

* the writer appends one row per transaction at ``--rate`` rows/s with
  :func:`pgfeed.append` and takes :func:`pgfeed.commit_token` after each commit;
* reader ``a`` follows the stream with :class:`pgfeed.AsyncReader`, reader
  ``b`` with the sync :class:`pgfeed.Reader` (callback form), both from "now".

Children talk to the parent in JSON lines on their stdout. The parent talks
to them on their stdin; closing a child's stdin tells it to stop, so children
also stop on their own if the parent dies. Children run in their own session:
Ctrl-C reaches only the parent, which then stops them in order (writer first,
then each reader waits for the writer's last token with ``wait_for``), checks
that both readers delivered the same rows in the same order, and exits 0.

The package, one idea a module: :mod:`.show` (the parent: what it prints and
checks), :mod:`.supervisor` (the child processes and signals),
:mod:`.protocol` (the JSON lines between them), :mod:`.order` (the order
check), :mod:`.writer` and :mod:`.readers` (the children's programs) and
:mod:`.child` (their entry point).
"""

from pgfeed_cli.demo.child import child_main
from pgfeed_cli.demo.show import run_demo

__all__ = ["child_main", "run_demo"]
