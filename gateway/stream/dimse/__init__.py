"""A PACS over DIMSE (PS3.7, PS3.4): the source (:mod:`.source`), C-FIND harvest (:mod:`.query`),
C-GET and C-MOVE retrieval (:mod:`.retrieve`, with the C-MOVE Storage SCP in :mod:`.storescp`),
the status checks both share (:mod:`.replies`), the association pool (:mod:`.associations`), the
PDU guard that refuses oversized instances before they are buffered (:mod:`.pduguard`), and the
Instance Availability Notification SCP (PS3.4 Annex R: :mod:`.ianscp`, what a notification says
checked in :mod:`.ian`)."""
