"""Qualcomm's side: the chipsets, the QNN EP's session options, compiling parts into weight-shared
context binaries, reading and renaming them, the Genie files, Genie itself on this host, and
``verify`` (the binaries on the HTP simulator against the QDQ parts)."""
