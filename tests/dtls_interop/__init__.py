"""perc's DTLS 1.2 engine against OpenSSL, a lossy network and hostile input.

* ``openssl_peer.py``: pyOpenSSL over memory BIOs with perc's sans-IO surface;
  ``harness.py``: ``pump`` (clean in-memory network) and ``EnginePeer``;
  ``netsim.py``: seeded lossy network under a fake clock; ``engine.py``: builders for perc's
  engine (EKT-sending server, server behind a CookieGate).
* ``test_openssl_harness.py``, ``test_netsim.py``: self-checks of the adapter and simulator.
* ``test_interop.py``, ``test_interop_loss.py``: perc vs OpenSSL, both directions.
* ``test_lossy.py``, ``test_ekt_rekey.py``: engine pairs over the lossy network, with EKTKey.
* ``test_robustness.py``: garbage, truncation, replays, wrong epochs, floods.

The speed comparison with pyOpenSSL is ``bench/dtls_handshake.py``.
"""
