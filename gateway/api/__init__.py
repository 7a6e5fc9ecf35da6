"""HTTP outside DICOMweb: the access middleware, the JSON API, study links and IHE IID."""
