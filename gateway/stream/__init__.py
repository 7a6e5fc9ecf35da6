"""The sources and their one contract (:mod:`.source`): a folder (:mod:`.folder`), a PACS over
DICOMweb (:mod:`.dicomweb_pacs`, held to its origin by :mod:`.origin`), a PACS over DIMSE
(:mod:`.dimse`), an in-memory source for tests (:mod:`.memory`), and federation over several
locations of one instance (:mod:`.federation`). Sources know the codecs, never the index."""
