"""Child process of the kill-during-write test (tests/test_state_kill.py); not a test itself.

Usage: ``python state_writer.py STATE KEY ASSOCIATION_UUID SEED``

Opens the state, resumes every stored association at its stored ceiling (D29), then as fast
as it can issues SPIs, reserves and "uses" sequence numbers (refreshing the association's
sealed record state as the KMF does), adds and removes associations, appends audit rows, and
runs rekey batches (SPI + EKTKey + audit row in one transaction). Each line goes to stdout
only after the write it reports has committed, so every line the parent reads is a promise
the state must keep after a SIGKILL:

    opening                about to open (or create) the state
    open                   the state opened
    spi SPI COUNTER        an SPI was issued (its counter is durable)
    seq N                  record number N of the main association was used (reserved)
    aseq AID N             record number N of association AID was used (reserved)
    assoc AID              association AID is stored (from record number 1)
    gone AID               association AID's row is deleted
    audit SEQ              audit row SEQ is written
"""

from __future__ import annotations

import random
import sys
import uuid

from perc.state import KmfState, load_state_key

CONFERENCE = "kill"


def main() -> None:
    path, key_path, aid_text, seed = sys.argv[1:5]
    rng = random.Random(int(seed))
    aid = uuid.UUID(aid_text)
    out = sys.stdout
    key = load_state_key(key_path)
    out.write("opening\n")
    out.flush()
    state = KmfState(path, key)
    out.write("open\n")
    out.flush()
    row = state.association(aid)
    if row is None:
        state.add_association(
            aid,
            mdd_fingerprint="mdd",
            conference=CONFERENCE,
            peer_fingerprint="peer",
            tls_id=None,
            profile=9,
            ekt_cipher=1,
            record_state=rng.randbytes(64),
            next_seq=1,
        )
        next_seq = 1
    else:
        # D29: after a restart sending resumes at the stored ceiling.
        next_seq = row.seq_ceiling
    # The other associations of earlier lives resume at their ceilings too.
    others = {
        r.association_id: r.seq_ceiling for r in state.associations() if r.association_id != aid
    }
    while True:
        r = rng.random()
        if r < 0.3:
            spi = state.next_spi(CONFERENCE)
            out.write(f"spi {spi} {state.spi_counter(CONFERENCE)}\n")
        elif r < 0.5:
            state.reserve_seq(aid, next_seq)
            out.write(f"seq {next_seq}\n")
            next_seq += rng.randrange(1, 700)
        elif r < 0.62 and others:
            other = rng.choice(sorted(others))
            n = others[other]
            state.reserve_seq(other, n, record_state=rng.randbytes(48))
            out.write(f"aseq {other} {n}\n")
            others[other] = n + rng.randrange(1, 700)
        elif r < 0.67 and len(others) < 4:
            new = uuid.UUID(int=rng.getrandbits(128))
            state.add_association(
                new,
                mdd_fingerprint="mdd",
                conference=CONFERENCE,
                peer_fingerprint=f"peer-{new}",
                tls_id="t",
                profile=9,
                ekt_cipher=1,
                record_state=rng.randbytes(48),
                next_seq=1,
            )
            others[new] = 1
            out.write(f"assoc {new}\n")
        elif r < 0.7 and others:
            gone = rng.choice(sorted(others))
            state.remove_association(gone)
            del others[gone]
            out.write(f"gone {gone}\n")
        elif r < 0.85:
            seq = state.append_audit("join", conference=CONFERENCE, name=f"n{next_seq}")
            out.write(f"audit {seq}\n")
        else:
            with state.batch():
                spi = state.next_spi(CONFERENCE)
                state.set_ekt_key(CONFERENCE, spi, rng.randbytes(32))
                seq = state.append_audit("rekey", conference=CONFERENCE, spi=spi)
            out.write(f"spi {spi} {state.spi_counter(CONFERENCE)}\naudit {seq}\n")
        out.flush()


if __name__ == "__main__":
    main()
