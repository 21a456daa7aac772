"""SRTP layer: AES-GCM SRTP/SRTCP (RFC 7714), double encryption (RFC 8723), EKT (RFC 8870).

This package ``__init__`` deliberately imports nothing. The Media Distributor imports
``perc.srtp.context`` and ``perc.srtp.hop`` only, and must never load the module that unwraps
EKT tags (``perc.srtp.ekt``); an import here would defeat that split (RFC 8871 §4.1).
"""
