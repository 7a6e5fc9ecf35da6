"""A plain reference for QIDO-RS, to hold the gateway's SQL answers against.

``build_world`` writes a registry through the registry's own write API (``put_instances`` and
``remove_paths`` inside ``registry.transaction()``, with ``registry.ranks``), the way harvests of
several sources do, updates included: instances moving between series, studies and sources, copies,
removals, files that come to hold another instance, patients renamed. Beside it, it keeps a model
of what the registry must then show, by the rules the registry documents
(``gateway/registry/arbitration.py``): a copy's metadata is written when its source holds the
instance alone or has the best priority among its holders; a copy that disagrees (another series)
with one of a better source is a conflict, never a location; an instance goes with its last
location, and keeps the metadata last written while any location remains.

``matching.answer`` then computes what a query must return from that model, in Python, from first
principles: PS3.4 C.2.2.2 matching (single value, ``*`` ``?`` wildcards, UID lists, DA/TM ranges,
universal matching, an attribute absent from the index matched as a zero-length value), person
names case- and accent-insensitive and fuzzy matching as the README documents them (each query
word begins a word of a name component), the INS joining patient IDs across sites, the answer's
order, paging and the Warning header (PS3.18 8.3.4.4), and every returned attribute, computed
counts included. Nothing here calls ``gateway.registry.qido``. ``queries.check`` runs random queries
through the HTTP app and lists each difference.
"""

from tests.qido_reference.matching import Query, answer, counts, view_of
from tests.qido_reference.queries import Report, check, random_query
from tests.qido_reference.world import World, build_world

__all__ = ["World", "build_world", "Query", "answer", "counts", "view_of", "random_query", "check", "Report"]
