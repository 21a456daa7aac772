"""perc: Privacy Enhanced RTP Conferencing (RFC 8871) in Python.

One program, three roles: the Key Distributor (``perc kmf``), the Media Distributor
(``perc mdd``) and the endpoint (``perc endpoint``).
"""

__version__ = "0.1.0"
