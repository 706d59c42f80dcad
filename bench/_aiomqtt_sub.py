"""Decode-only subscriber for bench/ingest.py, on the same MQTT client as the aggregator
(aiomqtt 2.5, MQTT 3.1.1): ``async for message in client.messages: decode(message.payload)``.

Prints to stdout, one line each: ``ready`` once subscribed; ``progress N`` every 0.5 s;
``done T_FIRST T_LAST N ERRORS`` when ``--expect`` messages have arrived (or on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import aiomqtt

from contract.wire import ProtocolError, decode, subscription
from plumbing.tls import client_context


async def main(args: argparse.Namespace) -> None:
    tls = client_context(args.ca, args.cert, args.key)
    n = errors = 0
    t_first = t_last = 0.0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            print(f"progress {n}", flush=True)

    async with aiomqtt.Client(
        args.host, args.port, identifier=args.client_id, tls_context=tls,
        protocol=aiomqtt.ProtocolVersion.V311, keepalive=args.keepalive, timeout=10,
    ) as client:
        await client.subscribe(subscription("telemetry"), qos=1)
        print("ready", flush=True)
        reporter = asyncio.ensure_future(progress())

        async def consume() -> None:
            nonlocal n, errors, t_first, t_last
            async for message in client.messages:
                try:
                    decode(message.payload)  # type: ignore[arg-type,unused-ignore]
                except ProtocolError:
                    errors += 1
                n += 1
                if n == 1:
                    t_first = time.time()
                if n >= args.expect:
                    t_last = time.time()
                    return

        consumer = asyncio.ensure_future(consume())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consumer, stopper, reporter):
            task.cancel()
        if not t_last:
            t_last = time.time()
    print(f"done {t_first:.6f} {t_last:.6f} {n} {errors}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-id", default="bench-aiomqtt")
    p.add_argument("--keepalive", type=int, default=600)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--profile", default="", help="write a cProfile of the run to this file")
    args = p.parse_args()
    try:
        if args.profile:
            import cProfile

            cProfile.run("asyncio.run(main(args))", args.profile)
        else:
            asyncio.run(main(args))
    except KeyboardInterrupt:
        sys.exit(130)
