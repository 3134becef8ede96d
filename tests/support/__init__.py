"""Test helpers shared by the host tiers and the kernel tier (usable without pytest fixtures).

- ``targets``: CHAP credentials, the description of a reachable LUN (portal, IQN, LUN, CHAP,
  ``iscsi://`` URL), free loopback ports.
- ``tgtd``: a private tgtd (own control port, own portal) with targets backed by sparse files.
- ``checkout``: imported first by the ``bench/`` scripts, runs them again under the
  checkout's ``.venv/bin/python`` when started by another Python.
"""
