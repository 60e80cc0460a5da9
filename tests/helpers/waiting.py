"""Polling for a condition a test waits on (a checkpoint written, a step logged)."""
import time


def wait_for(predicate, timeout: float, what: str, every: float = 0.2) -> None:
    """Return once predicate() holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
