"""The bundled OHIF viewer: fetched from npm once (:mod:`.install`), served under ``/viewer`` on
the same origin as ``/dicom-web`` (:mod:`.routes`), so the viewer needs no CORS and sends the
gateway's session cookie with every DICOMweb request."""

from __future__ import annotations

from gateway.viewer.install import OHIF_VERSION, install_viewer
from gateway.viewer.routes import VIEWER_PREFIX, viewer_routes

__all__ = ["OHIF_VERSION", "VIEWER_PREFIX", "install_viewer", "viewer_routes"]
