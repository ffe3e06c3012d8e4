"""The sans-IO core: command building, reply parsing and the consumer's decisions.

Nothing in this package performs I/O or reads a clock: no redis, no asyncio, no time module.
Drivers (``conveyor.consumer``, ``conveyor.producer``) execute what it builds and feed it the
replies and the current time in milliseconds.
"""
