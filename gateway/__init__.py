"""Imaging federation gateway: a metadata index over DICOM archives, served as DICOMweb."""

__version__ = "0.1.0"
