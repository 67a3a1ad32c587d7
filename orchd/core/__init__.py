"""The sans-IO core: pure decisions with time passed in. No sockets, no asyncio, no clocks."""
