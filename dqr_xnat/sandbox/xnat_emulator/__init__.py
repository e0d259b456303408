"""An XNAT 1.8 emulator for tests and the demo: a real HTTP server on 127.0.0.1 (xnat-contract.md §7).

Usage::

    emu = XnatEmulator(tmp_path)            # every file it receives is stored under tmp_path
    emu.add_user("svc", "secret")
    emu.add_project("NEURO01", owner="svc")
    emu.grant("NEURO01", "bob", "collaborator")
    with emu:                               # start() ... stop()
        xnat.connect(emu.url, user="svc", password="secret", no_parse_model=True)
        emu.prearchive_sessions("NEURO01")  # what landed, with the DICOM files on disk
        emu.inject("POST", r"/services/import", status=500)   # next import answers 500
        emu.expire_sessions()               # cookies die; clients must log in again

Or from a shell: ``python -m dqr_xnat.sandbox.xnat_emulator --root DIR --user svc:secret --project P``.
"""

from .emulator import ArchiveRecord, Fault, PrearchiveRecord, RequestRecord, XnatEmulator
from .store import UNASSIGNED, to_label_chars

__all__ = [
    "XnatEmulator",
    "RequestRecord",
    "PrearchiveRecord",
    "ArchiveRecord",
    "Fault",
    "UNASSIGNED",
    "to_label_chars",
]
