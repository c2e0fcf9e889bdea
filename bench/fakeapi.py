"""The simulated ZenMux API in its own process, preloaded with billed generations for the resolve workload.

    python -m bench.fakeapi --port P --preload N --ids-out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

from exporter.simulate.api import SimConfig, SimulatedZenMux, serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--preload", type=int, default=0, help="generations created (already billed) at start")
    parser.add_argument("--ids-out", type=Path, help="where the preloaded ids are written, one a line")
    args = parser.parse_args()

    async def run() -> None:
        sim = SimulatedZenMux(SimConfig(billing_delay_seconds=0.0))
        created = time.time() - 3600
        ids = [sim.create(created_at=created)["generationId"] for _ in range(args.preload)]
        if args.ids_out is not None:
            args.ids_out.write_text("".join(i + "\n" for i in ids))
        server = await serve(sim, "127.0.0.1", args.port)
        print(f"ready {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await server.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
