"""DICOMweb over HTTP (PS3.18): the endpoints (:mod:`.endpoints`), the QIDO-RS query parser
(:mod:`.query`) and search answers (:mod:`.search`), WADO-RS retrieval (:mod:`.retrieve`,
:mod:`.metadata`), content negotiation (:mod:`.accept`), streamed responses (:mod:`.streaming`)
and the bounded HTTP/1.1 protocol (:mod:`.protocol`)."""
