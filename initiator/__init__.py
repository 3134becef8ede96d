"""RFC 7143 iSCSI initiator: a sans-I/O protocol core plus one asyncio transport.

The protocol modules (``pdu``, ``keys``, ``text``, ``chap``, ``login``, ``session``, ...) never
touch a socket, a file or the clock: they take bytes and ``now`` and return PDUs, events and
deadlines. ``transport`` adapts them to asyncio. ``initiator`` imports nothing from
``tcmu_handler`` or ``hba``.
"""
