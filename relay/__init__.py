"""oneclick-relay: an SMTP relay that makes bulk mail meet the Gmail and Yahoo sender rules."""

__version__ = "0.1.0"
