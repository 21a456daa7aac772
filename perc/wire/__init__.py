"""Pure codecs for every untrusted byte format perc reads: no I/O, no state.

Each format has one module and one documented error type, all subclasses of
:class:`perc.wire.errors.DecodeError`. A decoder given untrusted bytes raises that type and
nothing else (property tests feed every decoder garbage and every truncation to prove it).
"""
