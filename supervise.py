"""supervisord, starting its programs at once: ``python supervise.py -c supervisord.conf``.

supervisord 4.3.0 waits out one full poll (a second) before it starts any
program: a second of every cold start. Supervisor's fix (pull request #1700,
"fix 1 sec delay on start") is merged but not released; this makes the first
poll return at once, which is what the fix does. Delete this file, and run
``supervisord`` again, once a release has the fix.
"""

from supervisor import poller, supervisord


class FirstPollAtOnce(poller.Poller):  # type: ignore[misc]
    """The platform's poller, whose first poll does not wait."""

    waited = False

    def poll(self, timeout: float) -> tuple[list[int], list[int]]:
        timeout, self.waited = (timeout if self.waited else 0), True
        return super().poll(timeout)  # type: ignore[no-any-return]


# supervisord's options make their poller from this name.
poller.Poller = FirstPollAtOnce

if __name__ == "__main__":
    supervisord.main()
