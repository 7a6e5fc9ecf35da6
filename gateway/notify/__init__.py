"""Subscriptions and their delivery: what the change feed announces, told to whom the policy allows.

- ``store``: subscriptions and the durable outbox, in the access database (their SQL).
- ``dispatch``: the feed fanned out into the outbox, consent checked for each subscription's owner
  when an event is queued and again when it is delivered; at-least-once, in order per
  subscription, retried with capped exponential backoff, one node at a time.
- ``resthook``: a FHIR R4 rest-hook notification (a ``history`` Bundle, as the Subscriptions R5
  Backport IG does for R4), POSTed with a deadline and without following redirects.
- ``mllp``: an HL7 v2.5 ORU^R01 over MLLP, acknowledged by an AA.
"""

__all__: list[str] = []
