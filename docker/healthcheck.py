"""Container probe: exit 0 when ``GET http://127.0.0.1:<port><path>`` answers 200.

Used by the Dockerfile's HEALTHCHECK (``/health/live``) and by compose
(``/health/ready``). ``/health/live`` goes to ``LIVENESS_PORT`` when it is set
(the image sets it): each gunicorn worker answers it there from a thread of
its own, so a busy database cannot fail the probe (lockngen.liveprobe);
every other path goes to ``PORT``. python:3.11-slim has no curl, and starting
Django for a probe every few seconds would cost a second of CPU each time.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health/live"
    port = os.environ.get("PORT", "8000")
    liveness_port = os.environ.get("LIVENESS_PORT", "0").strip() or "0"
    if path.rstrip("/") == "/health/live" and int(liveness_port):
        port = liveness_port
    url = f"http://127.0.0.1:{port}{path}"
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "3"))
    try:
        # The scheme is fixed to http above: no file:// or other schemes.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
