"""FHIR R4 without I/O: the resources the gateway builds from its index (ImagingStudy with the
Endpoint of its DICOMweb base, searchset Bundles, OperationOutcome) and the search parameters it
understands, as validated ``fhir.resources.R4B`` models. The HTTP layer (``gateway/api/fhir.py``)
reads the index and sends them; nothing here knows where the values came from."""

__all__: list[str] = []
