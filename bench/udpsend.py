"""A paced UDP sender, run as its own process: `python -m bench.udpsend PORT RATE SECONDS IDS_PER_DATAGRAM PREFIX`.

Sends RATE datagrams a second (in 1 ms bursts) for SECONDS, each with IDS_PER_DATAGRAM unique plain ids,
and prints `sent elapsed` on stdout.
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    port, rate, seconds, per, prefix = (
        int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    send = sock.send
    total = int(rate * seconds)
    tick = 0.001
    per_tick = rate * tick
    sent = 0
    counter = 0
    started = time.perf_counter()
    while sent < total:
        due = min(int((time.perf_counter() - started) / tick * per_tick) + 1, total)
        while sent < due:
            if per == 1:
                payload = f"{prefix}{counter:012x}".encode()
                counter += 1
            else:
                payload = "\n".join(f"{prefix}{counter + k:012x}" for k in range(per)).encode()
                counter += per
            send(payload)
            sent += 1
        pause = started + (sent / per_tick) * tick - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.perf_counter() - started
    print(sent, elapsed, flush=True)


if __name__ == "__main__":
    main()
