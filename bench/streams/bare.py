"""The baseline: a bare aiokafka consume -> produce loop, no decoding, no state, one out per in.

``python -m bench.streams.bare BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP``; stops on SIGTERM.
Same shape as the streams worker's loop (batch, send, wait for acks=all, commit), minus Faust,
the codec, the decision and the state table.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def loop(bootstrap: str, source: str, sink: str, group: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            futures = [await producer.send(sink, r.value, key=r.key) for records in batches.values() for r in records]
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(loop(*sys.argv[1:5]))
