"""The event agent: libvirt lifecycle events, device events, file changes -> one queue -> reconcile.

``daemon.Agent`` is the loop; each source lives in its own module and only posts events.
"""

from janus_hooks.agent.daemon import Agent, AgentOptions

__all__ = ["Agent", "AgentOptions"]
