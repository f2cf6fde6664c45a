"""Episode functions that misbehave, loaded by path (``--episode-fn``) in the multi-agent tests."""

from launchers.recipes import coevolve


async def raises_sometimes(ep):
    """The co-evolution episode, except that every third training episode raises."""
    if not ep.evaluation and ep.index % 3 == 2:
        raise RuntimeError(f"episode {ep.index} fails on purpose")
    return await coevolve.episode(ep)
