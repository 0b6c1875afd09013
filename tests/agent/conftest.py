"""The agent on fake host trees, driven by real event sources: libvirt's test:///default driver (real
lifecycle events from a second connection), real processes followed by pidfd, real inotify on real files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator

import pytest

from janus_hooks.agent import Agent, AgentOptions
from janus_hooks.agent.desktop import DesktopNotifier
from janus_hooks.agent.sdnotify import SdNotify
from janus_hooks.host import Host

TEST_URI = "test:///default"


class Running:
    """An agent running on its own asyncio loop in a thread; the test talks to it thread-safely."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = asyncio.new_event_loop()
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stopping = asyncio.Event()
            await self.agent.run(self.stopping)

        try:
            self.loop.run_until_complete(main())
        except BaseException as err:  # noqa: BLE001 - shown by stop()
            self.error = err

    def start(self, timeout: float = 20.0) -> Running:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout * 100)):
            if self.agent.ready.is_set() or self.error:
                break
            deadline.wait(0.01)
        assert self.agent.ready.is_set(), f"the agent did not get ready: {self.error!r}"
        return self

    def call(self, fn, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def idle(self, timeout: float = 20.0) -> None:
        self.call(lambda: self.agent.idle(timeout), timeout + 5)

    def post(self, event: object) -> None:
        self.agent.post(event)

    def stop(self, timeout: float = 20.0) -> None:
        if self.stopping is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not stop"
        if self.error:
            raise self.error


@pytest.fixture
def run_agent(caplog) -> Iterator:
    """Factory: ``run_agent(fake_host, **options)`` -> a started Running agent; stopped at the end."""
    caplog.set_level(logging.INFO, logger="janus_hooks")
    started: list[Running] = []

    def start(h, notifier_runner=None, sd: SdNotify | None = None, make_udev=None, **options) -> Running:
        opts = dict(uri=TEST_URI, udev=None, release_grace=0.05, retry_max=0.2, debounce=0.05)
        opts.update(options)
        host = Host(h.root, h.kernel)
        agent = Agent(host, AgentOptions(**opts), lambda config: h.janus(restoring=True),
                      notifier=DesktopNotifier(host, notifier_runner or h.runner), sd=sd or SdNotify({}),
                      make_udev=make_udev)
        running = Running(agent).start()
        started.append(running)
        return running

    yield start
    for running in started:
        with contextlib.suppress(AssertionError):
            running.stop()


@pytest.fixture
def test_driver():
    """A second connection to libvirt's test driver: destroying/creating its VM 'test' emits real events."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(TEST_URI)
    dom = conn.lookupByName("test")
    if not dom.isActive():
        dom.create()
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        if not dom.isActive():
            dom.create()
    conn.close()
