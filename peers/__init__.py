"""Real peers on loopback for tests and benchmarks: the gateway itself, Orthanc, DCMTK.

Each is started on free ports with its own configuration and storage in a temporary directory,
waited for until it answers, and stopped (then killed if need be) when the caller is done.
"""
