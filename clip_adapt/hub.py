"""Whether the Hugging Face hub can be reached, asked once and quickly.

huggingface_hub retries a failed request five times with growing waits (about 30 s per file), and every model
and dataset load asks again: without a network, a run spent minutes failing. One connection attempt tells us
instead; when it fails, the process switches to offline mode (HF_HUB_OFFLINE), so that what is cached loads
at once and what is not fails at once with one clear line. HF_HUB_OFFLINE=1 set by the user is honoured as is.
"""

import os
import socket
from functools import cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5


def offline() -> bool:
    import huggingface_hub.constants
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


@cache
def reachable() -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT or huggingface.co), no retries."""
    import huggingface_hub.constants
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


_switched_off = False   # offline because the hub could not be reached, not because the user asked


def go_offline() -> None:
    """Offline mode for the rest of this process (and the processes it starts): the libraries read their
    flag at import, so each module's copy is set too."""
    global _switched_off
    import datasets.config
    import huggingface_hub.constants
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    _switched_off = True


def notice_offline() -> None:
    """Called before anything is loaded from the hub: offline already, or the hub cannot be reached (then say
    so once and go offline); either way, no retries follow."""
    if offline() or reachable():
        return
    print("note: the Hugging Face hub cannot be reached: using the local cache only (offline mode)", flush=True)
    go_offline()


def unavailable(what: str, error: Exception | None = None) -> str:
    """Why `what` could not come from the hub, when it could not. Offline, the hub cannot say whether the name
    exists, so a typo and a missing download read alike: the message says both are possible."""
    if offline() and not _switched_off:
        return (f"{what} is not in the local cache, and offline mode is on (HF_HUB_OFFLINE=1), so the hub was not "
                f"asked; check the name for a typo")
    if offline():
        return (f"{what} is not in the local cache, and the Hugging Face hub cannot be reached to fetch it or to "
                f"check the name (a typo looks the same)")
    return (f"{what} could not be loaded from the Hugging Face hub"
            + (f" ({type(error).__name__})" if error is not None else "") + "; check the name for a typo")
