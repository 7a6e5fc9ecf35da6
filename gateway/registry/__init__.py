"""The index: every instance's QIDO columns, DICOM JSON and locations, in SQLite or PostgreSQL
(:mod:`.database`, :mod:`.schema`). The registry (:mod:`.store`) is the only place that speaks
SQL to it: QIDO compiled to SQL (:mod:`.qido`, :mod:`.search`), harvest's writes (:mod:`.writes`,
:mod:`.arbitration` between copies), and harvest itself (:mod:`.harvest`), which reads sources
through their contract and turns headers into records (:mod:`.record`)."""
