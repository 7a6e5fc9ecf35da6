"""DICOM without I/O: file headers and where their pixels lie (:mod:`.dicomfile`), frame byte maps
(:mod:`.framemap`), re-encoding for web clients (:mod:`.transcode`), multipart/related bodies read
and written (:mod:`.multipart`), DICOM JSON (:mod:`.dicomjson`) and the QIDO attribute catalogue
(:mod:`.attributes`). Everything here takes bytes or datasets and returns values, so it is tested
with byte tables alone."""
