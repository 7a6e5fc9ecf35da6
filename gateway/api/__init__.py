"""HTTP outside DICOMweb: the access middleware around every request, the answers to errors, and
the JSON API, one module per concern (study links, grants, hidden studies, emergency access, the
access history, IHE Invoke Image Display), each with its ``ROUTES`` for ``gateway.app``."""
