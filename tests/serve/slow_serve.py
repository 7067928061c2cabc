"""`loomlens serve` with every batch slowed down, for the tests that must fill the queue.

Run as the server process: `python tests/serve/slow_serve.py DELAY_MS serve ARGS...`. It
wraps `Service._predict`, the one callable the server's `Batcher` runs for each batch (each
group of equal options in it), so that it sleeps DELAY_MS before predicting, then hands the
remaining arguments to the normal CLI entry point. The sleep lives here, in the tests, so
loomlens itself carries no test hook.
"""

from __future__ import annotations

import sys
import time


def slow_down(delay_ms: float) -> None:
    """Make every batch the server runs take at least `delay_ms` longer."""
    from loomlens.serve.app import Service

    predict = Service._predict

    def slow_predict(self, images, options, deadline, between):
        time.sleep(delay_ms / 1000)
        return predict(self, images, options, deadline, between)

    Service._predict = slow_predict


if __name__ == "__main__":
    slow_down(float(sys.argv[1]))
    sys.argv = [sys.argv[0], *sys.argv[2:]]

    from loomlens.cli import main

    main()
