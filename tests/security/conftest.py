"""The adversarial suite: attacks on every route where they apply, on both registry backends.

The access fixtures (a gateway with issuers, patients and their studies) are the access suite's.
"""

from tests.access.conftest import ALICE, BOB, CLIENTS, PORTAL, PSC, Site, site  # noqa: F401
